"""ESD training speed and memory: erasekit's ESD against a faithful minimal copy of the official
diffusers ESD loop (rohitgandikota/erasing ``esd_sd.py``), side by side in one run.

The reference, as the official script does it: two full UNets (a frozen base and the trained copy);
every iteration samples a fresh x_t with the frozen UNet through a classifier-free-guidance DDIM loop
(batch 1, both halves in one call), stops after a random number of steps, then asks the frozen UNet
separately for the concept and the empty prompt at x_t, then takes one Adam step on the trained
copy. Both loops here use the same stopping steps (drawn as erasekit draws them), the same DDIM steps,
guidance, batch, learning rate and device; what differs is engineering only:

- ``erasekit prefetch=1``: one UNet instead of two (the frozen model is the trained tensors' originals
  swapped in), and the frozen predictions at x_t are the halves of the guidance call the trajectory
  makes there anyway (one fewer UNet call per step);
- ``erasekit prefetch=P``: also samples P steps' trajectories as one batch, rows leaving the batch at
  their stopping step (same draws, fewer and larger UNet calls).
- ``erasekit prefetch=P,look=L`` (``lookahead``): draws L such batches' trajectories at once and regroups
  them by stopping step, so each batch's rows stop close together: the same draws and the same rows
  through the UNet in fewer, fuller calls, none larger than ``prefetch=P``'s (the x_t of L*P steps wait
  in memory: latents, a few MB at SD1.5's size).
- ``erasekit prefetch=P,reuse=R`` (``trajectory_reuse``): one trajectory serves R consecutive steps, each
  taking x_t at its own stopping step. This changes what is sampled (the R steps' x_t are correlated;
  each keeps its distribution), so it is not engineering alone: the world erasure table with and
  without it (``benchmarks/world_erasure.py --methods esd --set esd.trajectory_reuse=R``) says whether
  erasure is any worse. Its stopping steps are the same draws; its trajectories are those of each
  group's first step.
- ``mp=bf16`` (``mixed_precision``): bf16 autocast for every forward pass of ours. Not engineering
  alone either (lower precision); the reference stays fp32, so compare it with ``prefetch=P`` rows.
- ``dtype=bf16``: the pipeline's weights in bf16, for the reference too (``reference,dtype=bf16``): the
  official ``esd_sd.py`` loads both UNets in bf16 and trains in bf16, so this is the official loop at its
  own precision, and each ``dtype=bf16`` row is compared with it (engineering alone again).
- ``compile=1`` (ESD's ``compile``): torch.compile, dynamic batch, for the no-gradient calls (x_t's
  trajectories and the frozen predictions); the trained pass stays eager.
- ``cl=1``: the UNet in channels-last memory format.

Each variant first runs ``--warmup`` untimed steps in its process (ours at least one chunk of
trajectories, ``prefetch × reuse × look`` steps, so every batch shape, allocation and compilation has been met once): one-off costs are
not the loop's speed, which is what a run of hundreds of steps sees.

Each row also gives the UNet calls per step, trained passes included (not counted through ``compile``).

Memory: each variant runs in a fresh subprocess; on CPU the figure is the process's peak RSS (the
loaded pipeline included, identical for all), on CUDA torch's peak allocation.

    python benchmarks/esd_speed.py [--steps 32] [--ddim-steps 50] [--variants "prefetch=8 prefetch=16"] [--device cpu]
    python benchmarks/esd_speed.py --sd15 --sd15-size 512 --device cuda   # an SD1.5-sized random pipeline
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def load(kind: str, size: int, device: str, dtype: str = "fp32"):
    import torch

    from erasekit.models import load_pipeline

    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    if kind == "world":
        return load_pipeline(None, device=device, dtype=torch_dtype)
    # SD1.5's UNet and text-encoder shapes with random weights (timings and memory only)
    import tempfile

    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    from erasekit.world.tokenizer import make_tokenizer

    torch.manual_seed(0)
    tok = make_tokenizer(tempfile.mkdtemp())
    unet = UNet2DConditionModel(sample_size=size // 8, cross_attention_dim=768, attention_head_dim=8,
                                block_out_channels=(320, 640, 1280, 1280), layers_per_block=2)
    te = CLIPTextModel(CLIPTextConfig(vocab_size=len(tok), hidden_size=768, intermediate_size=3072,
                                      num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=77,
                                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                      pad_token_id=tok.pad_token_id))
    vae = AutoencoderKL(block_out_channels=(32, 64, 64, 64), latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=tok, unet=unet,
                                   scheduler=DDIMScheduler(prediction_type="epsilon"), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    return pipe.to(device, torch_dtype)


def stops(seed: int, steps: int, ddim: int, n_prompts: int = 1) -> list[int]:
    """Each optimisation step's stopping step, drawn as erasekit's ESD draws it (seed and step alone)."""
    from erasekit.methods.esd import draw_example

    return [int(draw_example(seed, i, 1, n_prompts, ddim, (1,))[1]) for i in range(steps)]


def reference(pipe, concept: str, steps: int, ddim: int, guidance: float, lr: float, eta: float,
              till: list[int]) -> float:
    """The official loop, minimal: a deep-copied trainable UNet, fresh frozen trajectories per step."""
    import copy

    import torch
    from diffusers import DDIMScheduler

    device = pipe.unet.device
    base = pipe.unet
    base.requires_grad_(False)
    esd = copy.deepcopy(base)
    names, params = [], []
    for name, module in esd.named_modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)) and "attn2" in name:
            for n, p in module.named_parameters():
                names.append(f"{name}.{n}")
                params.append(p)
    esd.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=lr)
    sched = DDIMScheduler.from_config(pipe.scheduler.config)
    sched.set_timesteps(ddim, device=device)
    with torch.no_grad():
        erase, null = pipe.encode_prompt(concept, device, 1, True, negative_prompt="")
    h = w = pipe.unet.config.sample_size
    t0 = time.perf_counter()
    for it in range(steps):
        opt.zero_grad()
        gen = torch.Generator().manual_seed(it)
        with torch.no_grad():
            x = torch.randn((1, base.config.in_channels, h, w), generator=gen).to(device, base.dtype) * sched.init_noise_sigma
            for k in range(till[it]):  # the pipeline's own CFG loop, stopped early
                t = sched.timesteps[k]
                out = base(torch.cat([x] * 2), t, encoder_hidden_states=torch.cat([null, erase])).sample
                u, c = out.chunk(2)
                x = sched.step(u + guidance * (c - u), t, x).prev_sample
            t = sched.timesteps[till[it]]
            e_c = base(x, t, encoder_hidden_states=erase).sample
            e_n = base(x, t, encoder_hidden_states=null).sample
        pred = esd(x, t, encoder_hidden_states=erase).sample
        # esd_sd.py's target f(c) - eta'(f(c) - f(0)) with eta' = eta + 1 is erasekit's (CompVis's) f(0) - eta(f(c) - f(0))
        loss = torch.nn.functional.mse_loss(pred, e_c - (eta + 1) * (e_c - e_n))
        loss.backward()
        opt.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def ours(pipe, concept: str, steps: int, ddim: int, guidance: float, lr: float, eta: float, prefetch: int,
         reuse: int = 1, mp: str = "no", compile: bool = False, lookahead: int = 1) -> float:
    import torch

    from erasekit.adapters import get_adapter
    from erasekit.concepts import ConceptSpec
    from erasekit.methods import ESD

    m = ESD(steps=steps, lr=lr, negative_guidance=eta, ddim_steps=ddim, sample_guidance=guidance, prefetch=prefetch,
            trajectory_reuse=reuse, mixed_precision=mp, params="x", compile=compile, lookahead=lookahead)
    t0 = time.perf_counter()
    m.fit(get_adapter(pipe), [ConceptSpec(concept)], progress=False)
    if pipe.unet.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def parse_variant(variant: str) -> tuple[bool, dict[str, str]]:
    """``reference[,dtype=bf16][,cl=1]`` or
    ``prefetch=P[,look=L][,reuse=R][,mp=bf16][,dtype=bf16][,cl=1][,compile=1]``."""
    parts = variant.split(",")
    is_ref = parts[0] == "reference"
    if is_ref:
        parts = parts[1:]
    bad = [p for p in parts if "=" not in p]
    if bad:
        raise SystemExit(f"variant {variant!r}: {bad[0]!r} is not KEY=VALUE")
    kv = dict(part.split("=", 1) for part in parts)
    allowed = {"dtype", "cl"} if is_ref else {"prefetch", "look", "reuse", "mp", "dtype", "cl", "compile"}
    unknown = set(kv) - allowed
    if unknown:
        raise SystemExit(f"variant {variant!r}: unknown key(s) {sorted(unknown)}; use "
                         + ("dtype=bf16, cl=1" if is_ref else "prefetch=P, look=L, reuse=R, mp=bf16, dtype=bf16, cl=1, compile=1"))
    if len(kv) != len(parts):
        raise SystemExit(f"variant {variant!r}: a key is given twice")
    allowed_values = {"dtype": ("fp32", "bf16"), "mp": ("no", "bf16", "fp16"), "cl": ("0", "1"), "compile": ("0", "1")}
    for k, v in kv.items():
        if k in allowed_values and v not in allowed_values[k]:
            raise SystemExit(f"variant {variant!r}: {k} is one of {', '.join(allowed_values[k])}")
        if k in ("prefetch", "look", "reuse") and not (v.isdigit() and int(v) >= 1):
            raise SystemExit(f"variant {variant!r}: {k} is a whole number >= 1")
    return is_ref, kv


def plain_reference(variant: str) -> bool:
    """A reference the rows are compared with (one in channels-last is a variant of its own)."""
    is_ref, kv = parse_variant(variant)
    return is_ref and kv.get("cl", "0") == "0"


def child(args: argparse.Namespace) -> None:
    import torch

    from erasekit.evaluation.metrics.cost import peak_rss_mb

    torch.set_num_threads(args.threads)
    is_ref, kv = parse_variant(args.variant)
    pipe = load(args.model, args.sd15_size, args.device, kv.get("dtype", "fp32"))
    if kv.get("cl") == "1":  # channels-last convolutions (the reference's trained copy inherits it)
        pipe.unet.to(memory_format=torch.channels_last)
    rss0 = peak_rss_mb()
    calls = [0]  # UNet calls (the reference's trained copy inherits the hook); not counted through torch.compile
    counting = kv.get("compile") != "1"
    if counting:
        pipe.unet.register_forward_pre_hook(lambda module, args: calls.__setitem__(0, calls[0] + 1))
    common = {"concept": args.concept, "ddim": args.ddim_steps, "guidance": 3.0, "lr": args.lr, "eta": 1.0}

    def run(steps: int) -> float:
        if is_ref:
            return reference(pipe, steps=steps, **common, till=stops(0, steps, args.ddim_steps))
        return ours(pipe, steps=steps, **common, prefetch=int(kv.get("prefetch", 1)), reuse=int(kv.get("reuse", 1)),
                    mp=kv.get("mp", "no"), compile=kv.get("compile") == "1", lookahead=int(kv.get("look", 1)))

    # one-off costs (CUDA context, library handles, kernel selection, allocations, compiling) are not the loop's
    # speed; ours warms up on at least one whole chunk of trajectories (prefetch x reuse x look steps: with look, the
    # regrouped batches), so it has met every batch shape once
    warm = args.warmup if is_ref or not args.warmup or not args.batch_warmup else max(
        args.warmup, int(kv.get("prefetch", 1)) * int(kv.get("reuse", 1)) * int(kv.get("look", 1)))
    if warm:
        run(warm)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    calls[0] = 0
    secs = run(args.steps)
    peak = (torch.cuda.max_memory_allocated() / 2**20 if args.device.startswith("cuda")
            else peak_rss_mb())
    print(json.dumps({"variant": args.variant, "secs": secs, "peak_mb": peak, "loaded_rss_mb": rss0,
                      "calls_per_step": calls[0] / args.steps if counting else None}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", choices=("world", "sd15"), default="world")
    ap.add_argument("--sd15", action="store_true", help="use an SD1.5-sized random pipeline (= --model sd15)")
    ap.add_argument("--sd15-size", type=int, default=512, help="image size of the SD1.5-sized pipeline")
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--ddim-steps", type=int, default=50)
    ap.add_argument("--variants", default="prefetch=8 prefetch=16 prefetch=4,reuse=2 prefetch=8,reuse=2 "
                    "prefetch=4,reuse=4", help="variants to run besides the fp32 reference and prefetch=1, "
                    "space-separated: prefetch=P[,look=L][,reuse=R][,mp=bf16|fp16][,dtype=bf16][,cl=1][,compile=1] (erasekit) "
                    "or reference[,dtype=bf16][,cl=1] (the official loop)")
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--concept", default="star")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--only", action="store_true", help="run exactly --variants (not also the fp32 reference and "
                    "prefetch=1); a reference must be among them")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps each variant runs first in its process "
                    "(0 = none; on CPU the peak RSS then includes them)")
    ap.add_argument("--no-batch-warmup", dest="batch_warmup", action="store_false", help="ours warms up on "
                    "--warmup steps too, not on at least one chunk of trajectories (how the README's GPU rows ran)")
    ap.add_argument("--repeats", type=int, default=2, help="runs of every variant, interleaved; the fastest counts "
                    "(a busy machine slows some runs)")
    ap.add_argument("--variant", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.sd15:
        args.model = "sd15"
    if args.variant:
        return child(args)
    variants = [] if args.only else ["reference", "prefetch=1"]
    variants += [v for v in args.variants.split() if v not in variants]
    for v in variants:
        parse_variant(v)  # a typo fails here, before any run
    if not any(plain_reference(v) for v in variants):
        raise SystemExit("--only needs a reference among --variants (reference or reference,dtype=bf16)")
    best: dict[str, dict] = {}
    for _ in range(args.repeats):
        for v in variants:
            cmd = [sys.executable, __file__, "--variant", v, *sys.argv[1:]]
            res = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if res.returncode:
                raise SystemExit(f"{v} failed:\n{res.stderr[-2000:]}")
            r = json.loads(res.stdout.strip().splitlines()[-1])
            print(f"  ran {v}: {args.steps / r['secs']:.3f} steps/s, peak {r['peak_mb']:.0f} MB", flush=True)
            if v not in best or r["secs"] < best[v]["secs"]:
                best[v] = r
    rows = [best[v] for v in variants]
    # each row is compared with the reference at its weights' dtype when that reference ran, else with the
    # first reference that ran
    refs = {parse_variant(v)[1].get("dtype", "fp32"): best[v] for v in variants if plain_reference(v)}
    unit = "CUDA peak MB" if args.device.startswith("cuda") else "peak RSS MB"
    warm = (f"{args.warmup} untimed" + (" (ours: at least one chunk of trajectories)" if args.batch_warmup else "")
            if args.warmup else "no untimed steps")
    print(f"ESD-x on {args.model} ({args.device}, {args.threads} threads): {args.steps} timed steps after "
          f"{warm}, DDIM {args.ddim_steps}, guidance 3, batch 1; fastest of {args.repeats} "
          "interleaved runs each")
    till = stops(0, args.steps, args.ddim_steps)
    print(f"the same {args.steps} stopping steps for every variant (mean {sum(till) / len(till):.1f} DDIM steps)")
    wide = max(32, *(len(v) for v in variants))
    print(f"{'variant':<{wide}} {'steps/s':>8} {'x ref':>6} {'against':>16} {unit:>14} {'loaded MB':>10} "
          f"{'UNet calls/step':>15}")
    for v, r in zip(variants, rows):
        dtype = parse_variant(v)[1].get("dtype", "fp32")
        other = next(iter(refs))
        ref, against = (refs[dtype], f"reference {dtype}") if dtype in refs else (refs[other], f"reference {other}")
        sps = args.steps / r["secs"]
        per = r.get("calls_per_step")
        print(f"{r['variant']:<{wide}} {sps:8.3f} {sps / (args.steps / ref['secs']):6.2f} {against:>16} "
              f"{r['peak_mb']:14.0f} {r['loaded_rss_mb']:10.0f} {'-' if per is None else f'{per:.2f}':>15}")


if __name__ == "__main__":
    main()
