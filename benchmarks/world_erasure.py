"""Every registered method x every shape of the embedded world, plus multi-concept sets.

Each row fits one patch and evaluates it with ``erasekit.evaluate`` on shared seeds (images of
the unedited model are cached, so the baseline is generated once). Columns: efficacy (target
still detected, lower is better), generality (unseen synonyms detected), specificity on
neighbour shapes and on unrelated axes (higher is better), collateral (the other axes kept on the
erased concept's own prompts: "a green star" stays green), MACE's H; then the same figures on the
paraphrase prompts (``p:``, a grammar disjoint from the training captions and the erase
templates, same seeds; the CSV's ``p_`` columns, with the unedited model's too); fit time, and images
generated per second (a guard's extra UNet passes show against the "(none)" row of the same run;
NaN where every image came from the cache). The first rows are the unedited model: the baseline. Saves CSV and, with matplotlib, a PNG chart.

    python benchmarks/world_erasure.py [--axis shape|colour|...] [--seeds 0-31] [--methods uce,speed] [--out bench-out]
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

import erasekit  # noqa: E402
from erasekit.concepts import ConceptSpec  # noqa: E402
from erasekit.evaluation import ImageCache, evaluate, parse_seeds  # noqa: E402
from erasekit.methods import REGISTRY  # noqa: E402
from erasekit.world.vocab import CONCEPTS, erase_templates  # noqa: E402

MULTI = {"shape": [("star", "heart"), ("circle", "square", "triangle")],
         "colour": [("red", "blue"), ("green", "yellow", "purple")],
         "texture": [("striped", "dotted")], "background": [("grass", "sky")]}
#: methods that map a concept onto an anchor need one: the next value of the axis (star -> heart ...)
NEEDS_ANCHOR = {"ablating-concepts"}


def method_settings(methods: list[str], sets: list[str]) -> dict[str, dict]:
    """Per method: the world settings, then ``method.key=value`` overrides, typed by its config."""
    from erasekit.config import apply_overrides
    from erasekit.errors import InvalidInputError

    out = {}
    for m in methods:
        if m not in REGISTRY:
            raise SystemExit(f"unknown method {m!r}; choose from {', '.join(REGISTRY)}")
        mine = [s.split(".", 1)[1] for s in sets if s.split(".", 1)[0] == m]
        # the method's world settings, which `erasekit erase` uses on the world too (templates are set
        # per erased value by the caller)
        base = {k: v for k, v in REGISTRY[m].world_settings([ConceptSpec("star")]).items() if k != "templates"}
        try:
            cfg = apply_overrides(REGISTRY[m].Config(**base), mine)
        except InvalidInputError as e:  # one line, as the command line gives it
            raise SystemExit(f"{m}: {e}") from None
        keys = set(base) | {s.split("=", 1)[0] for s in mine}
        out[m] = {k: getattr(cfg, k) for k in keys}
    unknown = [s for s in sets if s.split(".", 1)[0] not in out]
    if unknown:
        raise SystemExit(f"--set {unknown[0]}: name one of the benchmarked methods ({', '.join(out)}) before the dot")
    return out


def fields_of(method: str) -> set[str]:
    return {f.name for f in dataclasses.fields(REGISTRY[method].Config)}


def images_per_second(res) -> float:
    """Images generated per second in this evaluation (cached images excluded; NaN if all were cached):
    a guard's extra UNet passes show here, against the "(none)" row of the same run."""
    misses, secs = res.cost["cache_misses"], res.cost["generation_s"]
    return misses / secs if misses and secs > 0 else float("nan")


#: per family (templated, paraphrase): the figures of one row, as (column, metric key)
FIGURES = (("efficacy", "efficacy_patched"), ("efficacy_before", "efficacy_original"),
           ("generality", "generality_patched"), ("neighbours", "specificity_neighbours_patched"),
           ("neighbours_before", "specificity_neighbours_original"), ("unrelated", "specificity_unrelated_patched"),
           ("unrelated_before", "specificity_unrelated_original"), ("collateral", "specificity_collateral_patched"),
           ("collateral_before", "specificity_collateral_original"))
#: paraphrase columns carry this prefix (the family is the same sets in a grammar disjoint from the
#: training captions and the erase templates: erasekit.evaluation.paraphrase)
P = "p_"


def _family(ms: list[dict]) -> dict:
    """Means over a row's concepts of one family's figures (NaN where a concept lacks one)."""
    out = {}
    for col, key in FIGURES:
        vals = [m[key]["value"] for m in ms if key in m]
        out[col] = sum(vals) / len(vals) if vals else float("nan")
    out["H"] = sum(m["harmonic"] for m in ms) / len(ms) if ms else float("nan")
    return out


def row(method: str, concepts: tuple[str, ...], res, fit_s: float) -> dict:
    templ = _family([c.metrics for c in res.concepts])
    para = _family([c.paraphrase for c in res.concepts if c.paraphrase is not None])
    return {"method": method, "concepts": "+".join(concepts), **templ, **{P + k: v for k, v in para.items()},
            "fit_s": fit_s, "img_s": images_per_second(res)}


COLS = (("eff", "efficacy", 6, 2), ("eff0", "efficacy_before", 6, 2), ("gen", "generality", 6, 2),
        ("neigh", "neighbours", 7, 2), ("neigh0", "neighbours_before", 7, 2), ("unrel", "unrelated", 7, 2),
        ("unrel0", "unrelated_before", 7, 2), ("coll", "collateral", 6, 2), ("coll0", "collateral_before", 6, 2),
        ("H", "H", 7, 3))
