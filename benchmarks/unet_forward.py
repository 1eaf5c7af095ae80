"""One SD1.5-sized UNet forward pass (random weights, 64x64 latents = 512 px, no gradients) by precision,
memory layout and batch, timed with CUDA events: where ESD's time goes on a GPU (its trajectories are
nearly all such calls) and what bf16 weights, channels-last and torch.compile buy on them. Batch 2 is
the official ESD loop's classifier-free-guidance call; 16 is erasekit's ``prefetch=8``.

    python benchmarks/unet_forward.py            # needs a CUDA GPU; about a minute, compile included

Each figure is the mean of 8 calls after 3 untimed ones; the compiled row's compile time is printed beside it.
"""

from __future__ import annotations

import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def bench(unet, b: int, autocast: bool = False, iters: int = 8, dtype=None, channels_last: bool = False) -> float:
    import torch

    dtype = dtype or torch.float32
    x = torch.randn(b, 4, 64, 64, device="cuda", dtype=dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    t = torch.tensor([500] * b, device="cuda")
    e = torch.randn(b, 77, 768, device="cuda", dtype=dtype)
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        for _ in range(3):
            unet(x, t, encoder_hidden_states=e)
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            unet(x, t, encoder_hidden_states=e)
        end.record()
        torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def main() -> None:
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("unet_forward.py times CUDA kernels: run it on a machine with a CUDA GPU")
    from esd_speed import load

    unet = load("sd15", 512, "cuda").unet
    print(f"SD1.5-sized UNet forward, 64x64 latents, no gradients ({torch.cuda.get_device_name()}, torch "
          f"{torch.__version__}); ms per call")
    for b in (2, 16):
        print(f"fp32 (TF32 conv only) b={b}: {bench(unet, b):.2f} ms", flush=True)
        print(f"autocast bf16 b={b}: {bench(unet, b, autocast=True):.2f} ms", flush=True)
    unet.to(torch.bfloat16)
    for b in (2, 16):
        print(f"bf16 weights b={b}: {bench(unet, b, dtype=torch.bfloat16):.2f} ms", flush=True)
    unet.to(memory_format=torch.channels_last)
    for b in (2, 16):
        print(f"bf16 weights channels_last b={b}: {bench(unet, b, dtype=torch.bfloat16, channels_last=True):.2f} ms",
              flush=True)
    t0 = time.perf_counter()
    compiled = torch.compile(unet)
    ms = bench(compiled, 16, dtype=torch.bfloat16, channels_last=True)
    print(f"compiled bf16 channels_last b=16: {ms:.2f} ms (compile+warm {time.perf_counter() - t0:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
