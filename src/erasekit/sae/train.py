"""Training a TopK (or BatchTopK) SAE on activations collected at a site: seeded, resumable from a
checkpoint folder, with a progress callback."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..config import check_config
from ..errors import InvalidInputError, OutputPathError
from .collect import Activations, collect, collect_text, is_text_site
from .model import TopKSAE, metrics

#: progress(stage, done, total): stage "collect" (prompts) or "train" (optimiser steps)
Progress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class SAEConfig:
    """Every knob of SAE training; the defaults suit the world model's site."""

    n_latents: int = field(default=1024, metadata={"help": "SAE width (latents)", "min": 1})
    k: int = field(default=16, metadata={"help": "active latents per token (TopK)", "min": 1})
    batch_topk: bool = field(default=False, metadata={
        "help": "BatchTopK: keep the k x batch largest activations of each training batch (SAeUron's training); "
                "tokens are then encoded with a learned threshold"})
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
    checkpoint_every: int = field(default=250, metadata={
        "help": "steps between checkpoints of a resumable run (sae train writes them beside -o)", "min": 1})


#: settings that do not change what a run computes (a resumed run may change them)
_COSMETIC = ("log_every", "checkpoint_every")


# ---------------------------------------------------------------------- checkpoints
class Checkpoint:
    """A resumable run's folder: ``run.json`` (what the run is), the collected activations (written
    once) and the latest training state. Every file is written atomically; :meth:`remove` deletes only
    these files (and the folder when nothing else is in it)."""

    FILES = ("run.json", "activations.safetensors", "state.pt")

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def exists(self) -> bool:
        return (self.path / "run.json").is_file()

    def start(self, key: dict[str, Any], resume: bool) -> bool:
        """Open the folder for the run ``key``; True when there is a run to resume. Without ``resume`` an
        existing checkpoint is an error (it would be overwritten); with it, a missing or different one."""
        if not resume:
            if self.path.exists():
                raise OutputPathError(f"an interrupted run left a checkpoint at {self.path}; pass --resume to "
                                      "continue it, or delete that folder to start again")
            self.path.mkdir()
            self._write("run.json", lambda f: f.write_text(json.dumps(key, indent=2, sort_keys=True) + "\n"))
            return False
        if not self.exists():
            raise InvalidInputError(f"there is no checkpoint to resume at {self.path}; run without --resume")
        try:
            have = json.loads((self.path / "run.json").read_text())
        except (OSError, ValueError):
            raise InvalidInputError(f"the checkpoint at {self.path} is unreadable; delete it and start again") from None
        diff = sorted(k for k in set(key) | set(have) if key.get(k) != have.get(k))
        if diff:
            raise InvalidInputError(f"the checkpoint at {self.path} is of another run (its {diff[0]} differs); pass the "
                                    "same model, site, prompts and settings, or delete it to start again")
        return True

    def _write(self, name: str, write: Callable[[Path], None]) -> None:
        tmp = self.path / f".{name}.{os.getpid()}.tmp"
        try:
            write(tmp)
            os.replace(tmp, self.path / name)
        finally:
            if tmp.exists():
                tmp.unlink()

    def save_activations(self, acts: Activations) -> None:
        from safetensors.torch import save_file

        self._write("activations.safetensors",
                    lambda f: save_file({"x": acts.x.contiguous(), "step": acts.step.contiguous()}, str(f)))

    def load_activations(self) -> Activations | None:
        from safetensors.torch import load_file

        f = self.path / "activations.safetensors"
        if not f.is_file():
            return None
        try:
            t = load_file(str(f))
            return Activations(t["x"], t["step"])
        except Exception:  # noqa: BLE001 - a damaged file is collected again
            return None

    def save_state(self, state: dict[str, Any]) -> None:
        self._write("state.pt", lambda f: torch.save(state, f))

    def load_state(self) -> dict[str, Any] | None:
        f = self.path / "state.pt"
        if not f.is_file():
            return None
        try:
            return torch.load(f, weights_only=True)
        except Exception:  # noqa: BLE001 - a damaged state restarts training from step 0
            return None

    def remove(self) -> None:
        for name in self.FILES:
            (self.path / name).unlink(missing_ok=True)
        if self.path.is_dir() and not any(self.path.iterdir()):
            self.path.rmdir()


