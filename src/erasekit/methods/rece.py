"""RECE, Reliable and Efficient Concept Erasure (Gong et al., 2024): start from UCE, then for N
rounds find, in closed form, the text-embedding sequence that makes the edited model reproduce
the original model's keys/values for the concept, and erase that sequence too."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from ..adapters import SDAdapter
from ..concepts import ConceptSpec
from ..edits import WeightDelta
from ..solvers import DTYPE, Moments, residuals, ridge_solve
from .base import ClosedFormConfig, Method, Timer, make_patch, pairs, preserve_prompts, select_layers
from .uce import UCE, UCEConfig


@dataclass(frozen=True)
class RECEConfig(ClosedFormConfig):
    rounds: int = field(default=3, metadata={"help": "adversarial erase rounds after the UCE start (official: 1-5)"})
    gamma: float = field(default=0.1, metadata={"help": "ridge on the adversarial embedding (official nudity: 0.1)"})
    lam: float = field(default=0.1, metadata={"help": "ridge towards the current weights each round"})
    erase_scale: float = field(default=1.0, metadata={"help": "s_e of each round"})
    preserve_scale: float = field(default=0.1, metadata={"help": "s_p of each round"})
    uce_lam: float = field(default=0.5, metadata={"help": "lam of the initial UCE edit"})
    uce_token: str = field(default="last", metadata={"help": "token policy of the initial UCE edit"})


def adversarial_embeddings(layers: dict[str, torch.Tensor], originals: dict[str, torch.Tensor], c: torch.Tensor,
                           gamma: float) -> torch.Tensor:
    """Rows c' = (sum W^T W + gamma I)^-1 (sum W^T W0) c, jointly over all edited layers."""
    d = c.shape[-1]
    a = gamma * torch.eye(d, dtype=DTYPE)
    b = torch.zeros(d, d, dtype=DTYPE)
    for n, w in layers.items():
        a += w.T @ w
        b += w.T @ originals[n]
    return torch.linalg.solve(a, b @ c.to(DTYPE).T).T


class RECE(Method):
    name = "rece"
    family = "closed-form"
    description = "RECE: UCE followed by rounds of closed-form adversarial-embedding erasure"
    Config = RECEConfig

    def fit(self, adapter: SDAdapter, concepts: list[ConceptSpec]) -> WeightDelta:
        cfg = self.config
        timer = Timer()
        uce = UCE(UCEConfig(edit=cfg.edit, templates=cfg.templates, lam=cfg.uce_lam, token=cfg.uce_token))
        start = uce.fit(adapter, concepts)
        layers = select_layers(adapter, cfg.edit)
        w0 = {n: m.weight.detach().to("cpu", DTYPE) for n, m in layers.items()}
        cur = {n: w0[n] + start.deltas[f"unet.{n}.weight"].to(DTYPE) for n in layers}
        er, an = pairs(concepts, cfg.templates)
        pres = preserve_prompts(concepts, cfg.templates) or [""]
        t = time.perf_counter()
        enc_e, enc_a, enc_p = adapter.encode(er), adapter.encode(an), adapter.encode(pres)
        timer.mark("encode_text", t)
        seq_c = enc_e.embeds.cpu().reshape(-1, enc_e.embeds.shape[-1])  # all rows of every concept prompt
        seq_g = enc_a.embeds.cpu().reshape(-1, enc_a.embeds.shape[-1])
        seq_p = enc_p.embeds.cpu().reshape(-1, enc_p.embeds.shape[-1])
        t = time.perf_counter()
        history = []
        for _ in range(cfg.rounds):
            adv = adversarial_embeddings(cur, w0, seq_c, cfg.gamma)
            m = Moments(seq_c.shape[-1])
            m.add_erase(adv, seq_g)
            m.add_preserve(seq_p)
            new = {n: ridge_solve(cur[n], m, lam=cfg.lam, erase_scale=cfg.erase_scale,
                                  preserve_scale=cfg.preserve_scale) for n in layers}
            # how much of the original K/V the adversarial rows still recover, before and after the round
            rec_before = sum(float(((cur[n] - w0[n]) @ adv.T).norm() ** 2) for n in layers)
            rec_after = sum(float(((new[n] @ adv.T) - (w0[n] @ seq_c.to(DTYPE).T)).norm() ** 2) for n in layers)
            history.append({"adv_norm": float(adv.norm(dim=-1).mean()), "recovery_gap_before": rec_before,
                            "recovery_gap_after": rec_after})
            cur = new
        timer.mark("solve", t)
        deltas = {f"unet.{n}.weight": (cur[n] - w0[n]).to(torch.float32) for n in layers}
        m_res = Moments(seq_c.shape[-1])
        m_res.add_erase(enc_e.last_subject().cpu(), enc_a.last_subject().cpu())
        m_res.add_preserve(enc_p.last_subject().cpu())
        res = {n: {k: round(v, 6) for k, v in residuals(cur[n], w0[n], m_res).items()} for n in layers}
        timer.parts.update({f"uce_{k}": v for k, v in start.manifest["timings_s"].items()})
        return make_patch(self, adapter, concepts, deltas, timer, res, {"rounds": history})
