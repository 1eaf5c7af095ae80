"""Bootstrap confidence intervals, shared by every metric."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Estimate:
    """A rate with its bootstrap 95% confidence interval."""

    value: float
    low: float
    high: float
    n: int

    def as_dict(self) -> dict[str, float]:
        return {"value": self.value, "ci95": [self.low, self.high], "n": self.n}

    def __str__(self) -> str:
        return f"{self.value:.3f} [{self.low:.3f}, {self.high:.3f}]"


def bootstrap(outcomes: np.ndarray | list[float], n_boot: int = 2000, seed: int = 0, level: float = 0.95) -> Estimate:
    """Mean of per-image ``outcomes`` with a percentile bootstrap interval (seeded, reproducible)."""
    x = np.asarray(outcomes, dtype=np.float64)
    if x.size == 0:
        return Estimate(float("nan"), float("nan"), float("nan"), 0)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, x.size, size=(n_boot, x.size))
    means = x[idx].mean(axis=1)
    a = (1 - level) / 2
    return Estimate(float(x.mean()), float(np.quantile(means, a)), float(np.quantile(means, 1 - a)), int(x.size))


def bootstrap_diff(a: np.ndarray, b: np.ndarray, n_boot: int = 2000, seed: int = 0) -> Estimate:
    """Paired difference mean(a - b) (same seeds), with a bootstrap interval."""
    return bootstrap(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64), n_boot, seed)
