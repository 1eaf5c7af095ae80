"""MACE's closed-form cross-attention refinement (Lu et al., 2024), its first stage.

Each concept prompt is paired with the same prompt naming the anchor instead. Tokens shared by
both prompts (prefix, suffix with EOT, and padding) are aligned, and the concept prompt's rows at
those positions are sent to the original outputs of the anchor prompt's rows. The concept
words themselves are left alone: this removes the residual concept information that causal
attention wrote into the *other* tokens. (MACE's LoRA and fusion stages come with the
fine-tuning family.)"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from ..adapters import SDAdapter
from ..concepts import ConceptSpec
from ..edits import WeightDelta
from ..solvers import Moments, ridge_solve
from .base import ClosedFormConfig, Method, Timer, make_patch, pairs, preserve_prompts, select_layers, solve_layers

DEFAULT_TEMPLATES = ("{}", "a photo of a {}", "an image of a {}", "a picture of a {}", "a drawing of a {}")


@dataclass(frozen=True)
class MACEConfig(ClosedFormConfig):
    templates: tuple[str, ...] = field(default=DEFAULT_TEMPLATES, metadata={
        "help": "prompt templates pairing concept and anchor prompts (the paper augments with many)"})
    lam: float = field(default=0.1, metadata={"help": "ridge towards W0 (the paper uses 0 with a large "
                                                      "COCO preserve cache; without one it must be > 0)"})
    preserve_scale: float = field(default=1.0, metadata={"help": "weight of the preserve prompts' rows"})
    include_padding: bool = field(default=True, metadata={"help": "also align the padding positions"})


def aligned_positions(ids_a: list[int], ids_b: list[int], len_a: int, len_b: int, max_len: int,
                      include_padding: bool) -> list[tuple[int, int]]:
    """Positions (i in a, j in b) of tokens shared by both prompts: prefix, suffix incl. EOT, padding."""
    pre = 0
    while pre < min(len_a, len_b) - 1 and ids_a[pre] == ids_b[pre]:
        pre += 1
    suf = 0
    while (suf < min(len_a, len_b) - pre and ids_a[len_a - 1 - suf] == ids_b[len_b - 1 - suf]):
        suf += 1
    out = [(i, i) for i in range(pre)]
    out += [(len_a - 1 - s, len_b - 1 - s) for s in range(suf)][::-1]
    if include_padding:
        k = 0
        while len_a + k < max_len and len_b + k < max_len:
            out.append((len_a + k, len_b + k))
            k += 1
    return out


class MACE(Method):
    name = "mace"
    family = "closed-form"
    description = "MACE closed-form refinement: clean concept traces out of co-occurring tokens (stage 1 of MACE)"
    Config = MACEConfig

    def fit(self, adapter: SDAdapter, concepts: list[ConceptSpec]) -> WeightDelta:
        cfg = self.config
        timer = Timer()
        layers = select_layers(adapter, cfg.edit)
        er, an = pairs(concepts, cfg.templates)
        pres = preserve_prompts(concepts, cfg.templates)
        t = time.perf_counter()
        enc_e, enc_a = adapter.encode(er), adapter.encode(an)
        enc_p = adapter.encode(pres) if pres else None
        timer.mark("encode_text", t)
        t = time.perf_counter()
        tok = adapter.pipe.tokenizer if adapter.pipe.tokenizer is not None else adapter.pipe.tokenizer_2
        max_len = tok.model_max_length
        ids_e = tok(er, padding="max_length", max_length=max_len, truncation=True).input_ids
        ids_a = tok(an, padding="max_length", max_length=max_len, truncation=True).input_ids
        cs, gs = [], []
        for i in range(len(er)):
            pos = aligned_positions(ids_e[i], ids_a[i], int(enc_e.lengths[i]), int(enc_a.lengths[i]),
                                    enc_e.embeds.shape[1], cfg.include_padding)
            if not pos:
                continue
            ia, ib = zip(*pos)
            cs.append(enc_e.embeds[i, list(ia)].cpu())
            gs.append(enc_a.embeds[i, list(ib)].cpu())
        c, g = torch.cat(cs), torch.cat(gs)
        m = Moments(c.shape[-1])
        m.add_erase(c, g)
        if enc_p is not None:
            m.add_preserve(torch.cat([enc_p.embeds[i, : int(enc_p.lengths[i])].cpu() for i in range(len(pres))]))
        deltas, res = solve_layers(layers, lambda _n, w0: ridge_solve(
            w0, m, lam=cfg.lam, erase_scale=1.0, preserve_scale=cfg.preserve_scale), m)
        timer.mark("solve", t)
        return make_patch(self, adapter, concepts, deltas, timer, res, {"aligned_rows": len(c)})
