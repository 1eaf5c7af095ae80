"""MACE's closed-form cross-attention refinement (Lu et al., 2024), its first stage.

Each concept prompt is paired with the same prompt naming the anchor instead. Tokens shared by
both prompts (prefix, suffix with EOT, and padding) are aligned, and the concept prompt's rows at
those positions are sent to the original outputs of the anchor prompt's rows. The concept
words themselves are left alone: this removes the residual concept information that causal
attention wrote into the *other* tokens. (MACE's LoRA and fusion stages come with the
fine-tuning family.)"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ..adapters import Encoded
from ..concepts import ConceptSpec
from ..solvers import Moments, ridge_solve
from .closed_form import ClosedFormConfig, ClosedFormMethod, Layers, Solution, Timer, encode_problem, solve_layers

DEFAULT_TEMPLATES = ("{}", "a photo of a {}", "an image of a {}", "a picture of a {}", "a drawing of a {}")


@dataclass(frozen=True)
class MACEConfig(ClosedFormConfig):
    templates: tuple[str, ...] = field(default=DEFAULT_TEMPLATES, metadata={
        "help": "prompt templates pairing concept and anchor prompts (the paper augments with many)",
        "min_items": 1, "each_contains": "{}"})
    lam: float = field(default=0.1, metadata={"help": "ridge towards W0 (the paper uses 0 with a large "
                                                      "COCO preserve cache; without one it must be > 0)", "min": 0.0})
    preserve_scale: float = field(default=1.0, metadata={"help": "weight of the preserve prompts' rows", "min": 0.0})
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


class MACE(ClosedFormMethod):
    name = "mace"
    description = "MACE closed-form refinement: clean concept traces out of co-occurring tokens (stage 1 of MACE)"
    Config = MACEConfig

    def solve(self, cfg: MACEConfig, adapter: Any, concepts: list[ConceptSpec], layers: Layers, timer: Timer) -> Solution:
        pb = encode_problem(adapter, concepts, cfg.templates, timer)
        with timer.part("solve"):
            c, g = self.aligned_rows(adapter, pb.erase, pb.anchor, pb.enc_erase, pb.enc_anchor)
            m = Moments(c.shape[-1])
            m.add_erase(c, g)
            if (enc_p := pb.enc_preserve) is not None:
                m.add_preserve(torch.cat([enc_p.embeds[i, : int(enc_p.lengths[i])].cpu() for i in range(len(enc_p))]))
            sol = solve_layers(layers, lambda _n, w0: ridge_solve(
                w0, m, lam=cfg.lam, erase_scale=1.0, preserve_scale=cfg.preserve_scale), m)
        sol.extra["aligned_rows"] = len(c)
        return sol

    def aligned_rows(self, adapter: Any, er: list[str], an: list[str], enc_e: Encoded,
                     enc_a: Encoded) -> tuple[torch.Tensor, torch.Tensor]:
        """The concept prompts' rows at positions shared with their anchor prompts, and those anchor rows."""
        ids_e, ids_a = adapter.input_ids(er)[0].tolist(), adapter.input_ids(an)[0].tolist()
        cs, gs = [], []
        for i in range(len(er)):
            pos = aligned_positions(ids_e[i], ids_a[i], int(enc_e.lengths[i]), int(enc_a.lengths[i]),
                                    enc_e.embeds.shape[1], self.config.include_padding)
            if pos:
                ia, ib = zip(*pos)
                cs.append(enc_e.embeds[i, list(ia)].cpu())
                gs.append(enc_a.embeds[i, list(ib)].cpu())
        return torch.cat(cs), torch.cat(gs)
