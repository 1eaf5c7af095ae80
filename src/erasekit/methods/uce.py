"""UCE, Unified Concept Editing (Gandikota et al., 2024): one closed-form edit of every
cross-attention key/value projection that sends each concept's text rows to its anchor's
outputs while holding preserve prompts' outputs, with a ridge pull towards the original.

Erasure and moderation only: UCE's debiasing mode (targets mixed from several attributes' outputs, with
ratios re-measured by CLIP on generated images over up to 30 iterations) is not implemented."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ..adapters import Encoded
from ..concepts import ConceptSpec
from ..errors import InvalidInputError
from ..solvers import Moments, ridge_solve
from .closed_form import ClosedFormConfig, ClosedFormMethod, Layers, Problem, Solution, Timer, encode_problem, solve_layers


@dataclass(frozen=True)
class UCEConfig(ClosedFormConfig):
    lam: float = field(default=0.5, metadata={"help": "ridge weight of ||W - W0||^2 (official: 0.5)", "min": 0.0})
    erase_scale: float = field(default=1.0, metadata={"help": "weight of the erase term s_e", "min": 0.0})
    preserve_scale: float | None = field(default=None, metadata={
        "help": "weight of the preserve term s_p; unset (None) = the token policy's official default: "
                "0.1 for 'all' (original train_erase.py), 1.0 for 'last' (current uce_sd_erase.py) and 'from_last'",
        "min": 0.0})
    token: str = field(default="last", metadata={
        "help": "row policy. 'last': each erase, anchor and preserve prompt's last subject token (current official "
                "uce_sd_erase.py). 'all': the original train_erase.py: erase rows from the last subject token to "
                "the end, EOT and padding included, trimmed to align with the anchor's; preserve rows = every row "
                "of each preserve prompt, padding included; '' is preserved when there is no preserve list. "
                "'from_last': erasekit 0.1's 'all': erase rows as 'all', but preserve rows stop at each preserve "
                "prompt's EOT and nothing is preserved without a preserve list (default s_p 1.0, not 0.1)",
        "choices": ("last", "all", "from_last")})

    @property
    def effective_preserve_scale(self) -> float:
        """``preserve_scale``, or the token policy's official default where it is unset."""
        check_token(self.token)
        return TOKEN_POLICIES[self.token] if self.preserve_scale is None else float(self.preserve_scale)


#: token policies of UCE and the preserve scale each uses when ``preserve_scale`` is unset
TOKEN_POLICIES: dict[str, float] = {"last": 1.0, "all": 0.1, "from_last": 1.0}


def check_token(token: str) -> None:
    if token not in TOKEN_POLICIES:
        raise InvalidInputError(f"token must be one of {', '.join(TOKEN_POLICIES)} (got {token!r})")


def erase_rows(enc_e: Encoded, enc_a: Encoded, token: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Erase rows and their anchor rows under a token policy ('all' and 'from_last' share them)."""
    if token == "last":
        return enc_e.last_subject(), enc_a.last_subject()
    if token in ("all", "from_last"):
        cs, gs = [], []
        for i in range(len(enc_e.embeds)):
            c, g = enc_e.rows_from_last(i), enc_a.rows_from_last(i)
            n = min(len(c), len(g))
            cs.append(c[:n])
            gs.append(g[:n])
        return torch.cat(cs), torch.cat(gs)
    raise InvalidInputError(f"token must be one of {', '.join(TOKEN_POLICIES)} (got {token!r})")


def preserve_rows(enc: Encoded | None, token: str) -> torch.Tensor:
    """Preserve rows under a token policy: 'last' subject token, every row ('all', padding
    included), or the real tokens up to EOT ('from_last')."""
    check_token(token)
    if enc is None:
        return torch.zeros(0, 0)
    if token == "last":
        return enc.last_subject()
    if token == "all":
        return enc.embeds.reshape(-1, enc.embeds.shape[-1])
    return torch.cat([enc.embeds[i, : int(enc.lengths[i])] for i in range(len(enc.embeds))])


def preserve_set(prompts: list[str], token: str) -> list[str]:
    """The preserve prompts a token policy uses: the original script ('all') preserves '' when
    there is no preserve list; the other policies preserve only what is asked for."""
    check_token(token)
    return [""] if token == "all" and not prompts else prompts


def uce_rows(problem: Problem, token: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(erase rows, anchor rows, preserve rows) of an encoded problem under a token policy."""
    c, g = erase_rows(problem.enc_erase, problem.enc_anchor, token)
    return c.cpu(), g.cpu(), preserve_rows(problem.enc_preserve, token).cpu()


class UCE(ClosedFormMethod):
    name = "uce"
    description = "Unified Concept Editing: closed-form K/V edit mapping concepts to anchors, preserving others"
    Config = UCEConfig

    @classmethod
    def world_settings(cls, concepts: list[ConceptSpec]) -> dict[str, Any]:
        """On the embedded world: UCE_WORLD and the world's erase templates for the concepts' axis."""
        from ..world.vocab import UCE_WORLD

        return {**super().world_settings(concepts), **UCE_WORLD}

    def solve(self, cfg: UCEConfig, adapter: Any, concepts: list[ConceptSpec], layers: Layers, timer: Timer) -> Solution:
        problem = encode_problem(adapter, concepts, cfg.templates, timer, keep=lambda p: preserve_set(p, cfg.token))
        with timer.part("solve"):
            m = self.moments(*uce_rows(problem, cfg.token))
            sol = solve_layers(layers, lambda _n, w0: ridge_solve(
                w0, m, lam=cfg.lam, erase_scale=cfg.erase_scale, preserve_scale=cfg.effective_preserve_scale), m)
        sol.extra.update(n_erase_prompts=len(problem.erase), n_preserve_prompts=len(problem.preserve),
                         preserve_scale_used=cfg.effective_preserve_scale)
        return sol

    def moments(self, c: torch.Tensor, g: torch.Tensor, p: torch.Tensor) -> Moments:
        """The erase pairs (c -> g) and preserve rows p the ridge solve fits."""
        m = Moments(c.shape[-1])
        m.add_erase(c, g)
        if p.numel():
            m.add_preserve(p)
        return m
