"""The training loop the fine-tuning methods share.

- :class:`Trainable`: what a fit trains on the live pipeline, either the named tensors themselves
  (a ``weight_delta`` edit of only those tensors comes out) or peft LoRA adapters injected on
  named linear layers (a ``lora`` edit). ``frozen()`` gives passes through the model as it was
  before training without a second copy of it: full training keeps a copy of the trained tensors
  only and swaps them in; LoRA switches its adapters off. ``close()`` leaves the pipeline exactly
  as it was.
- :func:`run_training`: Adam steps over a method's ``loss(step)``, with mixed precision, atomic
  checkpoints every N steps and exact resumption (a method draws each step's randomness from
  :func:`step_generator`, which depends on the seed and the step only, so a resumed run draws
  what an uninterrupted one would), a progress bar on a terminal and plain lines elsewhere, and a
  record for the manifest (loss summary, steps, wall time, speed).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import InvalidInputError
from ..io import atomic_path, check_parent

ADAPTER_NAME = "erasekit"


@dataclass(frozen=True)
class TrainingConfig:
    """Settings every fine-tuning method shares (each method sets its paper's defaults)."""

    steps: int = field(default=200, metadata={"help": "optimisation steps", "min": 1})
    lr: float = field(default=1e-5, metadata={"help": "Adam learning rate", "above": 0.0})
    batch_size: int = field(default=1, metadata={"help": "training examples per step", "min": 1})
    seed: int = field(default=0, metadata={"help": "seed of every random draw of the fit", "min": 0,
                                           "max": 2**63 - 1})
    rank: int = field(default=0, metadata={
        "help": "0: train the tensors themselves (a weight_delta edit of only those tensors); r > 0: train "
                "rank-r LoRA adapters on the linear layers among them (a lora edit)", "min": 0})
    lora_alpha: float = field(default=0.0, metadata={"help": "LoRA alpha (0 = the rank, scale 1)", "min": 0.0})
    checkpoint_every: int = field(default=50, metadata={
        "help": "steps between atomic checkpoints of an interrupted-safe run (CLI: beside the output)", "min": 1})
    mixed_precision: str = field(default="no", metadata={
        "help": "autocast dtype for forward passes: no, bf16 or fp16 (fp16 adds a gradient scaler)",
        "choices": ("no", "bf16", "fp16")})
    gradient_checkpointing: bool = field(default=False, metadata={
        "help": "recompute activations in the backward pass (less memory, more time)"})


def step_generator(seed: int, *keys: Any) -> torch.Generator:
    """A CPU generator seeded by ``seed`` and ``keys`` alone (e.g. ``("chunk", 3)``), so a resumed run
    draws exactly what an uninterrupted one draws there."""
    h = hashlib.sha256(json.dumps([seed, *map(str, keys)]).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(h[:8], "little") & (2**63 - 1))


def _component(pipe: Any, full_name: str) -> tuple[str, torch.nn.Module, str]:
    comp, _, rest = full_name.partition(".")
    mod = getattr(pipe, comp, None)
    if not isinstance(mod, torch.nn.Module):
        raise InvalidInputError(f"the pipeline has no component {comp!r} to train")
    return comp, mod, rest


class Trainable:
    """The tensors (``rank == 0``) or LoRA adapters (``rank > 0``) a fit trains, on the live pipeline.

    Args:
        pipe: the pipeline, trained in place until :meth:`close`.
        params: full parameter names (``unet.down_blocks...attn2.to_k.weight``) to train. With a
            rank, the linear layers owning them get adapters (other tensors are left out: say so).
        rank, alpha: LoRA rank and alpha (alpha 0 = the rank).
        seed: seeds the adapters' initialisation (peft's: A Kaiming-uniform, B zero).
    """

    def __init__(self, pipe: Any, params: list[str], rank: int = 0, alpha: float = 0.0, seed: int = 0) -> None:
        if not params:
            raise InvalidInputError("the method selected no parameters to train on this model")
        self.pipe, self.rank, self.alpha = pipe, rank, float(alpha or rank)
        self._components: dict[str, torch.nn.Module] = {}
        named: dict[str, torch.nn.Parameter] = {}
        for name in params:
            comp, mod, rest = _component(pipe, name)
            self._components[comp] = mod
            p = dict(mod.named_parameters()).get(rest)
            if p is None:
                raise InvalidInputError(f"the pipeline has no parameter {name}")
            named[name] = p
        self._grad_state = {comp: {n: p.requires_grad for n, p in m.named_parameters()}
                            for comp, m in self._components.items()}
        for m in self._components.values():
            m.requires_grad_(False)
        self._closed = False
        if rank == 0:
            self._params = named
            self._orig = {n: p.detach().clone() for n, p in named.items()}
            for p in named.values():
                p.requires_grad_(True)
            self.modules: list[str] = []
        else:
            self._params = {}
            self._orig = {}
            self.modules = sorted({n.rpartition(".")[0] for n in named
                                   if isinstance(self._module(n.rpartition(".")[0]), torch.nn.Linear)})
            if not self.modules:
                raise InvalidInputError("LoRA (rank > 0) needs linear layers among the trained parameters; use rank=0")
            self._inject(seed)

    # ------------------------------------------------------------------ set-up
    def _module(self, full: str) -> torch.nn.Module:
        _, mod, rest = _component(self.pipe, full)
        return mod.get_submodule(rest) if rest else mod

    def _inject(self, seed: int) -> None:
        from peft import LoraConfig, inject_adapter_in_model

        by_comp: dict[str, list[str]] = {}
        for m in self.modules:
            comp, _, rest = m.partition(".")
            by_comp.setdefault(comp, []).append(rest)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for comp, targets in by_comp.items():
                cfg = LoraConfig(r=self.rank, lora_alpha=self.alpha, target_modules=targets, lora_dropout=0.0)
                inject_adapter_in_model(cfg, self._components[comp], adapter_name=ADAPTER_NAME)
        self._layers = {m: self._module(m) for m in self.modules}
        for layer in self._layers.values():
            for d in (layer.lora_A, layer.lora_B):
                d[ADAPTER_NAME].requires_grad_(True)
        for comp, mod in self._components.items():  # peft freezes every other tensor: keep only ours trainable
            for n, p in mod.named_parameters():
                p.requires_grad_(f".{ADAPTER_NAME}." in f".{n}.")

    # ------------------------------------------------------------------ training
    def parameters(self) -> list[torch.nn.Parameter]:
        """The trained tensors, in a fixed order (the optimiser's and the checkpoint's)."""
        if self.rank == 0:
            return [self._params[n] for n in sorted(self._params)]
        return [p for m in self.modules for p in (self._layers[m].lora_A[ADAPTER_NAME].weight,
                                                   self._layers[m].lora_B[ADAPTER_NAME].weight)]

    def state(self) -> dict[str, torch.Tensor]:
        """Current values of the trained tensors, by name (a checkpoint's)."""
        if self.rank == 0:
            return {n: p.detach().cpu().clone() for n, p in self._params.items()}
        out = {}
        for m in self.modules:
            out[f"{m}.lora_A.weight"] = self._layers[m].lora_A[ADAPTER_NAME].weight.detach().cpu().clone()
            out[f"{m}.lora_B.weight"] = self._layers[m].lora_B[ADAPTER_NAME].weight.detach().cpu().clone()
        return out

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        mine = self.state()
        if set(state) != set(mine) or any(state[k].shape != mine[k].shape for k in mine):
            raise InvalidInputError("the checkpoint trains other tensors than this run; it was made with other "
                                    "settings or for another model (drop --resume or use --overwrite)")
        with torch.no_grad():
            if self.rank == 0:
                for n, p in self._params.items():
                    p.copy_(state[n])
            else:
                for m in self.modules:
                    self._layers[m].lora_A[ADAPTER_NAME].weight.copy_(state[f"{m}.lora_A.weight"])
                    self._layers[m].lora_B[ADAPTER_NAME].weight.copy_(state[f"{m}.lora_B.weight"])

    @contextlib.contextmanager
    def frozen(self) -> Iterator[None]:
        """Passes through the model as it was before training (no gradients): the original tensors are
        swapped in (full training) or the adapters switched off (LoRA); no copy of the model is made."""
        with torch.no_grad():
            if self.rank == 0:
                current = {n: p.data for n, p in self._params.items()}
                try:
                    for n, p in self._params.items():
                        p.data = self._orig[n]
                    yield
                finally:
                    for n, p in self._params.items():
                        p.data = current[n]
            else:
                try:
                    for layer in self._layers.values():
                        layer.enable_adapters(False)
                    yield
                finally:
                    for layer in self._layers.values():
                        layer.enable_adapters(True)

    @contextlib.contextmanager
    def gradient_checkpointing(self, enabled: bool) -> Iterator[None]:
        """Activation checkpointing on the trained components while training (diffusers and transformers
        switches), switched back off afterwards."""
        switched = []
        try:
            if enabled:
                for m in self._components.values():
                    if hasattr(m, "enable_gradient_checkpointing"):
                        m.enable_gradient_checkpointing()
                        switched.append((m, "disable_gradient_checkpointing"))
                    elif hasattr(m, "gradient_checkpointing_enable"):
                        m.gradient_checkpointing_enable()
                        switched.append((m, "gradient_checkpointing_disable"))
            yield
        finally:
            for m, off in switched:
                getattr(m, off)()

    # ------------------------------------------------------------------ results
    def deltas(self) -> dict[str, torch.Tensor]:
        """Full training: each trained tensor's change, float32 on the CPU."""
        return {n: (p.detach().float() - self._orig[n].float()).cpu() for n, p in sorted(self._params.items())}

    def factors(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """LoRA: ``{module: (A, B)}`` float32 on the CPU."""
        return {m: (self._layers[m].lora_A[ADAPTER_NAME].weight.detach().float().cpu().clone(),
                    self._layers[m].lora_B[ADAPTER_NAME].weight.detach().float().cpu().clone())
                for m in self.modules}

    def edit(self, manifest: dict[str, Any]) -> Any:
        """The trained change as an edit: a weight delta of only the trained tensors, or a LoRA edit."""
        from ..edits import LoraEdit, WeightDelta

        if self.rank == 0:
            return WeightDelta(self.deltas(), manifest)
        return LoraEdit.from_factors(self.factors(), manifest, alpha=self.alpha)

    def close(self) -> None:
        """Give the pipeline back exactly as it was: original tensors, no adapters, gradient flags restored."""
        if self._closed:
            return
        self._closed = True
        with torch.no_grad():
            for n, p in self._params.items():
                p.copy_(self._orig[n])
                p.grad = None  # no stale gradients (or their memory) left on the pipeline
        if self.rank:
            self._unload()
        for comp, flags in self._grad_state.items():
            for n, p in self._components[comp].named_parameters():
                if n in flags:
                    p.requires_grad_(flags[n])

    def _unload(self) -> None:
        for full in self.modules:
            layer = self._layers[full]
            parent_name, _, child = full.rpartition(".")
            setattr(self._module(parent_name), child, layer.get_base_layer())
        for mod in self._components.values():  # peft leaves its config on the model: drop it
            if getattr(mod, "peft_config", None) is not None and isinstance(mod.peft_config, dict):
                mod.peft_config.pop(ADAPTER_NAME, None)
                if not mod.peft_config:
                    with contextlib.suppress(AttributeError):
                        del mod.peft_config


# ---------------------------------------------------------------------------- checkpoints
class Checkpoint:
    """One file holding everything a run needs to continue: trained tensors, optimiser state, step,
    losses, and the run's identity (method, settings, concepts, base model) to refuse a mismatched resume.
    Written atomically (a temporary file renamed over the last checkpoint)."""

    def __init__(self, path: str | Path) -> None:
        self.path = check_parent(path)

    def exists(self) -> bool:
        return self.path.is_file()

    def save(self, state: dict[str, Any]) -> None:
        with atomic_path(self.path) as tmp:
            torch.save(state, tmp)

    def load(self) -> dict[str, Any]:
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=True)
            if not isinstance(state, dict) or "identity" not in state:
                raise ValueError("no run identity")
            return state
        except Exception as e:  # noqa: BLE001 - a truncated or foreign file: one line, not a pickle traceback
            raise InvalidInputError(f"{self.path} is not a readable erasekit checkpoint ({type(e).__name__}); "
                                    "erasekit leaves a file it cannot read alone: move or delete it yourself, "
                                    "or choose another output name") from None

    def discard(self) -> None:
        """Remove the checkpoint (a finished or restarted run); a file there that erasekit did not write
        is refused, never deleted."""
        if not self.path.exists() and not self.path.is_symlink():
            return
        if self.path.is_symlink() or not self.path.is_file() or "identity" not in self.load():
            raise InvalidInputError(f"{self.path} is in the way of this run's checkpoint and was not written by "
                                    "erasekit; move it away or choose another output name")
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


def _mismatch(saved: dict[str, Any], now: dict[str, Any], defaults: dict[str, Any] | None = None) -> str | None:
    """Why a checkpoint's identity is not this run's (None if it is). A setting the checkpoint does not
    record (added to the method since) counts as its default, so older checkpoints still resume."""
    for k in sorted(set(saved) | set(now)):
        if k == "config":
            was = {**(defaults or {}), **saved.get(k, {})}
            for ck in sorted(set(was) | set(now.get(k, {}))):
                a, b = was.get(ck), now.get(k, {}).get(ck)
                if a != b and ck not in ("checkpoint_every", "compile"):  # how, not what, it computes
                    return f"setting {ck} was {a!r}, now {b!r}"
        elif saved.get(k) != now.get(k):
            return f"{k} differs"
    return None


# ---------------------------------------------------------------------------- progress
class _Plain:
    """Log lines on stderr, about ten per run."""

    def __init__(self, label: str, total: int, start: int) -> None:
        self.label, self.total, self.every = label, total, max(1, total // 10)
        self.t0, self.start = time.perf_counter(), start

    def update(self, step: int, loss: float) -> None:
        if step % self.every and step != self.total:
            return
        rate = (step - self.start) / max(time.perf_counter() - self.t0, 1e-9)
        eta = (self.total - step) / rate if rate > 0 else float("nan")
        print(f"{self.label} step {step}/{self.total} loss {loss:.5f} {rate:.2f} it/s eta {eta:.0f}s",
              file=sys.stderr, flush=True)

    def close(self) -> None:
        pass


class _Bar:
    def __init__(self, label: str, total: int, start: int) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
        )

        self.p = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                          TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[rate]} it/s"),
                          TimeRemainingColumn(), console=Console(stderr=True), transient=False)
        self.p.start()
        self.task = self.p.add_task(label, total=total, completed=start, loss="-", rate="-")
        self.t0, self.start = time.perf_counter(), start

    def update(self, step: int, loss: float) -> None:
        rate = (step - self.start) / max(time.perf_counter() - self.t0, 1e-9)
        self.p.update(self.task, completed=step, loss=f"{loss:.5f}", rate=f"{rate:.2f}")

    def close(self) -> None:
        self.p.stop()


