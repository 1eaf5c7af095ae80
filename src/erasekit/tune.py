"""Choose a method's settings on a model by a rule fixed before the run: fit every candidate of a
grid, measure each on development seeds, keep the best.

The papers tune on their own evaluation (RECE keeps the round NudeNet flags least; AdvUnlearn and
FS-TE keep an epoch by eye), and a setting chosen on the seeds and phrasings it is then reported on
flatters it. :func:`tune` measures candidates only on the judge's templated prompt family and on
``seeds`` (default 100-115, which ``erasekit eval``'s default 0-63 does not use), so the choice can
be checked afterwards on other seeds and on the paraphrase family, which tuning never sees. With
``separately=True`` over star, heart and circle and the default seeds and rule, it is the procedure
the world settings were chosen by (README, "the rule").

Rules:

- ``"h"``: the highest mean harmonic score H (MACE's; over the concepts, templated family);
- ``"detection"``: among the candidates whose neighbour and unrelated drops are at most
  ``max_drop`` for every concept (point estimates), the lowest mean detection of the target;
  none may qualify, and then none is chosen;
- ``"robust"``: among the same candidates, the lowest mean (over concepts) of the worst post-attack
  success over ``attacks``, then the lowest detection, then the highest H.

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

RULES = ("h", "detection", "robust")
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
        try:
            grid[key] = [_parse(v, hints[key], key) for v in items]
        except InvalidInputError as e:
            raise InvalidInputError(str(e).replace("--set ", "--grid ", 1)) from None
    if not grid:
        raise InvalidInputError("no --grid given; pass e.g. --grid erase_scale=1,3,6")
    return grid


def candidates(base: Any, grid: Mapping[str, Iterable[Any]]) -> list[tuple[dict[str, Any], Any]]:
    """Every combination of the grid's values over ``base`` (a method config), in grid order, each
    range-checked (:func:`plan` also builds each candidate's method, which checks the rest)."""
    if not grid:
        raise InvalidInputError("the grid is empty; give at least one setting with its candidate values")
    known = {f.name for f in dataclasses.fields(base)}
    unknown = sorted(set(grid) - known)
    if unknown:
        raise InvalidInputError(f"no setting(s) {unknown} to tune; known: {sorted(known)}")
    values: dict[str, list[Any]] = {}
    for k, vs in grid.items():
        if isinstance(vs, (str, bytes)) or not isinstance(vs, Iterable):
            raise InvalidInputError(f"grid[{k!r}] must be a list of candidate values, not {type(vs).__name__}")
        values[k] = list(vs)  # once: a generator is read a single time
        if not values[k]:
            raise InvalidInputError(f"grid[{k!r}] must be a non-empty list of candidate values")
        seen: list[Any] = []
        for v in values[k]:
            if v in seen:
                raise InvalidInputError(f"grid[{k!r}] lists {v!r} twice; give each candidate once")
            seen.append(v)
    keys = list(values)
    combos = list(itertools.product(*(values[k] for k in keys)))
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


def plan(cls: type, base: Any, grid: Mapping[str, Iterable[Any]], concepts: list[ConceptSpec],
         separately: bool = False) -> list[tuple[dict[str, Any], Any]]:
    """(settings, method) for every candidate, each method built and checked against the concepts it
    will be fitted on (settings that must agree with each other, anchors a method needs): everything
    that can fail before a fit fails here, before the first one."""
    out = []
    for settings, cfg in candidates(base, grid):
        method = cls(cfg)
        check = getattr(method, "check", None)
        if check is not None:
            for group in ([[c] for c in concepts] if separately else [concepts]):
                check(group)
        out.append((settings, method))
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
        rob = getattr(c, "robustness", None) or {}
        if rob:
            row["post_attack"] = {a: r["success"]["all"]["post_attack"]["value"] for a, r in rob.items()}
            row["worst_post_attack"] = max(row["post_attack"].values())
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
    """A candidate's place under ``rule`` (larger is better; None: it may not be chosen). Under
    ``detection`` equal detections (common at few seeds) go to the higher H; under ``robust`` the
    lowest worst post-attack success, then detection, then H; equal keys keep the earlier candidate."""
    mean = record["mean"]
    h = mean["H"] if mean["H"] is not None else -1.0
    if rule == "h":
        return (h,)
    if not record["within_max_drop"]:
        return None
    detected = -(mean["detected_after"] if mean["detected_after"] is not None else 1.0)
    if rule == "robust":
        worst = mean.get("worst_post_attack")
        return (-(worst if worst is not None else 1.0), detected, h)
    return (detected, h)


@dataclass
class TuneResult:
    """Every candidate's settings and figures, the rule, and the chosen candidate with its edits."""

    method: str
    rule: str
    max_drop: float
    seeds: list[int]
    base: dict[str, Any]
    separately: bool = False
    candidates: list[dict[str, Any]] = field(default_factory=list)
    chosen: int | None = None
    reason: str = ""
    notes: list[str] = field(default_factory=list)
    #: the chosen candidate's edits, by the concepts each erases ("star", or "star+heart" for a joint edit)
    edits: dict[str, Edit] = field(default_factory=dict)

    @property
    def edit(self) -> Edit | None:
        """The chosen edit where there is one (a joint fit, or a single concept); else None."""
        return next(iter(self.edits.values())) if len(self.edits) == 1 else None

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "edits"}  # no tensors
        d["chosen_settings"] = None if self.chosen is None else self.candidates[self.chosen]["settings"]
        d["held_out"] = ("tuning saw only the templated prompt family on these seeds: measure the choice with "
                         "`erasekit eval` on other seeds (its default 0-63) and read the paraphrase family too")
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, default=str)


