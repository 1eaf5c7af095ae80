"""Negative prompt as an erasure guard: classifier-free guidance steers away from the concept.

The unconditional branch of CFG is replaced by the concept prompt, so each step moves the sample
along ``cond - concept`` instead of ``cond - ""``. It changes no weight: the edit is a ``hook``
edit, and it works on any model family. With guidance scale <= 1 there is no unconditional branch
and it does nothing. (METHODS.md §3.1; SLD builds on the same three-branch idea.)
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from .. import __version__
from ..adapters import Encoded
from ..adapters.sampling import Hook, SampleContext
from ..concepts import ConceptSpec
from ..edits import Edit, HookEdit
from .base import Method, config_dict
from .guard import GuardPromptConfig, guard_prompt


@dataclass(frozen=True)
class NegativePromptConfig(GuardPromptConfig):
    """The negative prompt is written from the erased concepts (``GuardPromptConfig``)."""


class NegativePromptHook(Hook):
    """Replaces the unconditional conditioning by the encoding of ``prompt``."""

    def __init__(self, prompt: str) -> None:
        self.prompt = prompt

    def embeddings(self, ctx: SampleContext, cond: Encoded, uncond: Encoded | None) -> tuple[Encoded, Encoded | None]:
        neg = ctx.adapter.encode([self.prompt])
        return cond, neg.index([0] * len(cond))


class NegativePrompt(Method):
    name = "negative-prompt"
    family = "guard"
    edit_kind = "hook"
    description = "Negative prompt: classifier-free guidance pushes away from the concept (a hook edit, no weights)"
    Config = NegativePromptConfig

    def uses_keep_phrases(self) -> bool:
        return False  # erases from the concept's prompts alone

    def fit(self, adapter: Any, concepts: list[ConceptSpec]) -> Edit:
        t0 = time.perf_counter()
        prompt = guard_prompt(adapter, self.config, concepts, "negative prompt")
        return HookEdit({}, {"method": self.name, "config": config_dict(self.config),
                             "concepts": [c.to_dict() for c in concepts], "hook": {"negative_prompt": prompt},
                             "erasekit_version": __version__, "wall_time_s": round(time.perf_counter() - t0, 4)})

    @classmethod
    def make_hooks(cls, edit: Edit, adapter: Any) -> list[Hook]:
        return [NegativePromptHook(str(edit.manifest["hook"]["negative_prompt"]))]
