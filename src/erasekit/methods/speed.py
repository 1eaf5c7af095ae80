"""SPEED (Li et al., 2025): closed-form erasure restricted to the null space of the preserved
concepts' embeddings, with influence-based prior filtering (IPF), directed prior augmentation
(DPA) and invariant equality constraints (IEC) that pin the start token and the null prompt."""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field

import torch

from ..adapters import SDAdapter
from ..concepts import ConceptSpec
from ..edits import WeightDelta
from ..solvers import DTYPE, Moments, null_space_projector, null_space_solve, residuals
from .base import ClosedFormConfig, Method, Timer, make_patch, pairs, preserve_prompts, select_layers


@dataclass(frozen=True)
class SPEEDConfig(ClosedFormConfig):
    edit: str = field(default="v", metadata={"help": "projections to edit (official default: v)"})
    retain_scale: float = field(default=1.0, metadata={"help": "alpha, ridge of the projected solve "
                                                                 "(official: 1.0; 0.05 multi-concept)"})
    tau: float = field(default=0.1, metadata={"help": "eigenvalue threshold of the null space (official 0.1; "
                                                      "1e-4 for 10-100 concepts)"})
    mu: float = field(default=0.0, metadata={"help": "softening of the equality constraints (0 = exact)"})
    prior_filter: bool = field(default=True, metadata={"help": "IPF: keep the most affected retain rows"})
    augment: int = field(default=10, metadata={"help": "DPA: perturbed copies per retain row (0 = off)"})
    constraints: bool = field(default=True, metadata={"help": "IEC: keep SOT and null-prompt outputs fixed"})
    kmeans: int = field(default=3, metadata={"help": "null-prompt centroids in the constraint set"})
    seed: int = field(default=0, metadata={"help": "seed of DPA noise and k-means"})


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


class SPEED(Method):
    name = "speed"
    family = "closed-form"
    description = "SPEED: null-space-constrained closed-form edit with prior filtering, augmentation, equality constraints"
    Config = SPEEDConfig

    def fit(self, adapter: SDAdapter, concepts: list[ConceptSpec]) -> WeightDelta:
        cfg = self.config
        timer = Timer()
        layers = select_layers(adapter, cfg.edit)
        er, an = pairs(concepts, cfg.templates)
        erased = [p for c in concepts for p in c.erase_phrases]
        retain = [p for p in preserve_prompts(concepts, cfg.templates) if not _mentions(p, erased)]
        t = time.perf_counter()
        enc_e, enc_a, enc_null = adapter.encode(er), adapter.encode(an), adapter.encode([""])
        enc_r = adapter.encode(retain) if retain else None
        timer.mark("encode_text", t)
        t = time.perf_counter()
        c, g = enc_e.last_subject().cpu().to(DTYPE), enc_a.last_subject().cpu().to(DTYPE)
        null = enc_null.embeds[0].cpu().to(DTYPE)
        r_all = enc_r.last_subject().cpu().to(DTYPE) if enc_r is not None else null[1:]
        d = c.shape[-1]
        m = Moments(d)
        m.add_erase(c, g, weight=1.0 / len(c))  # means, as the official code (alpha is relative to them)
        k_mat = None
        if cfg.constraints:
            k_mat = torch.cat([null[:1], kmeans(null[1:], cfg.kmeans, cfg.seed)]).T  # (d, 1 + k)
        eye = torch.eye(d, dtype=DTYPE)
        gen = torch.Generator().manual_seed(cfg.seed)
        info: dict[str, dict] = {}
        plain = (m.s_gc - m.s_cc) @ torch.linalg.inv(eye + m.s_cc)  # shared by every layer

        def solve(name: str, w0: torch.Tensor) -> torch.Tensor:
            dw0 = w0 @ plain  # the plain erase update, which IPF and DPA score retain rows by
            r = r_all
            if cfg.prior_filter and len(r) > 1:
                score = (dw0 @ r.T).norm(dim=0)
                r = r[score > score.mean()] if (score > score.mean()).any() else r
            if cfg.augment > 0:
                v_min = torch.linalg.svd(w0, full_matrices=True).Vh[-1]
                noise = torch.randn(len(r) * cfg.augment, d, generator=gen, dtype=DTYPE)
                aug = r.repeat_interleave(cfg.augment, 0) + (noise @ v_min)[:, None] * v_min[None, :]
                score = (dw0 @ aug.T).norm(dim=0)
                r = torch.cat([r, aug[score > score.mean()]])
            c_rr = r.T @ r / len(r)
            proj = null_space_projector(c_rr, cfg.tau)
            info[name] = {"retain_rows": len(r), "null_dim": int(round(float(torch.trace(proj))))}
            return null_space_solve(w0, m, proj, alpha=cfg.retain_scale, constraints=k_mat, mu=cfg.mu)

        deltas, res = {}, {}
        for name, mod in layers.items():
            w0 = mod.weight.detach().to("cpu", DTYPE)
            w = solve(name, w0)
            deltas[f"unet.{name}.weight"] = (w - w0).to(torch.float32)
            mr = Moments(d)
            mr.add_erase(c, g)
            mr.add_preserve(r_all)
            res[name] = {**{k: round(v, 6) for k, v in residuals(w, w0, mr).items()}, **info[name]}
        timer.mark("solve", t)
        return make_patch(self, adapter, concepts, deltas, timer, res,
                          {"n_erase_prompts": len(er), "n_retain_prompts": len(retain)})
