"""Specificity: is everything else intact: neighbours of the target and unrelated concepts."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ..stats import bootstrap, bootstrap_diff


def specificity(correct: dict[str, dict[str, np.ndarray]],
                clusters: dict[str, Sequence[Any]] | None = None) -> dict[str, Any]:
    """Accuracy of the judge against what each prompt asked for, per part, before and after.

    ``correct[part][v]`` holds 0/1 per image for ``part`` in ("neighbours", "unrelated",
    "collateral") (any may be absent) and ``v`` in ("original", "patched"). Neighbours are other
    values of the target's own axis (other shapes when a shape is erased); unrelated are the other
    axes on those prompts; collateral are the other axes on the prompts that name the erased
    concept (erasing "star" should not recolour "a green star"). The ``_drop`` entries are paired
    differences original - patched (positive = damage). The harmonic score uses neighbours and
    unrelated only, as MACE defines it. ``clusters[part]`` names each image's prompt.
    """
    out: dict[str, Any] = {}
    for part, by_version in correct.items():
        c = (clusters or {}).get(part)
        for v in ("original", "patched"):
            out[f"specificity_{part}_{v}"] = bootstrap(by_version[v], clusters=c).as_dict()
        out[f"specificity_{part}_drop"] = bootstrap_diff(by_version["original"], by_version["patched"],
                                                         clusters=c).as_dict()
    return out


def mean_specificity(metrics: dict[str, Any], version: str) -> float | None:
    """The mean of the specificity parts present, for the harmonic score."""
    vals = [metrics[k]["value"] for k in (f"specificity_neighbours_{version}", f"specificity_unrelated_{version}")
            if k in metrics]
    return float(np.mean(vals)) if vals else None