def tune(pipe: Any, concepts: str | ConceptSpec | Iterable[str | ConceptSpec], method: str,
         grid: Mapping[str, Iterable[Any]], config: Any = None, seeds: Iterable[int] = DEV_SEEDS,
         judge: Any = None, rule: str = "h", max_drop: float = 0.05, cache: Any = None,
         sampling: dict[str, Any] | None = None, anchor: str = "", preserve: Iterable[str] | str | None = None,
         separately: bool = False, attacks: Sequence[Any] = (), attack_seeds: Iterable[int] | None = None,
         on_candidate: Callable[[int, int, dict[str, Any]], None] | None = None) -> TuneResult:
    """Fit ``method`` at every combination of ``grid`` (``{"setting": [values...]}``, over
    ``config`` or the method's defaults), measure each on ``seeds`` with ``judge`` (templated
    prompts only), and choose by ``rule`` (module docstring). With several concepts, one edit
    erases them all; ``separately=True`` fits and measures one edit per concept instead (how the
    world settings were chosen: mean H over shapes erased one at a time). ``attacks`` (names or
    :class:`~erasekit.attacks.Attack` objects, as for ``evaluate``) attack every candidate on the
    target and synonym prompts of ``attack_seeds`` (default: the first 8 seeds) and record each
    one's post-attack success; ``rule="robust"`` needs them. ``on_candidate(i, n, record)`` is called
    after each candidate. Returns every candidate's figures and the chosen
    candidate's edits."""
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
    attacks = [a.strip() for a in attacks.split(",") if a.strip()] if isinstance(attacks, str) else list(attacks)
    if rule == "robust" and not attacks:
        raise InvalidInputError("the robust rule ranks candidates by post-attack success: name the attacks, e.g. "
                                "--attack unlearndiffatk,concept-arithmetic")
    cls = get_method(method)
    base = config if config is not None else cls.Config()
    if not isinstance(base, cls.Config):
        raise InvalidInputError(f"config is a {type(base).__name__}, not {cls.name}'s {cls.Config.__name__}")
    specs = make_concepts(concepts, anchor=anchor, preserve=preserve)
    judge = get_judge(judge or "world-classifier") if isinstance(judge, str) or judge is None else judge
    for s in specs:
        judge.prepare(s)  # unknown concepts fail before the first fit
    groups = [[s] for s in specs] if separately else [specs]
    cands = plan(cls, base, grid, specs, separately)  # every candidate built and checked before the first fit
    cache = cache if isinstance(cache, ImageCache) else ImageCache(cache)
    adapter = get_adapter(pipe)
    result = TuneResult(cls.name, rule, float(max_drop), seeds, dataclasses.asdict(base), bool(separately))
    best_key: tuple | None = None
    for i, (settings, m) in enumerate(cands):
        figs: dict[str, dict[str, float | None]] = {}
        edits: dict[str, Edit] = {}
        fit_s = eval_s = 0.0
        for group in groups:
            t0 = time.perf_counter()
            edit = m.fit(adapter, group)
            t1 = time.perf_counter()
            res = evaluate(pipe, group, patch=edit, seeds=seeds, judge=judge, cache=cache, sampling=sampling,
                           paraphrase=False, keep_images=False, attacks=attacks, attack_seeds=attack_seeds)
            fit_s, eval_s = fit_s + t1 - t0, eval_s + time.perf_counter() - t1
            figs.update(_figures(res))
            edits["+".join(c.target for c in group)] = edit
        mean = {k: _mean(f.get(k) for f in figs.values()) for k in ("H", "detected_after", "neighbours_kept",
                                                                      "unrelated_kept", "worst_post_attack")}
        record = {"settings": settings, "figures": figs, "mean": mean, "within_max_drop": within(figs, max_drop),
                  "fit_s": round(fit_s, 2), "eval_s": round(eval_s, 2),
                  "edit_digests": {k: e.digest for k, e in edits.items()}}
        result.candidates.append(record)
        key = rank_key(record, rule)
        if key is not None and (best_key is None or key > best_key):
            best_key, result.chosen, result.edits = key, i, edits  # only the best candidate's edits are kept
        if on_candidate is not None:
            on_candidate(i, len(cands), record)
    if rule == "detection":
        missing = sorted({d for c in result.candidates for f in c["figures"].values()
                          for d in ("neighbours_drop", "unrelated_drop") if f.get(d) is None})
        if missing:
            result.notes.append(f"no {' or '.join(x.split('_')[0] for x in missing)} prompts were measured, so "
                                "max_drop did not check them: give the concepts neighbours or preserve prompts")
    if result.chosen is None:
        result.reason = (f"no candidate kept neighbours and unrelated prompts within {max_drop:.2f} of the unedited "
                         "model; loosen max_drop or widen the grid")
    else:
        c = result.candidates[result.chosen]
        result.reason = ("highest mean H" if rule == "h" else
                         f"lowest mean target detection with drops <= {max_drop:.2f}" if rule == "detection" else
                         f"lowest worst post-attack success with drops <= {max_drop:.2f}") + \
            f" ({', '.join(f'{k}={v!r}' for k, v in c['settings'].items())})"
    return result
