"""The adapter protocol: the only code that knows a model family's internals.

Methods, evaluation and attacks ask an adapter for modules by *role*, never by a family's
module paths, and families register themselves with a predicate on the pipeline.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Protocol, runtime_checkable

import torch

from ..errors import InvalidInputError

#: module roles an adapter serves (``Adapter.modules(role)``)
ROLES: dict[str, str] = {
    "cross_attn_kv": "key/value projections of the UNet's cross-attention (they read the text embeddings)",
    "cross_attn_k": "key projections of the UNet's cross-attention",
    "cross_attn_v": "value projections of the UNet's cross-attention",
    "cross_attn": "every linear layer of the UNet's cross-attention blocks (query, key, value, output)",
    "unet_no_cross_attn": "every linear and convolution layer of the UNet outside cross-attention",
    "text_encoder": "every linear layer and the token embedding of the text encoder(s)",
}


@dataclass
class Encoded:
    """Text-encoder output of a batch of prompts, as the UNet's cross-attention reads it.

    Attributes:
        embeds: (N, L, d) cross-attention input (``prompt_embeds``).
        lengths: (N,) number of real tokens per prompt including start and end tokens.
        pooled: (N, d_pool) pooled embedding where the family has one (SDXL ``add_embeds``).
        inputs: when encoded from token embeddings (``encode_embeddings``), what the text encoders read:
            (token embeddings (N, L, d_tok), token ids (N, L)) per text encoder, so that a hook that
            inspects tokens (SAFREE) can read adversarial vectors that no prompt text names.
    """

    embeds: torch.Tensor
    lengths: torch.Tensor
    pooled: torch.Tensor | None = None
    inputs: list[tuple[torch.Tensor, torch.Tensor]] | None = None

    def last_subject(self) -> torch.Tensor:
        """(N, d) row of each prompt's last subject token (index ``length - 2``; SOT for "")."""
        idx = (self.lengths - 2).clamp(min=0)
        return self.embeds[torch.arange(len(idx)), idx]

    def rows_from_last(self, i: int) -> torch.Tensor:
        """Rows of prompt ``i`` from its last subject token to the end (EOT and padding included)."""
        start = int((self.lengths[i] - 2).clamp(min=0))
        return self.embeds[i, start:]

    def __len__(self) -> int:
        return len(self.embeds)

    def index(self, idx: torch.Tensor | list[int]) -> "Encoded":
        """The rows ``idx`` of the batch (repeats allowed)."""
        idx = torch.as_tensor(idx, dtype=torch.long)
        inputs = None if self.inputs is None else [(e[idx.to(e.device)], i[idx.to(i.device)]) for e, i in self.inputs]
        return Encoded(self.embeds[idx.to(self.embeds.device)], self.lengths[idx.to(self.lengths.device)],
                       None if self.pooled is None else self.pooled[idx.to(self.pooled.device)], inputs)

    @staticmethod
    def cat(parts: list["Encoded"]) -> "Encoded":
        pooled = None if parts[0].pooled is None else torch.cat([p.pooled for p in parts])  # type: ignore[misc]
        inputs = None
        if all(p.inputs is not None for p in parts):
            inputs = [(torch.cat([p.inputs[k][0] for p in parts]), torch.cat([p.inputs[k][1] for p in parts]))  # type: ignore[index]
                      for k in range(len(parts[0].inputs))]  # type: ignore[arg-type]
        return Encoded(torch.cat([p.embeds for p in parts]), torch.cat([p.lengths for p in parts]), pooled, inputs)


@runtime_checkable
class Adapter(Protocol):
    """What methods, evaluation and attacks may ask of a model family."""

    family: ClassVar[str]
    pipe: Any

    def modules(self, role: str) -> dict[str, torch.nn.Module]:
        """Modules serving ``role`` (see :data:`ROLES`), by full name (``component.module.path``)."""

    def encode(self, prompts: list[str]) -> Encoded:
        """Encode prompts exactly as the pipeline does for generation."""

    def fingerprint(self) -> str:
        """Stable hash of the base model (config + the weights methods read)."""


def check_role(role: str) -> None:
    if role not in ROLES:
        raise InvalidInputError(f"unknown module role {role!r}; known: {', '.join(ROLES)}")


# ---------------------------------------------------------------------- family registry
_FAMILIES: list[tuple[str, Callable[[Any], bool], type]] = []


def register_family(name: str, predicate: Callable[[Any], bool], cls: type) -> None:
    """Register an adapter class for pipelines that ``predicate`` claims; the first claim wins,
    so register more specific families first. A duplicate name raises."""
    if any(n == name for n, _, _ in _FAMILIES):
        raise RuntimeError(f"two adapter families are registered as {name!r}")
    _FAMILIES.append((name, predicate, cls))


def families() -> list[str]:
    return [n for n, _, _ in _FAMILIES]


def family_of(pipe: Any) -> str:
    """Name of the adapter family that serves ``pipe``; one line naming the supported ones otherwise."""
    for name, pred, _ in _FAMILIES:
        try:
            if pred(pipe):
                return name
        except Exception:  # noqa: BLE001 - a predicate that cannot read the object does not claim it
            continue
    raise InvalidInputError(f"{type(pipe).__name__} is not a supported pipeline; erasekit serves "
                            f"{', '.join(_family_help(n) for n in families())} text-to-image pipelines")


def _family_help(name: str) -> str:
    return {"sd": "Stable Diffusion 1.x/2.x", "sdxl": "SDXL"}.get(name, name)


def get_adapter(pipe: Any) -> Any:
    """The adapter for ``pipe`` (an adapter passes through unchanged)."""
    if hasattr(pipe, "pipe") and hasattr(pipe, "family") and hasattr(pipe, "modules"):
        return pipe
    name = family_of(pipe)
    return next(cls for n, _, cls in _FAMILIES if n == name)(pipe)


# ---------------------------------------------------------------------- digests
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
