"""SPEED (Li et al., 2025): closed-form erasure restricted to the null space of the preserved
concepts' embeddings, with influence-based prior filtering (IPF), directed prior augmentation
(DPA) and invariant equality constraints (IEC) that pin the start token and the null prompt.

Erase rows follow the official code (``token=auto``): the last subject token of each prompt, or, when
the one concept erased is nudity, every token after SOT (padding included), each sent to the anchor's
row at the same position; ``token=last`` / ``token=all`` choose either for any concept."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import torch

from ..concepts import ConceptSpec
from ..solvers import DTYPE, Moments, null_space_projector, null_space_solve
from .closed_form import ClosedFormConfig, ClosedFormMethod, Layers, Solution, Timer, encode_problem, solve_layers


@dataclass(frozen=True)
class SPEEDConfig(ClosedFormConfig):
    edit: str = field(default="v", metadata={"help": "projections to edit (official default: v)",
                                              "choices": ("k", "v", "kv")})
    retain_scale: float = field(default=1.0, metadata={"help": "alpha, ridge of the projected solve "
                                                                 "(official: 1.0; 0.05 multi-concept)", "min": 0.0})
    tau: float = field(default=0.1, metadata={"help": "eigenvalue threshold of the null space (official 0.1; "
                                                      "1e-4 for 10-100 concepts)", "above": 0.0})
    mu: float = field(default=0.0, metadata={"help": "softening of the equality constraints (0 = exact)", "min": 0.0})
    prior_filter: bool = field(default=True, metadata={"help": "IPF: keep the most affected retain rows"})
    augment: int = field(default=10, metadata={"help": "DPA: perturbed copies per retain row (0 = off)", "min": 0})
    constraints: bool = field(default=True, metadata={"help": "IEC: keep SOT and null-prompt outputs fixed"})
    kmeans: int = field(default=3, metadata={"help": "null-prompt centroids in the constraint set", "min": 1})
    seed: int = field(default=0, metadata={"help": "seed of DPA noise and k-means"})
    token: str = field(default="auto", metadata={
        "help": "erase rows: 'last' (each prompt's last subject token), 'all' (every row after SOT, padding "
                "included, each sent to the anchor prompt's row at the same position), 'auto' (the official "
                "code: 'all' when the one concept erased is nudity, 'last' otherwise)",
        "choices": ("auto", "last", "all")})

    def erase_rows(self, concepts: list[ConceptSpec]) -> str:
        """The row policy ``token`` resolves to for these concepts."""
        if self.token != "auto":
            return self.token
        return "all" if [c.target.strip().lower() for c in concepts] == ["nudity"] else "last"


def kmeans(x: torch.Tensor, k: int, seed: int, iters: int = 50) -> torch.Tensor:
    """Plain Lloyd's k-means with seeded k-means++-style init; returns (k, d) centroids."""
    g = torch.Generator().manual_seed(seed)
    k = min(k, len(x))
    cent = [x[torch.randint(0, len(x), (1,), generator=g)].squeeze(0)]
    for _ in range(1, k):
        d = torch.cdist(x, torch.stack(cent)).min(-1).values ** 2
        probs = d / d.sum() if float(d.sum()) > 0 else torch.full_like(d, 1 / len(d))
        cent.append(x[torch.multinomial(probs, 1, generator=g)].squeeze(0))
    c = torch.stack(cent)
    for _ in range(iters):
        assign = torch.cdist(x, c).argmin(-1)
        new = torch.stack([x[assign == j].mean(0) if (assign == j).any() else c[j] for j in range(k)])
        if torch.allclose(new, c):
            break
        c = new
    return c


def _mentions(prompt: str, phrases: list[str]) -> bool:
    return any(re.search(rf"\b{re.escape(p.lower())}\b", prompt.lower()) for p in phrases if p)