def run_key(site: str, fingerprint: str | None, prompts: Sequence[str], cfg: SAEConfig) -> dict[str, Any]:
    """What identifies a run for resuming: the site, the model, the prompts and the settings that matter."""
    h = hashlib.sha256("\n".join(prompts).encode("utf-8", "backslashreplace")).hexdigest()[:16]
    conf = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in _COSMETIC}
    return {"site": site, "model_fingerprint": fingerprint, "prompts": len(prompts), "prompts_sha256": h,
            "config": conf}


# ---------------------------------------------------------------------- training
def fit(x: torch.Tensor, cfg: SAEConfig = SAEConfig(), meta: dict[str, Any] | None = None,
        log: Callable[[str], None] | None = None, progress: Progress | None = None,
        checkpoint: Checkpoint | None = None, resume_state: dict[str, Any] | None = None) -> tuple[TopKSAE, dict[str, Any]]:
    """Train an SAE on the tokens ``x`` (T, d); return it and its training record.

    With ``checkpoint`` the training state is saved every ``cfg.checkpoint_every`` steps; with
    ``resume_state`` (a state saved so) training continues from it and ends bit for bit where an
    uninterrupted run would have."""
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

    sae = TopKSAE(x.shape[1], cfg.n_latents, cfg.k, meta, batch_topk=cfg.batch_topk)
    sae.init_from(train_x[torch.randperm(len(train_x), generator=g)[:65536]], generator=g)
    opt = torch.optim.Adam(sae.parameters(), lr=cfg.lr, betas=(0.9, 0.999), eps=6.25e-10)
    decay_from = int(cfg.steps * 0.8)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 1.0 if s < decay_from else max(0.0, (cfg.steps - s) / max(cfg.steps - decay_from, 1)))
    since_fired = torch.zeros(cfg.n_latents, dtype=torch.long)
    order, pos = torch.randperm(len(train_x), generator=g), 0
    threshold_sum, threshold_n = 0.0, 0  # BatchTopK: the mean smallest kept activation (second half of training)
    first = 1
    if resume_state is not None:
        sae.load_state_dict(resume_state["sae"])
        opt.load_state_dict(resume_state["opt"])
        sched.load_state_dict(resume_state["sched"])
        g.set_state(resume_state["generator"])
        order, pos = resume_state["order"], int(resume_state["pos"])
        since_fired = resume_state["since_fired"]
        threshold_sum, threshold_n = float(resume_state["threshold_sum"]), int(resume_state["threshold_n"])
        first = int(resume_state["step"]) + 1
        if log is not None:
            log(f"resumed at step {first - 1}/{cfg.steps}")
    fve = float("nan")
    for step in range(first, cfg.steps + 1):
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
        z = out["z"].detach()
        fired = (z > 0).any(0)
        since_fired += len(xb)
        since_fired[fired] = 0
        if cfg.batch_topk and step > cfg.steps // 2 and bool((z > 0).any()):
            threshold_sum += float(z[z > 0].min())
            threshold_n += 1
        fve = 1 - float(out["mse"].detach())
        if progress is not None:
            progress("train", step, cfg.steps)
        if log is not None and (step % cfg.log_every == 0 or step == cfg.steps):
            log(f"step {step}/{cfg.steps}  fve {fve:.4f}  aux {float(out['aux'].detach()):.3f}  "
                f"dead {float(dead.float().mean()):.3f}")
        if checkpoint is not None and step % cfg.checkpoint_every == 0 and step < cfg.steps:
            checkpoint.save_state({"step": step, "sae": sae.state_dict(), "opt": opt.state_dict(),
                                   "sched": sched.state_dict(), "generator": g.get_state(), "order": order,
                                   "pos": pos, "since_fired": since_fired, "threshold_sum": threshold_sum,
                                   "threshold_n": threshold_n})
    if cfg.batch_topk:
        with torch.no_grad():
            sae.threshold.fill_(threshold_sum / threshold_n if threshold_n else 0.0)
    sae.eval()
    held = metrics(sae, eval_x)
    dead_all = metrics(sae, x)["dead_fraction"]
    record = {"steps": cfg.steps, "tokens": len(x), "eval_tokens": len(eval_x) if n_eval > 0 else 0,
              "fve": held["fve"], "mse": held["mse"], "l0": held["l0"], "dead_fraction": dead_all,
              "dead_fraction_training": float((since_fired >= cfg.dead_tokens).float().mean()),
              "wall_time_s": round(time.perf_counter() - start, 3), "config": dataclasses.asdict(cfg)}
    if cfg.batch_topk:
        record["threshold"] = float(sae.threshold)
    if resume_state is not None:
        record["resumed_at_step"] = first - 1
    return sae, record


