"""A self-contained HTML report: before/after grids, the metric table with intervals, cost."""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..io import atomic_path
from .evaluate import PARAPHRASE, EvalResult

SET_TITLES = {
    "target": "Target prompts (should lose the concept)",
    "generality": "Unseen synonyms (should lose it too)",
    "neighbours": "Neighbours (should keep their own concept)",
    "unrelated": "Unrelated prompts (colour, texture, background should stay)",
}

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;background:#f6f7f9;color:#1d2330}
header{background:#1d2330;color:#fff;padding:20px 32px}header h1{margin:0;font-size:22px}
header p{margin:4px 0 0;color:#b9c1d0;font-size:14px}main{padding:24px 32px;max-width:1200px}
section{background:#fff;border-radius:10px;box-shadow:0 1px 3px rgba(0,0,0,.08);padding:20px 24px;margin-bottom:24px}
h2{margin:0 0 12px;font-size:19px}h3{margin:18px 0 8px;font-size:15px;color:#3b4455}
table{border-collapse:collapse;font-size:14px;margin:8px 0}th,td{padding:6px 12px;border-bottom:1px solid #e6e8ec;text-align:right}
th:first-child,td:first-child{text-align:left}th{background:#f0f2f5;font-weight:600}
.ci{color:#7a8395;font-size:12px}.good{color:#16794c;font-weight:600}.bad{color:#b42318;font-weight:600}
.pair{display:flex;gap:18px;flex-wrap:wrap}.pair figure{margin:0}.pair figcaption{font-size:12px;color:#5b6475;margin-bottom:4px}
.pair img{image-rendering:pixelated;border:1px solid #d5d9e0;border-radius:4px;max-width:100%}
.prompts{font-size:12px;color:#5b6475;margin:6px 0 0;columns:2}code{background:#f0f2f5;padding:1px 4px;border-radius:3px}
.summary td.big{font-size:18px;font-weight:600}
td.para{background:#f7f5ff}tr.family-paraphrase td{background:#f7f5ff}
"""


def _grid_png(images: np.ndarray, cols: int = 8, cell: int = 96) -> str:
    n = min(len(images), cols * 2)
    ims = images[:n]
    h, w = ims.shape[1:3]
    scale = max(1, cell // w)
    rows = -(-n // cols)
    canvas = Image.new("RGB", (cols * (w * scale + 2), rows * (h * scale + 2)), (255, 255, 255))
    for i, im in enumerate(ims):
        tile = Image.fromarray(im).resize((w * scale, h * scale), Image.NEAREST)
        canvas.paste(tile, ((i % cols) * (w * scale + 2), (i // cols) * (h * scale + 2)))
    buf = io.BytesIO()
    canvas.save(buf, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _est(d: dict[str, Any] | None) -> str:
    if not d:
        return "&ndash;"
    lo, hi = d["ci95"]
    return f"{d['value']:.3f} <span class='ci'>[{lo:.3f}, {hi:.3f}]</span>"


def _val(d: dict[str, Any] | None) -> str:
    return "&ndash;" if not d else f"{d['value']:.2f}"


def _h(m: dict[str, Any], key: str) -> str:
    ci = m.get(f"{key}_ci95")
    return f"{m[key]:.3f}" + (f" <span class='ci'>[{ci[0]:.3f}, {ci[1]:.3f}]</span>" if ci else "")


def metric_rows(m: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """(metric, original, patched, better) rows of the metric table."""
    rows = [("Efficacy: target detected", _est(m.get("efficacy_original")), _est(m.get("efficacy_patched")), "lower")]
    if "generality_patched" in m:
        rows.append(("Generality: unseen synonyms detected", _est(m["generality_original"]),
                     _est(m["generality_patched"]), "lower"))
    rows += [
        ("Specificity: neighbours correct", _est(m.get("specificity_neighbours_original")),
         _est(m.get("specificity_neighbours_patched")), "higher"),
        ("Specificity: unrelated prompts correct", _est(m.get("specificity_unrelated_original")),
         _est(m.get("specificity_unrelated_patched")), "higher"),
    ]
    if "specificity_collateral_patched" in m:
        rows.append(("Collateral: other axes kept on the erased concept's own prompts",
                     _est(m["specificity_collateral_original"]), _est(m["specificity_collateral_patched"]), "higher"))
    rows.append(("Harmonic score H", _h(m, "harmonic_original"), _h(m, "harmonic"), "higher"))
    return rows


def _side_by_side(m: dict[str, Any], p: dict[str, Any] | None) -> list[str]:
    """Metric rows with the templated and the paraphrase family's columns side by side."""
    rows = metric_rows(m)
    other = {name: (o, q) for name, o, q, _ in metric_rows(p)} if p is not None else {}
    out = []
    for name, o, q, better in rows:
        po, pq = other.get(name, ("&ndash;", "&ndash;"))
        out.append(f"<tr><td>{name}</td><td>{o}</td><td>{q}</td>"
                   + (f"<td class='para'>{po}</td><td class='para'>{pq}</td>" if p is not None else "")
                   + f"<td>{better}</td></tr>")
    return out


def _fid_cells(m: dict[str, Any]) -> tuple[str, str]:
    """(feature distance cells, FID / KID cells): original and patched columns of one family."""
    d = m["distribution"]
    if "fid" not in d:
        return "<td>&ndash;</td><td>&ndash;</td>", "<td>&ndash;</td><td>&ndash;</td>"
    return (f"<td>0</td><td>{_est(m['feature_distance'])}</td>",
            f"<td>0</td><td>{d['fid']:.3f} / {d['kid']:.4f}</td>")


def _reference_row(r: dict[str, Any] | None, para: bool) -> str:
    """FID / KID of the templated family's unrelated images against the user's reference images."""
    if not r:
        return ""
    rest = "<td>&ndash;</td><td>&ndash;</td>" if para else ""
    if "skipped" in r:
        return (f"<tr><td>FID / KID vs reference images</td><td colspan='2'>{html.escape(r['skipped'])}</td>{rest}"
                "<td>lower</td></tr>")
    what = (f"FID / KID vs {r['n_reference']} reference images ({html.escape(', '.join(r['prompt_sets']))}"
            " prompts")
    o, q = r["original"], r["patched"]
    return (f"<tr><td>{what}, {o['n_images']} images each; {html.escape(r['feature_space'])}; point estimates, "
            f"biased upwards at few images)</td><td>{o['fid']:.3f} / {o['kid']:.4f}</td><td>{q['fid']:.3f} / "
            f"{q['kid']:.4f}</td>{rest}<td>lower</td></tr>")


def render_report(result: EvalResult, title: str = "erasekit evaluation") -> str:
    s = result.settings
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
             f"<style>{CSS}</style></head><body><header><h1>{html.escape(title)}</h1>"
             f"<p>model <code>{html.escape(str(s.get('model') or 'a custom generator'))}</code> ({s['model_fingerprint']}) &middot; "
             f"judge {html.escape(s['judge']['name'])} {s['judge']['version']} &middot; seeds "
             f"{s['seeds'][0]}&ndash;{s['seeds'][1]} ({s['seeds'][2]} per prompt set) &middot; "
             f"{s['sampling']['num_inference_steps']} steps, guidance {s['sampling']['guidance_scale']}, "
             f"{html.escape(s['sampling']['scheduler'])}</p></header><main>"]
    para = any(c.paraphrase is not None for c in result.concepts)
    boot = s.get("bootstrap") or {}
    ci_note = ("95% intervals: " + html.escape(boot.get("method", "bootstrap")) + "; " + html.escape(boot["extremes"])
               if "extremes" in boot else "bootstrap 95% intervals")
    # summary across concepts: one row per concept and prompt family
    parts.append("<section class='summary' id='summary'><h2>Summary</h2><table><tr><th>concept</th><th>prompts</th>"
                 "<th>detected before</th><th>detected after</th><th>synonyms after</th><th>neighbours kept</th>"
                 "<th>unrelated kept</th><th>collateral kept</th><th>H</th></tr>")
    for c in result.concepts:
        for fam, f in c.families().items():
            cells = "".join(("<td class='big'>" if k == "detected_after" else "<td>") + f"{_val(f.get(k))}</td>"
                            for k in ("detected_before", "detected_after", "synonyms_after", "neighbours_kept",
                                      "unrelated_kept", "collateral_kept"))
            h = f["H"]
            hci = f" <span class='ci'>[{h['ci95'][0]:.2f}, {h['ci95'][1]:.2f}]</span>" if h.get("ci95") else ""
            parts.append(f"<tr class='family-{fam}'><td>{html.escape(c.concept)} <span class='ci'>({c.axis})</span>"
                         f"</td><td>{fam}</td>{cells}<td>{h['value']:.3f}{hci}</td></tr>")
    parts.append("</table>")
    fams = s.get("prompt_families") or {}
    parts.append("<ul class='prompts'>" + "".join(f"<li><b>{html.escape(k)}</b>: {html.escape(v)}</li>"
                                                  for k, v in fams.items()) + "</ul>")
    if not para:
        parts.append("<p class='ci'>No paraphrase family: this judge has none, it was turned off, or the prompt "
                     "sets came from outside.</p>")
    parts.append(f"<p class='ci' id='intervals'>{ci_note}.</p></section>")
    if any(c.robustness for c in result.concepts):
        parts.append("<section id='robustness'><h2>Robustness</h2><p>Attack success: the judge reads the concept on "
                     "the target and synonym prompts (and their paraphrases), pre-attack (the patched model, same "
                     f"prompts and seeds) and post-attack; seeds {html.escape(str(s.get('attacks', {}).get('seeds')))}"
                     ". Lower post-attack is more robust.</p><table><tr><th>concept</th><th>attack</th><th>pre-attack"
                     "</th><th>post-attack</th><th>gain</th><th>attack time</th></tr>")
        for c in result.concepts:
            for name, r in c.robustness.items():
                a = r["success"]["all"]
                parts.append(f"<tr><td>{html.escape(c.concept)}</td><td>{html.escape(name)}</td>"
                             f"<td>{_est(a['pre_attack'])}</td><td>{_est(a['post_attack'])}</td><td>{_est(a['gain'])}"
                             f"</td><td>{r['cost']['attack_s']:.1f} s</td></tr>")
        parts.append("</table></section>")
    for c in result.concepts:
        m = c.metrics
        p = c.paraphrase
        head = ("<tr><th rowspan='2'>metric</th><th colspan='2'>templated prompts</th>"
                "<th colspan='2'>paraphrase prompts</th><th rowspan='2'>better</th></tr><tr><th>original</th>"
                "<th>patched</th><th>original</th><th>patched</th></tr>") if p is not None else \
            "<tr><th>metric</th><th>original</th><th>patched</th><th>better</th></tr>"
        parts.append(f"<section id='concept-{html.escape(c.label)}'><h2>Concept: {html.escape(c.concept)}</h2>"
                     f"<h3>Metrics (95% intervals, prompts resampled)</h3><table>{head}")
        parts.extend(_side_by_side(m, p))
        for name, scores in (m.get("clip_score") or {}).items():
            para_scores = ((p or {}).get("clip_score") or {}).get(name)
            cells = f"<td>{_est(scores['original'])}</td><td>{_est(scores['patched'])}</td>"
            if p is not None:
                cells += (f"<td class='para'>{_est(para_scores['original'])}</td><td class='para'>"
                          f"{_est(para_scores['patched'])}</td>") if para_scores else "<td>&ndash;</td><td>&ndash;</td>"
            parts.append(f"<tr><td>CLIPScore, {html.escape(name)} (image vs its own prompt, 100 max(cos, 0))</td>{cells}"
                         f"<td>{'lower' if name in ('target', 'generality') else 'higher'}</td></tr>")
        span = 4 if p is not None else 2
        d = m["distribution"]
        if "fid" in d:
            t_dist, t_fid = _fid_cells(m)
            p_dist, p_fid = _fid_cells(p) if p is not None else ("", "")
            parts.append(f"<tr><td>Fidelity: feature distance to original (same seed)</td>{t_dist}{p_dist}"
                         f"<td>lower</td></tr>"
                         f"<tr><td>FID / KID vs original ({html.escape(d['feature_space'])}; point estimates without "
                         "an interval; KID is unbiased, so it reads below 0 for sets as alike as same-seed pairs)</td>"
                         f"{t_fid}{p_fid}<td>lower</td></tr>")
        else:
            parts.append(f"<tr><td>Fidelity to original</td><td colspan='{span + 1}'>"
                         f"{html.escape(str(d.get('skipped')))}</td></tr>")
        parts.append(_reference_row(m.get("reference_fid"), p is not None))
        parts.append("</table>")
        for name in (*SET_TITLES, *(PARAPHRASE + k for k in SET_TITLES)):
            if name not in c.images:
                continue
            ims = c.images[name]
            prompts = c.prompts.get(name, [])[:4]
            base = name.removeprefix(PARAPHRASE)
            title = SET_TITLES[base] if base == name else f"Paraphrase: {SET_TITLES[base][0].lower()}{SET_TITLES[base][1:]}"
            parts.append(f"<h3 class='set-{name.replace('/', '-')}'>{title}</h3><div class='pair'>"
                         f"<figure><figcaption>original</figcaption><img alt='{name} original' "
                         f"src='{_grid_png(ims['original'])}'></figure>"
                         f"<figure><figcaption>patched</figcaption><img alt='{name} patched' "
                         f"src='{_grid_png(ims['patched'])}'></figure></div>"
                         f"<ul class='prompts'>{''.join(f'<li>{html.escape(p)}</li>' for p in prompts)}</ul>")
        parts.append("</section>")
    cost = result.cost
    parts.append("<section id='cost'><h2>Cost and configuration</h2><table><tr><th>item</th><th>value</th></tr>")
    for p in cost["patches"]:
        parts.append(f"<tr><td>fit: {html.escape(p['method'])} ({p['digest']})</td><td>{p['fit_wall_s']} s</td></tr>")
        mem = p.get("fit_peak_memory_mb") or {}
        if mem:
            parts.append(f"<tr><td>fit peak memory</td><td>{html.escape(', '.join(f'{k} {v}' for k, v in mem.items()))}"
                         "</td></tr>")
    parts.append(f"<tr><td>evaluation wall time</td><td>{cost['eval_wall_s']} s</td></tr>"
                 f"<tr><td>of which generation</td><td>{cost['generation_s']} s</td></tr>"
                 f"<tr><td>peak memory (RSS)</td><td>{cost['peak_rss_mb']} MB</td></tr>"
                 f"<tr><td>image cache hits / misses</td><td>{cost['cache_hits']} / {cost['cache_misses']}</td></tr>"
                 "</table>")
    for p in cost["patches"]:
        parts.append(f"<h3>{html.escape(p['method'])} config</h3><pre>{html.escape(json.dumps(p['config'], indent=1))}</pre>")
    parts.append("</section></main></body></html>")
    return "".join(parts)


def write_report(result: EvalResult, path: str | Path, title: str = "erasekit evaluation") -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(render_report(result, title), encoding="utf-8")
    return Path(path)
