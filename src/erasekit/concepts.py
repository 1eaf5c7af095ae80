"""What to erase: :class:`ConceptSpec` and concept-list files (txt, csv, json)."""

from __future__ import annotations

import csv
import io
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from collections.abc import Iterable
from typing import Any

from .errors import InvalidInputError


def check_text(text: Any, what: str) -> str:
    """``text`` if it is text that can be encoded (no undecodable bytes from a shell); one line otherwise."""
    if not isinstance(text, str):
        raise InvalidInputError(f"{what} must be text, got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidInputError(f"{what} holds bytes that are not UTF-8 text ({text!r}); check the terminal's "
                                "encoding") from None
    return text


def _clean(text: Any, what: str) -> str:
    return " ".join(check_text(text, what).split())


def _tuple(items: Iterable[str] | str | None, what: str) -> tuple[str, ...]:
    if items is None:
        return ()
    if isinstance(items, str):
        items = [s for s in items.split(",")]
    elif isinstance(items, (dict, bytes)) or not isinstance(items, Iterable):  # JSON numbers, booleans, objects
        raise InvalidInputError(f"{what} must be a list of phrases or one comma-separated string, "
                                f"not {type(items).__name__} {items!r}")
    out = tuple(_clean(s, what) for s in items)
    return tuple(s for s in out if s)


@dataclass(frozen=True)
class ConceptSpec:
    """One concept to erase.

    Attributes:
        target: the phrase to erase, e.g. "star" or "Van Gogh".
        anchor: what the target should become ("" = nothing, the empty prompt).
        synonyms: other phrases for the same concept, erased too.
        neighbours: related concepts that must be kept (added to the preserve set).
        preserve: further prompts whose outputs must not change.
    """

    target: str
    anchor: str = ""
    synonyms: tuple[str, ...] = ()
    neighbours: tuple[str, ...] = ()
    preserve: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "target", _clean(self.target, "concept"))
        object.__setattr__(self, "anchor", _clean(self.anchor, "anchor"))
        for name in ("synonyms", "neighbours", "preserve"):
            object.__setattr__(self, name, _tuple(getattr(self, name), name))
        if not self.target:
            raise InvalidInputError("a concept is empty or whitespace; give the phrase to erase, e.g. --concept star")
        if self.anchor.lower() == self.target.lower():
            raise InvalidInputError(f"concept {self.target!r} has itself as anchor; choose another anchor or \"\"")
        erased = {self.target.lower(), *(s.lower() for s in self.synonyms)}
        for p in (*self.neighbours, *self.preserve):
            if p.lower() in erased:
                raise InvalidInputError(f"{p!r} is both erased and preserved for concept {self.target!r}; "
                                        "remove it from the preserve/neighbour list")

    @property
    def erase_phrases(self) -> tuple[str, ...]:
        """The target followed by its synonyms."""
        return (self.target, *self.synonyms)

    @property
    def keep_phrases(self) -> tuple[str, ...]:
        """Neighbours and preserve prompts."""
        return (*self.neighbours, *self.preserve)

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ConceptSpec:
        known = {"target", "anchor", "synonyms", "neighbours", "preserve"}
        extra = set(d) - known
        if extra:
            raise InvalidInputError(f"unknown concept field(s) {sorted(extra)}; known: {sorted(known)}")
        if "target" not in d:
            raise InvalidInputError("a concept entry has no 'target'")
        return cls(**d)


def make_concepts(concepts: str | ConceptSpec | Iterable[str | ConceptSpec], anchor: str = "",
                  preserve: Iterable[str] | str | None = None) -> list[ConceptSpec]:
    """Normalise user input (a phrase, specs, or a list of either) into a list of specs."""
    if isinstance(concepts, (str, ConceptSpec)):
        concepts = [concepts]
    pres = _tuple(preserve, "preserve")
    out = []
    for c in concepts:
        if isinstance(c, ConceptSpec):
            out.append(c)
        else:
            out.append(ConceptSpec(c, anchor=anchor, preserve=pres))
    if not out:
        raise InvalidInputError("no concept given; pass --concept or --concepts-file")
    return out


def _with_flags(d: dict[str, Any], anchor: str, preserve: Iterable[str] | str | None, path: Path) -> ConceptSpec:
    """A file's concept entry with --anchor/--preserve applied where the entry gives none; an entry
    that gives its own is not silently overridden: that is a one-line error."""
    if not isinstance(d, dict):
        raise InvalidInputError(f"concepts file {path}: each entry is a phrase or an object with a 'target'")
    d = dict(d)
    for key, flag in (("anchor", anchor), ("preserve", _tuple(preserve, "preserve"))):
        if flag and d.get(key):
            raise InvalidInputError(f"concepts file {path} gives its own {key} for {d.get('target')!r} and --{key} "
                                    f"gives another; drop one of them")
        if flag:
            d[key] = flag
    return ConceptSpec.from_dict(d)


def load_concepts(path: str | Path, anchor: str = "", preserve: Iterable[str] | str | None = None) -> list[ConceptSpec]:
    """Read concepts from a file: ``.txt`` (one per line, ``#`` comments), ``.csv`` (header with
    a ``target`` column; optional ``anchor``, ``synonyms``, ``neighbours``, ``preserve`` with
    ``;``-separated lists) or ``.json`` (a list of strings or of objects with those keys)."""
    p = Path(path)
    if not p.is_file():
        raise InvalidInputError(f"concepts file {p} does not exist")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise InvalidInputError(f"concepts file {p} is not UTF-8 text") from None
    except OSError as e:
        raise InvalidInputError(f"could not read concepts file {p} ({e.strerror or type(e).__name__}); "
                                "check its permissions") from None
    suffix = p.suffix.lower()
    items: list[str | ConceptSpec] = []
    if suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise InvalidInputError(f"concepts file {p} is not valid JSON (line {e.lineno}): {e.msg}") from None
        if not isinstance(data, list):
            raise InvalidInputError(f"concepts file {p} must hold a JSON list")
        for d in data:
            items.append(_with_flags(d, anchor, preserve, p) if isinstance(d, dict) else d)
    elif suffix == ".csv":
        rows = list(csv.DictReader(io.StringIO(text)))
        if rows and "target" not in rows[0]:
            raise InvalidInputError(f"concepts file {p} needs a 'target' column in its header")
        for r in rows:
            d: dict[str, Any] = {"target": r["target"]}
            for k in ("anchor", "synonyms", "neighbours", "preserve"):
                if r.get(k):
                    d[k] = r[k] if k == "anchor" else [s for s in r[k].split(";")]
            items.append(_with_flags(d, anchor, preserve, p))
    else:
        for line in text.splitlines():
            line = line.split("#", 1)[0].strip()
            if line:
                items.append(line)
    if not items:
        raise InvalidInputError(f"concepts file {p} holds no concept")
    return make_concepts(items, anchor=anchor, preserve=preserve)
