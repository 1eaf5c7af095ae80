"""Training a TopK SAE on activations collected at a site."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..config import check_config
from ..errors import InvalidInputError
from .collect import Activations, collect
from .model import TopKSAE, metrics


@dataclass(frozen=True)
class SAEConfig:
    """Every knob of SAE training; the defaults suit the world model's site."""

    n_latents: int = field(default=1024, metadata={"help": "SAE width (latents)", "min": 1})
    k: int = field(default=16, metadata={"help": "active latents per token (TopK)", "min": 1})
    steps: int = field(default=3000, metadata={"help": "optimiser steps", "min": 1})
    batch_size: int = field(default=1024, metadata={"help": "tokens per optimiser step", "min": 1})
    lr: float = field(default=4e-4, metadata={"help": "Adam learning rate (linear decay over the last 20%)",
                                              "above": 0.0})
    aux_k: int = field(default=256, metadata={"help": "dead latents the AuxK loss reconstructs with", "min": 1})
    aux_coef: float = field(default=1 / 32, metadata={"help": "weight of the AuxK loss", "min": 0.0})
    dead_tokens: int = field(default=100_000, metadata={
        "help": "a latent not fired for this many training tokens is dead (AuxK trains it)", "min": 1})
    eval_fraction: float = field(default=0.05, metadata={
        "help": "share of collected tokens held out for the final metrics", "min": 0.0, "max": 0.5})
    seed: int = field(default=0, metadata={"help": "seed of generation, subsampling, init and batches"})
    num_inference_steps: int = field(default=20, metadata={"help": "sampling steps while collecting", "min": 1})
    guidance_scale: float = field(default=2.0, metadata={"help": "guidance while collecting", "min": 0.0})
    prompt_batch: int = field(default=16, metadata={"help": "prompts generated together while collecting", "min": 1})
    tokens_per_call: int = field(default=4096, metadata={
        "help": "tokens kept (random subsample) per forward of the site while collecting", "min": 1})
    log_every: int = field(default=250, metadata={"help": "steps between progress lines", "min": 1})


def fit(x: torch.Tensor, cfg: SAEConfig = SAEConfig(), meta: dict[str, Any] | None = None,
        log: Callable[[str], None] | None = None) -> tuple[TopKSAE, dict[str, Any]]:
    """Train a TopK SAE on the tokens ``x`` (T, d); return it and its training record."""
    check_config(cfg)
    if cfg.k > cfg.n_latents:
        raise InvalidInputError(f"setting k={cfg.k} is out of range: it must be at most n_latents={cfg.n_latents}")
    if x.ndim != 2 or len(x) < 2:
        raise InvalidInputError(f"need at least 2 activation tokens as a (tokens, channels) tensor, got "
                                f"{tuple(x.shape)}")
    start = time.perf_counter()
    g = torch.Generator().manual_seed(cfg.seed)
    x = x.float()
    perm = torch.randperm(len(x), generator=g)
    n_eval = min(int(len(x) * cfg.eval_fraction), len(x) - 1)
    eval_x, train_x = (x[perm[:n_eval]], x[perm[n_eval:]]) if n_eval > 0 else (x, x)

    sae = TopKSAE(x.shape[1], cfg.n_latents, cfg.k, meta)
    sae.init_from(train_x[torch.randperm(len(train_x), generator=g)[:65536]], generator=g)
    opt = torch.optim.Adam(sae.parameters(), lr=cfg.lr, betas=(0.9, 0.999), eps=6.25e-10)
    decay_from = int(cfg.steps * 0.8)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 1.0 if s < decay_from else max(0.0, (cfg.steps - s) / max(cfg.steps - decay_from, 1)))
    since_fired = torch.zeros(cfg.n_latents, dtype=torch.long)
    order, pos = torch.randperm(len(train_x), generator=g), 0
    for step in range(1, cfg.steps + 1):
        if pos + cfg.batch_size > len(order):  # next epoch: a fresh seeded order
            order, pos = torch.randperm(len(train_x), generator=g), 0
        xb = train_x[order[pos:pos + cfg.batch_size]]
        pos += cfg.batch_size
        dead = since_fired >= cfg.dead_tokens
        out = sae.losses(xb, dead, cfg.aux_k, cfg.aux_coef)
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        sae.remove_parallel_grads()
        opt.step()
        sched.step()
        sae.normalize_decoder()
        fired = (out["z"] > 0).any(0)
        since_fired += len(xb)
        since_fired[fired] = 0
        if log is not None and (step % cfg.log_every == 0 or step == cfg.steps):
            log(f"step {step}/{cfg.steps}  fve {1 - float(out['mse'].detach()):.4f}  aux {float(out['aux'].detach()):.3f}  "
                f"dead {float(dead.float().mean()):.3f}")
    sae.eval()
    held = metrics(sae, eval_x)
    dead_all = metrics(sae, x)["dead_fraction"]
    record = {"steps": cfg.steps, "tokens": len(x), "eval_tokens": len(eval_x) if n_eval > 0 else 0,
              "fve": held["fve"], "mse": held["mse"], "l0": held["l0"], "dead_fraction": dead_all,
              "dead_fraction_training": float((since_fired >= cfg.dead_tokens).float().mean()),
              "wall_time_s": round(time.perf_counter() - start, 3), "config": dataclasses.asdict(cfg)}
    return sae, record


def train_sae(adapter: Any, site: str, prompts: Sequence[str], cfg: SAEConfig = SAEConfig(),
              log: Callable[[str], None] | None = None) -> tuple[TopKSAE, dict[str, Any]]:
    """Collect activations at ``site`` while generating ``prompts`` with ``adapter``, then train a TopK SAE
    on them. The SAE's ``meta`` names the site, the model's fingerprint and the token width; the record
    adds collection time and the total wall time."""
    check_config(cfg)
    start = time.perf_counter()
    acts: Activations = collect(adapter, site, prompts, num_inference_steps=cfg.num_inference_steps,
                                guidance_scale=cfg.guidance_scale, batch_size=cfg.prompt_batch,
                                per_call=cfg.tokens_per_call, seed=cfg.seed, log=log)
    collect_s = time.perf_counter() - start
    fingerprint = adapter.fingerprint() if hasattr(adapter, "fingerprint") else None
    meta = {"site": site, "model_fingerprint": fingerprint, "family": getattr(adapter, "family", None),
            "prompts": len(prompts)}
    sae, record = fit(acts.x, cfg, meta, log)
    record.update({"site": site, "prompts": len(prompts), "collect_time_s": round(collect_s, 3),
                   "train_time_s": record["wall_time_s"], "wall_time_s": round(time.perf_counter() - start, 3)})
    return sae, record