class SPEED(ClosedFormMethod):
    name = "speed"
    description = "SPEED: null-space-constrained closed-form edit with prior filtering, augmentation, equality constraints"
    Config = SPEEDConfig

    @classmethod
    def world_settings(cls, concepts: list[ConceptSpec]) -> dict[str, Any]:
        """On the embedded world: SPEED_WORLD (K and V, not the official V alone; ``--set edit=v`` gives
        the official behaviour) and the world's erase templates for the concepts' axis."""
        from ..world.vocab import SPEED_WORLD

        return {**super().world_settings(concepts), **SPEED_WORLD}

    def solve(self, cfg: SPEEDConfig, adapter: Any, concepts: list[ConceptSpec], layers: Layers, timer: Timer) -> Solution:
        erased = [p for c in concepts for p in c.erase_phrases]
        pb = encode_problem(adapter, concepts, cfg.templates, timer,
                            keep=lambda ps: [p for p in ps if not _mentions(p, erased)])  # retain prompts
        enc_e, enc_a, enc_r = pb.enc_erase, pb.enc_anchor, pb.enc_preserve
        with timer.part("encode_text"):
            enc_null = adapter.encode([""])
        with timer.part("solve"):
            rows = cfg.erase_rows(concepts)
            if rows == "all":  # the official nudity branch: every token after SOT, E^T E summed over them
                d = enc_e.embeds.shape[-1]
                c = enc_e.embeds[:, 1:].reshape(-1, d).cpu().to(DTYPE)
                g = enc_a.embeds[:, 1:].reshape(-1, d).cpu().to(DTYPE)
            else:
                c, g = enc_e.last_subject().cpu().to(DTYPE), enc_a.last_subject().cpu().to(DTYPE)
            null = enc_null.embeds[0].cpu().to(DTYPE)
            r_all = enc_r.last_subject().cpu().to(DTYPE) if enc_r is not None else null[1:]
            m = Moments(c.shape[-1])
            # means over prompts, as the official code (alpha is relative to them)
            m.add_erase(c, g, weight=1.0 / len(enc_e))
            k_mat = torch.cat([null[:1], kmeans(null[1:], cfg.kmeans, cfg.seed)]).T if cfg.constraints else None
            mr = Moments(c.shape[-1])  # the residuals are reported on plain sums over every retain row
            mr.add_erase(c, g)
            mr.add_preserve(r_all)
            per_layer = _NullSpaceSolve(cfg, m, r_all, k_mat)
            sol = solve_layers(layers, per_layer, mr)
        for name, info in per_layer.info.items():
            sol.residuals[name].update(info)
        sol.extra.update(n_erase_prompts=len(pb.erase), n_retain_prompts=len(pb.preserve), erase_rows=rows)
        return sol


class _NullSpaceSolve:
    """SPEED's per-layer solve: IPF and DPA choose the retain rows by how much the plain erase
    update moves them, then the update is confined to their null space under the IEC constraints."""

    def __init__(self, cfg: SPEEDConfig, m: Moments, r_all: torch.Tensor, k_mat: torch.Tensor | None) -> None:
        self.cfg, self.m, self.r_all, self.k_mat = cfg, m, r_all, k_mat
        d = r_all.shape[-1]
        self.plain = (m.s_gc - m.s_cc) @ torch.linalg.inv(torch.eye(d, dtype=DTYPE) + m.s_cc)  # shared by all layers
        self.gen = torch.Generator().manual_seed(cfg.seed)
        self.info: dict[str, dict] = {}

    def retain_rows(self, w0: torch.Tensor) -> torch.Tensor:
        cfg, r = self.cfg, self.r_all
        dw0 = w0 @ self.plain  # the plain erase update, which IPF and DPA score retain rows by
        if cfg.prior_filter and len(r) > 1:
            score = (dw0 @ r.T).norm(dim=0)
            r = r[score > score.mean()] if (score > score.mean()).any() else r
        if cfg.augment > 0:
            v_min = torch.linalg.svd(w0, full_matrices=True).Vh[-1]
            noise = torch.randn(len(r) * cfg.augment, r.shape[-1], generator=self.gen, dtype=DTYPE)
            aug = r.repeat_interleave(cfg.augment, 0) + (noise @ v_min)[:, None] * v_min[None, :]
            score = (dw0 @ aug.T).norm(dim=0)
            r = torch.cat([r, aug[score > score.mean()]])
        return r

    def __call__(self, name: str, w0: torch.Tensor) -> torch.Tensor:
        r = self.retain_rows(w0)
        proj = null_space_projector(r.T @ r / len(r), self.cfg.tau)
        self.info[name] = {"retain_rows": len(r), "null_dim": int(round(float(torch.trace(proj))))}
        return null_space_solve(w0, self.m, proj, alpha=self.cfg.retain_scale, constraints=self.k_mat, mu=self.cfg.mu)
