"""Edits: what methods produce and users keep. Three kinds share one protocol and one folder format.

``load_edit(folder)`` reads any kind; ``load_patch`` is its 0.1 name.
"""

from __future__ import annotations

from .base import (KINDS, Edit, EditError, PatchError, applied, load_edit, register_kind, resolve_module,
                   resolve_param)
from .export import export_lora, export_pipeline
from .hook import HookEdit
from .lora import LoraEdit, factorise
from .weight_delta import WeightDelta

load_patch = load_edit

__all__ = ["Edit", "EditError", "HookEdit", "KINDS", "LoraEdit", "PatchError", "WeightDelta", "applied",
           "export_lora", "export_pipeline", "factorise", "load_edit", "load_patch", "register_kind",
           "resolve_module", "resolve_param"]
