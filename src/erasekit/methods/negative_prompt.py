"""Negative prompt as an erasure guard: classifier-free guidance steers away from the concept.

The unconditional branch of CFG is replaced by the concept prompt, so each step moves the sample
along ``cond - concept`` instead of ``cond - ""``. It changes no weight: the edit is a ``hook``
edit, and it works on any model family. With guidance scale <= 1 there is no unconditional branch
and it does nothing. (METHODS.md §3.1; SLD builds on the same three-branch idea.)
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from .. import __version__
from ..adapters import Encoded
from ..adapters.sampling import Hook, SampleContext
from ..concepts import ConceptSpec
from ..edits import Edit, HookEdit
from ..errors import InvalidInputError
from .base import Method, config_dict


@dataclass(frozen=True)
class NegativePromptConfig:
    template: str = field(default="{}", metadata={"help": "how each concept phrase is written into the negative "
                                                          "prompt ({} = phrase)"})
    synonyms: bool = field(default=True, metadata={"help": "also name each concept's synonyms"})
    separator: str = field(default=", ", metadata={"help": "text between the named phrases"})


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

    def prompt(self, concepts: list[ConceptSpec]) -> str:
        cfg = self.config
        if "{}" not in cfg.template:
            raise InvalidInputError(f"template {cfg.template!r} has no {{}} where the concept goes; e.g. 'a photo of {{}}'")
        phrases = [p for c in concepts for p in (c.erase_phrases if cfg.synonyms else (c.target,))]
        return cfg.separator.join(" ".join(cfg.template.replace("{}", p).split()) for p in dict.fromkeys(phrases))

    def fit(self, adapter: Any, concepts: list[ConceptSpec]) -> Edit:
        t0 = time.perf_counter()
        prompt = self.prompt(concepts)
        tok = adapter.pipe.tokenizer if adapter.pipe.tokenizer is not None else adapter.pipe.tokenizer_2
        n_tokens = len(tok(prompt).input_ids)
        if n_tokens > tok.model_max_length:
            raise InvalidInputError(f"the negative prompt is {n_tokens} tokens but the text encoder reads "
                                    f"{tok.model_max_length}; erase fewer concepts at once or drop synonyms "
                                    "(--set synonyms=false)")
        return HookEdit({}, {"method": self.name, "config": config_dict(self.config),
                             "concepts": [c.to_dict() for c in concepts], "hook": {"negative_prompt": prompt},
                             "erasekit_version": __version__, "wall_time_s": round(time.perf_counter() - t0, 4)})

    @classmethod
    def make_hooks(cls, edit: Edit, adapter: Any) -> list[Hook]:
        return [NegativePromptHook(str(edit.manifest["hook"]["negative_prompt"]))]
