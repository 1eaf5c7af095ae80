import random
import re

import numpy as np
import pytest

from erasekit.world.render import RGB, render
from erasekit.world.vocab import (AXES, BACKGROUNDS, COLOURS, CONCEPTS, SHAPES, TEMPLATES, TEXTURES, Labels,
                                  canonical_of, caption, find_axis)


def test_axes_are_large_enough_and_have_synonyms():
    assert len(SHAPES) >= 8 and len(COLOURS) >= 8 and len(TEXTURES) >= 4 and len(BACKGROUNDS) >= 4
    assert len(TEMPLATES) >= 6
    words = set()
    for axis in AXES:
        for canon, syns in CONCEPTS[axis].items():
            assert len(set(syns)) >= 2, canon
            for w in (canon, *syns):
                assert w not in words, f"{w} is used twice"
                words.add(w)


def test_render_is_deterministic_and_seed_dependent():
    lab = Labels("star", "red", "striped", "grass")
    a, b = render(lab, 3), render(lab, 3)
    assert a.dtype == np.uint8 and a.shape == (32, 32, 3)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, render(lab, 4))
    assert render(lab, 3, size=64).shape == (64, 64, 3)


@pytest.mark.parametrize("axis", AXES)
def test_each_axis_changes_the_image(axis):
    base = Labels("circle", "blue", "solid", "white")
    for value in CONCEPTS[axis]:
        other = Labels(**{**base.as_dict(), axis: value})
        same = other == base
        assert np.array_equal(render(other, 0), render(base, 0)) == same


def test_solid_object_has_its_colour_at_the_centre():
    for colour, rgb in RGB.items():
        img = render(Labels("square", colour, "solid", "black"), 0).astype(int)
        centre = img[14:18, 14:18].reshape(-1, 3).mean(0)
        assert np.abs(centre - np.array(rgb)).max() < 25, colour


def test_background_is_visible_in_the_corners():
    white = render(Labels("circle", "red", "solid", "white"), 0)
    black = render(Labels("circle", "red", "solid", "black"), 0)
    assert white[0, 0].min() > 200 and black[0, 0].max() < 50


def test_unknown_value_is_a_clear_error():
    with pytest.raises(KeyError, match="unknown shape"):
        render(Labels("blob", "red", "solid", "white"), 0)


def test_captions_agree_with_labels():
    rng = random.Random(0)
    seen_templates = set()
    for i in range(400):
        lab = Labels(*(rng.choice(list(CONCEPTS[a])) for a in AXES))
        text = caption(lab, rng, synonym_p=0.5, drop_p=0.3)
        assert text == text.strip() and "  " not in text
        for word in re.findall(r"[a-z]+", text):
            hit = find_axis(word)
            if hit is not None:
                axis, canon = hit
                assert getattr(lab, axis) == canon, (text, lab)
        seen_templates.add(text.split(" ")[0])
    full = caption(Labels("star", "red", "dotted", "grass"), random.Random(1), synonym_p=0.0)
    assert all(w in full for w in ("star", "red", "dotted", "grass"))
    syn = caption(Labels("star", "red", "dotted", "grass"), random.Random(1), synonym_p=1.0)
    assert "red" not in syn.split() and canonical_of("colour", "crimson") == "red"


def test_articles_are_grammatical():
    text = caption({"shape": "circle", "colour": "orange", "texture": None, "background": None},
                   random.Random(0), template=0, synonym_p=0.0)
    assert text == "an orange circle"


def test_parallel_rendering_gives_the_same_images():
    from erasekit.world.render import render_batch

    rng = random.Random(3)
    labels = [Labels(*(rng.choice(list(CONCEPTS[a])) for a in AXES)) for _ in range(2100)]
    seeds = list(range(500, 2600))
    serial = render_batch(labels, seeds)
    assert np.array_equal(render_batch(labels, seeds, workers=2), serial)
    assert np.array_equal(serial[7], render(labels[7], seeds[7]))
