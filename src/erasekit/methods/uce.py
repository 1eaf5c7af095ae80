"""UCE, Unified Concept Editing (Gandikota et al., 2024): one closed-form edit of every
cross-attention key/value projection that sends each concept's text rows to its anchor's
outputs while holding preserve prompts' outputs, with a ridge pull towards the original."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..adapters import Encoded, SDAdapter
from ..concepts import ConceptSpec
from ..edits import WeightDelta
from ..errors import InvalidInputError
from ..solvers import Moments, ridge_solve
from .base import ClosedFormConfig, Method, Timer, make_patch, pairs, preserve_prompts, select_layers, solve_layers


@dataclass(frozen=True)
class UCEConfig(ClosedFormConfig):
    lam: float = field(default=0.5, metadata={"help": "ridge weight of ||W - W0||^2 (official: 0.5)"})
    erase_scale: float = field(default=1.0, metadata={"help": "weight of the erase term s_e"})
    preserve_scale: float = field(default=1.0, metadata={"help": "weight of the preserve term s_p"})
    token: str = field(default="last", metadata={
        "help": "rows edited: 'last' subject token (current official code) or 'all' = last token onward, "
                "EOT and padding included (the original script)"})


def erase_rows(enc_e: Encoded, enc_a: Encoded, token: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Erase rows and their anchor rows under a token policy."""
    if token == "last":
        return enc_e.last_subject(), enc_a.last_subject()
    if token == "all":
        cs, gs = [], []
        for i in range(len(enc_e.embeds)):
            c, g = enc_e.rows_from_last(i), enc_a.rows_from_last(i)
            n = min(len(c), len(g))
            cs.append(c[:n])
            gs.append(g[:n])
        return torch.cat(cs), torch.cat(gs)
    raise InvalidInputError(f"token must be 'last' or 'all' (got {token!r})")


def preserve_rows(enc: Encoded | None, token: str) -> torch.Tensor:
    if enc is None:
        return torch.zeros(0, 0)
    if token == "last":
        return enc.last_subject()
    return torch.cat([enc.embeds[i, : int(enc.lengths[i])] for i in range(len(enc.embeds))])


def encode_problem(adapter: SDAdapter, concepts: list[ConceptSpec], cfg, timer: Timer):
    """Encode erase/anchor/preserve prompts; returns (erase rows, anchor rows, preserve rows, prompts)."""
    er, an = pairs(concepts, cfg.templates)
    pres = preserve_prompts(concepts, cfg.templates)
    import time as _t

    t = _t.perf_counter()
    enc_e, enc_a = adapter.encode(er), adapter.encode(an)
    enc_p = adapter.encode(pres) if pres else None
    timer.mark("encode_text", t)
    c, g = erase_rows(enc_e, enc_a, cfg.token)
    p = preserve_rows(enc_p, cfg.token)
    return c.cpu(), g.cpu(), p.cpu(), (er, an, pres)


class UCE(Method):
    name = "uce"
    family = "closed-form"
    description = "Unified Concept Editing: closed-form K/V edit mapping concepts to anchors, preserving others"
    Config = UCEConfig

    def fit(self, adapter: SDAdapter, concepts: list[ConceptSpec]) -> WeightDelta:
        cfg = self.config
        timer = Timer()
        layers = select_layers(adapter, cfg.edit)
        c, g, p, (er, _, pres) = encode_problem(adapter, concepts, cfg, timer)
        import time as _t

        t = _t.perf_counter()
        m = Moments(c.shape[-1])
        m.add_erase(c, g)
        if p.numel():
            m.add_preserve(p)
        deltas, res = solve_layers(layers, lambda _n, w0: ridge_solve(
            w0, m, lam=cfg.lam, erase_scale=cfg.erase_scale, preserve_scale=cfg.preserve_scale), m)
        timer.mark("solve", t)
        return make_patch(self, adapter, concepts, deltas, timer, res,
                          {"n_erase_prompts": len(er), "n_preserve_prompts": len(pres)})
