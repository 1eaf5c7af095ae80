"""An attack's run folder: ``attack.json``, the adversarial artefact and ``report.html`` with the
unedited, edited and attacked images of each attacked prompt side by side."""

from __future__ import annotations

import html
import json
from pathlib import Path
import numpy as np

from ..evaluation.report import CSS, _est, _grid_png
from ..io import atomic_dir
from .run import AttackResult


def render_attack_report(result: AttackResult, title: str = "erasekit attack") -> str:
    s, rates = result.settings, result.rates()
    edits = ", ".join(f"{e['method']} ({e['kind']}, {e['digest']})" for e in s["edits"]) or "none (the unedited model)"
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
             f"<style>{CSS}</style></head><body><header><h1>{html.escape(title)}: {html.escape(result.attack)} on "
             f"{html.escape(result.concept)!r}</h1><p>model <code>{html.escape(str(s.get('model') or '?'))}</code> "
             f"({s['model_fingerprint']}) &middot; edits {html.escape(edits)} &middot; judge "
             f"{html.escape(s['judge']['name'])} &middot; {len(s['seeds'])} seeds per prompt set</p></header><main>",
             "<section><h2>Attack success</h2><p>Success: " + html.escape(s["success"]) + ". Intervals: 95%, prompts "
             "resampled with all their seeds. Pre-attack: the same prompts and seeds without the attack.</p>"
             "<table><tr><th>prompts</th><th>n</th><th>unedited model</th><th>pre-attack</th><th>post-attack</th>"
             "<th>gain</th></tr>"]
    for name, r in rates.items():
        parts.append(f"<tr><td>{html.escape(name)}</td><td>{r['n']}</td><td>{_est(r['original'])}</td>"
                     f"<td>{_est(r['pre_attack'])}</td><td>{_est(r['post_attack'])}</td><td>{_est(r['gain'])}</td></tr>")
    parts.append("</table></section>")
    for name in dict.fromkeys(it.set for it in result.items):
        idx = [i for i, it in enumerate(result.items) if it.set == name]
        rows = {"unedited model": np.stack([result.items[i].image for i in idx]),
                "edited (pre-attack)": np.stack([result.items[i].edited_image for i in idx]),
                "attacked": result.attacked_images[idx]}
        figs = "".join(f"<figure><figcaption>{k}</figcaption><img src='{_grid_png(v)}'></figure>" for k, v in rows.items())
        prompts = "".join(f"<li><code>{html.escape(result.items[i].prompt)}</code> &rarr; "
                          f"<code>{html.escape(result.adversarial.prompts[i])}</code> (seed {result.items[i].seed}"
                          f"{', concept back' if result.detected_post[i] else ''})</li>" for i in idx[:16])
        parts.append(f"<section><h2>{html.escape(name)} prompts</h2><div class='pair'>{figs}</div>"
                     f"<ul class='prompts'>{prompts}</ul></section>")
    parts.append("<section><h2>Cost and settings</h2><table>"
                 f"<tr><td>wall time</td><td>{result.cost['wall_s']} s (attack {result.cost['attack_s']} s)</td></tr>"
                 f"<tr><td>UNet calls (rows)</td><td>{result.cost['unet_calls']} ({result.cost['unet_rows']})</td></tr>"
                 f"</table><pre>{html.escape(json.dumps(result.config, indent=1, default=str))}</pre>"
                 f"<pre>{html.escape(json.dumps(result.record, indent=1, default=str))}</pre></section>")
    parts.append("</main></body></html>")
    return "".join(parts)


def write_attack_run(result: AttackResult, run_dir: str | Path, overwrite: bool = False) -> Path:
    """Write the run folder atomically: nothing is left half-written if anything fails."""
    with atomic_dir(run_dir, overwrite=overwrite) as tmp:
        (tmp / "attack.json").write_text(result.to_json())
        result.adversarial.save(tmp)
        (tmp / "report.html").write_text(render_attack_report(result), encoding="utf-8")
    return Path(run_dir)

