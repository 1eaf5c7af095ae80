"""Prompt sets that probe one concept: target, generality, neighbours, unrelated."""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass, field

import torch

from ..adapters import Encoded
from ..concepts import ConceptSpec
from ..errors import InvalidInputError


@dataclass(frozen=True)
class PromptSet:
    """Prompts with the label each one asks for on every axis (``None`` = not asked).

    ``embeddings``, when given, are what is generated from (one row per prompt: an attack's
    learned prompt embeddings, say); ``prompts`` then only describe them in reports.
    """

    name: str
    prompts: tuple[str, ...]
    labels: tuple[dict[str, str], ...]
    embeddings: Encoded | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if len(self.labels) != len(self.prompts):
            raise InvalidInputError(f"prompt set {self.name!r} has {len(self.prompts)} prompts but "
                                    f"{len(self.labels)} labels; give one label dict per prompt")
        if self.embeddings is not None and len(self.embeddings) != len(self.prompts):
            raise InvalidInputError(f"prompt set {self.name!r} has {len(self.prompts)} prompts but "
                                    f"{len(self.embeddings)} embeddings; give one per prompt")

    def __len__(self) -> int:
        return len(self.prompts)

    def key(self, i: int) -> str:
        """What decides prompt ``i``'s conditioning: its text, or the digest of its embeddings."""
        if self.embeddings is None:
            return self.prompts[i]
        h = hashlib.sha256(b"embeddings")
        e = self.embeddings.index([i])
        for t in (e.embeds, e.lengths, e.pooled):
            if t is not None:
                h.update(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
        return h.hexdigest()


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


# Used when a concept (e.g. "Van Gogh", "nudity") names no preserve prompts: everyday scenes far
# from most erased concepts, so "unrelated" specificity has something to measure.
DEFAULT_UNRELATED: tuple[str, ...] = (
    "a dog running on a beach", "a bowl of fruit on a wooden table", "a city street at night",
    "a snowy mountain landscape", "a red sports car", "a cup of coffee next to a laptop",
    "a lighthouse on a rocky coast", "a portrait of an old man with a beard",
    "a field of sunflowers", "a cat sleeping on a sofa",
)
TARGET_TEMPLATES: tuple[str, ...] = ("{}", "a photo of {}", "an image of {}", "a picture of {}")
# phrasings a patch fitted on the target's own words never saw: generality for open concepts
PARAPHRASE_TEMPLATES: tuple[str, ...] = ("a detailed artwork of {}", "{}, high quality",
                                         "a close-up of {}", "a scene with {}")


def open_prompt_sets(spec: ConceptSpec, axis: str, n: int) -> dict[str, PromptSet]:
    """Prompt sets for a concept of a real checkpoint, with labels on one axis ``axis``.

    - target: the target phrase in plain templates;
    - generality: its synonyms (or, without synonyms, the target) in paraphrase templates;
    - neighbours: the concepts to keep (``spec.neighbours``), labelled with their own name;
    - unrelated: ``spec.preserve`` (or :data:`DEFAULT_UNRELATED`), each labelled with itself, so a
      judge scores whether the image still matches its own prompt among all candidates.
    """
    if n < 1:
        raise InvalidInputError("the seed range is empty; pass e.g. --seeds 0-63")

    def build(name: str, items: list[tuple[str, str]]) -> PromptSet:
        picked = [items[i % len(items)] for i in range(n)]
        return PromptSet(name, tuple(p for p, _ in picked), tuple({axis: lab} for _, lab in picked))

    target = [(t.format(spec.target), spec.target) for t in TARGET_TEMPLATES]
    words = list(spec.synonyms) or [spec.target]
    general = [(t.format(w), spec.target) for w in words for t in PARAPHRASE_TEMPLATES]
    sets = {"target": build("target", target), "generality": build("generality", general)}
    if spec.neighbours:
        sets["neighbours"] = build("neighbours", [(t.format(nb), nb) for nb in spec.neighbours
                                                  for t in TARGET_TEMPLATES])
    unrelated = list(spec.preserve) or list(DEFAULT_UNRELATED)
    sets["unrelated"] = build("unrelated", [(p, p) for p in unrelated])
    return sets


def open_labels(spec: ConceptSpec) -> list[str]:
    """Candidate labels of a concept's axis: target, neighbours, unrelated prompts (no duplicates)."""
    out: list[str] = []
    for lab in (spec.target, *spec.neighbours, *(spec.preserve or DEFAULT_UNRELATED)):
        if lab not in out:
            out.append(lab)
    return out
