"""What every method shares: the config/registry contract and the closed-form plumbing."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import torch

from .. import __version__
from ..adapters import SDAdapter
from ..concepts import ConceptSpec
from ..edits import WeightDelta
from ..errors import InvalidInputError
from ..solvers import DTYPE, Moments, residuals


class Method:
    """A concept-erasure method: a frozen ``Config`` dataclass and ``fit``.

    Subclasses set ``name``, ``description``, ``family`` ("closed-form", ...) and ``Config``.
    """

    name: ClassVar[str]
    description: ClassVar[str]
    family: ClassVar[str]
    Config: ClassVar[type]

    def __init__(self, config: Any = None, **overrides: Any) -> None:
        cfg = config if config is not None else self.Config()
        if overrides:
            known = {f.name for f in dataclasses.fields(cfg)}
            unknown = set(overrides) - known
            if unknown:
                raise InvalidInputError(f"{self.name} has no setting(s) {sorted(unknown)}; known: {sorted(known)}")
            cfg = dataclasses.replace(cfg, **overrides)
        self.config = cfg

    def fit(self, adapter: SDAdapter, concepts: list[ConceptSpec]) -> WeightDelta:  # pragma: no cover
        raise NotImplementedError


def config_dict(cfg: Any) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(cfg).items()}


def config_from_dict(cls: type, d: dict[str, Any]) -> Any:
    hints = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(d) - set(hints)
    if unknown:
        raise InvalidInputError(f"unknown setting(s) {sorted(unknown)} for {cls.__name__}")
    vals = {}
    for k, v in d.items():
        default = hints[k].default if hints[k].default is not dataclasses.MISSING else hints[k].default_factory()  # type: ignore[misc]
        vals[k] = tuple(v) if isinstance(default, tuple) and isinstance(v, list) else v
    return cls(**vals)


@dataclass(frozen=True)
class ClosedFormConfig:
    """Settings every closed-form method shares."""

    edit: str = field(default="kv", metadata={"help": "which projections to edit: k, v or kv"})
    templates: tuple[str, ...] = field(default=("{}",), metadata={
        "help": "prompt templates the target, anchor and preserve phrases are put into ({} = phrase)"})


def expand(template_list: tuple[str, ...], phrase: str) -> list[str]:
    return [" ".join(t.replace("{}", phrase).split()) for t in template_list]


def select_layers(adapter: SDAdapter, edit: str) -> dict[str, torch.nn.Linear]:
    if edit not in ("k", "v", "kv"):
        raise InvalidInputError(f"edit must be k, v or kv (got {edit!r})")
    mods = adapter.kv_modules()
    keep = {"k": ("to_k",), "v": ("to_v",), "kv": ("to_k", "to_v")}[edit]
    sel = {n: m for n, m in mods.items() if n.endswith(keep)}
    if not sel:
        raise InvalidInputError("the model has no cross-attention key/value projections to edit")
    return sel


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


class Timer:
    """Wall time of a fit, by part, and its memory high-water marks."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.parts: dict[str, float] = {}
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()

    def memory(self) -> dict[str, float]:
        """Process peak RSS (an upper bound: it includes loading the model) and, on CUDA, the fit's peak."""
        import resource

        out = {"process_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
        if torch.cuda.is_available():
            out["cuda_peak_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        return out

    def mark(self, name: str, since: float) -> None:
        self.parts[name] = self.parts.get(name, 0.0) + time.perf_counter() - since

    def total(self) -> float:
        return time.perf_counter() - self.t0


def solve_layers(layers: dict[str, torch.nn.Linear], solve: Callable[[str, torch.Tensor], torch.Tensor],
                 moments: Moments | None, **res_kwargs: Any) -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
    """Run ``solve(name, W0_float64) -> W_new`` per layer; returns unet deltas and residuals."""
    deltas, res = {}, {}
    for name, mod in layers.items():
        w0 = mod.weight.detach().to("cpu", DTYPE)
        w = solve(name, w0)
        deltas[f"unet.{name}.weight"] = (w - w0).to(torch.float32)
        if moments is not None:
            kw = {k: (v[name] if isinstance(v, dict) else v) for k, v in res_kwargs.items()}
            res[name] = {k: round(v, 6) for k, v in residuals(w, w0, moments, **kw).items()}
    return deltas, res


def make_patch(method: Method, adapter: SDAdapter, concepts: list[ConceptSpec], deltas: dict[str, torch.Tensor],
               timer: Timer, layer_residuals: dict[str, dict], extra: dict[str, Any] | None = None) -> WeightDelta:
    manifest = {
        "method": method.name,
        "config": config_dict(method.config),
        "concepts": [c.to_dict() for c in concepts],
        "family": adapter.family,
        "base_fingerprint": adapter.fingerprint(),
        # patches already applied when this one was fitted (its deltas are relative to them)
        "fitted_on_top_of": [p.digest for p, _ in getattr(adapter.pipe, "_erasekit_stack", None) or []],
        "erasekit_version": __version__,
        "wall_time_s": round(timer.total(), 4),
        "timings_s": {k: round(v, 4) for k, v in timer.parts.items()},
        "peak_memory_mb": timer.memory(),
        "residuals": layer_residuals,
    }
    if extra:
        manifest.update(extra)
    return WeightDelta(deltas, manifest)
