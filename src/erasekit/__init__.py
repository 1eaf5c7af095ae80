"""erasekit: erase concepts from text-to-image diffusion models, measure it, attack it."""

from __future__ import annotations

__version__ = "0.1.0"

from .adapters import get_adapter  # noqa: E402
from .api import erase  # noqa: E402
from .concepts import ConceptSpec, load_concepts  # noqa: E402
from .edits import (Edit, HookEdit, LoraEdit, WeightDelta, export_lora, export_pipeline, load_edit,  # noqa: E402
                    load_patch)
from .errors import ErasekitError  # noqa: E402
from .evaluation import evaluate  # noqa: E402
from .models import load_pipeline  # noqa: E402
from .tune import TuneResult, tune  # noqa: E402
from .compare import CompareResult, compare  # noqa: E402

__all__ = ["ConceptSpec", "Edit", "ErasekitError", "HookEdit", "LoraEdit", "WeightDelta", "erase", "evaluate",
           "export_lora", "export_pipeline", "get_adapter", "load_concepts", "load_edit", "load_patch",
           "load_pipeline", "tune", "TuneResult", "compare", "CompareResult",
           "__version__"]