PCOLS = (("|p:eff", P + "efficacy", 7, 2), ("gen", P + "generality", 6, 2), ("neigh", P + "neighbours", 7, 2),
         ("unrel", P + "unrelated", 7, 2), ("coll", P + "collateral", 6, 2), ("H", P + "H", 7, 3))


def header(first: str) -> str:
    return first + "".join(f"{h:>{w}}" for h, _, w, _ in COLS + PCOLS) + f"{'fit s':>7}{'img/s':>7}"


def figures(r: dict) -> str:
    return "".join(f"{r[k]:>{w}.{d}f}" for _, k, w, d in COLS + PCOLS)


def fmt(r: dict) -> str:
    fit = (f"{r['fit_s']:>7.2f}" if r["method"] != "(none)" else f"{'':>7}") + f"{r['img_s']:>7.2f}"
    return f"{r['method'][:8]:<9}{r['concepts']:<24}{figures(r)}{fit}"


def summary(rows: list[dict]) -> None:
    """Per-method means over every row: the one table to compare methods by."""
    print("\nmeans per method (eff0/neigh0/unrel0/coll0: the unedited model on the same prompts and seeds; "
          "p: the same figures on the paraphrase prompts)")
    print(header(f"{'method':<9}{'rows':>5}"))
    keys = [k for _, k, _, _ in COLS + PCOLS] + ["fit_s"]
    for m in dict.fromkeys(r["method"] for r in rows):
        rs = [r for r in rows if r["method"] == m]
        avg = {k: sum(r[k] for r in rs) / len(rs) for k in keys}
        speeds = [r["img_s"] for r in rs if r["img_s"] == r["img_s"]]  # NaN: nothing was generated
        print(f"{m[:8]:<9}{len(rs):>5}{figures(avg)}{avg['fit_s']:>7.2f}"
              f"{(sum(speeds) / len(speeds) if speeds else float('nan')):>7.2f}")


def main(family: str | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", default="0-31")
    ap.add_argument("--methods", default=",".join(m for m, c in REGISTRY.items() if family in (None, c.family)))
    ap.add_argument("--axis", default="shape", choices=list(CONCEPTS),
                    help="world axis whose values are erased one at a time")
    ap.add_argument("--values", "--shapes", default=None, help="comma-separated values (default: all of the axis)")
    ap.add_argument("--no-multi", action="store_true")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (the README says which made each figure); noise "
                    "comes from CPU generators, so images agree up to float rounding, and fine-tuned edits differ a little")
    ap.add_argument("--out", default="bench-out")
    ap.add_argument("--cache", default=None, help="image cache folder (default: $ERASEKIT_CACHE or ~/.cache/erasekit)")
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="METHOD.KEY=VALUE",
                    help="override one method's setting, e.g. --set rece.adv_rows=words (repeatable)")
    args = ap.parse_args()
    settings = method_settings(args.methods.split(","), args.sets)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or 2))
    seeds = parse_seeds(args.seeds)
    pipe = erasekit.load_pipeline(device=args.device)
    cache = ImageCache(args.cache)
    values = list(CONCEPTS[args.axis])
    jobs = [(s,) for s in (args.values.split(",") if args.values else values)] + \
        ([] if args.no_multi else MULTI[args.axis])
    rows = []
    t0 = time.time()
    print(f"world erasure benchmark ({args.axis}): {len(seeds)} seeds per prompt set; efficacy/generality lower is better")
    print("settings beyond each method's defaults: " + (", ".join(f"{m} {v}" for m, v in settings.items() if v) or "none"))
    print(header(f"{'method':<9}{'concepts':<24}"))
    for concepts in jobs:
        base = evaluate(pipe, list(concepts), seeds=seeds, cache=cache)
        r = row("(none)", concepts, base, 0.0)
        rows.append(r)
        print(fmt(r), flush=True)
        for method in args.methods.split(","):
            anchor = (lambda c: values[(values.index(c) + 1) % len(values)]) if method in NEEDS_ANCHOR else \
                (lambda c: "")
            specs = [ConceptSpec(c, anchor=anchor(c), preserve=tuple(o for o in values if o not in concepts
                                                                    and o != anchor(c))) for c in concepts]
            shaped = {"templates": erase_templates(args.axis)} if "templates" in fields_of(method) else {}
            patch = erasekit.erase(pipe, specs, method=method, **shaped, **settings[method])
            res = evaluate(pipe, specs, patch=patch, seeds=seeds, cache=cache)
            r = row(method, concepts, res, patch.manifest["wall_time_s"])
            rows.append(r)
            print(fmt(r), flush=True)
    summary(rows)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / f"world_erasure_{args.axis}.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    print(f"wrote {out / f'world_erasure_{args.axis}.csv'} ({time.time() - t0:.0f}s)")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no chart (pip install 'erasekit[bench]')", file=sys.stderr)
        return
    methods = sorted({r["method"] for r in rows if r["method"] != "(none)"})
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    for ax, key, title in zip(axes, ("efficacy", "neighbours", "H"),
                              ("target still detected (lower better)", f"neighbour {args.axis}s kept (higher better)",
                               "harmonic score H (higher better)")):
        vals = [sum(r[key] for r in rows if r["method"] == m) / max(1, sum(r["method"] == m for r in rows))
                for m in ["(none)"] + methods]
        ax.bar(["none"] + methods, vals, color=["#9aa3b2"] + ["#3b6fd8"] * len(methods))
        ax.set_title(title, fontsize=10)
        ax.set_ylim(0, 1)
    fig.tight_layout()
    fig.savefig(out / f"world_erasure_{args.axis}.png", dpi=120)
    print(f"wrote {out / f'world_erasure_{args.axis}.png'}")


if __name__ == "__main__":
    main()
