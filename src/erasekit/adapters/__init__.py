"""Model-family adapters and their selection from a pipeline.

Families register with a predicate, most specific first; adding a family is one file and one
``register_family`` line here.
"""

from __future__ import annotations

from typing import Any

from .base import ROLES, Adapter, Encoded, families, family_of, get_adapter, register_family
from .sd import SDAdapter
from .sdxl import SDXLAdapter


def _is_sdxl(pipe: Any) -> bool:
    from diffusers import StableDiffusionXLPipeline

    return isinstance(pipe, StableDiffusionXLPipeline)


def _is_sd(pipe: Any) -> bool:
    """Text-to-image Stable Diffusion 1.x/2.x: the pipeline class or a subclass of it (image-to-image,
    inpainting, depth, pix2pix and upscaling pipelines share its components but not its sampling)."""
    from diffusers import StableDiffusionPipeline

    return isinstance(pipe, StableDiffusionPipeline)


register_family("sdxl", _is_sdxl, SDXLAdapter)
register_family("sd", _is_sd, SDAdapter)

__all__ = ["Adapter", "Encoded", "ROLES", "SDAdapter", "SDXLAdapter", "families", "family_of", "get_adapter",
           "register_family"]
