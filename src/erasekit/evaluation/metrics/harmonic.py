"""MACE's harmonic score H: efficacy, specificity and generality in one number (higher is better)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ..stats import METHOD, rate_replicates
from .specificity import mean_specificity


def harmonic(acc_e: float, acc_s: float, acc_g: float | None = None) -> float:
    """Harmonic mean of (1 - efficacy acc), specificity acc and (1 - generality acc).

    MACE (Lu et al. 2024) ranks erasers by H_o = 3 / (1/(1-Acc_e) + 1/Acc_s + 1/(1-Acc_g)); without
    a generality set the third term is left out. Any part at or below zero gives H = 0.
    """
    parts = [1 - acc_e, acc_s] + ([] if acc_g is None else [1 - acc_g])
    if any(p <= 0 for p in parts):
        return 0.0
    return len(parts) / sum(1 / p for p in parts)


def _harmonic_array(acc_e: np.ndarray, acc_s: np.ndarray, acc_g: np.ndarray | None) -> np.ndarray:
    parts = [1 - acc_e, acc_s] + ([] if acc_g is None else [1 - acc_g])
    stacked = np.stack(parts)
    with np.errstate(divide="ignore"):
        h = len(parts) / (1 / np.where(stacked > 0, stacked, np.nan)).sum(axis=0)
    return np.where((stacked <= 0).any(axis=0), 0.0, h)


def harmonic_scores(metrics: dict[str, Any]) -> dict[str, float]:
    """H of the patched and of the original model, from the other metrics' entries."""
    out = {}
    for v, key in (("patched", "harmonic"), ("original", "harmonic_original")):
        spec = mean_specificity(metrics, v)
        gen = metrics.get(f"generality_{v}")
        out[key] = harmonic(metrics[f"efficacy_{v}"]["value"], 1.0 if spec is None else spec,
                            None if gen is None else gen["value"])
    return out


Outcomes = tuple[np.ndarray, Sequence[Any] | None]


def harmonic_interval(efficacy: Outcomes, specificity: list[Outcomes], generality: Outcomes | None = None,
                      n_boot: int = METHOD["resamples"], seed: int = 0, level: float = METHOD["level"]) -> list[float]:
    """95% interval of H: each prompt set's prompts resampled (with all their seeds), H recomputed.

    Each argument is (per-image outcomes, each image's prompt). Prompt sets are independent
    samples, so each is resampled on its own (distinct seeds per set); a set whose outcomes all
    agree draws its rate from the Jeffreys posterior at its number of prompts instead (see
    :func:`~erasekit.evaluation.stats.rate_replicates`), so a perfect eraser's H is not [1, 1].
    Specificity is the mean of its parts (neighbours, unrelated), as in :func:`harmonic_scores`.
    """
    e = rate_replicates(efficacy[0], efficacy[1], n_boot, seed)
    s = np.mean([rate_replicates(x, c, n_boot, seed + 1 + i) for i, (x, c) in enumerate(specificity)], axis=0) \
        if specificity else np.ones(n_boot)
    g = None if generality is None else rate_replicates(generality[0], generality[1], n_boot, seed + 101)
    h = _harmonic_array(e, s, g)
    point = harmonic(float(np.mean(efficacy[0])), float(np.mean([np.mean(x) for x, _ in specificity]))
                     if specificity else 1.0, None if generality is None else float(np.mean(generality[0])))
    a = (1 - level) / 2
    return [min(point, float(np.quantile(h, a))), max(point, float(np.quantile(h, 1 - a)))]
