"""Strict ``key=value`` overrides of frozen or plain config dataclasses."""

from __future__ import annotations

import dataclasses
import math
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
    hints = typing.get_type_hints(type(cfg))
    for f in dataclasses.fields(cfg):
        v, meta = getattr(cfg, f.name), f.metadata
        if v is None:
            continue
        _check_type(f.name, v, hints.get(f.name))
        if isinstance(v, float) and math.isnan(v):
            raise InvalidInputError(f"setting {f.name} is NaN; give a number")
        if "min_items" in meta and len(v) < meta["min_items"]:
            raise InvalidInputError(f"setting {f.name} is empty; give at least {meta['min_items']} item(s)")
        items = [v] if isinstance(v, str) else v
        missing = [x for x in items if meta.get("each_contains", "") not in x] if "each_contains" in meta else []
        if missing:
            raise InvalidInputError(f"setting {f.name}: {missing[0]!r} has no {meta['each_contains']} where the "
                                    "phrase goes; write e.g. 'a photo of {}'")
        bad = ("min" in meta and v < meta["min"] and f"at least {meta['min']}") or \
              ("above" in meta and v <= meta["above"] and f"above {meta['above']}") or \
              ("max" in meta and v > meta["max"] and f"at most {meta['max']}") or \
              ("choices" in meta and v not in meta["choices"] and f"one of {', '.join(map(str, meta['choices']))}")
        if bad:
            raise InvalidInputError(f"setting {f.name}={v!r} is out of range: it must be {bad}")


def _check_type(name: str, value: Any, typ: Any) -> None:
    """One line for a value of the wrong type (an int stands for a float; a list for a tuple)."""
    args = typing.get_args(typ)
    if typing.get_origin(typ) in (typing.Union, types.UnionType):
        typ = next((a for a in args if a is not type(None)), typ)
    base = typing.get_origin(typ) or typ
    if not isinstance(base, type):
        return
    ok = isinstance(value, base) and not (base is int and isinstance(value, bool))
    ok = ok or (base is float and isinstance(value, int) and not isinstance(value, bool)) or \
        (base is tuple and isinstance(value, list))
    if not ok:
        raise InvalidInputError(f"setting {name}={value!r} should be {base.__name__}, not {type(value).__name__}")


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


def configure(owner: str, default: Any, config: Any = None, overrides: dict[str, Any] | None = None) -> Any:
    """``config`` (or ``default``) with keyword ``overrides`` applied, checked: what a method or an attack
    named ``owner`` is built with. Unknown keys are a one-line error naming the known ones."""
    cfg = config if config is not None else default
    if overrides:
        known = {f.name for f in dataclasses.fields(cfg)}
        unknown = set(overrides) - known
        if unknown:
            raise InvalidInputError(f"{owner} has no setting(s) {sorted(unknown)}; known: {sorted(known)}")
        cfg = dataclasses.replace(cfg, **overrides)
    check_config(cfg)
    return cfg
