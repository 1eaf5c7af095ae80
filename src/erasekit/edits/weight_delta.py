"""``weight_delta``: ``W <- W + delta`` on named parameters (closed form, full or masked fine-tuning)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from .base import Edit, PatchError, Undo, add_to_params, register_kind, resolve_param, tensor_digest


@register_kind
@dataclass(frozen=True, eq=False)
class WeightDelta(Edit):
    """A weight edit: ``W <- W + delta`` for each named parameter.

    Attributes:
        deltas: parameter name (``component.module.path.weight``) -> float32 delta.
        manifest: method, config, concepts, family, base fingerprint and measurements.
    """

    kind: ClassVar[str] = "weight_delta"
    deltas: dict[str, torch.Tensor]
    manifest: dict[str, Any] = field(default_factory=dict)

    def _digest_into(self, h: "hashlib._Hash") -> None:
        tensor_digest(h, self.deltas)  # the deltas alone decide the result (0.1 patches keep their digests)

    def tensors(self) -> dict[str, torch.Tensor]:
        return self.deltas

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], manifest: dict[str, Any]) -> "WeightDelta":
        return cls(tensors, manifest)

    def _check_fits(self, pipe: Any) -> None:
        for name, d in self.deltas.items():
            p = resolve_param(pipe, name)
            if tuple(p.shape) != tuple(d.shape):
                raise PatchError(f"{name} has shape {tuple(p.shape)} but the edit has {tuple(d.shape)}; "
                                 "this edit was made for another model")

    def _apply(self, pipe: Any) -> Undo:
        return add_to_params(pipe, self.deltas)

    def merged_deltas(self) -> dict[str, torch.Tensor]:
        """What this edit adds to each parameter when merged."""
        return self.deltas
