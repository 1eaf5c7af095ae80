"""Compare edits side by side: the same concepts, prompts, seeds and judge for each, and each
edit's difference from a baseline edit paired image by image.

Running ``erasekit eval`` once per edit and reading the intervals side by side asks too little of
the data and too much of the reader: two overlapping intervals do not mean two edits are alike.
Because every edit is measured on the same prompts and seeds, the difference between two edits can
be taken per image and its interval computed by resampling prompts with all their seeds (the
unit the images depend on), which is far tighter than the two intervals suggest.
:func:`compare` gives each edit's headline figures (templated and paraphrase families) and, for
every other edit, the paired difference from the baseline with its 95% interval
(:func:`~erasekit.evaluation.stats.bootstrap_diff`). The original model's images are shared
through the image cache, so the unedited model is generated once.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .concepts import ConceptSpec
from .edits import Edit
from .errors import InvalidInputError

#: (row name, outcome key, what is better)
HEADLINES = (("detected after", "detected", "lower"), ("synonyms after", "synonyms", "lower"),
             ("neighbours kept", "neighbours_kept", "higher"), ("unrelated kept", "unrelated_kept", "higher"),
             ("collateral kept", "collateral_kept", "higher"))
_SUMMARY = {"detected": "detected_after", "synonyms": "synonyms_after", "neighbours_kept": "neighbours_kept",
            "unrelated_kept": "unrelated_kept", "collateral_kept": "collateral_kept"}


@dataclass
class CompareResult:
    """Per concept and prompt family: each edit's figures (``rows``), and each edit's paired
    difference from the baseline (``diffs``); ``results`` holds every edit's full evaluation."""

    names: list[str]
    baseline: str
    settings: dict[str, Any]
    rows: list[dict[str, Any]] = field(default_factory=list)
    diffs: list[dict[str, Any]] = field(default_factory=list)
    results: dict[str, Any] = field(default_factory=dict, repr=False)

    def to_dict(self) -> dict[str, Any]:
        from . import __version__

        return {"erasekit_version": __version__, "names": self.names, "baseline": self.baseline,
                "settings": self.settings, "rows": self.rows, "diffs": self.diffs,
                "metrics": {n: r.to_dict() for n, r in self.results.items()}}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, default=float) + "\n"


def _edits(value: Edit | Sequence[Edit], name: str) -> list[Edit]:
    items = [value] if isinstance(value, Edit) else list(value) if isinstance(value, (list, tuple)) else None
    if not items or not all(isinstance(e, Edit) for e in items):
        raise InvalidInputError(f"edit {name!r}: give an edit or a list of edits (a stack applied in order)")
    return items


def compare(pipe: Any, concepts: str | ConceptSpec | Iterable[str | ConceptSpec],
            edits: Mapping[str, Edit | Sequence[Edit]], seeds: Iterable[int] = range(64), judge: Any = None,
            cache: Any = None, sampling: dict[str, Any] | None = None, paraphrase: bool = True,
            baseline: str | None = None, force: bool = False, unrelated: Sequence[str] | str | None = None,
            prompt_seed: int = 0) -> CompareResult:
    """Evaluate each named edit (or stack of edits) on ``concepts`` with the same seeds, prompts and
    judge, and compare each with ``baseline`` (default: the first name) image by image.

    A difference is ``edit - baseline`` for every headline (target and synonym detection, neighbours,
    unrelated and collateral kept), per concept and prompt family, with a 95% interval that resamples
    prompts with all their seeds; ``excludes_zero`` says whether that interval leaves 0 out. Where the
    two edits' prompt sets still differ, that headline's difference is not paired and is skipped,
    saying why; every concept any of the edits erases is left out of every edit's neighbour prompts
    (``evaluate``'s ``exclude``), so this does not happen with erasekit's judges.
    """
    from .evaluation import ImageCache, evaluate, get_judge
    from .evaluation.stats import bootstrap, bootstrap_diff

    if not isinstance(edits, Mapping) or len(edits) < 2:
        raise InvalidInputError("compare needs at least two named edits, e.g. {'uce': edit_a, 'esd': edit_b}")
    stacks = {str(n): _edits(e, str(n)) for n, e in edits.items()}
    names = list(stacks)
    if any(not n.strip() for n in names):
        raise InvalidInputError("an edit's name is empty; name each edit")
    if "(unedited)" in names:
        raise InvalidInputError("'(unedited)' names the unedited model's row; give that edit another name")
    baseline = names[0] if baseline is None else baseline
    if baseline not in stacks:
        raise InvalidInputError(f"baseline {baseline!r} is not one of the edits: {', '.join(names)}")
    seeds = list(seeds)
    judge = get_judge(judge or "world-classifier") if isinstance(judge, str) or judge is None else judge
    cache = cache if isinstance(cache, ImageCache) else ImageCache(cache)
    custom = getattr(pipe, "erasekit_fingerprint", None)
    for stack in stacks.values():  # refuse what evaluate would refuse before anything is generated
        for e in stack:
            if custom and e.kind == "hook":
                raise InvalidInputError("this generator is not a supported pipeline, so it cannot run hook edits; "
                                        "compare hook edits on a diffusers pipeline")
            e.check(pipe, force)
    # every concept any compared edit erases is left out of every edit's neighbour prompts, so all of
    # them are measured on the same prompts and every headline pairs
    everything = [[w for w in (c.get("target"), *(c.get("synonyms") or ())) if isinstance(w, str) and w.strip()]
                  for stack in stacks.values() for e in stack for c in e.manifest.get("concepts", [])]
    results = {n: evaluate(pipe, concepts, patch=stacks[n], seeds=seeds, judge=judge, cache=cache, sampling=sampling,
                           paraphrase=paraphrase, keep_images=False, force=force, unrelated=unrelated,
                           prompt_seed=prompt_seed, exclude=everything) for n in names}
    first = results[names[0]]
    out = CompareResult(names, baseline, {
        "seeds": [min(seeds), max(seeds), len(seeds)], "judge": first.settings["judge"],
        "sampling": first.settings["sampling"], "model": first.settings["model"],
        "edits": {n: [{"method": e.method, "kind": e.kind, "digest": e.digest} for e in stacks[n]] for n in names},
        "difference": "edit minus baseline, per image (same prompt and seed), 95% interval resampling prompts"},
        results=results)
    base = results[baseline]
    for ci, concept in enumerate(base.concepts):
        for fam in concept.outcomes:
            unedited = concept.outcomes[fam]
            row = {"concept": concept.concept, "family": fam, "edit": "(unedited)"}
            for _, key, _ in HEADLINES:
                if key in unedited:
                    row[key] = bootstrap(unedited[key]["original"], clusters=unedited[key]["clusters"]).as_dict()
            row["H"] = concept.families().get(fam, {}).get("H_before")
            out.rows.append(row)
            for n in names:
                c = results[n].concepts[ci]
                summary = c.families().get(fam, {})
                row = {"concept": concept.concept, "family": fam, "edit": n}
                row.update({key: summary[_SUMMARY[key]] for _, key, _ in HEADLINES if _SUMMARY[key] in summary})
                row["H"] = summary.get("H")
                out.rows.append(row)
            b = base.concepts[ci].outcomes.get(fam, {})
            for n in names:
                if n == baseline:
                    continue
                o = results[n].concepts[ci].outcomes.get(fam, {})
                d = {"concept": concept.concept, "family": fam, "edit": n, "baseline": baseline}
                for _, key, _ in HEADLINES:
                    if key not in o or key not in b:
                        continue
                    if o[key]["prompts"] != b[key]["prompts"]:
                        d[key] = {"skipped": "the two edits were measured on different prompts here: not paired"}
                        continue
                    est = bootstrap_diff(o[key]["patched"], b[key]["patched"], clusters=o[key]["clusters"])
                    d[key] = {**est.as_dict(), "excludes_zero": bool(est.low > 0 or est.high < 0)}
                out.diffs.append(d)
    return out


