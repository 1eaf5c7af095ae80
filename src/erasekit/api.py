"""The Python entry points: ``erase`` a concept from a pipeline into an edit."""

from __future__ import annotations

from typing import Any, Iterable

from .adapters import get_adapter
from .concepts import ConceptSpec, make_concepts
from .edits import Edit
from .methods import get_method


def erase(pipe: Any, concepts: str | ConceptSpec | Iterable[str | ConceptSpec], method: str = "uce",
          anchor: str = "", preserve: Iterable[str] | str | None = None, config: Any = None,
          **overrides: Any) -> Edit:
    """Fit ``method`` on ``pipe`` to erase ``concepts``; returns an edit (the pipeline is unchanged).

    Args:
        pipe: a diffusers pipeline (or an adapter).
        concepts: a phrase, a :class:`ConceptSpec`, or a list of either.
        method: a registered method name (``erasekit methods`` lists them).
        anchor: what plain-phrase concepts should become ("" = nothing).
        preserve: prompts whose outputs must stay, for plain-phrase concepts.
        config: a ready config dataclass of the method; ``overrides`` replace its fields.

    Returns:
        a weight-delta, LoRA or hook edit, by method (and ``lora_rank`` for closed-form methods).
    """
    specs = make_concepts(concepts, anchor=anchor, preserve=preserve)
    m = get_method(method)(config, **overrides)
    return m.fit(get_adapter(pipe), specs)
