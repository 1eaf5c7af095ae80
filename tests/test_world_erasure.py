"""On the trained world model (not random weights): UCE really erases a shape."""

import random

import torch

import erasekit
from erasekit.concepts import ConceptSpec
from erasekit.world.train import generate_images
from erasekit.world.vocab import AXES, BACKGROUNDS, COLOURS, SHAPES, TEXTURES, Labels, caption, erase_templates

TARGET = "star"


def shape_prompts(shape: str, n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [caption(Labels(shape, rng.choice(list(COLOURS)), rng.choice(list(TEXTURES)), rng.choice(list(BACKGROUNDS))),
                    rng, synonym_p=0.0) for _ in range(n)]


def shape_rate(pipe, classifier, prompts, shape, seed):
    imgs = generate_images(pipe, prompts, [seed + i for i in range(len(prompts))])
    pred = classifier.predict_proba(imgs)["shape"].argmax(-1)
    return float((pred == list(SHAPES).index(shape)).float().mean())


def test_uce_erases_a_shape_and_spares_the_others(world_pipe, classifier):
    others = [s for s in SHAPES if s != TARGET]
    spec = ConceptSpec(TARGET, preserve=tuple(others))
    patch = erasekit.erase(world_pipe, spec, method="uce", templates=erase_templates("shape"), token="all",
                           erase_scale=10.0)
    target_prompts = shape_prompts(TARGET, 24, seed=1)
    other_prompts = {s: shape_prompts(s, 6, seed=2) for s in others}

    def measure():
        t = shape_rate(world_pipe, classifier, target_prompts, TARGET, 1000)
        o = sum(shape_rate(world_pipe, classifier, p, s, 2000) for s, p in other_prompts.items()) / len(others)
        return t, o

    t0, o0 = measure()
    with patch.scoped(world_pipe):
        t1, o1 = measure()
    assert t0 - t1 >= 0.50, (t0, t1)
    assert o0 - o1 <= 0.10, (o0, o1)
