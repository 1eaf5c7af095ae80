"""MACE's harmonic score H: efficacy, specificity and generality in one number (higher is better)."""

from __future__ import annotations

from typing import Any

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


def harmonic_scores(metrics: dict[str, Any]) -> dict[str, float]:
    """H of the patched and of the original model, from the other metrics' entries."""
    out = {}
    for v, key in (("patched", "harmonic"), ("original", "harmonic_original")):
        spec = mean_specificity(metrics, v)
        gen = metrics.get(f"generality_{v}")
        out[key] = harmonic(metrics[f"efficacy_{v}"]["value"], 1.0 if spec is None else spec,
                            None if gen is None else gen["value"])
    return out
