"""Evaluation: efficacy, specificity, generality, fidelity and cost, with confidence intervals."""

from .cache import ImageCache
from .evaluate import EvalResult, evaluate, parse_seeds
from .judges import JUDGES, Judge, WorldJudge, get_judge
from .metrics import harmonic
from .stats import Estimate, bootstrap

__all__ = ["EvalResult", "Estimate", "ImageCache", "JUDGES", "Judge", "WorldJudge", "bootstrap", "evaluate",
           "get_judge", "harmonic", "parse_seeds"]
