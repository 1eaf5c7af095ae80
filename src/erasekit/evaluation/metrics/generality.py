"""Generality: is the target also gone when asked for by synonyms and paraphrases the patch never saw."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ..stats import bootstrap, bootstrap_diff


def generality(detected: dict[str, np.ndarray], clusters: Sequence[Any] | None = None) -> dict[str, Any]:
    """Detection rate of the target on unseen synonym prompts, before and after (lower after is
    better); ``clusters`` names each image's prompt."""
    out: dict[str, Any] = {f"generality_{v}": bootstrap(detected[v], clusters=clusters).as_dict()
                           for v in ("original", "patched")}
    out["generality_drop"] = bootstrap_diff(detected["original"], detected["patched"], clusters=clusters).as_dict()
    return out
