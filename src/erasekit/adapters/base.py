"""The adapter protocol: the only code that knows a model family's internals."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch


@dataclass
class Encoded:
    """Text-encoder output of a batch of prompts, as the UNet's cross-attention reads it.

    Attributes:
        embeds: (N, L, d) cross-attention input (``prompt_embeds``).
        lengths: (N,) number of real tokens per prompt including start and end tokens.
        pooled: (N, d_pool) pooled embedding where the family has one (SDXL ``add_embeds``).
    """

    embeds: torch.Tensor
    lengths: torch.Tensor
    pooled: torch.Tensor | None = None

    def last_subject(self) -> torch.Tensor:
        """(N, d) row of each prompt's last subject token (index ``length - 2``; SOT for "")."""
        idx = (self.lengths - 2).clamp(min=0)
        return self.embeds[torch.arange(len(idx)), idx]

    def rows_from_last(self, i: int) -> torch.Tensor:
        """Rows of prompt ``i`` from its last subject token to the end (EOT and padding included)."""
        start = int((self.lengths[i] - 2).clamp(min=0))
        return self.embeds[i, start:]


@runtime_checkable
class Adapter(Protocol):
    """What methods, evaluation and attacks may ask of a model family."""

    family: ClassVar[str]
    pipe: Any

    def kv_modules(self) -> dict[str, torch.nn.Linear]:
        """Cross-attention key/value projections that read text embeddings, by module name."""

    def encode(self, prompts: list[str]) -> Encoded:
        """Encode prompts exactly as the pipeline does for generation."""

    def fingerprint(self) -> str:
        """Stable hash of the base model (config + the weights methods read)."""


def weights_digest(h: "hashlib._Hash", tensors: list[torch.Tensor]) -> None:
    for t in tensors:
        t = t.detach().to("cpu", torch.float32).contiguous()
        h.update(str(tuple(t.shape)).encode())
        h.update(t.numpy().tobytes())


def config_digest(h: "hashlib._Hash", *configs: Any) -> None:
    for c in configs:
        d = dict(c) if c is not None else {}
        d = {k: v for k, v in d.items() if not k.startswith("_")}
        h.update(json.dumps(d, sort_keys=True, default=str).encode())
