"""Strict ``key=value`` overrides of frozen or plain config dataclasses."""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, TypeVar

from .errors import InvalidInputError

T = TypeVar("T")


def _parse(value: str, typ: Any, key: str) -> Any:
    origin = typing.get_origin(typ)
    args = typing.get_args(typ)
    if origin in (typing.Union, types.UnionType) and type(None) in args:  # Optional[X]: "none" unsets it
        if value.strip().lower() in ("none", "null", ""):
            return None
        return _parse(value, next(a for a in args if a is not type(None)), key)
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


def check_config(cfg: Any) -> None:
    """Range-check a config against its fields' metadata (``min``, ``max``, ``above`` = strict
    lower bound, ``choices``); a violation is a one-line error naming the setting."""
    for f in dataclasses.fields(cfg):
        v, meta = getattr(cfg, f.name), f.metadata
        if v is None:
            continue
        bad = ("min" in meta and v < meta["min"] and f"at least {meta['min']}") or \
              ("above" in meta and v <= meta["above"] and f"above {meta['above']}") or \
              ("max" in meta and v > meta["max"] and f"at most {meta['max']}") or \
              ("choices" in meta and v not in meta["choices"] and f"one of {', '.join(map(str, meta['choices']))}")
        if bad:
            raise InvalidInputError(f"setting {f.name}={v!r} is out of range: it must be {bad}")


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
    out = dataclasses.replace(cfg, **changes)  # type: ignore[type-var]
    check_config(out)
    return out
