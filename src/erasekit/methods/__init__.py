"""The method registry: an explicit list; a duplicate name raises at import."""

from __future__ import annotations

import dataclasses
from typing import Any

from ..concepts import ConceptSpec
from ..errors import InvalidInputError
from .ablating import AblatingConcepts
from .advunlearn import AdvUnlearn
from .base import Method
from .concept_steerers import ConceptSteerers
from .esd import ESD
from .fs_te import FewShotTextEncoder
from .mace import MACE
from .negative_prompt import NegativePrompt
from .realera import RealEra
from .rece import RECE
from .safree import SAFREE
from .saeuron import SAeUron
from .salun import SalUn
from .sld import SLD
from .speed import SPEED
from .uce import UCE

_ALL: list[type[Method]] = [UCE, RECE, SPEED, MACE, RealEra, ESD, AblatingConcepts, SalUn, FewShotTextEncoder, AdvUnlearn,
                            NegativePrompt, SLD, SAFREE, SAeUron, ConceptSteerers]

REGISTRY: dict[str, type[Method]] = {}
for _m in _ALL:
    if _m.name in REGISTRY:
        raise RuntimeError(f"two methods are registered as {_m.name!r}")
    REGISTRY[_m.name] = _m


def get_method(name: str) -> type[Method]:
    """The method class registered as ``name``."""
    try:
        return REGISTRY[name.lower()]
    except KeyError:
        raise InvalidInputError(f"unknown method {name!r}; known: {', '.join(REGISTRY)}") from None


def describe() -> list[dict[str, Any]]:
    """Name, family, description and config fields (with defaults and help) of every method."""
    out = []
    for m in REGISTRY.values():
        fields = [{"name": f.name, "default": f.default if f.default is not dataclasses.MISSING else None,
                   "help": f.metadata.get("help", "")} for f in dataclasses.fields(m.Config)]
        world = m.world_settings([ConceptSpec("star")])  # on the embedded world (templates follow the axis)
        for f in fields:
            if f["name"] in world and f["name"] != "templates" and world[f["name"]] != f["default"]:
                f["world"] = world[f["name"]]
        out.append({"name": m.name, "family": m.family, "edit_kind": m.edit_kind, "description": m.description,
                    "config": fields})
    return out


__all__ = ["Method", "REGISTRY", "get_method", "describe", "UCE", "RECE", "SPEED", "MACE", "RealEra", "NegativePrompt", "SLD", "SAFREE", "ESD", "AblatingConcepts", "SalUn",
           "FewShotTextEncoder", "AdvUnlearn", "SAeUron", "ConceptSteerers"]
