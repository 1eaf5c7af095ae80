"""The closed-form plumbing every closed-form method shares: prompt pairs and preserve sets, the
edited layers, per-layer solves, timings, and the edit with its manifest.

A closed-form method is a config and a ``solve`` that turns the encoded problem into new
weights per layer; :class:`ClosedFormMethod.fit` does the rest. With ``lora_rank > 0`` the
weight delta becomes its best rank-r approximation, as a LoRA edit.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from .. import __version__
from ..adapters import Encoded, get_adapter
from ..concepts import ConceptSpec
from ..edits import Edit, LoraEdit, WeightDelta, applied, factorise
from ..errors import InvalidInputError
from ..solvers import DTYPE, Moments, residuals
from .base import Method, config_dict

Layers = dict[str, torch.nn.Linear]


@dataclass(frozen=True)
class ClosedFormConfig:
    """Settings every closed-form method shares."""

    edit: str = field(default="kv", metadata={"help": "which projections to edit: k, v or kv",
                                              "choices": ("k", "v", "kv")})
    templates: tuple[str, ...] = field(default=("{}",), metadata={
        "help": "prompt templates the target, anchor and preserve phrases are put into ({} = phrase)",
        "min_items": 1, "each_contains": "{}"})
    lora_rank: int = field(default=0, metadata={
        "help": "0: a full weight-delta edit; r > 0: the delta's best rank-r approximation (truncated SVD) as a "
                "LoRA edit, exportable as a diffusers LoRA file", "min": 0})


@dataclass
class Solution:
    """Each layer's weight change (float32, by full module name) and what the fit measured."""

    deltas: dict[str, torch.Tensor]
    residuals: dict[str, dict] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)


def expand(template_list: tuple[str, ...], phrase: str) -> list[str]:
    return [" ".join(t.replace("{}", phrase).split()) for t in template_list]


def select_layers(adapter: Any, edit: str) -> Layers:
    """The cross-attention key/value projections to edit, by full module name."""
    if edit not in ("k", "v", "kv"):
        raise InvalidInputError(f"edit must be k, v or kv (got {edit!r})")
    sel = adapter.modules({"k": "cross_attn_k", "v": "cross_attn_v", "kv": "cross_attn_kv"}[edit])
    if not sel:
        raise InvalidInputError("the model has no cross-attention key/value projections to edit")
    return sel  # type: ignore[return-value]


def originals(layers: Layers) -> dict[str, torch.Tensor]:
    """Each layer's current weight in float64 on the CPU (the solves' W0)."""
    return {n: m.weight.detach().to("cpu", DTYPE) for n, m in layers.items()}


def pairs(concepts: list[ConceptSpec], templates: tuple[str, ...]) -> tuple[list[str], list[str]]:
    """(erase prompts, anchor prompts), aligned, over every concept's phrases and templates."""
    er, an = [], []
    for c in concepts:
        for phrase in c.erase_phrases:
            for t_e, t_a in zip(expand(templates, phrase), expand(templates, c.anchor)):
                er.append(t_e)
                an.append(t_a)
    return er, an


def preserve_prompts(concepts: list[ConceptSpec], templates: tuple[str, ...]) -> list[str]:
    erased = {p.lower() for c in concepts for p in c.erase_phrases}
    out: list[str] = []
    for c in concepts:
        for phrase in c.keep_phrases:
            if phrase.lower() in erased:
                raise InvalidInputError(f"{phrase!r} is erased by one concept and preserved by another; "
                                        "remove it from one list")
            out.extend(expand(templates, phrase))
    return list(dict.fromkeys(out))


@dataclass
class Problem:
    """A closed-form fit's prompts and their encodings: erase prompts paired with anchor prompts,
    and the preserve prompts (``enc_preserve`` is None when there are none)."""

    erase: list[str]
    anchor: list[str]
    preserve: list[str]
    enc_erase: Encoded
    enc_anchor: Encoded
    enc_preserve: Encoded | None


