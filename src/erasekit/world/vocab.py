"""The concepts of the embedded world, their synonyms and the caption grammar.

Every concept axis (shape, colour, texture, background) has a canonical word per value and
at least two synonyms. Captions are sampled from several sentence templates; some captions
leave axes out so the model also learns the marginals.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

AXES: tuple[str, ...] = ("shape", "colour", "texture", "background")

SHAPES: dict[str, tuple[str, ...]] = {
    "circle": ("disc", "orb"),
    "square": ("box", "block"),
    "triangle": ("wedge", "delta"),
    "star": ("pentagram", "asterisk"),
    "heart": ("valentine", "love"),
    "cross": ("plus", "cruciform"),
    "crescent": ("moon", "sickle"),
    "hexagon": ("hex", "honeycomb"),
}
COLOURS: dict[str, tuple[str, ...]] = {
    "red": ("crimson", "scarlet"),
    "orange": ("tangerine", "amber"),
    "yellow": ("golden", "lemon"),
    "green": ("emerald", "lime"),
    "cyan": ("turquoise", "aqua"),
    "blue": ("azure", "cobalt"),
    "purple": ("violet", "plum"),
    "pink": ("rose", "fuchsia"),
}
TEXTURES: dict[str, tuple[str, ...]] = {
    "solid": ("plain", "flat"),
    "striped": ("stripy", "banded"),
    "dotted": ("spotted", "polka"),
    "checkered": ("chequered", "checkerboard"),
}
BACKGROUNDS: dict[str, tuple[str, ...]] = {
    "white": ("snowy", "ivory"),
    "black": ("dark", "night"),
    "sky": ("skies", "heavens"),
    "grass": ("lawn", "meadow"),
}

CONCEPTS: dict[str, dict[str, tuple[str, ...]]] = {
    "shape": SHAPES,
    "colour": COLOURS,
    "texture": TEXTURES,
    "background": BACKGROUNDS,
}

#: Sentence templates. Slots: {a} article + noun phrase is built by the template itself.
#: ``{tex}``/``{col}`` are adjective slots ("" when the axis is left out), ``{shape}`` is the
#: noun (a generic noun when left out), trailing phrases carry texture/background.
TEMPLATES: tuple[str, ...] = (
    "a {tex}{col}{shape}{bg_on}",
    "a photo of a {col}{tex}{shape}{bg_against}",
    "an image of a {col}{shape}{tex_with}{bg_over}",
    "{col}{tex}{shape}{bg_comma}",
    "a drawing of a {tex}{shape}{col_in}{bg_on}",
    "{bg_pre}a {col}{tex}{shape}",
    "a picture of a {col}{shape}{tex_with}{bg_against}",
)

#: A broader caption grammar for retraining the world model (issue: a world model that reads more than
#: seven templates): the seven above plus requests, questions, fillers, clauses, and colour, texture
#: and background before and after the shape. Every template has all four axes' slots (``drop_p``
#: leaves axes out). Written without looking at the paraphrase family, and kept out of it: no
#: template's frame (concept words masked) is a paraphrase frame (``tests/test_paraphrase.py``).
#: The shipped world model was trained on it (``erasekit world train``'s default grammar); erasekit's
#: first world model was trained on ``TEMPLATES`` alone (``--set grammar=templates``). Evaluation's
#: templated prompts stay on ``TEMPLATES``, which the broad grammar contains.
BROAD_TEMPLATES: tuple[str, ...] = TEMPLATES + (
    "please draw a {tex}{col}{shape}{bg_on}",
    "draw a {col}{shape}{tex_pattern}{bg_with}",
    "can you make a {col}{tex}{shape}{bg_in_front}?",
    "i want a {shape}{col_that}{tex_pattern}{bg_on}",
    "here is a {tex}{shape}{col_coloured}{bg_behind}",
    "there is a {col}{tex}{shape}{bg_setting}",
    "a {shape}{col_comma}{tex_comma}{bg_on}",
    "we see a {col}{shape}{tex_with}{bg_in_front}",
    "show a {shape}{col_in}{tex_pattern}{bg_against}",
    "a simple {col}{tex}{shape}{bg_over}",
    "one {tex}{col}{shape}{bg_setting}",
    "render a {tex}{shape}{col_in}{bg_against}",
    "an illustration of a {col}{tex}{shape}{bg_with}",
    "a sketch of a {tex}{shape}{col_that}{bg_behind}",
    "what does a {col}{tex}{shape}{bg_on} look like?",
    "imagine a {shape}{col_coloured}{tex_pattern}{bg_in_front}",
    "this is a {tex}{col}{shape}{bg_setting}",
    "generate a {col}{shape}{tex_with}{bg_behind}",
    "i need a {tex}{shape}{col_in}{bg_with}",
    "please, a {col}{tex}{shape}{bg_on}",
    "give me a {shape}{col_that}{tex_comma}{bg_over}",
    "look at the {tex}{col}{shape}{bg_on}",
    "the picture shows a {col}{shape}{tex_pattern}{bg_in_front}",
    "{bg_pre}there is a {tex}{col}{shape}",
    "{bg_pre}draw a {col}{shape}{tex_with}",
    "could we have a {tex}{col}{shape}{bg_setting}?",
    "a nice {col}{tex}{shape}{bg_against}",
    "my favourite is a {shape}{col_coloured}{tex_with}{bg_on}",
    "do you have a {col}{tex}{shape}{bg_over}?",
    "a view of a {shape}{col_in}{tex_pattern}{bg_setting}",
    "make me a {tex}{col}{shape}{bg_with}",
    "a {col}{shape}{tex_comma}{bg_in_front}",
    "add a {col}{tex}{shape}{bg_on}",
    "i drew a {tex}{shape}{col_coloured}{bg_against}",
    "an artwork with a {col}{tex}{shape}{bg_behind}",
    "a {tex}{col}{shape} for you{bg_comma}",
)

#: caption grammars by name (``caption(grammar=...)``, ``world train --set grammar=...``)
GRAMMARS: dict[str, tuple[str, ...]] = {"templates": TEMPLATES, "broad": BROAD_TEMPLATES}

GENERIC_NOUNS: tuple[str, ...] = ("shape", "object")

_SLOTS = ("{tex}", "{col}", "{shape}", "{bg_on}", "{bg_against}", "{bg_over}", "{bg_comma}", "{bg_pre}",
          "{tex_with}", "{col_in}", "{col_that}", "{tex_pattern}", "{bg_with}", "{bg_behind}", "{bg_in_front}",
          "{col_coloured}", "{tex_comma}", "{col_comma}", "{bg_setting}")
#: the words the slots themselves add (beyond the concept words)
_SLOT_WORDS = ("an", "on", "background", "against", "backdrop", "over", "with", "pattern", "in", "texture")
_BROAD_SLOT_WORDS = ("that", "is", "behind", "it", "front", "of", "coloured", "setting")


def all_words(grammar: str = "broad") -> list[str]:
    """Every word a world caption of ``grammar`` can contain, sorted (the tokenizer's word list; the
    default, ``broad``, is the shipped model's; ``templates`` that of a model trained on the 7 templates)."""
    words: set[str] = set(GENERIC_NOUNS)
    for axis in CONCEPTS.values():
        for canon, syns in axis.items():
            words.add(canon)
            words.update(syns)
    for t in grammar_templates(grammar):
        filled = t
        for slot in _SLOTS:
            filled = filled.replace(slot, " ")
        words.update(w for w in filled.replace(",", " ").replace("?", " ").split() if w)
    words.update(_SLOT_WORDS)
    if grammar != "templates":
        words.update(_BROAD_SLOT_WORDS)
    return sorted(words)


def grammar_templates(grammar: str) -> tuple[str, ...]:
    """The templates of a caption grammar by name; an unknown name is a one-line error."""
    if grammar not in GRAMMARS:
        from ..errors import InvalidInputError

        raise InvalidInputError(f"unknown caption grammar {grammar!r}; choose one of {', '.join(GRAMMARS)}")
    return GRAMMARS[grammar]


@dataclass(frozen=True)
class Labels:
    """The true concept values of one rendered image (canonical names)."""

    shape: str
    colour: str
    texture: str
    background: str

    def as_dict(self) -> dict[str, str]:
        return {"shape": self.shape, "colour": self.colour, "texture": self.texture,
                "background": self.background}

    def index(self) -> tuple[int, int, int, int]:
        """Class indices per axis, in ``AXES`` order."""
        return tuple(list(CONCEPTS[a]).index(getattr(self, a)) for a in AXES)  # type: ignore[return-value]


def _article_fix(text: str) -> str:
    words = text.split(" ")
    for i in range(len(words) - 1):
        if words[i] in ("a", "an") and words[i + 1]:
            words[i] = "an" if words[i + 1][0] in "aeiou" else "a"
    return " ".join(words)


def caption(
    labels: Labels | dict[str, str | None],
    rng: random.Random,
    *,
    template: int | None = None,
    synonym_p: float = 0.5,
    drop_p: float = 0.0,
    grammar: str = "templates",
) -> str:
    """Build one caption for ``labels``.

    Args:
        labels: canonical values; an axis set to ``None`` is left out of the caption.
        rng: source of randomness (template, synonyms, dropped axes).
        template: index into the grammar's templates; random when ``None``.
        synonym_p: probability that each mentioned value is replaced by a random synonym.
        drop_p: probability that each axis is left out.
        grammar: ``templates`` (``TEMPLATES``: evaluation's templated prompts, erasekit's first world model's
            captions; the default) or ``broad`` (``BROAD_TEMPLATES``, the shipped model's captions).
    """
    templates = grammar_templates(grammar)
    values = labels.as_dict() if isinstance(labels, Labels) else dict(labels)
    words: dict[str, str | None] = {}
    for axis in AXES:
        v = values.get(axis)
        if v is not None and rng.random() < drop_p:
            v = None
        if v is not None and rng.random() < synonym_p:
            v = rng.choice(CONCEPTS[axis][v])
        words[axis] = v
    t = templates[rng.randrange(len(templates)) if template is None else template]
    tex, col, bg = words["texture"], words["colour"], words["background"]
    slots = {
        "tex": f"{tex} " if tex else "",
        "col": f"{col} " if col else "",
        "shape": words["shape"] or rng.choice(GENERIC_NOUNS),
        "bg_on": f" on a {bg} background" if bg else "",
        "bg_against": f" against a {bg} backdrop" if bg else "",
        "bg_over": f" over a {bg} background" if bg else "",
        "bg_comma": f", {bg} background" if bg else "",
        "bg_pre": f"on a {bg} background, " if bg else "",
        "tex_with": f" with a {tex} texture" if tex else "",
        "col_in": f" in {col}" if col else "",
        "col_that": f" that is {col}" if col else "",
        "tex_pattern": f" with a {tex} pattern" if tex else "",
        "bg_with": f" with a {bg} background" if bg else "",
        "bg_behind": f", {bg} behind it" if bg else "",
        "bg_in_front": f" in front of a {bg} background" if bg else "",
        "col_coloured": f" coloured {col}" if col else "",
        "tex_comma": f", {tex}" if tex else "",
        "col_comma": f", {col}" if col else "",
        "bg_setting": f" in a {bg} setting" if bg else "",
    }
    return _article_fix(t.format(**slots))


def canonical_of(axis: str, word: str) -> str:
    """Map a canonical word or synonym of ``axis`` to its canonical value."""
    for canon, syns in CONCEPTS[axis].items():
        if word == canon or word in syns:
            return canon
    raise KeyError(f"{word!r} is not a {axis} of the world")


def find_axis(word: str) -> tuple[str, str] | None:
    """Return ``(axis, canonical)`` for a world concept word or synonym, else ``None``."""
    for axis in AXES:
        try:
            return axis, canonical_of(axis, word)
        except KeyError:
            continue
    return None


def world_grammar(folder=None) -> str:
    """The caption grammar a world model was trained on, from the ``training.json`` that
    ``erasekit world train`` writes beside it (``folder``; default: the shipped model). A folder without
    a readable record is taken as the first recipe's ``templates``."""
    import json
    from pathlib import Path

    base = Path(folder) if folder is not None else Path(__file__).parent / "assets" / "world-model"
    try:
        return str(json.loads((base / "training.json").read_text()).get("config", {}).get("grammar", "templates"))
    except (OSError, ValueError):
        return "templates"


def _broad_frames(axis: str) -> list[str]:
    """The broad grammar's own sentence frames with only ``axis`` filled in (``{}``): "please draw a
    {}", "what does a {} look like?", "draw a shape in {}"... (the other axes left out, a generic
    noun for the shape where the axis is not shape). One frame per broad template, in order, so a frame
    that two templates share ("there is a {}", "draw a {}") comes twice and weighs twice, as it does
    among the training captions."""
    mark = "qqconceptqq"
    rng = random.Random(0)
    out = []
    for i in range(len(TEMPLATES), len(BROAD_TEMPLATES)):
        labels: dict[str, str | None] = {a: None for a in AXES}
        labels[axis] = mark
        filled = caption(labels, rng, template=i, synonym_p=0.0, grammar="broad")
        out.append(filled.replace(mark, "{}"))
    return out


def erase_templates(axis: str = "shape", grammar: str | None = None) -> tuple[str, ...]:
    """Prompt templates (``{}`` = the concept) that cover how world captions use an ``axis`` value.

    Closed-form methods erase the rows of the prompts they are shown; world captions put
    adjectives before a shape and a background after it, so erasing over these templates
    reaches the contexts the model was trained on (as UCE's "painting by {}" does for art).
    ``grammar`` is the caption grammar of the model (default: the shipped model's; for a model you
    trained, ``world_grammar(its_folder)``); a model trained on the broad grammar also gets that
    grammar's request, question and clause frames, with only the concept filled in. None of them is a
    paraphrase-family frame (``tests/test_paraphrase.py``).
    """
    if axis == "shape":
        out = ["{}", "a {}", "a photo of a {}", "an image of a {}", "a drawing of a {}", "a picture of a {}"]
        out += [f"a {c} {{}}" for c in COLOURS] + [f"a {t} {{}}" for t in TEXTURES]
        out += [f"a {{}} on a {b} background" for b in BACKGROUNDS]
    elif axis == "colour":
        out = ["{}", "a {} shape", "a {} object"] + [f"a {{}} {s}" for s in SHAPES]
    elif axis == "texture":
        out = ["{}", "a {} shape", "a {} object"] + [f"a {{}} {s}" for s in SHAPES]
    elif axis == "background":
        out = ["{}", "on a {} background", "against a {} backdrop"] + [f"a {s} on a {{}} background" for s in SHAPES]
    else:
        raise KeyError(f"unknown axis {axis!r}; known: {', '.join(AXES)}")
    if grammar_templates(grammar or world_grammar()) is not TEMPLATES:
        out += [f for f in _broad_frames(axis) if f not in out]  # the 7 templates' frames are there already
    return tuple(out)


#: UCE settings for the world model: erase every row from the concept on (the world's captions
#: carry the concept into later tokens) and weigh erasure over the many preserve rows. On the
#: 7-template model erase_scale 3 took star from 0.96 to 0.04 with no drop on other shapes. On the
#: shipped broad-grammar model, chosen by one rule fixed before the run (highest mean templated H over
#: star, heart and circle on seeds 100-115, disjoint from the tables' 0-31; world_erasure.py on an
#: H200): erase_scale 3 / 4 / 6 / 8 gave H 0.552 / 0.589 / 0.676 / 0.664 (paraphrases 0.674 / 0.646 /
#: 0.666 / 0.680), so 6.
UCE_WORLD: dict[str, object] = {"token": "from_last", "erase_scale": 6.0}

#: RECE's UCE start with the same row policy. With the default ``last``, the rows it edits for a
#: template such as "a {} on a grass background" are those of "background", not of the concept:
#: on star and heart the colour/texture/background of other prompts fell from 1.00 to 0.46 with
#: no rounds at all (rounds=0), and to 0.48 with them; ``from_last`` keeps them at 0.98.
#: Re-checked on the shipped broad-grammar model by the UCE rule above (mean templated H over star, heart
#: and circle, seeds 100-115; ``world_erasure.py`` on a CPU): ``uce_erase_scale`` 1 / 3 / 6 gave H 0.636 /
#: 0.573 / 0.461 (paraphrases 0.770 / 0.711 / 0.604), so RECE keeps its UCE start's default scale.
RECE_WORLD: dict[str, object] = {"uce_token": "from_last"}

#: RealEra on the world: UCE's row policy and a stronger erase term. Chosen on the shipped broad-grammar
#: model by the UCE rule above (CPU): the published defaults / ``token`` from_last / from_last with
#: ``erase_scale`` 3 gave H 0.589 / 0.382 / 0.803 (paraphrases 0.586 / 0.483 / 0.819), so the last. A
#: candidate added after that grid, from_last with erase_scale 6, scored 0.804, equal within noise, at
#: 25 points of unrelated prompts and 30 of collateral (unrelated 0.75, collateral 0.70 against 0.97 and
#: 0.94); the grid's choice is kept.
REALERA_WORLD: dict[str, object] = {"token": "from_last", "erase_scale": 3.0}

#: SPEED on the world: edit the keys as well as the values. The official default edits V only; chosen
#: on the shipped broad-grammar model by the UCE rule above (CPU): ``edit`` v / kv gave H 0.351 / 0.663
#: (paraphrases 0.458 / 0.762). Both leave the target at 0.23; K as well sends more of the unseen
#: synonyms away (0.83 -> 0.50) at no cost to the other shapes or axes (1.00 / 0.99 / 0.99-1.00).
SPEED_WORLD: dict[str, object] = {"edit": "kv"}
