"""Activations at a module ("site") collected while generating through erasekit's sampling loop."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..adapters.sampling import Hook, StepContext, resolve_module
from ..errors import InvalidInputError

#: the world model's SAE site: the last attention of the up block at the middle (8x8) resolution,
#: the counterpart of SAeUron's ``up_blocks.1.attentions.1`` on SD1.x (role ``unet-up-attn-0-1``: the first
#: cross-attention up block, at a quarter of the latent resolution)
WORLD_SITE = "unet.up_blocks.0.attentions.1"


@dataclass
class Activations:
    """Collected tokens ``x`` (T, C) and, per token, the denoising step index ``step`` (T,)."""

    x: torch.Tensor
    step: torch.Tensor

    def __len__(self) -> int:
        return len(self.x)


def to_tokens(out: Any) -> torch.Tensor:
    """A module's output as (tokens, channels): (N, C, H, W) -> (N*H*W, C); (N, L, C) -> (N*L, C)."""
    if isinstance(out, (tuple, list)):
        out = out[0]
    elif not isinstance(out, torch.Tensor) and hasattr(out, "sample"):
        out = out.sample
    if not isinstance(out, torch.Tensor):
        raise InvalidInputError(f"the site's output is a {type(out).__name__}, not a tensor; choose a module "
                                "whose output is an activation tensor")
    if out.ndim == 4:
        return out.permute(0, 2, 3, 1).reshape(-1, out.shape[1])
    if out.ndim in (2, 3):
        return out.reshape(-1, out.shape[-1])
    raise InvalidInputError(f"the site's output has shape {tuple(out.shape)}; expected (N, C, H, W) or (N, L, C)")


class CaptureHook(Hook):
    """Keeps a seeded random subsample of at most ``per_call`` tokens of each forward of ``site``
    (all tokens when None), with the step index; changes nothing."""

    def __init__(self, site: str, per_call: int | None = None, generator: torch.Generator | None = None) -> None:
        self.site, self.per_call = site, per_call
        self.generator = generator or torch.Generator().manual_seed(0)
        self.step = -1
        self.xs: list[torch.Tensor] = []
        self.steps: list[torch.Tensor] = []

    def noise(self, ctx: StepContext, predict: Callable[..., torch.Tensor]) -> torch.Tensor:
        self.step = ctx.index
        return predict()

    def module_hooks(self, adapter: Any) -> dict[str, Callable]:
        def capture(module: torch.nn.Module, args: Any, output: Any) -> None:
            tokens = to_tokens(output).detach()
            if self.per_call is not None and len(tokens) > self.per_call:
                idx = torch.randperm(len(tokens), generator=self.generator)[: self.per_call]
                tokens = tokens[idx.to(tokens.device)]
            self.xs.append(tokens.float().cpu())
            self.steps.append(torch.full((len(tokens),), self.step, dtype=torch.int16))
        return {self.site: capture}

    def result(self) -> Activations:
        if not self.xs:
            raise InvalidInputError(f"site {self.site!r} never ran during generation; choose a UNet module")
        return Activations(torch.cat(self.xs), torch.cat(self.steps))


def collect(adapter: Any, site: str, prompts: Sequence[str], *, num_inference_steps: int = 20,
            guidance_scale: float = 2.0, batch_size: int = 16, per_call: int | None = 4096, seed: int = 0,
            log: Callable[[str], None] | None = None,
            progress: Callable[[str, int, int], None] | None = None) -> Activations:
    """Generate one image per prompt (prompt i from seed ``seed + i``) and collect the activations at
    ``site`` (a full module name such as ``"unet.up_blocks.1.attentions.1"``). With guidance both the
    unconditional and the conditional half of each UNet call are kept."""
    prompts = list(prompts)
    if not prompts:
        raise InvalidInputError("the prompt set is empty; give at least one prompt to collect activations from")
    if batch_size < 1:
        raise InvalidInputError(f"batch_size={batch_size} must be at least 1")
    resolve_module(adapter.pipe, site)  # one-line error for a wrong site before any work
    hook = CaptureHook(site, per_call, torch.Generator().manual_seed(seed))
    for i in range(0, len(prompts), batch_size):
        chunk = prompts[i:i + batch_size]
        gens = [torch.Generator(adapter.device).manual_seed(seed + i + j) for j in range(len(chunk))]
        adapter.sample(chunk, gens, num_inference_steps, guidance_scale, hooks=[hook])
        if progress is not None:
            progress("collect", min(i + batch_size, len(prompts)), len(prompts))
        if log is not None:
            log(f"collected {min(i + batch_size, len(prompts))}/{len(prompts)} prompts, "
                f"{sum(len(x) for x in hook.xs)} tokens")
    return hook.result()


def is_text_site(adapter: Any, site: str) -> bool:
    """True when the full module name ``site`` lies in one of the adapter's text encoders."""
    comps = adapter.text_encoder_components() if hasattr(adapter, "text_encoder_components") else {}
    return site.partition(".")[0] in comps


@torch.no_grad()
def collect_text(adapter: Any, site: str, prompts: Sequence[str], *, batch_size: int = 64,
                 log: Callable[[str], None] | None = None,
                 progress: Callable[[str, int, int], None] | None = None) -> Activations:
    """Encode ``prompts`` as the pipeline does and collect the outputs of the text-encoder module ``site``
    at every position (start, words, end and padding: what a steering vector is added to), as Concept
    Steerers' collection does. ``step`` is -1 for every token."""
    prompts = list(prompts)
    if not prompts:
        raise InvalidInputError("the prompt set is empty; give at least one prompt to collect activations from")
    module = resolve_module(adapter.pipe, site)
    xs: list[torch.Tensor] = []
    handle = module.register_forward_hook(lambda m, a, out: xs.append(to_tokens(out).float().cpu()))
    try:
        for i in range(0, len(prompts), batch_size):
            adapter.encode(prompts[i:i + batch_size], unique=False)
            if progress is not None:
                progress("collect", min(i + batch_size, len(prompts)), len(prompts))
    finally:
        handle.remove()
    if not xs:
        raise InvalidInputError(f"site {site!r} never ran while encoding; choose a text-encoder layer")
    if log is not None:
        log(f"collected {len(prompts)} prompts, {sum(len(x) for x in xs)} tokens")
    x = torch.cat(xs)
    return Activations(x, torch.full((len(x),), -1, dtype=torch.int16))
