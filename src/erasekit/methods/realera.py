"""RealEra (Liu et al., 2025), closed-form part: neighbour-concept mining and beyond-concept
regularisation around a UCE-style edit.

Each erased row c is joined by mined neighbours c' with cos(c, c') in [near_min, near_max] (same
norm), all sent to the anchor, so that prompts *associated* with the concept lose it too.
Samples further out, cos in [far_min, far_max], join the preserve set with their original
outputs, so that the edit stays local. No official code exists; the cosine bands are ours and
exposed as settings. (The paper's LoRA stage comes with the fine-tuning family.)"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from ..adapters import SDAdapter
from ..concepts import ConceptSpec
from ..edits import WeightDelta
from ..errors import InvalidInputError
from ..solvers import DTYPE, Moments, ridge_solve
from .base import Method, Timer, make_patch, select_layers, solve_layers
from .uce import UCEConfig, encode_problem


@dataclass(frozen=True)
class RealEraConfig(UCEConfig):
    neighbours: int = field(default=16, metadata={"help": "mined neighbour embeddings per erased row"})
    near_min: float = field(default=0.80, metadata={"help": "lowest cosine of a mined neighbour"})
    near_max: float = field(default=0.97, metadata={"help": "highest cosine of a mined neighbour"})
    neighbour_scale: float = field(default=0.5, metadata={"help": "weight of each mined neighbour row"})
    beyond: int = field(default=16, metadata={"help": "beyond-concept samples per erased row"})
    far_min: float = field(default=0.40, metadata={"help": "lowest cosine of a beyond-concept sample"})
    far_max: float = field(default=0.65, metadata={"help": "highest cosine of a beyond-concept sample"})
    beyond_scale: float = field(default=0.5, metadata={"help": "weight of each beyond-concept row"})
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


class RealEra(Method):
    name = "realera"
    family = "closed-form"
    description = "RealEra: UCE-style edit plus mined neighbour concepts and beyond-concept regularisation"
    Config = RealEraConfig

    def fit(self, adapter: SDAdapter, concepts: list[ConceptSpec]) -> WeightDelta:
        cfg = self.config
        timer = Timer()
        layers = select_layers(adapter, cfg.edit)
        c, g, p, (er, _, pres) = encode_problem(adapter, concepts, cfg, timer)
        t = time.perf_counter()
        gen = torch.Generator().manual_seed(cfg.seed)
        m = Moments(c.shape[-1])
        m.add_erase(c, g)
        if cfg.neighbours:
            near = sample_on_cone(c, cfg.neighbours, cfg.near_min, cfg.near_max, gen)
            m.add_erase(near, g.to(DTYPE).repeat_interleave(cfg.neighbours, 0), weight=cfg.neighbour_scale)
        if p.numel():
            m.add_preserve(p)
        if cfg.beyond:
            m.add_preserve(sample_on_cone(c, cfg.beyond, cfg.far_min, cfg.far_max, gen), weight=cfg.beyond_scale)
        deltas, res = solve_layers(layers, lambda _n, w0: ridge_solve(
            w0, m, lam=cfg.lam, erase_scale=cfg.erase_scale, preserve_scale=cfg.preserve_scale), m)
        timer.mark("solve", t)
        return make_patch(self, adapter, concepts, deltas, timer, res, {"n_erase_prompts": len(er)})