def encode_problem(adapter: Any, concepts: list[ConceptSpec], templates: tuple[str, ...], timer: "Timer",
                   keep: Callable[[list[str]], list[str]] = list) -> Problem:
    """Pair and encode the concepts' erase/anchor prompts and their preserve prompts (passed through
    ``keep``, a method's own selection), timing the encoding as ``encode_text``."""
    er, an = pairs(concepts, templates)
    pres = keep(preserve_prompts(concepts, templates))
    with timer.part("encode_text"):
        return Problem(er, an, pres, adapter.encode(er), adapter.encode(an), adapter.encode(pres) if pres else None)


class Timer:
    """Wall time of a fit, by part, and its memory high-water marks."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.parts: dict[str, float] = {}
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()

    @contextlib.contextmanager
    def part(self, name: str) -> Iterator[None]:
        """``with timer.part("solve"): ...`` adds the block's wall time to ``name``."""
        t = time.perf_counter()
        try:
            yield
        finally:
            self.parts[name] = self.parts.get(name, 0.0) + time.perf_counter() - t

    def memory(self) -> dict[str, float]:
        """Process peak RSS (an upper bound: it includes loading the model) and, on CUDA, the fit's peak."""
        from ..evaluation.metrics.cost import peak_rss_mb

        out = {"process_peak_rss_mb": peak_rss_mb()}
        if torch.cuda.is_available():
            out["cuda_peak_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        return out

    def total(self) -> float:
        return time.perf_counter() - self.t0


def solve_layers(layers: Layers, solve: Callable[[str, torch.Tensor], torch.Tensor],
                 moments: Moments | None = None) -> Solution:
    """Run ``solve(name, W0_float64) -> W_new`` per layer, with each layer's residuals under ``moments``;
    one layer's float64 weights are held at a time."""
    sol = Solution({})
    for name, mod in layers.items():
        w0 = mod.weight.detach().to("cpu", DTYPE)
        w = solve(name, w0)
        sol.deltas[name] = (w - w0).to(torch.float32)
        if moments is not None:
            sol.residuals[name] = {k: round(v, 6) for k, v in residuals(w, w0, moments).items()}
    return sol


class ClosedFormMethod(Method):
    """A closed-form method: subclasses implement ``solve``; ``fit`` selects the layers, times the
    fit and writes the edit (a weight delta, or a rank-r LoRA with ``lora_rank``)."""

    family = "closed-form"

    def solve(self, cfg: Any, adapter: Any, concepts: list[ConceptSpec], layers: Layers, timer: Timer) -> Solution:
        """New weights per layer for ``concepts``; ``cfg`` is ``self.config``, typed as the method's own."""
        raise NotImplementedError  # pragma: no cover - abstract

    def fit(self, adapter: Any, concepts: list[ConceptSpec]) -> Edit:
        adapter = get_adapter(adapter)
        timer = Timer()
        layers = select_layers(adapter, self.config.edit)
        sol = self.solve(self.config, adapter, concepts, layers, timer)
        deltas = {f"{n}.weight": sol.deltas[n] for n in layers}
        manifest = {
            "method": self.name,
            "config": config_dict(self.config),
            "concepts": [c.to_dict() for c in concepts],
            "family": adapter.family,
            "base_fingerprint": adapter.fingerprint(),
            # edits already applied when this one was fitted (its deltas are relative to them)
            "fitted_on_top_of": [e.digest for e, _ in applied(adapter.pipe)],
            "erasekit_version": __version__,
            "residuals": sol.residuals,
            **sol.extra,
        }
        rank = self.config.lora_rank
        if rank:
            factors, err = factorise(deltas, rank)
            manifest["lora_relative_error"] = {k: round(v, 8) for k, v in err.items()}
        manifest.update(wall_time_s=round(timer.total(), 4), peak_memory_mb=timer.memory(),
                        timings_s={k: round(v, 4) for k, v in timer.parts.items()})
        return LoraEdit.from_factors(factors, manifest) if rank else WeightDelta(deltas, manifest)
