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
from .evaluate import EvalResult

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


def metric_rows(m: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """(metric, original, patched, better) rows of the metric table."""
    rows = [("Efficacy: target detected", _est(m.get("efficacy_original")), _est(m.get("efficacy_patched")), "lower")]
    if "generality_patched" in m:
        rows.append(("Generality: unseen synonyms detected", _est(m["generality_original"]),
                     _est(m["generality_patched"]), "lower"))
    rows += [
        ("Specificity: neighbours correct", _est(m.get("specificity_neighbours_original")),
         _est(m.get("specificity_neighbours_patched")), "higher"),
        ("Specificity: unrelated prompts correct", _est(m["specificity_unrelated_original"]),
         _est(m["specificity_unrelated_patched"]), "higher"),
    ]
    if "specificity_collateral_patched" in m:
        rows.append(("Collateral: other axes kept on the erased concept's own prompts",
                     _est(m["specificity_collateral_original"]), _est(m["specificity_collateral_patched"]), "higher"))
    rows.append(("Harmonic score H", f"{m['harmonic_original']:.3f}", f"{m['harmonic']:.3f}", "higher"))
    return rows


def render_report(result: EvalResult, title: str = "erasekit evaluation") -> str:
    s = result.settings
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
             f"<style>{CSS}</style></head><body><header><h1>{html.escape(title)}</h1>"
             f"<p>model <code>{html.escape(str(s.get('model') or 'a custom generator'))}</code> ({s['model_fingerprint']}) &middot; "
             f"judge {html.escape(s['judge']['name'])} {s['judge']['version']} &middot; seeds "
             f"{s['seeds'][0]}&ndash;{s['seeds'][1]} ({s['seeds'][2]} per prompt set) &middot; "
             f"{s['sampling']['num_inference_steps']} steps, guidance {s['sampling']['guidance_scale']}, "
             f"{html.escape(s['sampling']['scheduler'])}</p></header><main>"]
    # summary across concepts
    parts.append("<section class='summary' id='summary'><h2>Summary</h2><table><tr><th>concept</th>"
                 "<th>detected before</th><th>detected after</th><th>neighbours kept</th><th>unrelated kept</th>"
                 "<th>H</th></tr>")
    for c in result.concepts:
        m = c.metrics
        parts.append(f"<tr><td>{html.escape(c.concept)} <span class='ci'>({c.axis})</span></td>"
                     f"<td>{m['efficacy_original']['value']:.2f}</td>"
                     f"<td class='big'>{m['efficacy_patched']['value']:.2f}</td>"
                     f"<td>{_val(m.get('specificity_neighbours_patched'))}</td>"
                     f"<td>{m['specificity_unrelated_patched']['value']:.2f}</td><td>{m['harmonic']:.3f}</td></tr>")
    parts.append("</table></section>")
    for c in result.concepts:
        m = c.metrics
        parts.append(f"<section id='concept-{html.escape(c.label)}'><h2>Concept: {html.escape(c.concept)}</h2>"
                     "<h3>Metrics (bootstrap 95% intervals)</h3><table><tr><th>metric</th><th>original</th>"
                     "<th>patched</th><th>better</th></tr>")
        for name, o, p, better in metric_rows(m):
            parts.append(f"<tr><td>{name}</td><td>{o}</td><td>{p}</td><td>{better}</td></tr>")
        d = m["distribution"]
        if "fid" in d:
            parts.append(f"<tr><td>Fidelity: feature distance to original (same seed)</td><td>0</td>"
                         f"<td>{_est(m['feature_distance'])}</td><td>lower</td></tr>"
                         f"<tr><td>FID / KID vs original ({html.escape(d['feature_space'])}; KID is unbiased, so "
                         "it reads below 0 for sets as alike as same-seed pairs)</td><td>0</td>"
                         f"<td>{d['fid']:.3f} / {d['kid']:.4f}</td><td>lower</td></tr></table>")
        else:
            parts.append(f"<tr><td>Fidelity to original</td><td colspan='3'>{html.escape(str(d.get('skipped')))}"
                         "</td></tr></table>")
        for name in ("target", "generality", "neighbours", "unrelated"):
            if name not in c.images:
                continue
            ims = c.images[name]
            prompts = c.prompts.get(name, [])[:4]
            parts.append(f"<h3 class='set-{name}'>{SET_TITLES[name]}</h3><div class='pair'>"
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
