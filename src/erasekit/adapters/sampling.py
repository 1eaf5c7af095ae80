"""erasekit's one sampling loop, with the points where inference-time edits hook in.

With no hooks it gives the images the diffusers pipeline's own ``__call__`` gives for its default
arguments and the same generators. Hooks come from the pipeline's applied ``hook`` edits first (in
stack order), then from the caller:

- ``Hook.embeddings`` rewrites the conditioning once per call (hooks apply in list order);
- ``Hook.noise`` wraps each step's guided prediction (the first hook is innermost);
- ``Hook.module_hooks`` are torch forward hooks, registered for the denoising loop and the VAE
  decode and always removed afterwards, also when generation raises. Text encoding runs before
  they are registered: change conditioning with ``embeddings``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from ..errors import InvalidInputError
from .base import Encoded

#: what ``sample`` returns for its output types: "np" (N, H, W, 3) floats, "pt" (N, 3, H, W)
#: tensors, both in [0, 1]; "pil" a list of PIL images
Images = np.ndarray | torch.Tensor | list


@dataclass
class SampleContext:
    """One ``sample`` call. ``prompts`` is None when the caller passed an ``Encoded``."""

    adapter: Any
    prompts: list[str] | None
    num_inference_steps: int
    guidance_scale: float
    batch_size: int


@dataclass
class StepContext:
    """One denoising step. ``latents`` is x_t before ``scheduler.scale_model_input``."""

    sample: SampleContext
    index: int
    t: torch.Tensor
    latents: torch.Tensor
    cond: Encoded
    uncond: Encoded | None
    guidance_scale: float


class Hook:
    """An inference-time change. Override what you change; the defaults change nothing."""

    def embeddings(self, ctx: SampleContext, cond: Encoded,
                   uncond: Encoded | None) -> tuple[Encoded, Encoded | None]:
        """The conditioning (and unconditional conditioning, None without guidance) to sample with."""
        return cond, uncond

    def noise(self, ctx: StepContext, predict: Callable[..., torch.Tensor]) -> torch.Tensor:
        """This step's guided model output. ``predict()`` is what the loop (or the inner hook) would use;
        ``predict(cond=..., uncond=...)`` asks the same of other conditioning, and inner hooks still run
        (they see it as ``ctx.cond``/``ctx.uncond``)."""
        return predict()

    def module_hooks(self, adapter: Any) -> dict[str, Callable]:
        """Forward hooks ``fn(module, args, output) -> new output or None`` by full module name
        (``"unet.up_blocks.1.attentions.1"``)."""
        return {}


def stacked_hooks(adapter: Any) -> list[Hook]:
    """The hooks of the ``hook`` edits applied to the adapter's pipeline, in stack order."""
    stack = getattr(adapter.pipe, "_erasekit_stack", None) or []
    return [h for edit, _ in stack if getattr(edit, "kind", None) == "hook" for h in edit.hooks(adapter)]


def resolve_module(pipe: Any, name: str) -> torch.nn.Module:
    """The module ``component.path.in.it`` of ``pipe``."""
    comp, _, rest = name.partition(".")
    module = getattr(pipe, comp, None)
    if isinstance(module, torch.nn.Module):
        with contextlib.suppress(AttributeError):
            return module.get_submodule(rest) if rest else module
    raise InvalidInputError(f"the pipeline has no module {name!r}; name one as 'component.path', "
                            "e.g. 'unet.up_blocks.1.attentions.1'")


@contextlib.contextmanager
def module_hooks(adapter: Any, hooks: Sequence[Hook]) -> Iterator[None]:
    """Register the hooks' forward hooks for the ``with`` block; they are removed however it ends."""
    handles = []
    try:
        for hook in hooks:
            for name, fn in hook.module_hooks(adapter).items():
                handles.append(resolve_module(adapter.pipe, name).register_forward_hook(fn))
        yield
    finally:
        for handle in handles:
            handle.remove()