def _cell(d: dict[str, Any] | None, sign: bool = False) -> str:
    """One figure with its interval, as HTML (``sign``: a difference, marked where it leaves 0 out)."""
    import html

    if not d:
        return "<td>&ndash;</td>"
    if "skipped" in d:
        return f"<td title='{html.escape(d['skipped'])}'>not paired</td>"
    fmt = "{:+.3f}" if sign else "{:.3f}"
    ci = d.get("ci95")
    text = fmt.format(d["value"]) + (f" <span class='ci'>[{fmt.format(ci[0])}, {fmt.format(ci[1])}]</span>"
                                     if ci else "")
    return f"<td class='sig'><b>{text}</b></td>" if d.get("excludes_zero") else f"<td>{text}</td>"


def render_compare(result: CompareResult, title: str = "erasekit comparison") -> str:
    """The comparison as one HTML page: per concept and family, each edit's figures and each one's
    paired difference from the baseline (bold where its interval leaves 0 out)."""
    import html

    from .evaluation.report import CSS

    s = result.settings
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
             f"<style>{CSS}</style></head><body><header><h1>{html.escape(title)}</h1><p>model <code>"
             f"{html.escape(str(s.get('model') or 'a custom generator'))}</code> &middot; judge "
             f"{html.escape(s['judge']['name'])} &middot; seeds {s['seeds'][0]}&ndash;{s['seeds'][1]} "
             f"({s['seeds'][2]} per prompt set) &middot; baseline <b>{html.escape(result.baseline)}</b></p>"
             "</header><main>"]
    keys = [(t, k, b) for t, k, b in HEADLINES if any(k in r for r in result.rows)]
    head = "".join(f"<th>{html.escape(t)} ({b})</th>" for t, _, b in keys)
    for concept in dict.fromkeys(r["concept"] for r in result.rows):
        parts.append(f"<section><h2>{html.escape(concept)}</h2>")
        for fam in dict.fromkeys(r["family"] for r in result.rows if r["concept"] == concept):
            parts.append(f"<h3>{html.escape(fam)} prompts: 95% intervals, prompts resampled with their seeds</h3>"
                         f"<table><tr><th>edit</th>{head}<th>H</th></tr>")
            for r in result.rows:
                if r["concept"] == concept and r["family"] == fam:
                    parts.append(f"<tr><td>{html.escape(r['edit'])}</td>" + "".join(_cell(r.get(k)) for _, k, _ in keys)
                                 + _cell(r.get("H")) + "</tr>")
            parts.append(f"</table><h3>difference from {html.escape(result.baseline)}, image by image (bold: the "
                         f"interval leaves 0 out)</h3><table><tr><th>edit</th>{head}</tr>")
            for d in result.diffs:
                if d["concept"] == concept and d["family"] == fam:
                    parts.append(f"<tr><td>{html.escape(d['edit'])}</td>"
                                 + "".join(_cell(d.get(k), sign=True) for _, k, _ in keys) + "</tr>")
            parts.append("</table>")
        parts.append("</section>")
    edits = "".join(f"<li><b>{html.escape(n)}</b>: " + " + ".join(
        f"{html.escape(e['method'])} ({html.escape(e['kind'])}, {html.escape(e['digest'][:12])})" for e in stack)
        + "</li>" for n, stack in s["edits"].items())
    parts.append(f"<section><h2>Edits</h2><ul>{edits}</ul><p class='ci'>{html.escape(s['difference'])}.</p></section>"
                 "</main></body></html>")
    return "".join(parts)
