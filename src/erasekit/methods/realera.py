"""RealEra (Liu et al., 2025), closed-form part: neighbour-concept mining and beyond-concept
regularisation around a UCE-style edit.

Each erased row c is joined by mined neighbours c' with cos(c, c') in [near_min, near_max] (same
norm), all sent to the anchor, so that prompts *associated* with the concept lose it too.
Samples further out, cos in [far_min, far_max], join the preserve set with their original
outputs, so that the edit stays local. No official code exists; the cosine bands are ours and
exposed as settings. The paper builds on MACE and adds a LoRA stage trained on the mined neighbours;
erasekit implements the closed-form part only, on UCE's solve, and has no RealEra LoRA stage."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ..concepts import ConceptSpec
from ..errors import InvalidInputError
from ..solvers import DTYPE, Moments
from .base import Method
from .uce import UCE, UCEConfig

_COS = {"min": -1.0, "max": 1.0}


@dataclass(frozen=True)
class RealEraConfig(UCEConfig):
    neighbours: int = field(default=16, metadata={"help": "mined neighbour embeddings per erased row", "min": 0})
    near_min: float = field(default=0.80, metadata={"help": "lowest cosine of a mined neighbour", **_COS})
    near_max: float = field(default=0.97, metadata={"help": "highest cosine of a mined neighbour", **_COS})
    neighbour_scale: float = field(default=0.5, metadata={"help": "weight of each mined neighbour row", "min": 0.0})
    beyond: int = field(default=16, metadata={"help": "beyond-concept samples per erased row", "min": 0})
    far_min: float = field(default=0.40, metadata={"help": "lowest cosine of a beyond-concept sample", **_COS})
    far_max: float = field(default=0.65, metadata={"help": "highest cosine of a beyond-concept sample", **_COS})
    beyond_scale: float = field(default=0.5, metadata={"help": "weight of each beyond-concept row", "min": 0.0})
    seed: int = field(default=0, metadata={"help": "seed of the sampling"})


def sample_on_cone(c: torch.Tensor, n: int, cos_lo: float, cos_hi: float, gen: torch.Generator) -> torch.Tensor:
    """``n`` vectors per row of ``c`` with the row's norm and cosine to it drawn from [cos_lo, cos_hi]."""
    if not (-1 <= cos_lo <= cos_hi <= 1):
        raise InvalidInputError(f"cosine band [{cos_lo}, {cos_hi}] must lie within [-1, 1] and be ordered")
    c = c.to(DTYPE)
    rows = c.repeat_interleave(n, 0)
    unit = rows / rows.norm(dim=-1, keepdim=True).clamp(min=1e-12)
    u = torch.randn(rows.shape, generator=gen, dtype=DTYPE)
    u = u - (u * unit).sum(-1, keepdim=True) * unit
    u = u / u.norm(dim=-1, keepdim=True).clamp(min=1e-12)
    k = cos_lo + (cos_hi - cos_lo) * torch.rand(len(rows), 1, generator=gen, dtype=DTYPE)
    return rows.norm(dim=-1, keepdim=True) * (k * unit + (1 - k ** 2).sqrt() * u)


class RealEra(UCE):
    name = "realera"
    description = "RealEra: UCE-style edit plus mined neighbour concepts and beyond-concept regularisation"
    Config = RealEraConfig

    @classmethod
    def world_settings(cls, concepts: list[ConceptSpec]) -> dict[str, Any]:
        """On the embedded world: REALERA_WORLD (UCE's row policy, erase_scale 3; chosen for RealEra, see
        :mod:`erasekit.world.vocab`) and the world's erase templates for the concepts' axis."""
        from ..world.vocab import REALERA_WORLD

        return {**Method.world_settings.__func__(cls, concepts), **REALERA_WORLD}

    def moments(self, c: torch.Tensor, g: torch.Tensor, p: torch.Tensor) -> Moments:
        """UCE's moments, plus mined neighbours sent to the anchor and beyond-concept rows kept."""
        cfg = self.config
        gen = torch.Generator().manual_seed(cfg.seed)
        m = super().moments(c, g, p)
        if cfg.neighbours:
            near = sample_on_cone(c, cfg.neighbours, cfg.near_min, cfg.near_max, gen)
            m.add_erase(near, g.to(DTYPE).repeat_interleave(cfg.neighbours, 0), weight=cfg.neighbour_scale)
        if cfg.beyond:
            m.add_preserve(sample_on_cone(c, cfg.beyond, cfg.far_min, cfg.far_max, gen), weight=cfg.beyond_scale)
        return m