def sample(adapter: Any, prompts: list[str] | Encoded, generators: list[torch.Generator], num_inference_steps: int,
           guidance_scale: float, uncond: Encoded | None = None, hooks: Sequence[Hook] = (),
           output_type: str = "np", return_latents: bool = False,
           grad: bool = False) -> Images | tuple[Images, torch.Tensor]:
    """Generate one image per prompt (or ``Encoded`` row), image i from ``generators[i]``.

    Args:
        uncond: conditioning to guide away from; the pipeline's own (see ``adapter.uncond``) when None.
            Used only with guidance (``guidance_scale > 1`` and no guidance-embedding UNet).
        hooks: run after the hooks of the pipeline's applied ``hook`` edits.
        output_type: "np", "pt" or "pil", as the pipeline's ``output_type``.
        return_latents: also return the final (N, C, h, w) latents.
        grad: track gradients (default: run under ``torch.no_grad``).
    """
    hooks = stacked_hooks(adapter) + list(hooks)
    with torch.set_grad_enabled(grad):
        cond = prompts if isinstance(prompts, Encoded) else adapter.encode(list(prompts), unique=False)
        if len(generators) != len(cond):
            raise InvalidInputError(f"got {len(generators)} generators for {len(cond)} prompts; pass one per prompt")
        ctx = SampleContext(adapter, None if isinstance(prompts, Encoded) else list(prompts), num_inference_steps,
                            guidance_scale, len(cond))
        guided = guidance_scale > 1 and adapter.pipe.unet.config.time_cond_proj_dim is None
        uncond = (adapter.uncond(len(cond)) if uncond is None else uncond) if guided else None
        for hook in hooks:
            cond, uncond = hook.embeddings(ctx, cond, uncond)
        with module_hooks(adapter, hooks):
            latents = _denoise(ctx, hooks, cond, uncond if guided else None, generators)
            images = adapter.postprocess(adapter.decode_latents(latents, generator=generators), output_type)
    return (images, latents) if return_latents else images


def _denoise(ctx: SampleContext, hooks: Sequence[Hook], cond: Encoded, uncond: Encoded | None,
             generators: list[torch.Generator]) -> torch.Tensor:
    """The pipeline's denoising loop; the final latents."""
    adapter, scheduler = ctx.adapter, ctx.adapter.pipe.scheduler
    timesteps = adapter.set_timesteps(ctx.num_inference_steps)
    latents = initial_latents(adapter, generators, cond.embeds.dtype)
    step_kwargs = _step_kwargs(scheduler, generators)
    for i, t in enumerate(timesteps):
        step = StepContext(ctx, i, t, latents, cond, uncond, ctx.guidance_scale)
        model_input = scheduler.scale_model_input(latents, t)

        def predict(cond: Encoded | None = None, uncond: Encoded | None = None, _s: StepContext = step,
                    _x: torch.Tensor = model_input) -> torch.Tensor:
            c, u = _s.cond if cond is None else cond, _s.uncond if uncond is None else uncond
            return adapter.predict_noise(_x, _s.t, c, u, _s.guidance_scale)

        predict._erasekit_plain = True  # type: ignore[attr-defined]
        for hook in hooks:
            predict = _wrap(hook, step, predict)
        latents = scheduler.step(predict(), t, latents, **step_kwargs, return_dict=False)[0]
    return latents


def _wrap(hook: Hook, step: StepContext, inner: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """``hook.noise`` around ``inner``; conditioning an outer hook passes in reaches ``hook`` (as its
    ``ctx``) and everything inside it."""
    def call(cond: Encoded | None = None, uncond: Encoded | None = None) -> torch.Tensor:
        if cond is None and uncond is None:
            return hook.noise(step, inner)
        ctx = dataclasses.replace(step, cond=step.cond if cond is None else cond,
                                  uncond=step.uncond if uncond is None else uncond)
        def rebound(cond: Encoded | None = None, uncond: Encoded | None = None) -> torch.Tensor:
            return inner(ctx.cond if cond is None else cond, ctx.uncond if uncond is None else uncond)

        rebound._erasekit_plain = is_model_prediction(inner)  # type: ignore[attr-defined]
        return hook.noise(ctx, rebound)
    return call


def is_model_prediction(predict: Callable[..., torch.Tensor]) -> bool:
    """True when ``predict`` is the loop's own guided prediction of ``ctx.cond``/``ctx.uncond`` (no inner
    hook changes it), so a hook may compute it itself, e.g. inside a larger batched call."""
    return bool(getattr(predict, "_erasekit_plain", False))


def initial_latents(adapter: Any, generators: list[torch.Generator], dtype: torch.dtype) -> torch.Tensor:
    """x_T as the pipeline draws it: row i from ``generators[i]``, times the scheduler's ``init_noise_sigma``
    (call after ``adapter.set_timesteps``)."""
    from diffusers.utils.torch_utils import randn_tensor  # diffusers loads at first use

    h, w = adapter.image_size
    f = adapter.pipe.vae_scale_factor
    shape = (len(generators), adapter.pipe.unet.config.in_channels, h // f, w // f)
    latents = randn_tensor(shape, generator=list(generators), device=adapter.device, dtype=dtype)
    return latents * adapter.pipe.scheduler.init_noise_sigma


def _step_kwargs(scheduler: Any, generators: list[torch.Generator]) -> dict[str, Any]:
    """``prepare_extra_step_kwargs`` of the pipelines: eta 0 and the generators where ``step`` takes them."""
    accepted = inspect.signature(scheduler.step).parameters
    return {k: v for k, v in (("eta", 0.0), ("generator", generators)) if k in accepted}