def collect_site(adapter: Any, site: str, prompts: Sequence[str], cfg: SAEConfig,
                 log: Callable[[str], None] | None = None, progress: Progress | None = None) -> Activations:
    """The activations an SAE at ``site`` (a full module name) trains on: a UNet site's outputs while
    ``prompts`` are generated, or a text-encoder site's outputs (every position) while they are encoded."""
    if is_text_site(adapter, site):
        return collect_text(adapter, site, prompts, batch_size=max(cfg.prompt_batch, 64), log=log,
                            progress=progress)
    return collect(adapter, site, prompts, num_inference_steps=cfg.num_inference_steps,
                   guidance_scale=cfg.guidance_scale, batch_size=cfg.prompt_batch, per_call=cfg.tokens_per_call,
                   seed=cfg.seed, log=log, progress=progress)


def train_sae(adapter: Any, site: str, prompts: Sequence[str], cfg: SAEConfig = SAEConfig(),
              log: Callable[[str], None] | None = None, progress: Progress | None = None,
              checkpoint: str | Path | None = None, resume: bool = False) -> tuple[TopKSAE, dict[str, Any]]:
    """Collect activations at ``site`` (a role name such as ``unet-up-attn-0-1`` or ``text-encoder-layer-2``, or
    a full module name) with ``adapter``, then train an SAE on them. The SAE's ``meta`` names the site (the
    full module name, and the role name given), the model's fingerprint and the family; the record adds
    collection time and the total wall time.

    With ``checkpoint`` (a folder that must not exist, unless ``resume``) the collected activations and
    the training state are kept there as the run goes, so that a killed run continues with ``resume``;
    the folder is removed when training ends."""
    check_config(cfg)
    if cfg.k > cfg.n_latents:
        raise InvalidInputError(f"setting k={cfg.k} is out of range: it must be at most n_latents={cfg.n_latents}")
    prompts = list(prompts)
    if not prompts:
        raise InvalidInputError("the prompt set is empty; give at least one prompt to collect activations from")
    module = adapter.site(site) if hasattr(adapter, "site") else site
    start = time.perf_counter()
    fingerprint = adapter.fingerprint() if hasattr(adapter, "fingerprint") else None
    ckpt = Checkpoint(checkpoint) if checkpoint is not None else None
    resuming = ckpt.start(run_key(module, fingerprint, prompts, cfg), resume) if ckpt is not None else False
    acts = ckpt.load_activations() if resuming and ckpt is not None else None
    state = ckpt.load_state() if resuming and ckpt is not None and acts is not None else None
    if acts is None:
        acts = collect_site(adapter, module, prompts, cfg, log=log, progress=progress)
        if ckpt is not None:
            ckpt.save_activations(acts)
    elif log is not None:
        log(f"reusing the {len(acts)} activation tokens the checkpoint holds")
    collect_s = time.perf_counter() - start
    meta = {"site": module, "site_name": site, "model_fingerprint": fingerprint,
            "family": getattr(adapter, "family", None), "prompts": len(prompts)}
    sae, record = fit(acts.x, cfg, meta, log, progress, ckpt, state)
    record.update({"site": module, "site_name": site, "prompts": len(prompts), "collect_time_s": round(collect_s, 3),
                   "train_time_s": record["wall_time_s"], "wall_time_s": round(time.perf_counter() - start, 3)})
    return sae, record


def discard(checkpoint: str | Path) -> None:
    """Remove a finished run's checkpoint folder (only the files a checkpoint holds)."""
    Checkpoint(checkpoint).remove()

