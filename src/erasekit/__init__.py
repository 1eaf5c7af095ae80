"""erasekit: erase concepts from text-to-image diffusion models, measure it, attack it."""

from __future__ import annotations

__version__ = "0.1.0"

from .api import erase  # noqa: E402
from .concepts import ConceptSpec, load_concepts  # noqa: E402
from .edits import WeightDelta, export_pipeline, load_patch  # noqa: E402
from .errors import ErasekitError  # noqa: E402
from .models import load_pipeline  # noqa: E402

__all__ = ["ConceptSpec", "ErasekitError", "WeightDelta", "erase", "export_pipeline", "load_concepts",
           "load_patch", "load_pipeline", "__version__"]
