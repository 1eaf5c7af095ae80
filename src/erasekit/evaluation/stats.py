"""Confidence intervals shared by every metric: prompts are the unit, and no interval collapses.

An evaluation draws one image per (prompt, seed). A prompt often comes back on several seeds
(real checkpoints cycle a handful of templates; an outside prompt set may repeat prompts), and
images of one prompt are not independent: a prompt the model cannot draw fails on every seed.
Resampling images as if they were independent then gives intervals that are too narrow.

So every interval here is a **cluster bootstrap**: prompts (clusters, identified by their text
or embedding digest) are resampled with replacement, each keeping all of its seeds, and the
statistic is recomputed on the resampled images (percentile interval, seeded, reproducible).

A percentile bootstrap collapses when every outcome agrees: at 0 of n it says [0, 0], which no
finite sample can support. For rates (outcomes in [0, 1]) the interval is therefore the union of
the cluster bootstrap interval and a **Wilson score interval at an effective sample size**
``n_eff = n / deff``. The design effect ``deff`` is the ratio of the cluster-robust variance of
the mean (between-prompt spread of the prompt totals) to the naive per-image variance, floored
at 1; with one image per prompt it is exactly 1 and Wilson runs on n images. When every outcome
agrees the within-prompt correlation cannot be estimated, and the data are consistent with the
seeds of a prompt always agreeing (correlation 1), so ``n_eff`` is the number of prompts: the
conservative choice, and the one the cluster bootstrap's own unit implies. The union keeps
whichever of the two is more cautious, so near the extremes (1 of n, where the percentile
bootstrap under-covers) the Wilson bound takes over, and in the middle the bootstrap does.

Paired differences (original - patched, same prompts and seeds) combine the cluster bootstrap of
the per-image differences with Newcombe's square-and-add interval built from the Wilson-union
intervals of the two one-sided parts (images that lost the outcome, images that gained it), so
"no image changed" reads as a small interval around 0, not as exactly 0.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

#: what metrics.json and the report say about the intervals
METHOD = {
    "unit": "prompt",
    "method": "cluster bootstrap (prompts resampled with replacement, each with all its seeds), percentile",
    "extremes": "rates: union with a Wilson score interval at n_eff = n / design effect (n_eff = number of "
                "prompts when all outcomes agree); paired drops: union with Newcombe's square-and-add interval",
    "resamples": 2000,
    "level": 0.95,
}


@dataclass(frozen=True)
class Estimate:
    """A mean with its 95% confidence interval, the number of images and of prompts behind it."""

    value: float
    low: float
    high: float
    n: int
    clusters: int = 0
    n_eff: float = float("nan")

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"value": self.value, "ci95": [self.low, self.high], "n": self.n,
                               "prompts": self.clusters}
        if self.n_eff == self.n_eff:  # not NaN: a rate, with the effective n its Wilson bound used
            out["n_eff"] = round(self.n_eff, 2)
        return out

    def __str__(self) -> str:
        return f"{self.value:.3f} [{self.low:.3f}, {self.high:.3f}]"


def _z(level: float) -> float:
    from statistics import NormalDist

    return NormalDist().inv_cdf(1 - (1 - level) / 2)


def wilson(p: float, n: float, level: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a proportion ``p`` observed on ``n`` (possibly fractional) units.

    Known answers: at p = 0 the interval is [0, z^2 / (n + z^2)]; at p = 1 it is [n / (n + z^2), 1].
    """
    if n <= 0:
        return 0.0, 1.0
    z = _z(level)
    z2 = z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z * math.sqrt(max(p * (1 - p) / n + z2 / (4 * n * n), 0.0)) / (1 + z2 / n)
    lo, hi = max(0.0, centre - half), min(1.0, centre + half)
    return (0.0 if p <= 0 else lo), (1.0 if p >= 1 else hi)


def _codes(clusters: Sequence[Any] | np.ndarray | None, n: int) -> np.ndarray:
    """Integer cluster codes 0..k-1 (each image its own cluster when ``clusters`` is None)."""
    if clusters is None:
        return np.arange(n)
    c = list(clusters)
    if len(c) != n:
        raise ValueError(f"{len(c)} cluster ids for {n} outcomes")
    first: dict[str, int] = {}  # codes in order of first appearance: distinct ids give 0..n-1
    return np.array([first.setdefault(str(x), len(first)) for x in c], dtype=np.int64)


def _cluster_means(x: np.ndarray, codes: np.ndarray, n_boot: int, seed: int) -> np.ndarray:
    """``n_boot`` cluster-bootstrap replicates of the mean of ``x`` (ratio of resampled sums)."""
    k = int(codes.max()) + 1
    sums = np.bincount(codes, weights=x, minlength=k)
    sizes = np.bincount(codes, minlength=k).astype(np.float64)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, k, size=(n_boot, k))
    return sums[idx].sum(axis=1) / sizes[idx].sum(axis=1)


