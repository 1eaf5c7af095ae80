"""``hook``: an edit that changes how the pipeline encodes or denoises, not its weights.

A hook edit carries its method's name, config, concepts, tensors and ``manifest["hook"]`` (what
else its method computed at fit time, e.g. the negative prompt); its digest covers all of them.
The method turns them into
:class:`~erasekit.adapters.sampling.Hook` objects (embedding transforms, guidance terms, module
activation edits) that erasekit's sampling loop runs. Applying one only pushes it onto the
pipeline's edit stack: the loop registers its module hooks for the duration of one sampling call
and always removes them, also when generation raises. Note that a bare ``pipe(...)`` call of
diffusers does not run hooks: generate through erasekit (``erasekit generate``, ``evaluate``,
``get_adapter(pipe).sample``). A hook edit is not weights, so it cannot be exported as a pipeline.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from .base import Edit, Undo, register_kind


def _nothing() -> None:
    """A hook edit changes nothing on the pipeline itself: its undo is popping it off the stack."""


@register_kind
@dataclass(frozen=True, eq=False)
class HookEdit(Edit):
    """An inference-time edit.

    Attributes:
        data: the method's tensors (may be empty), by name.
        manifest: as every edit; ``method`` and ``config`` decide which hooks it makes.
    """

    kind: ClassVar[str] = "hook"
    data: dict[str, torch.Tensor] = field(default_factory=dict)
    manifest: dict[str, Any] = field(default_factory=dict)

    def tensors(self) -> dict[str, torch.Tensor]:
        return self.data

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], manifest: dict[str, Any]) -> "HookEdit":
        return cls(tensors, manifest)

    def hooks(self, adapter: Any) -> list[Any]:
        """The sampling-loop hooks this edit runs on ``adapter``, made by its method."""
        from ..methods import get_method  # methods build on edits: resolved at use, not import

        return get_method(self.method).make_hooks(self, adapter)

    def _check_fits(self, pipe: Any) -> None:
        from ..methods import get_method

        get_method(self.method)  # an unknown method is a one-line error before anything is generated

    def _apply(self, pipe: Any) -> Undo:
        return _nothing
