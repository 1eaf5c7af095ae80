"""Efficacy: how often the target concept still appears on prompts that ask for it."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ..stats import bootstrap, bootstrap_diff


def efficacy(detected: dict[str, np.ndarray], p_target: dict[str, np.ndarray] | None = None,
             clusters: Sequence[Any] | None = None) -> dict[str, Any]:
    """Detection rate of the target by the judge, before and after (lower after is better).

    ``detected[v]`` holds 0/1 per image for ``v`` in ("original", "patched"), same seeds in the
    same order; ``p_target`` the judge's probability of the target (a softer view of the same
    thing). ``efficacy_drop`` is the paired difference original - patched. ``clusters`` names each
    image's prompt: intervals resample prompts (see :mod:`erasekit.evaluation.stats`).
    """
    out: dict[str, Any] = {}
    for v in ("original", "patched"):
        out[f"efficacy_{v}"] = bootstrap(detected[v], clusters=clusters).as_dict()
        if p_target is not None:
            out[f"p_target_{v}"] = bootstrap(p_target[v], clusters=clusters).as_dict()
    out["efficacy_drop"] = bootstrap_diff(detected["original"], detected["patched"], clusters=clusters).as_dict()
    return out
