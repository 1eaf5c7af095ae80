"""The attack registry: an explicit list; a duplicate name raises at import.

``erasekit.attacks.attack(pipe, concept, "textual-inversion", patch=edit)`` attacks an erasure and
measures pre- and post-attack success; see :mod:`erasekit.attacks.run`."""

from __future__ import annotations

from typing import Any

from ..errors import InvalidInputError
from .artefact import Adversarial
from .base import Attack, AttackContext, guarded_prediction
from .concept_arithmetic import ConceptArithmetic
from .p4d import P4D
from .ring_a_bell import RingABell
from .textual_inversion import TextualInversion
from .unlearndiffatk import UnlearnDiffAtk

_ALL: list[type[Attack]] = [TextualInversion, UnlearnDiffAtk, P4D, RingABell, ConceptArithmetic]

REGISTRY: dict[str, type[Attack]] = {}
for _a in _ALL:
    if _a.name in REGISTRY:
        raise RuntimeError(f"two attacks are registered as {_a.name!r}")
    REGISTRY[_a.name] = _a


def get_attack(name: str) -> type[Attack]:
    """The attack class registered as ``name``."""
    try:
        return REGISTRY[name.strip().lower()]
    except (KeyError, AttributeError):
        raise InvalidInputError(f"unknown attack {name!r}; known: {', '.join(REGISTRY)}") from None


def describe() -> list[dict[str, Any]]:
    """Name, kind, description and settings of each registered attack."""
    import dataclasses

    out = []
    for cls in REGISTRY.values():
        world = cls.world_settings()
        fields = [{"name": f.name, "default": f.default, "help": f.metadata.get("help", "")}
                  for f in dataclasses.fields(cls.Config)]
        for f in fields:
            if f["name"] in world and world[f["name"]] != f["default"]:
                f["world"] = world[f["name"]]
        out.append({"name": cls.name, "kind": cls.kind, "description": cls.description, "config": fields})
    return out


from .run import AttackResult, attack  # noqa: E402

__all__ = ["Adversarial", "Attack", "AttackContext", "AttackResult", "REGISTRY", "attack", "describe", "get_attack",
           "guarded_prediction"]
