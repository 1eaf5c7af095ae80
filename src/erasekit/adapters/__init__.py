"""Model-family adapters and their selection from a pipeline."""

from __future__ import annotations

from typing import Any

from ..errors import InvalidInputError
from .base import Adapter, Encoded
from .sd import SDAdapter
from .sdxl import SDXLAdapter

__all__ = ["Adapter", "Encoded", "SDAdapter", "SDXLAdapter", "get_adapter", "family_of"]


def family_of(pipe: Any) -> str:
    """Name of the adapter family that serves ``pipe``."""
    if getattr(pipe, "text_encoder_2", None) is not None or type(pipe).__name__.startswith("StableDiffusionXL"):
        return "sdxl"
    if getattr(pipe, "unet", None) is not None and getattr(pipe, "text_encoder", None) is not None:
        return "sd"
    raise InvalidInputError(f"{type(pipe).__name__} is not supported yet; erasekit serves SD1.x/2.x and SDXL pipelines")


def get_adapter(pipe: Any) -> SDAdapter:
    """The adapter for ``pipe`` (an adapter passes through unchanged)."""
    if isinstance(pipe, SDAdapter):
        return pipe
    return {"sd": SDAdapter, "sdxl": SDXLAdapter}[family_of(pipe)](pipe)
