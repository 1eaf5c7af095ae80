"""Image generation with a pipeline: seeded, batched, and saved as a grid."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .concepts import check_text
from .errors import InvalidInputError
from .io import atomic_path, check_parent

IMAGE_SUFFIXES = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}


def generate(pipe, prompt: str, n: int = 8, seed: int = 0, num_inference_steps: int | None = None,
             guidance_scale: float | None = None, batch_size: int = 16, adversarial: Any = None,
             force: bool = False) -> list[Image.Image]:
    """Generate ``n`` images of ``prompt``; image i uses seed ``seed + i`` (reproducible per image).

    Generation runs erasekit's sampling loop, so ``hook`` edits applied to ``pipe`` take effect.
    ``adversarial`` (an attack's :class:`~erasekit.attacks.Adversarial` or its run folder) puts its
    tokens where ``prompt`` names them and adds its guidance terms; images are then made one at a
    time, as the attack made them, so they replay its images bit for bit."""
    import torch

    from .adapters import get_adapter
    from .models import sampling_defaults

    if not prompt or not prompt.strip():
        raise InvalidInputError("the prompt is empty; pass the text to draw, e.g. \"a red circle\"")
    if n < 1:
        raise InvalidInputError(f"image count must be at least 1 (got {n}); pass -n 1 or more")
    if not 0 <= seed <= 2**63 - n:
        raise InvalidInputError(f"seed {seed} is out of range; seeds are 0..2**63-1 (image i uses seed + i)")
    check_text(prompt, "the prompt")
    defaults: dict[str, Any] = sampling_defaults(getattr(pipe, "erasekit_source", ""))
    steps = defaults["num_inference_steps"] if num_inference_steps is None else num_inference_steps
    guidance = defaults["guidance_scale"] if guidance_scale is None else guidance_scale
    if steps < 1:
        raise InvalidInputError(f"steps must be at least 1 (got {steps})")
    if not math.isfinite(guidance) or guidance < 0:
        raise InvalidInputError(f"guidance must be a number >= 0 (got {guidance})")
    adapter = get_adapter(pipe)
    hooks: list[Any] = []
    if adversarial is not None:
        from .attacks import Adversarial

        adv = adversarial if isinstance(adversarial, Adversarial) else Adversarial.load(adversarial)
        adv.check(adapter, force)
        missing = [] if adv.terms or any(name in prompt for name in adv.tokens) else sorted(adv.tokens)[:3]
        if missing:
            raise InvalidInputError(f"the prompt names none of the artefact's tokens ({', '.join(missing)}...); write "
                                    f"one where the concept's word would be, e.g. \"a photo of a {missing[0]}\"")
        hooks, batch_size = adv.hooks(), 1
    images: list[Image.Image] = []
    for start in range(0, n, batch_size):
        count = min(batch_size, n - start)
        gens = [torch.Generator(device="cpu").manual_seed(seed + start + i) for i in range(count)]
        cond: Any = [prompt] * count
        if adversarial is not None:
            with torch.no_grad():
                cond = adv.encode(adapter, cond)
        images.extend(adapter.sample(cond, gens, steps, guidance, hooks=hooks, output_type="pil"))
    return images


def make_grid(images: list[Image.Image], cols: int | None = None, cell: int | None = None) -> Image.Image:
    """Tile images into a grid; small images are upscaled (nearest) so each cell is ``cell`` px."""
    cols = cols or min(len(images), 8)
    rows = -(-len(images) // cols)
    w, h = images[0].size
    cell = cell or max(w, 128)
    scale = max(1, cell // w)
    w2, h2 = w * scale, h * scale
    grid = Image.new("RGB", (cols * w2 + (cols - 1) * 2, rows * h2 + (rows - 1) * 2), (255, 255, 255))
    for i, im in enumerate(images):
        im = im.convert("RGB").resize((w2, h2), Image.NEAREST) if scale > 1 else im.convert("RGB")
        grid.paste(im, ((i % cols) * (w2 + 2), (i // cols) * (h2 + 2)))
    return grid


def save_image(image: Image.Image, path: str | Path, overwrite: bool = True) -> Path:
    """Save atomically; the format follows the suffix. ``overwrite=False`` refuses a file that exists
    (or appeared since the caller checked)."""
    p = check_parent(path)
    fmt = IMAGE_SUFFIXES.get(p.suffix.lower())
    if fmt is None:
        raise InvalidInputError(f"cannot tell the image format of {p.name}; use a .png, .jpg or .webp name")
    with atomic_path(p, overwrite=overwrite) as tmp:
        image.save(tmp, format=fmt)
    return p


def to_uint8(images: list[Image.Image]) -> np.ndarray:
    """PIL images to a uint8 (N, H, W, 3) array."""
    return np.stack([np.asarray(im.convert("RGB")) for im in images])
