"""What every fine-tuning method shares: a :class:`~erasekit.training.TrainingConfig`, the tensors it
trains (chosen by adapter role), a ``loss(step)``, and :meth:`FineTuneMethod.fit`, which runs the one
training loop and returns a ``weight_delta`` edit of only the trained tensors or a ``lora`` edit.

The model's prediction type is the adapter's: every loss here compares UNet outputs with UNet
outputs (or with ``adapter.target``), so the same code serves epsilon-prediction SD1.x/SDXL and the
v-prediction world model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .. import __version__
from ..adapters import Encoded, get_adapter
from ..concepts import ConceptSpec
from ..edits import Edit, applied
from ..errors import InvalidInputError
from ..training import Checkpoint, Trainable, identity_of, run_training
from .base import Method, config_dict
from .closed_form import Timer

#: parameter selections by name, as the fine-tuning papers name them
UNET_EXCLUDED_BY_U = ("unet.time_embedding", "unet.conv_out", "unet.add_embedding")


def params_of(adapter: Any, role: str, exclude: tuple[str, ...] = ()) -> list[str]:
    """Full parameter names (weights and biases) of the modules serving ``role``, minus name prefixes."""
    out = []
    for name, mod in adapter.modules(role).items():
        if name.startswith(exclude):
            continue
        out += [f"{name}.{p}" for p, _ in mod.named_parameters(recurse=False)]
    return sorted(out)


def select_params(adapter: Any, which: str) -> list[str]:
    """``x``: every linear layer of cross-attention (q, k, v, out); ``x-strict``: cross-attention K/V;
    ``u``: every linear and convolution layer outside cross-attention except the time embedding and the
    output convolution (ESD's ``noxattn``); ``kv`` = ``x-strict``; ``text-encoder``: the text encoder's
    linear layers and token embeddings; ``unet``: everything the UNet's x and u select together."""
    if which == "x":
        return params_of(adapter, "cross_attn")
    if which in ("x-strict", "kv"):
        return params_of(adapter, "cross_attn_kv")
    if which == "u":
        return params_of(adapter, "unet_no_cross_attn", UNET_EXCLUDED_BY_U)
    if which == "unet":
        return sorted(params_of(adapter, "cross_attn") + params_of(adapter, "unet_no_cross_attn"))
    if which == "text-encoder":
        return params_of(adapter, "text_encoder")
    raise InvalidInputError(f"unknown parameter selection {which!r}; choose x, x-strict, u, unet or text-encoder")


def generate_latents(adapter: Any, prompts: list[str], seed: int, label: str = "images",
                     batch: int = 16) -> torch.Tensor:
    """Final latents (x0 in UNet space) the model itself generates for ``prompts``, image i seeded by
    ``(seed, label, i)``, with the model's recommended sampling: the training images a method makes
    from its own model (Ablating Concepts' anchor images, SalUn's forget and retain sets)."""
    from ..models import sampling_defaults
    from ..training import step_generator

    s = sampling_defaults(getattr(adapter.pipe, "erasekit_source", ""))
    out = []
    for i in range(0, len(prompts), batch):
        chunk = prompts[i:i + batch]
        gens = [step_generator(seed, label, i + j) for j in range(len(chunk))]
        _, lat = adapter.sample(chunk, gens, s["num_inference_steps"], s["guidance_scale"], output_type="pt",
                                return_latents=True)
        out.append(lat.detach())
    return torch.cat(out)


def noisy(adapter: Any, x0: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_t, t, target) for a uniformly drawn training timestep: the DDPM training pair in the model's
    own prediction space (``target`` is the noise, velocity or x0 the UNet should predict)."""
    n_train = adapter.pipe.scheduler.config.num_train_timesteps
    t = torch.randint(n_train, (len(x0),), generator=g).to(x0.device)
    noise = torch.randn(x0.shape, generator=g).to(x0.device, x0.dtype)
    return adapter.add_noise(x0, noise, t), t, adapter.target(x0, noise, t)


def template_pairs(concepts: list[ConceptSpec], templates: tuple[str, ...]) -> list[tuple[str, str]]:
    """(concept prompt, anchor prompt) for every erase phrase of every concept in every template."""
    from .closed_form import expand

    return [(e, a) for c in concepts for phrase in c.erase_phrases
            for e, a in zip(expand(templates, phrase), expand(templates, c.anchor))]


def encode_trainable(adapter: Any, prompts: list[str]) -> Encoded:
    """Encode ``prompts`` with gradients through the text encoder(s) and their token embeddings (for
    methods that train them; ``adapter.encode`` runs without gradients)."""
    adapter.check_length(prompts)
    return adapter.encode_embeddings(adapter.token_embeddings(prompts), adapter.input_ids(prompts))


def repeat_encoded(e: Encoded, n: int) -> Encoded:
    """``e``'s first row ``n`` times."""
    return e.index([0] * n)


class FineTuneMethod(Method):
    """A fine-tuning method. Subclasses implement :meth:`trained_params`, :meth:`prepare` and :meth:`loss`
    (and may set :meth:`after_backward`); their ``Config`` extends :class:`~erasekit.training.TrainingConfig`."""

    family = "fine-tuning"

    def trained_params(self, adapter: Any) -> list[str]:  # pragma: no cover - abstract
        raise NotImplementedError

    def prepare(self, adapter: Any, concepts: list[ConceptSpec], trainable: Trainable) -> Any:  # pragma: no cover
        """Encode prompts, make data: whatever ``loss`` needs (runs before step 0 and on resume)."""
        raise NotImplementedError

    def loss(self, adapter: Any, state: Any, trainable: Trainable, step: int) -> torch.Tensor:  # pragma: no cover
        """The loss of optimisation step ``step``; its randomness must come from ``step_generator(seed, ...)``."""
        raise NotImplementedError

    def after_backward(self, state: Any, trainable: Trainable) -> None:
        """Between backward and the optimiser step (e.g. SalUn's gradient mask)."""

    def after_step(self, adapter: Any, state: Any, trainable: Trainable, step: int, optimizer: Any) -> None:
        """After the optimiser step (e.g. AdvUnlearn's retain step with the same optimiser)."""

    def get_extra_state(self, state: Any) -> dict[str, Any]:
        """Tensors/numbers the method carries from step to step (checkpointed; none by default)."""
        return {}

    def set_extra_state(self, state: Any, extra: dict[str, Any]) -> None:
        """Restore what :meth:`get_extra_state` returned (on resume)."""

    def check(self, concepts: list[ConceptSpec]) -> None:
        """Refuse concepts this method cannot train on (one line)."""

    def fit(self, adapter: Any, concepts: list[ConceptSpec], checkpoint: str | Path | None = None,
            resume: bool = False, progress: bool | None = True) -> Edit:
        """Train on ``adapter``'s pipeline (left as it was afterwards) and return the edit.

        Args:
            checkpoint: a file for atomic checkpoints every ``checkpoint_every`` steps (the CLI puts it
                beside the output as ``<output>.checkpoint``); it is left in place: delete it once the
                edit is saved. None: no checkpoints.
            resume: continue from ``checkpoint`` (refused if it was made with other settings or model).
            progress: a bar on a terminal, plain lines otherwise; False for none.
        """
        adapter = get_adapter(adapter)
        cfg = self.config
        self.check(concepts)
        timer = Timer()
        on_top = [e.digest for e, _ in applied(adapter.pipe)]
        fingerprint = adapter.fingerprint()  # before training touches the weights it hashes
        identity = identity_of(self.name, cfg, concepts, fingerprint, on_top)
        ckpt = Checkpoint(checkpoint) if checkpoint is not None else None
        if resume and (ckpt is None or not ckpt.exists()):
            where = f" at {ckpt.path}" if ckpt is not None else " (no checkpoint path was given)"
            raise InvalidInputError(f"there is no checkpoint to resume{where}; run without --resume")
        if ckpt is not None and ckpt.exists() and not resume:
            raise InvalidInputError(f"{ckpt.path} holds an interrupted run; pass --resume to continue it, or "
                                    "--overwrite to start again")
        trainable = Trainable(adapter.pipe, self.trained_params(adapter), cfg.rank, cfg.lora_alpha, cfg.seed)
        try:
            with trainable.gradient_checkpointing(cfg.gradient_checkpointing), timer.part("prepare"):
                state = self.prepare(adapter, concepts, trainable)
            with trainable.gradient_checkpointing(cfg.gradient_checkpointing), timer.part("train"):
                record = run_training(trainable, lambda step: self.loss(adapter, state, trainable, step), cfg,
                                      identity=identity, label=self.name, checkpoint=ckpt, resume=resume,
                                      progress=progress, after_backward=lambda: self.after_backward(state, trainable),
                                      after_step=lambda step, opt: self.after_step(adapter, state, trainable, step, opt),
                                      extra_state=(lambda: self.get_extra_state(state),
                                                   lambda d: self.set_extra_state(state, d)))
            manifest = {
                "method": self.name,
                "config": config_dict(cfg),
                "concepts": [c.to_dict() for c in concepts],
                "family": adapter.family,
                "base_fingerprint": fingerprint,
                "fitted_on_top_of": on_top,
                "erasekit_version": __version__,
                "training": record,
                "trained_tensors": len(trainable.parameters()),
                **self.extra_manifest(state),
            }
            manifest.update(wall_time_s=round(timer.total(), 4), peak_memory_mb=timer.memory(),
                            timings_s={k: round(v, 4) for k, v in timer.parts.items()})
            return trainable.edit(manifest)
        finally:
            trainable.close()

    def extra_manifest(self, state: Any) -> dict[str, Any]:
        """Method-specific measurements for the manifest."""
        return {}
