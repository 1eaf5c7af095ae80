"""Strict ``key=value`` overrides of frozen or plain config dataclasses."""

from __future__ import annotations

import dataclasses
import typing
from typing import Any, TypeVar

from .errors import InvalidInputError

T = TypeVar("T")


def _parse(value: str, typ: Any, key: str) -> Any:
    origin = typing.get_origin(typ)
    if typ is bool:
        low = value.strip().lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise InvalidInputError(f"--set {key}={value}: expected true or false")
    if typ in (int, float, str):
        try:
            return typ(value)
        except ValueError:
            raise InvalidInputError(f"--set {key}={value}: expected {typ.__name__}") from None
    if origin in (tuple, list):
        inner = typing.get_args(typ)[0] if typing.get_args(typ) else str
        sep = "|" if inner is str else ","  # text items may hold commas: separate them with |
        return origin(_parse(v.strip(), inner, key) for v in value.split(sep) if v.strip())
    raise InvalidInputError(f"--set {key}: this setting cannot be set from the command line")


def apply_overrides(cfg: T, pairs: list[str]) -> T:
    """Return ``cfg`` with ``key=value`` overrides; unknown keys and wrong types are errors."""
    fields = {f.name: f for f in dataclasses.fields(cfg)}  # type: ignore[arg-type]
    hints = typing.get_type_hints(type(cfg))
    changes: dict[str, Any] = {}
    for pair in pairs:
        if "=" not in pair:
            raise InvalidInputError(f"--set {pair!r}: write key=value")
        key, value = pair.split("=", 1)
        key = key.strip()
        if key not in fields:
            raise InvalidInputError(f"--set {key}: unknown setting; known: {', '.join(sorted(fields))}")
        changes[key] = _parse(value, hints[key], key)
    return dataclasses.replace(cfg, **changes)  # type: ignore[type-var]
