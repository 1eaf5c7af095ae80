"""Closed-form erasure at scale on an SD1.5-sized pipeline (random weights, public config).

UNet2DConditionModel with SD1.5's configuration (~860M parameters, 16 cross-attention blocks,
32 K/V matrices) and a CLIP ViT-L/14-sized text encoder (123M). Weights are random: this
measures time and memory, not erasure quality. For 1, 10, 100 and 1000 concepts it runs UCE
and SPEED through erasekit and, side by side, a baseline that accumulates the statistics the
way the reference scripts do (per layer, per concept, outer products in each layer's output
space). It prints total seconds, the share spent encoding text, and peak memory. Text encoding
runs on --device; erasekit's float64 solve runs on the host CPU whatever the device (its
per-layer work is d x d and does not grow with the number of concepts).

    python benchmarks/closed_form_scaling.py [--counts 1,10,100,1000] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import os
import random
import string
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel  # noqa: E402
from transformers import CLIPTextConfig, CLIPTextModel  # noqa: E402

import erasekit  # noqa: E402
from erasekit.adapters import get_adapter  # noqa: E402
from erasekit.world.tokenizer import make_tokenizer  # noqa: E402

SD15_UNET = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                 block_out_channels=(320, 640, 1280, 1280),
                 down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                 cross_attention_dim=768, attention_head_dim=8)
SD15_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                     set_alpha_to_one=False, steps_offset=1)
CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
              num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768)


def rss_peak_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM"):
                return int(line.split()[1]) / 1024
    return float("nan")


def reset_peak() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def concept_names(n: int) -> list[str]:
    rng = random.Random(0)
    return ["".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(4, 9))) for _ in range(n)]


def build(device: str) -> StableDiffusionPipeline:
    tok = make_tokenizer(tempfile.mkdtemp(), model_max_length=77)  # SD1.5 pads to 77 tokens
    torch.manual_seed(0)
    te = CLIPTextModel(CLIPTextConfig(**CLIP_L, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                      pad_token_id=tok.pad_token_id))
    unet = UNet2DConditionModel(**SD15_UNET)
    vae = AutoencoderKL(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=tok, unet=unet,
                                   scheduler=DDIMScheduler(**SD15_SCHEDULER), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    return pipe.to(device)


def baseline_uce(adapter, names: list[str], lam: float = 0.5) -> float:
    """Reference-script style: per layer, loop over concepts, accumulate outer products of the
    layer's outputs; encode each prompt separately. Returns seconds."""
    t0 = time.perf_counter()
    with torch.no_grad():
        rows = []
        for n in names:
            e = adapter.encode([n])
            a = adapter.encode([""])
            rows.append((e.last_subject()[0].double().cpu(), a.last_subject()[0].double().cpu()))
        for _, mod in adapter.kv_modules().items():
            w0 = mod.weight.detach().double().cpu()
            mat1 = lam * w0
            mat2 = lam * torch.eye(w0.shape[1], dtype=torch.float64)
            for c, g in rows:
                v = w0 @ g
                mat1 += torch.outer(v, c)
                mat2 += torch.outer(c, c)
            _ = mat1 @ torch.linalg.inv(mat2)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--counts", default="1,10,100,1000")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--baseline-max", type=int, default=100, help="largest count the slow baseline is run for")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    counts = [int(c) for c in args.counts.split(",")]
    t = time.perf_counter()
    pipe = build(args.device)
    adapter = get_adapter(pipe)
    n_unet = sum(p.numel() for p in pipe.unet.parameters()) / 1e6
    n_te = sum(p.numel() for p in pipe.text_encoder.parameters()) / 1e6
    print(f"SD1.5-sized pipeline, random weights: UNet {n_unet:.0f}M, text encoder {n_te:.0f}M, "
          f"{len(adapter.kv_modules())} K/V matrices; built in {time.perf_counter() - t:.0f}s on {args.device}")
    adapter.encode(["warm up"])
    print(f"{'method':<10}{'concepts':>9}{'total s':>10}{'encode %':>10}{'solve s':>9}{'peak MB':>9}{'baseline s':>12}")
    for n in counts:
        names = concept_names(n)
        for method in ("uce", "speed"):
            reset_peak()
            if args.device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            patch = erasekit.erase(pipe, names, method=method)
            total = time.perf_counter() - t0
            enc = patch.manifest["timings_s"].get("encode_text", 0.0)
            solve = patch.manifest["timings_s"].get("solve", 0.0)
            peak = torch.cuda.max_memory_allocated() / 2**20 if args.device == "cuda" else rss_peak_mb()
            base = ""
            if method == "uce" and n <= args.baseline_max:
                base = f"{baseline_uce(adapter, names):.2f}"
            elif method == "uce":
                base = "not run"
            print(f"{method:<10}{n:>9}{total:>10.2f}{100 * enc / total:>9.0f}%{solve:>9.2f}{peak:>9.0f}{base:>12}",
                  flush=True)
    print("peak MB: process peak RSS during the fit on CPU (includes the ~3.9 GB model), "
          "torch.cuda.max_memory_allocated on GPU. Reference point: SPEED reports 100 concepts in 5 s on a GPU.")
    print(f"text encoding on {args.device}; the float64 solve on the host CPU ({torch.get_num_threads()} threads)")


if __name__ == "__main__":
    main()
