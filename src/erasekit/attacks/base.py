"""What every attack shares: a frozen config dataclass, ``run(ctx) -> Adversarial``, and the
context it runs in (the edited adapter, the images the unedited model made, the judge).

Attacks see an adapter with the edits applied, whatever their kind. Their losses go through
:func:`guarded_prediction`, which runs the pipeline's hook edits (SLD, SAFREE, SAeUron, a negative
prompt) inside the prediction exactly as the sampling loop would, so a guard is attacked, not
bypassed.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch

from ..adapters import Encoded
from ..adapters.sampling import SampleContext, StepContext, _wrap, module_hooks, stacked_hooks
from ..concepts import ConceptSpec
from ..config import configure
from ..errors import InvalidInputError
from .artefact import Adversarial


@dataclass
class Item:
    """One attacked image: a prompt of the evaluation's target sets and its seed.

    ``image`` is what the unedited model made for it (the attacker's example of the concept),
    ``detected_original``/``detected_pre`` the judge's reading of it and of the edited model's image."""

    prompt: str
    seed: int
    set: str
    image: np.ndarray
    detected_original: bool = False
    detected_pre: bool = False
    edited_image: np.ndarray | None = field(default=None, repr=False)


class UNetCounter:
    """Counts UNet forward calls and the rows they carry, for an attack's cost."""

    def __init__(self, unet: torch.nn.Module) -> None:
        self.calls = self.rows = 0
        self.handle = unet.register_forward_pre_hook(self._count)

    def _count(self, module: Any, args: Any) -> None:
        self.calls += 1
        if args and isinstance(args[0], torch.Tensor):
            self.rows += int(args[0].shape[0])

    def close(self) -> None:
        self.handle.remove()


@dataclass
class AttackContext:
    """What an attack runs with. The adapter's pipeline has the attacked edits applied."""

    adapter: Any
    spec: ConceptSpec
    axis: str
    label: str
    judge: Any
    items: list[Item]
    sampling: dict[str, Any]
    edits: list[Any] = field(default_factory=list)
    seed: int = 0
    progress: Callable[[str, int, int], None] | None = None
    log: Callable[[str], None] = lambda m: None
    record: dict[str, Any] = field(default_factory=dict)

    @property
    def steps(self) -> int:
        return int(self.sampling["num_inference_steps"])

    @property
    def guidance(self) -> float:
        return float(self.sampling["guidance_scale"])

    def tick(self, stage: str, done: int, total: int) -> None:
        if self.progress is not None:
            self.progress(stage, done, total)

    def concept_words(self) -> list[str]:
        """The words that name the concept in the attacked prompts: its phrases and synonyms, and on the
        world model every synonym the vocabulary has for it; longest first."""
        words = {*self.spec.erase_phrases}
        try:
            from ..world.vocab import CONCEPTS

            words |= set(CONCEPTS.get(self.axis, {}).get(self.label, ()))
        except ImportError:  # pragma: no cover - the world ships with erasekit
            pass
        return sorted({w for w in words if w.strip()}, key=lambda w: (-len(w), w))

    def replace_concept(self, prompt: str, token: str) -> str:
        """``prompt`` with its first word for the concept replaced by ``token`` (``token`` put in front of
        a prompt that names the concept in none of :meth:`concept_words`)."""
        for w in self.concept_words():
            new, n = re.subn(rf"(?<![\w-]){re.escape(w)}(?![\w-])", token, prompt, count=1, flags=re.IGNORECASE)
            if n:
                return new
        return f"{token} {prompt}"

    # ------------------------------------------------------------------ images and the judge
    def detect(self, images: np.ndarray) -> np.ndarray:
        """Per uint8 (N, H, W, 3) image: does the judge read the attacked concept?"""
        probs = self.judge.probs(torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1)
        k = self.judge.axes()[self.axis].index(self.label)
        return (probs[self.axis].argmax(-1) == k).numpy()

    def generate(self, cond: Encoded, seeds: Sequence[int], hooks: Sequence[Any] = ()) -> np.ndarray:
        """uint8 images of the edited pipeline, one per conditioning row, each sampled on its own (batch
        of one) so that ``erasekit generate --adversarial`` replays it bit for bit."""
        out = []
        for i, s in enumerate(seeds):
            g = [torch.Generator().manual_seed(int(s))]
            im = self.adapter.sample(cond.index([i]), g, self.steps, self.guidance, hooks=hooks)
            out.append(np.round(np.clip(im[0], 0, 1) * 255).astype(np.uint8))
        return np.stack(out)

    def latents(self, images: np.ndarray) -> torch.Tensor:
        """VAE latents (posterior means) of uint8 images, as the UNet sees them."""
        x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1
        with torch.no_grad():
            return self.adapter.encode_images(x.to(self.adapter.device))

    @contextlib.contextmanager
    def unedited(self) -> Iterator[None]:
        """The pipeline without the attacked edits for the ``with`` block (the unedited model an attacker
        who holds the original weights would query); they are applied again afterwards."""
        pipe = self.adapter.pipe
        for e in reversed(self.edits):
            e.revert(pipe)
        try:
            yield
        finally:
            for e in self.edits:
                e.apply(pipe, force=True)

    # ------------------------------------------------------------------ predictions
    def predict(self, x: torch.Tensor, t: torch.Tensor | int, cond: Encoded) -> torch.Tensor:
        """The edited pipeline's prediction for the model input ``x`` at one timestep ``t``
        (see :func:`guarded_prediction`)."""
        return guarded_prediction(self.adapter, x, t, cond, self.steps, self.guidance)

    def training_t(self, generator: torch.Generator) -> torch.Tensor:
        """A training timestep drawn uniformly from the scheduler's range."""
        n = int(self.adapter.pipe.scheduler.config.num_train_timesteps)
        return torch.randint(0, n, (1,), generator=generator)[0]


def has_hooks(adapter: Any) -> bool:
    return bool(stacked_hooks(adapter))


def guarded_prediction(adapter: Any, x: torch.Tensor, t: torch.Tensor | int, cond: Encoded, steps: int,
                       guidance: float, hooks: Sequence[Any] = ()) -> torch.Tensor:
    """The prediction an attack's loss reads, differentiable in ``cond``.

    With no hook edit applied (weight and LoRA edits are in the weights), the conditional prediction
    ``θ'(x, T(c), t)``: the objective of the official attack codes. With hook edits (or ``hooks``), one
    step of erasekit's sampling loop at ``guidance``: the hooks' embedding transforms, their guidance
    terms and module hooks all act, as they do when the pipeline samples (a guard lives in guidance, so
    the conditional prediction alone would not see it). ``t`` is one timestep for the whole batch; the
    step index hooks read is that of the nearest timestep of a ``steps``-step schedule.
    """
    hooks = stacked_hooks(adapter) + list(hooks)
    if not hooks:
        return adapter.predict_noise(x, t, cond)
    tt = torch.as_tensor(t).reshape(-1)
    if tt.numel() > 1 and bool((tt != tt[0]).any()):
        raise InvalidInputError("a guarded prediction takes one timestep for the whole batch")
    t0 = tt[0].to(adapter.device)
    guided = guidance > 1 and adapter.pipe.unet.config.time_cond_proj_dim is None
    uncond = adapter.uncond(len(cond)) if guided else None
    ctx = SampleContext(adapter, None, steps, guidance, len(cond))
    for hook in hooks:
        cond, uncond = hook.embeddings(ctx, cond, uncond)
    schedule = adapter.set_timesteps(steps)
    index = int((schedule.to(torch.float32) - float(t0)).abs().argmin())
    step = StepContext(ctx, index, t0, x, cond, uncond, guidance)

    def predict(cond: Encoded | None = None, uncond: Encoded | None = None) -> torch.Tensor:
        return adapter.predict_noise(x, t0, step.cond if cond is None else cond,
                                     step.uncond if uncond is None else uncond, guidance)

    predict._erasekit_plain = True  # type: ignore[attr-defined]
    with module_hooks(adapter, hooks):
        for hook in hooks:
            predict = _wrap(hook, step, predict)
        return predict()


class Attack:
    """An attack on an erasure: a frozen ``Config`` dataclass and ``run``.

    Subclasses set ``name``, ``description``, ``Config`` and ``kind`` ("gradient": needs the model's
    gradients; "search": judge or text-encoder queries only)."""

    name: ClassVar[str]
    description: ClassVar[str]
    kind: ClassVar[str] = "gradient"
    Config: ClassVar[type]
    #: config fields that count iterations: zero is refused for them
    iteration_fields: ClassVar[tuple[str, ...]] = ()

    def __init__(self, config: Any = None, **overrides: Any) -> None:
        cfg = configure(self.name, self.Config() if config is None else None, config, overrides)
        for f in self.iteration_fields:
            if getattr(cfg, f) < 1:
                raise InvalidInputError(f"{self.name}: {f} must be at least 1 (got {getattr(cfg, f)})")
        self.config = cfg

    @classmethod
    def world_settings(cls) -> dict[str, Any]:
        """Settings used on the embedded world model unless overridden (CPU-sized; see each attack)."""
        return {}

    def check(self, ctx: AttackContext) -> None:
        """One-line errors for what this attack cannot do here, before any work."""

    def run(self, ctx: AttackContext) -> Adversarial:  # pragma: no cover - abstract
        raise NotImplementedError


def attack_seed(seed: int, *keys: Any) -> torch.Generator:
    """A CPU generator seeded from ``seed`` and ``keys`` (stable across runs and platforms)."""
    import hashlib

    h = hashlib.sha256(repr((seed, *keys)).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(h[:8], "little") & (2**63 - 1))
