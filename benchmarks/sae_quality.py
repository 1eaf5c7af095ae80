"""SAE quality on the embedded world model: variance explained, dead latents and sparsity versus k and
width (TopK, optionally BatchTopK), and how concept-selective SAeUron's selected features are.

Part 1 collects the UNet site's activations once (random world captions, 20 steps, guidance 2) and
trains one SAE per (width, k) on them; held-out fraction of variance explained (FVE), the share of
latents that never fire on the collected tokens, mean L0 and training time are printed per SAE.

Part 2 takes one SAE (``--sae DIR``, or the grid's SAE of the default width and k), generates the
shapes' prompts (``--templates`` erase templates per shape phrase) and selects SAeUron's features for
``--concept`` at ``--percentile``, as ``saeuron`` does; for the selected features it prints, per
sampling step, the mean activation on the concept's images against the other shapes' images (and
their ratio), and the share of the concept's and of the others' images on which a selected feature fires
above SAeUron's firing threshold at some position (where it would be ablated), averaged over the features.

    python benchmarks/sae_quality.py                      # a few minutes on 2 cores
    python benchmarks/sae_quality.py --widths 256,1024,4096 --ks 4,8,16,32 --steps 3000 --prompts 200
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

import erasekit
from erasekit.adapters import get_adapter
from erasekit.adapters.sampling import Hook
from erasekit.methods.saeuron import mean_codes, scores, selection
from erasekit.sae import SAEConfig, TopKSAE, collect, fit, to_tokens
from erasekit.world.vocab import AXES, CONCEPTS, SHAPES, caption, erase_templates


def captions(n: int, seed: int) -> list[str]:
    import random

    rng = random.Random(seed)
    return [caption({ax: rng.choice(list(CONCEPTS[ax])) for ax in AXES}, rng) for _ in range(n)]


class Fires(Hook):
    """Per image and step: does a selected feature exceed its threshold at some position (conditional half)."""

    def __init__(self, sae: TopKSAE, site: str, threshold: torch.Tensor, n_images: int, n_steps: int) -> None:
        self.sae, self.site, self.threshold = sae, site, threshold
        self.sel = torch.isfinite(threshold).any(0)
        self.hits = torch.zeros(n_images, n_steps, int(self.sel.sum()), dtype=torch.bool)
        self.rows: slice | None = None
        self.index = 0

    def noise(self, ctx, predict):
        self.index = ctx.index
        return predict()

    def module_hooks(self, adapter):
        def fn(module, args, out):
            assert self.rows is not None
            n = self.rows.stop - self.rows.start
            x = out[0] if isinstance(out, tuple) else out
            z = self.sae.encode(to_tokens(x[-n:]).float()).reshape(n, -1, self.sae.n_latents)[..., self.sel]
            thr = self.threshold[self.index][self.sel]
            self.hits[self.rows, self.index] = (z > torch.where(torch.isfinite(thr), thr, torch.inf)).any(1)
        return {self.site: fn}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--site", default="unet-up-attn-0-1", help="role name or module (default: SAeUron's site)")
    ap.add_argument("--widths", default="256,1024", help="SAE widths (latents)")
    ap.add_argument("--ks", default="8,16,32", help="active latents per token")
    ap.add_argument("--batch-topk", action="store_true", help="also train each (width, k) with BatchTopK")
    ap.add_argument("--steps", type=int, default=800, help="optimiser steps per SAE")
    ap.add_argument("--prompts", type=int, default=48, help="random world captions to collect from")
    ap.add_argument("--sae", default=None, help="SAE folder for part 2 (default: the grid's width 1024, k 16)")
    ap.add_argument("--concept", default="star", choices=list(SHAPES))
    ap.add_argument("--percentile", type=float, default=99.0)
    ap.add_argument("--templates", type=int, default=6, help="erase templates per shape phrase in part 2")
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS") or 2))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    pipe = erasekit.load_pipeline(device="cpu")
    ad = get_adapter(pipe)
    site = ad.site(args.site)
    t0 = time.time()
    acts = collect(ad, site, captions(args.prompts, 0), num_inference_steps=20, guidance_scale=2.0, batch_size=16)
    print(f"SAE quality at {args.site} = {site} of the world model: {len(acts)} tokens of {acts.x.shape[1]} channels "
          f"from {args.prompts} captions x 20 steps x 2 CFG halves ({time.time() - t0:.0f}s); {args.steps} steps "
          "per SAE, 5% of tokens held out")
    print(f"{'width':>6}{'k':>5}{'mode':>10}{'FVE':>8}{'dead':>8}{'L0':>7}{'train s':>9}")
    grid: dict[tuple[int, int, bool], TopKSAE] = {}
    for width in map(int, args.widths.split(",")):
        for k in map(int, args.ks.split(",")):
            for batch in ([False, True] if args.batch_topk else [False]):
                if k > width:
                    continue
                cfg = SAEConfig(n_latents=width, k=k, steps=args.steps, batch_topk=batch, dead_tokens=50_000)
                sae, rec = fit(acts.x, cfg, {"site": site})
                grid[(width, k, batch)] = sae
                print(f"{width:>6}{k:>5}{'batchtopk' if batch else 'topk':>10}{rec['fve']:>8.3f}"
                      f"{rec['dead_fraction']:>8.3f}{rec['l0']:>7.1f}{rec['wall_time_s']:>9.1f}", flush=True)

    sae = TopKSAE.load(args.sae) if args.sae else grid.get((1024, 16, False)) or next(iter(grid.values()))
    names = list(SHAPES)
    templates = erase_templates("shape")[: args.templates]
    prompts = [[t.replace("{}", p) for p in (s, *SHAPES[s]) for t in templates] for s in names]
    t1 = time.time()
    mu, _, sizes = mean_codes(ad, sae, site, prompts, 20, 2.0)
    target = names.index(args.concept)
    _, threshold = selection(mu, [target], sizes, args.percentile, -1.0)
    fires = Fires(sae, site, threshold, sum(sizes), 20)
    start = 0
    for g, ps in enumerate(prompts):
        for i in range(0, len(ps), 32):
            chunk = ps[i:i + 32]
            fires.rows = slice(start, start + len(chunk))
            ad.sample(chunk, [torch.Generator().manual_seed(j) for j in range(len(chunk))], 20, 2.0, hooks=[fires],
                      output_type="pt")
            start += len(chunk)
    is_target = torch.cat([torch.full((n,), g == target) for g, n in enumerate(sizes)])
    others = torch.stack([mu[g] for g in range(len(names)) if g != target]).mean(0)
    print(f"\nconcept selectivity of SAeUron's features for {args.concept!r} (width {sae.n_latents}, k {sae.k}; "
          f"{sizes[target]} concept images, {sum(sizes) - sizes[target]} of the other shapes; percentile "
          f"{args.percentile}; {time.time() - t1:.0f}s)")
    print(f"{'step':>5}{'selected':>9}{'act concept':>12}{'act others':>11}{'ratio':>7}{'fires concept':>14}"
          f"{'fires others':>13}  top features (score)")
    sel_all = torch.isfinite(threshold)
    col = torch.cumsum(sel_all.any(0).long(), 0) - 1
    for t in (0, 5, 10, 15, 19):
        sel = sel_all[t]
        if not bool(sel.any()):
            continue
        a_c, a_o = float(mu[target, t, sel].mean()), float(others[t, sel].mean())
        h = fires.hits[:, t, col[sel]].float()  # (images, selected features)
        f_c, f_o = float(h[is_target].mean()), float(h[~is_target].mean())
        s = scores(mu, target, sizes)[t]
        top = s.topk(3)
        tops = ", ".join(f"{int(j)} ({float(v):.3f})" for v, j in zip(top.values, top.indices))
        print(f"{t:>5}{int(sel.sum()):>9}{a_c:>12.3f}{a_o:>11.3f}{a_c / max(a_o, 1e-9):>7.2f}{f_c:>14.2f}{f_o:>13.2f}  {tops}")
    print(f"\ntotal {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
