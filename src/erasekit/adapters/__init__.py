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
    return getattr(pipe, "text_encoder_2", None) is not None and getattr(pipe, "unet", None) is not None and \
        "Img2Img" not in type(pipe).__name__ and "Inpaint" not in type(pipe).__name__


def _is_sd(pipe: Any) -> bool:
    name = type(pipe).__name__
    return (getattr(pipe, "unet", None) is not None and getattr(pipe, "text_encoder", None) is not None
            and getattr(pipe, "tokenizer", None) is not None and getattr(pipe, "vae", None) is not None
            and getattr(pipe, "text_encoder_2", None) is None and "Img2Img" not in name and "Inpaint" not in name)


register_family("sdxl", _is_sdxl, SDXLAdapter)
register_family("sd", _is_sd, SDAdapter)

__all__ = ["Adapter", "Encoded", "ROLES", "SDAdapter", "SDXLAdapter", "families", "family_of", "get_adapter",
           "register_family"]
