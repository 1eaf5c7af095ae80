"""Cost: wall time and peak memory of fitting a patch (from its manifest) and of the evaluation."""

from __future__ import annotations

import resource
import sys
from typing import Any


def fit_cost(patches: list[Any]) -> list[dict[str, Any]]:
    """What each patch cost to fit, as its ``patch.json`` recorded it."""
    return [{"method": p.method, "digest": p.digest, "fit_wall_s": p.manifest.get("wall_time_s"),
             "fit_timings_s": p.manifest.get("timings_s"), "fit_peak_memory_mb": p.manifest.get("peak_memory_mb"),
             "config": p.manifest.get("config")} for p in patches]


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, MB (Linux reports ``ru_maxrss`` in KiB, macOS in bytes)."""
    unit = 1 if sys.platform == "darwin" else 1024
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * unit / 2**20, 1)


def eval_cost(wall_s: float, generation_s: float, cache_hits: int, cache_misses: int,
              patches: list[Any]) -> dict[str, Any]:
    return {"eval_wall_s": round(wall_s, 2), "generation_s": round(generation_s, 2), "peak_rss_mb": peak_rss_mb(),
            "cache_hits": cache_hits, "cache_misses": cache_misses, "patches": fit_cost(patches)}
