"""The metrics of ``erasekit eval``, one module each.

Every metric takes per-image outcomes (one value per prompt and seed) for the original and the
patched model, on the same seeds, and returns JSON-ready entries with a 95% interval that
resamples prompts with all their seeds (:mod:`erasekit.evaluation.stats`; FID/KID are point estimates):

- :mod:`.efficacy`: is the target still drawn on prompts that ask for it (lower is better);
- :mod:`.specificity`: are neighbours and unrelated concepts intact, and their drop;
- :mod:`.generality`: is the target still drawn on synonyms the patch never saw;
- :mod:`.harmonic`: MACE's H, one number to rank methods by;
- :mod:`.fidelity`: how far non-target images move from the original (feature distance, FID/KID);
- :mod:`.cost`: wall time and memory of fitting the patch and of the evaluation.
"""

from .cost import eval_cost, fit_cost
from .efficacy import efficacy
from .fidelity import distribution_distances, feature_distance, fidelity, reference_distances
from .generality import generality
from .harmonic import harmonic, harmonic_interval, harmonic_scores
from .specificity import specificity

__all__ = ["distribution_distances", "efficacy", "eval_cost", "feature_distance", "fidelity", "fit_cost",
           "reference_distances",
           "generality", "harmonic", "harmonic_interval", "harmonic_scores", "specificity"]
