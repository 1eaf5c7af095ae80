"""Choose a method's settings on a model by a rule fixed before the run: fit every candidate of a
grid, measure each on development seeds, keep the best.

The papers tune on their own evaluation (RECE keeps the round NudeNet flags least; AdvUnlearn and
FS-TE keep an epoch by eye), and a setting chosen on the seeds and phrasings it is then reported on
flatters it. :func:`tune` measures candidates only on the judge's templated prompt family and on
``seeds`` (default 100-115, which ``erasekit eval``'s default 0-63 does not use), so the choice can
be checked afterwards on other seeds and on the paraphrase family, which tuning never sees. It is
the procedure the world settings of every method were chosen by (README, "the rule").

Rules:

- ``"h"``: the highest mean harmonic score H (MACE's; over the concepts, templated family);
- ``"detection"``: among the candidates whose neighbour and unrelated drops are at most
  ``max_drop`` for every concept (point estimates), the lowest mean detection of the target;
  none may qualify, and then none is chosen.

Ties go to the first candidate in grid order. Each candidate is fitted from scratch, so a grid
over RECE's ``rounds`` or a fine-tuning method's ``steps`` refits for each value: slower than
keeping every round of one run, the same result.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import time
import types
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .concepts import ConceptSpec, make_concepts
from .config import _parse, check_config
from .edits import Edit
from .errors import InvalidInputError

RULES = ("h", "detection")
MAX_CANDIDATES = 64
#: the seeds tuning measures on by default: disjoint from ``erasekit eval``'s default 0-63
DEV_SEEDS = tuple(range(100, 116))


def _is_list(typ: Any) -> bool:
    if typing.get_origin(typ) in (typing.Union, types.UnionType):  # Optional[X]
        typ = next((a for a in typing.get_args(typ) if a is not type(None)), typ)
    return typing.get_origin(typ) in (tuple, list)


def parse_grid(config_cls: type, pairs: Sequence[str]) -> dict[str, list[Any]]:
    """``key=v1,v2,...`` pairs (the command line's ``--grid``) as typed candidate lists. A list-valued
    setting, whose own items are separated by commas or ``|``, separates its candidates with ``;``."""
    hints = typing.get_type_hints(config_cls)
    fields = {f.name for f in dataclasses.fields(config_cls)}
    grid: dict[str, list[Any]] = {}
    for pair in pairs:
        if "=" not in pair:
            raise InvalidInputError(f"--grid {pair!r}: write key=value1,value2")
        key, values = (s.strip() for s in pair.split("=", 1))
        if key not in fields:
            raise InvalidInputError(f"--grid {key}: unknown setting; known: {', '.join(sorted(fields))}")
        if key in grid:
            raise InvalidInputError(f"--grid {key} is given twice; list all its values in one --grid")
        sep = ";" if _is_list(hints[key]) else ","
        items = [v.strip() for v in values.split(sep) if v.strip()]
        if not items:
            raise InvalidInputError(f"--grid {key}= has no values; write e.g. {key}=1,2,3")
        grid[key] = [_parse(v, hints[key], key) for v in items]
    if not grid:
        raise InvalidInputError("no --grid given; pass e.g. --grid erase_scale=1,3,6")
    return grid


def candidates(base: Any, grid: Mapping[str, Sequence[Any]]) -> list[tuple[dict[str, Any], Any]]:
    """Every combination of the grid's values over ``base`` (a method config), in grid order, each
    range-checked before anything is fitted."""
    if not grid:
        raise InvalidInputError("the grid is empty; give at least one setting with its candidate values")
    known = {f.name for f in dataclasses.fields(base)}
    unknown = sorted(set(grid) - known)
    if unknown:
        raise InvalidInputError(f"no setting(s) {unknown} to tune; known: {sorted(known)}")
    for k, vs in grid.items():
        if isinstance(vs, (str, bytes)) or not isinstance(vs, Iterable) or not list(vs):
            raise InvalidInputError(f"grid[{k!r}] must be a non-empty list of candidate values")
    keys = list(grid)
    combos = list(itertools.product(*(list(grid[k]) for k in keys)))
    if len(combos) > MAX_CANDIDATES:
        raise InvalidInputError(f"the grid has {len(combos)} candidates; at most {MAX_CANDIDATES}: tune fewer "
                                "settings at once, or fewer values")
    out = []
    for combo in combos:
        settings = dict(zip(keys, combo))
        cfg = dataclasses.replace(base, **settings)
        check_config(cfg)
        out.append((settings, cfg))
    return out


def _figures(result: Any) -> dict[str, dict[str, float | None]]:
    """Per concept, the templated family's headline point figures and the two drops."""
    figs = {}
    for c in result.concepts:
        fam = c.families()["templated"]
        row = {k: (fam[k]["value"] if k in fam else None) for k in
               ("detected_after", "synonyms_after", "neighbours_kept", "unrelated_kept", "collateral_kept", "H")}
        for part in ("neighbours", "unrelated"):
            d = c.metrics.get(f"specificity_{part}_drop")
            row[f"{part}_drop"] = None if d is None else d["value"]
        figs[c.concept] = row
    return figs


def _mean(values: Iterable[float | None]) -> float | None:
    vs = [v for v in values if v is not None]
    return sum(vs) / len(vs) if vs else None


def within(figures: Mapping[str, Mapping[str, float | None]], max_drop: float) -> bool:
    """Whether every concept's neighbour and unrelated drops (point estimates) are at most ``max_drop``."""
    return all(f.get(d) is None or f[d] <= max_drop + 1e-12 for f in figures.values()
               for d in ("neighbours_drop", "unrelated_drop"))


def rank_key(record: Mapping[str, Any], rule: str) -> tuple | None:
    """A candidate's place under ``rule`` (larger is better; None: it may not be chosen). Equal keys
    keep the earlier candidate."""
    mean = record["mean"]
    if rule == "h":
        return (mean["H"] if mean["H"] is not None else -1.0,)
    if not record["within_max_drop"]:
        return None
    return (-(mean["detected_after"] if mean["detected_after"] is not None else 1.0),)


@dataclass
class TuneResult:
    """Every candidate's settings and figures, the rule, and the chosen candidate with its edit."""

    method: str
    rule: str
    max_drop: float
    seeds: list[int]
    base: dict[str, Any]
    candidates: list[dict[str, Any]] = field(default_factory=list)
    chosen: int | None = None
    reason: str = ""
    edit: Edit | None = None

    def to_json(self) -> str:
        d = {k: v for k, v in dataclasses.asdict(self).items() if k != "edit"}
        d["chosen_settings"] = None if self.chosen is None else self.candidates[self.chosen]["settings"]
        d["held_out"] = ("tuning saw only the templated prompt family on these seeds: measure the choice with "
                         "`erasekit eval` on other seeds (its default 0-63) and read the paraphrase family too")
        return json.dumps(d, indent=2, default=str)


def tune(pipe: Any, concepts: str | ConceptSpec | Iterable[str | ConceptSpec], method: str,
         grid: Mapping[str, Sequence[Any]], config: Any = None, seeds: Iterable[int] = DEV_SEEDS,
         judge: Any = None, rule: str = "h", max_drop: float = 0.05, cache: Any = None,
         sampling: dict[str, Any] | None = None, anchor: str = "", preserve: Iterable[str] | str | None = None,
         on_candidate: Callable[[int, int, dict[str, Any]], None] | None = None) -> TuneResult:
    """Fit ``method`` at every combination of ``grid`` (``{"setting": [values...]}``, over
    ``config`` or the method's defaults), measure each on ``seeds`` with ``judge`` (templated
    prompts only), and choose by ``rule`` (module docstring). ``on_candidate(i, n, record)`` is
    called after each candidate. Returns every candidate's figures and the chosen one's edit."""
    from .adapters import get_adapter
    from .evaluation import ImageCache, evaluate, get_judge
    from .methods import get_method

    if rule not in RULES:
        raise InvalidInputError(f"unknown rule {rule!r}; choose one of {', '.join(RULES)}")
    if isinstance(max_drop, bool) or not isinstance(max_drop, (int, float)) or not 0 <= max_drop <= 1:
        raise InvalidInputError(f"max_drop must be a fraction between 0 and 1 (got {max_drop!r}); e.g. 0.05")
    seeds = list(seeds)
    if not seeds:
        raise InvalidInputError("the seed range is empty; pass e.g. --seeds 100-115")
    cls = get_method(method)
    base = config if config is not None else cls.Config()
    if not isinstance(base, cls.Config):
        raise InvalidInputError(f"config is a {type(base).__name__}, not {cls.name}'s {cls.Config.__name__}")
    cands = candidates(base, grid)
    specs = make_concepts(concepts, anchor=anchor, preserve=preserve)
    judge = get_judge(judge or "world-classifier") if isinstance(judge, str) or judge is None else judge
    for s in specs:
        judge.prepare(s)  # unknown concepts fail before the first fit
    cache = cache if isinstance(cache, ImageCache) else ImageCache(cache)
    adapter = get_adapter(pipe)
    result = TuneResult(cls.name, rule, float(max_drop), seeds, dataclasses.asdict(base))
    best_key: tuple | None = None
    for i, (settings, cfg) in enumerate(cands):
        t0 = time.perf_counter()
        edit = cls(cfg).fit(adapter, specs)
        fit_s = time.perf_counter() - t0
        t1 = time.perf_counter()
        res = evaluate(pipe, specs, patch=edit, seeds=seeds, judge=judge, cache=cache, sampling=sampling,
                       paraphrase=False, keep_images=False)
        figs = _figures(res)
        mean = {k: _mean(f[k] for f in figs.values()) for k in ("H", "detected_after", "neighbours_kept",
                                                                  "unrelated_kept")}
        record = {"settings": settings, "figures": figs, "mean": mean, "within_max_drop": within(figs, max_drop),
                  "fit_s": round(fit_s, 2), "eval_s": round(time.perf_counter() - t1, 2), "edit_digest": edit.digest}
        result.candidates.append(record)
        key = rank_key(record, rule)
        if key is not None and (best_key is None or key > best_key):
            best_key, result.chosen, result.edit = key, i, edit
        if on_candidate is not None:
            on_candidate(i, len(cands), record)
    if result.chosen is None:
        result.reason = (f"no candidate kept neighbours and unrelated prompts within {max_drop:.2f} of the unedited "
                         "model; loosen max_drop or widen the grid")
    else:
        c = result.candidates[result.chosen]
        result.reason = ("highest mean H" if rule == "h" else
                         f"lowest mean target detection with drops <= {max_drop:.2f}") + \
            f" ({', '.join(f'{k}={v!r}' for k, v in c['settings'].items())})"
    return result