def effective_n(x: np.ndarray, codes: np.ndarray) -> float:
    """``n / deff``: the number of independent images the clustered sample is worth (see module doc)."""
    n = x.size
    k = int(codes.max()) + 1
    if k >= n:
        return float(n)
    if k == 1:
        return 1.0
    mean = x.mean()
    naive = ((x - mean) ** 2).sum() / (n * (n - 1))
    if naive <= 0:  # every outcome agrees: assume the seeds of a prompt always do
        return float(k)
    sums = np.bincount(codes, weights=x, minlength=k)
    sizes = np.bincount(codes, minlength=k)
    robust = k / (k - 1) * ((sums - mean * sizes) ** 2).sum() / (n * n)
    deff = min(max(robust / naive, 1.0), n / k)
    return float(n / deff)


def bootstrap(outcomes: np.ndarray | list[float], n_boot: int = 2000, seed: int = 0, level: float = 0.95,
              clusters: Sequence[Any] | np.ndarray | None = None, rate: bool | None = None) -> Estimate:
    """Mean of per-image ``outcomes`` with a cluster-bootstrap interval (seeded, reproducible).

    ``clusters`` gives each image's prompt (any hashable id; None: every image its own prompt).
    ``rate``: outcomes are proportions in [0, 1], so the interval also covers the Wilson bound at
    the effective n (see the module docstring); None decides from the values.
    """
    x = np.asarray(outcomes, dtype=np.float64).reshape(-1)
    if x.size == 0:
        return Estimate(float("nan"), float("nan"), float("nan"), 0, 0)
    codes = _codes(clusters, x.size)
    k = int(codes.max()) + 1
    means = _cluster_means(x, codes, n_boot, seed)
    a = (1 - level) / 2
    value = float(x.mean())
    lo, hi = float(np.quantile(means, a)), float(np.quantile(means, 1 - a))
    if rate is None:
        rate = bool(x.min() >= 0 and x.max() <= 1)
    if not rate:
        return Estimate(value, lo, hi, int(x.size), k)
    n_eff = effective_n(x, codes)
    wl, wh = wilson(value, n_eff, level)
    return Estimate(value, min(lo, wl), max(hi, wh), int(x.size), k, n_eff)


def bootstrap_diff(a: np.ndarray, b: np.ndarray, n_boot: int = 2000, seed: int = 0, level: float = 0.95,
                   clusters: Sequence[Any] | np.ndarray | None = None, rate: bool | None = None) -> Estimate:
    """Paired difference mean(a - b) (same prompts and seeds), with a cluster-bootstrap interval.

    When ``a`` and ``b`` are rates in [0, 1] (``rate``; None decides from the values), the interval
    also covers Newcombe's square-and-add interval built from the two one-sided parts ``max(a - b, 0)``
    and ``max(b - a, 0)``, each with its Wilson-union interval, so an unchanged set gives a small
    interval around 0.
    """
    a = np.asarray(a, dtype=np.float64).reshape(-1)
    b = np.asarray(b, dtype=np.float64).reshape(-1)
    d = a - b
    est = bootstrap(d, n_boot, seed, level, clusters, rate=False)
    if rate is None:
        rate = d.size > 0 and min(a.min(), b.min()) >= 0 and max(a.max(), b.max()) <= 1
    if d.size == 0 or not rate:
        return est
    pos = bootstrap(np.maximum(d, 0), n_boot, seed, level, clusters, rate=True)
    neg = bootstrap(np.maximum(-d, 0), n_boot, seed, level, clusters, rate=True)
    lo = est.value - math.hypot(pos.value - pos.low, neg.high - neg.value)
    hi = est.value + math.hypot(pos.high - pos.value, neg.value - neg.low)
    return Estimate(est.value, max(-1.0, min(est.low, lo)), min(1.0, max(est.high, hi)), est.n, est.clusters,
                    min(pos.n_eff, neg.n_eff))


def rate_replicates(outcomes: np.ndarray, clusters: Sequence[Any] | np.ndarray | None, n_boot: int = 2000,
                    seed: int = 0) -> np.ndarray:
    """Bootstrap replicates of a rate, for statistics built from several rates (MACE's H).

    Prompts are resampled as in :func:`bootstrap`. A set whose outcomes all agree has no
    resampling spread, so its replicates are drawn instead from the Jeffreys posterior
    Beta(x + 1/2, n_eff - x + 1/2) at the effective n of :func:`effective_n` (the number of
    prompts there): the same caution the Wilson bound applies to the rate alone.
    """
    x = np.asarray(outcomes, dtype=np.float64).reshape(-1)
    codes = _codes(clusters, x.size)
    if x.min() != x.max():
        return _cluster_means(x, codes, n_boot, seed)
    n_eff = effective_n(x, codes)
    s = float(x.mean()) * n_eff
    return np.random.default_rng(seed).beta(s + 0.5, n_eff - s + 0.5, size=n_boot)
