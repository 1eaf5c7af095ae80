"""Prompt sets that probe one concept: target, generality, neighbours, unrelated."""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from ..concepts import ConceptSpec
from ..errors import InvalidInputError


@dataclass(frozen=True)
class PromptSet:
    """Prompts with the label each one asks for on every axis (``None`` = not asked)."""

    name: str
    prompts: tuple[str, ...]
    labels: tuple[dict[str, str], ...]


def world_prompt_sets(spec: ConceptSpec, axis: str, label: str, n: int, seed: int = 0) -> dict[str, PromptSet]:
    """Four sets of ``n`` world captions for erasing ``label`` on ``axis``.

    - target: name the concept with its canonical word;
    - generality: name it with synonyms the patch never saw;
    - neighbours: other values of the same axis (e.g. other shapes);
    - unrelated: other values too, scored on the *other* axes (colour, texture, ... stay intact).
    """
    from ..world.vocab import AXES, CONCEPTS, caption

    if n < 1:
        raise InvalidInputError("the seed range is empty; pass e.g. --seeds 0-63")
    rng = random.Random(f"{seed}-{axis}-{label}")
    others = [v for v in CONCEPTS[axis] if v != label]
    seen = {s.lower() for s in spec.erase_phrases}
    unseen_syns = [s for s in CONCEPTS[axis][label] if s.lower() not in seen]

    def labels_with(value: str) -> dict[str, str]:
        d = {a: rng.choice(list(CONCEPTS[a])) for a in AXES}
        d[axis] = value
        return d

    def build(name: str, values: list[str], synonyms: list[str] | None = None) -> PromptSet:
        prompts, labs = [], []
        for i in range(n):
            lab = labels_with(values[i % len(values)])
            text = caption(lab, rng, template=i % 7, synonym_p=0.0)
            if synonyms:
                word = synonyms[i % len(synonyms)]
                text = re.sub(rf"\b{re.escape(lab[axis])}\b", word, text)
            prompts.append(text)
            labs.append(lab)
        return PromptSet(name, tuple(prompts), tuple(labs))

    sets = {"target": build("target", [label]),
            "neighbours": build("neighbours", others),
            "unrelated": build("unrelated", others)}
    if unseen_syns:
        sets["generality"] = build("generality", [label], unseen_syns)
    return sets