class _Silent:
    def update(self, step: int, loss: float) -> None:
        pass

    def close(self) -> None:
        pass


def progress_reporter(label: str, total: int, start: int = 0, enabled: bool | None = True) -> Any:
    """A progress bar when stderr is a terminal, plain lines otherwise; nothing with ``enabled=False``."""
    if enabled is False:
        return _Silent()
    return _Bar(label, total, start) if sys.stderr.isatty() else _Plain(label, total, start)


# ---------------------------------------------------------------------------- the loop
def _summary(losses: list[float]) -> dict[str, Any]:
    if not losses:
        return {}
    n = len(losses)
    buckets = min(10, n)
    means = [sum(losses[i * n // buckets:(i + 1) * n // buckets]) / max(1, (i + 1) * n // buckets - i * n // buckets)
             for i in range(buckets)]
    return {"first": round(losses[0], 6), "last": round(losses[-1], 6), "min": round(min(losses), 6),
            "mean_by_tenth": [round(m, 6) for m in means]}


def run_training(trainable: Trainable, loss_fn: Callable[[int], torch.Tensor], cfg: TrainingConfig, *,
                 identity: dict[str, Any], label: str = "training", checkpoint: Checkpoint | None = None,
                 resume: bool = False, progress: bool | None = True,
                 after_backward: Callable[[], None] | None = None,
                 after_step: Callable[[int, torch.optim.Optimizer], None] | None = None,
                 extra_state: tuple[Callable[[], dict], Callable[[dict], None]] | None = None) -> dict[str, Any]:
    """Adam over ``trainable`` minimising ``loss_fn(step)`` for ``cfg.steps`` steps; the run's record.

    ``identity`` (JSON-able: method, settings, concepts, base model) is stored in each checkpoint;
    resuming from a checkpoint of another identity is refused in one line. ``after_backward`` runs
    between the backward pass and the optimiser step (SalUn masks gradients there); ``after_step(step,
    optimiser)`` after it (AdvUnlearn's separate retain step uses the same optimiser there).
    ``extra_state`` = (get, set): a method's own state carried across steps (AdvUnlearn's adversarial
    prompt), saved in each checkpoint and restored on resume.
    """
    params = trainable.parameters()
    opt = torch.optim.Adam(params, lr=cfg.lr, betas=(0.9, getattr(cfg, "adam_beta2", 0.999)))
    device = params[0].device
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.mixed_precision)
    scaler = torch.amp.GradScaler(device.type) if amp_dtype is torch.float16 else None
    start, losses, wall_before = 0, [], 0.0
    identity = json.loads(json.dumps(identity))
    if checkpoint is not None and checkpoint.exists():
        if not resume:
            raise InvalidInputError(f"{checkpoint.path} holds an interrupted run; pass --resume to continue it, or "
                                    "--overwrite to start again")
        state = checkpoint.load()
        why = _mismatch(json.loads(state.get("identity", "{}")), identity, _defaults(cfg))
        if why:
            raise InvalidInputError(f"--resume: the checkpoint {checkpoint.path} was made by another run ({why}); "
                                    "match its settings and model, or pass --overwrite to start again")
        trainable.load_state(state["trainable"])
        opt.load_state_dict(state["optimizer"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        start, losses, wall_before = int(state["step"]), list(state["losses"]), float(state["wall_s"])
        if extra_state is not None:
            extra_state[1](state.get("extra") or {})
    reporter = progress_reporter(label, cfg.steps, start, progress)
    t0 = time.perf_counter()
    loss = torch.tensor(float("nan"))
    try:
        for step in range(start, cfg.steps):
            opt.zero_grad(set_to_none=True)
            with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                loss = loss_fn(step)
            if not torch.isfinite(loss):
                raise InvalidInputError(f"the loss became {float(loss)} at step {step + 1}; lower lr (now {cfg.lr})"
                                        + (" or use mixed_precision=bf16" if cfg.mixed_precision == "fp16" else ""))
            (scaler.scale(loss) if scaler is not None else loss).backward()
            if after_backward is not None:
                if scaler is not None:
                    scaler.unscale_(opt)
                after_backward()
            if scaler is not None:
                scaler.step(opt)
                scaler.update()
            else:
                opt.step()
            if after_step is not None:
                after_step(step, opt)
            losses.append(float(loss.detach()))
            reporter.update(step + 1, losses[-1])
            if checkpoint is not None and (step + 1) % cfg.checkpoint_every == 0 and step + 1 < cfg.steps:
                checkpoint.save({"identity": json.dumps(identity, sort_keys=True), "step": step + 1,
                                 "trainable": trainable.state(), "optimizer": opt.state_dict(),
                                 "scaler": scaler.state_dict() if scaler is not None else {},
                                 "losses": losses, "wall_s": wall_before + time.perf_counter() - t0,
                                 "extra": extra_state[0]() if extra_state is not None else {}})
    finally:
        reporter.close()
    secs = time.perf_counter() - t0
    done = cfg.steps - start
    return {"steps": cfg.steps, "resumed_at_step": start or None, "loss": _summary(losses),
            "train_wall_time_s": round(wall_before + secs, 3),
            "steps_per_s": round(done / secs, 4) if secs > 0 and done else None}


def _defaults(cfg: Any) -> dict[str, Any]:
    """The default settings of ``cfg``'s class, as identities record settings."""
    from ..methods.base import config_dict

    try:
        return json.loads(json.dumps(config_dict(type(cfg)())))
    except Exception:  # noqa: BLE001 - a config class without defaults for every field: compare as recorded
        return {}


def identity_of(method: str, cfg: Any, concepts: list[Any], fingerprint: str, on_top: list[str]) -> dict[str, Any]:
    """What a checkpoint must match to be resumed: method, settings, concepts, base model, edits under it."""
    from ..methods.base import config_dict

    return {"method": method, "config": config_dict(cfg), "concepts": [c.to_dict() for c in concepts],
            "base_fingerprint": fingerprint, "fitted_on_top_of": on_top}
