"""What every method shares: a frozen config dataclass, ``fit(adapter, concepts) -> Edit``, and
for hook methods the hooks an edit of theirs runs."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from ..concepts import ConceptSpec
from ..config import configure
from ..edits import Edit
from ..errors import InvalidInputError


class Method:
    """A concept-erasure method: a frozen ``Config`` dataclass and ``fit``.

    Subclasses set ``name``, ``description``, ``family`` ("closed-form", "guard", ...), ``Config``
    and ``edit_kind`` (the kind of edit ``fit`` returns by default).
    """

    name: ClassVar[str]
    description: ClassVar[str]
    family: ClassVar[str]
    edit_kind: ClassVar[str] = "weight_delta"
    Config: ClassVar[type]

    def __init__(self, config: Any = None, **overrides: Any) -> None:
        cfg = configure(self.name, self.Config() if config is None else None, config, overrides)
        self.config = cfg

    def fit(self, adapter: Any, concepts: list[ConceptSpec]) -> Edit:  # pragma: no cover - abstract
        """Fit on ``adapter``'s pipeline (left unchanged) and return the edit."""
        raise NotImplementedError

    @classmethod
    def world_settings(cls, concepts: list[ConceptSpec]) -> dict[str, Any]:
        """Settings ``erasekit erase`` (and every world benchmark) uses on the embedded world model unless
        --set overrides them: by default the world's erase templates for the concepts' axis when the
        method has a ``templates`` setting, and otherwise the published defaults; methods add the
        settings measured on the world (``UCE_WORLD``, ``ESD_WORLD``...)."""
        from ..world.vocab import erase_templates, find_axis

        axes = {found[0] for c in concepts if (found := find_axis(c.target)) is not None}
        fields = {f.name for f in dataclasses.fields(cls.Config)}
        return {"templates": erase_templates(axes.pop())} if len(axes) == 1 and "templates" in fields else {}

    def uses_keep_phrases(self) -> bool:
        """Whether ``fit`` reads the concepts' neighbour/preserve prompts at these settings (the CLI says it
        passes the world's other values as neighbours only to a method that reads them)."""
        return True

    @classmethod
    def make_hooks(cls, edit: Edit, adapter: Any) -> list[Any]:
        """The sampling-loop hooks a hook edit of this method runs (hook methods override this)."""
        raise InvalidInputError(f"{cls.name} makes {cls.edit_kind} edits, not hook edits; re-create the edit")


def config_dict(cfg: Any) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(cfg).items()}


def config_from_dict(cls: type, d: dict[str, Any]) -> Any:
    hints = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(d) - set(hints)
    if unknown:
        raise InvalidInputError(f"unknown setting(s) {sorted(unknown)} for {cls.__name__}")
    vals = {}
    for k, v in d.items():
        default = hints[k].default if hints[k].default is not dataclasses.MISSING else hints[k].default_factory()  # type: ignore[misc]
        vals[k] = tuple(v) if isinstance(default, tuple) and isinstance(v, list) else v
    return cls(**vals)
