"""``lora``: low-rank adapters ``W <- W + (alpha / r) B A`` on named linear modules.

The adapters are described by a peft ``LoraConfig`` (rank, alpha, target modules), stored in the
manifest, and their tensors use peft's names (``<module>.lora_A.weight``, ``<module>.lora_B.weight``),
so a diffusers LoRA file is a renaming away (``erasekit export --format lora``). While applied,
the adapters are merged into the base weights with an exact backup: a LoRA edit then stacks with
weight deltas and hook edits by parameter name, costs nothing at inference, and reverts bit for
bit. Training methods train through peft's injected layers and hand the factors to this class.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from ..errors import InvalidInputError
from .base import Edit, PatchError, Undo, add_to_params, canonical, register_kind, resolve_module, tensor_digest

A_SUFFIX, B_SUFFIX = ".lora_A.weight", ".lora_B.weight"


def peft_config(rank: int, alpha: float, modules: list[str]) -> dict[str, Any]:
    """A peft ``LoraConfig`` for these modules, as the dict the manifest keeps."""
    from peft import LoraConfig

    cfg = LoraConfig(r=rank, lora_alpha=alpha, target_modules=sorted(modules), init_lora_weights=False)
    d = cfg.to_dict()
    return {k: (sorted(v) if isinstance(v, set) else v) for k, v in d.items()
            if k in ("peft_type", "r", "lora_alpha", "target_modules", "bias", "use_rslora")}


@register_kind
@dataclass(frozen=True, eq=False)
class LoraEdit(Edit):
    """Low-rank adapters on named modules (full names, ``unet.down_blocks...attn2.to_k``).

    Attributes:
        down: module name -> A, shape (r, in_features).
        up: module name -> B, shape (out_features, r).
        manifest: as every edit, plus ``lora``: the peft LoraConfig (``r``, ``lora_alpha``, ...).
    """

    kind: ClassVar[str] = "lora"
    down: dict[str, torch.Tensor]
    up: dict[str, torch.Tensor]
    manifest: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if set(self.down) != set(self.up):
            raise InvalidInputError("a LoRA edit needs an up and a down matrix for every module")
        for name in self.down:
            if self.down[name].shape[0] != self.up[name].shape[1]:
                raise InvalidInputError(f"{name}: LoRA down {tuple(self.down[name].shape)} and up "
                                        f"{tuple(self.up[name].shape)} disagree on the rank")

    @property
    def rank(self) -> int:
        return int(self.manifest.get("lora", {}).get("r") or max(a.shape[0] for a in self.down.values()))

    @property
    def scale(self) -> float:
        """``alpha / r``, the factor peft applies to ``B A``."""
        cfg = self.manifest.get("lora", {})
        return float(cfg.get("lora_alpha", self.rank)) / self.rank

    def _digest_into(self, h: "hashlib._Hash") -> None:
        h.update(self.kind.encode())
        h.update(canonical({"scale": self.scale}))
        tensor_digest(h, self.tensors())

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {f"{n}{A_SUFFIX}": a for n, a in self.down.items()}
        out.update({f"{n}{B_SUFFIX}": b for n, b in self.up.items()})
        return out

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], manifest: dict[str, Any]) -> "LoraEdit":
        down = {k.removesuffix(A_SUFFIX): v for k, v in tensors.items() if k.endswith(A_SUFFIX)}
        up = {k.removesuffix(B_SUFFIX): v for k, v in tensors.items() if k.endswith(B_SUFFIX)}
        if len(down) + len(up) != len(tensors):
            raise PatchError("the LoRA edit's tensors are not named <module>.lora_A/B.weight; re-create the edit")
        return cls(down, up, manifest)

    @classmethod
    def from_factors(cls, factors: dict[str, tuple[torch.Tensor, torch.Tensor]], manifest: dict[str, Any],
                     alpha: float | None = None) -> "LoraEdit":
        """Build from ``{module: (down A, up B)}``; ``alpha`` defaults to the rank (scale 1)."""
        rank = max(a.shape[0] for a, _ in factors.values())
        manifest = {**manifest, "lora": peft_config(rank, float(alpha if alpha is not None else rank), list(factors))}
        return cls({n: a for n, (a, _) in factors.items()}, {n: b for n, (_, b) in factors.items()}, manifest)

    def merged_deltas(self) -> dict[str, torch.Tensor]:
        """``{module.weight: scale * B A}``: what merging adds to each weight (float32)."""
        return {f"{n}.weight": self.scale * (self.up[n].float() @ self.down[n].float()) for n in self.down}

    def _check_fits(self, pipe: Any) -> None:
        for name in self.down:
            mod = resolve_module(pipe, name)
            if not isinstance(mod, torch.nn.Linear):
                raise PatchError(f"{name} is not a linear layer; this LoRA edit was made for another architecture")
            if (mod.out_features, mod.in_features) != (self.up[name].shape[0], self.down[name].shape[1]):
                raise PatchError(f"{name} is {mod.out_features}x{mod.in_features} but the LoRA edit is "
                                 f"{self.up[name].shape[0]}x{self.down[name].shape[1]}; it was made for another model")

    def _apply(self, pipe: Any) -> Undo:
        return add_to_params(pipe, self.merged_deltas())


def factorise(deltas: dict[str, torch.Tensor], rank: int) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]],
                                                                    dict[str, float]]:
    """Best rank-``rank`` factors ``(A, B)`` of each ``module.weight`` delta (truncated SVD, B A ~ delta)
    and each one's relative Frobenius error."""
    if rank < 1:
        raise InvalidInputError(f"LoRA rank must be at least 1 (got {rank})")
    factors, errors = {}, {}
    for name, d in deltas.items():
        d64 = d.to(torch.float64)
        u, s, vh = torch.linalg.svd(d64, full_matrices=False)
        r = min(rank, len(s))
        root = s[:r].sqrt()
        b, a = u[:, :r] * root, root[:, None] * vh[:r]
        if r < rank:  # a layer narrower than the rank: zero factors keep one rank for every module
            b = torch.cat([b, b.new_zeros(b.shape[0], rank - r)], 1)
            a = torch.cat([a, a.new_zeros(rank - r, a.shape[1])], 0)
        factors[name.removesuffix(".weight")] = (a.to(torch.float32), b.to(torch.float32))
        norm = float(d64.norm())
        errors[name.removesuffix(".weight")] = float((d64 - b @ a).norm()) / norm if norm > 0 else 0.0
    return factors, errors
