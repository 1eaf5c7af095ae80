"""Fidelity to the original: how far patched images of non-target prompts move from the originals.

Two views: per seed, the distance between the judge's features of the original and the patched
image (paired, so it sees a changed picture even when the label survives), and between the two
sets, FID and KID computed by torchmetrics in the judge's feature space. Real checkpoints may pass
torchmetrics' Inception features instead (``feature=2048``) when the weights are on disk.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..stats import bootstrap


def _to_unit(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255


class _Features(torch.nn.Module):
    """Judge features as a torchmetrics feature extractor (input: float images in [0, 1])."""

    def __init__(self, judge: Any, dim: int) -> None:
        super().__init__()
        self.judge = judge
        self.num_features = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.judge.features(x.float() * 2 - 1).double()


def feature_distance(judge: Any, original: np.ndarray, patched: np.ndarray) -> dict[str, Any] | None:
    """Mean per-seed distance ||f(patched) - f(original)|| / mean ||f(original)||; None without features."""
    fo, fp = judge.features(_to_unit(original) * 2 - 1), judge.features(_to_unit(patched) * 2 - 1)
    if fo is None:
        return None
    scale = fo.norm(dim=-1).mean()
    return bootstrap(((fp - fo).norm(dim=-1) / scale).numpy()).as_dict()


def distribution_distances(judge: Any, a: np.ndarray, b: np.ndarray, feature: Any = None) -> dict[str, Any]:
    """FID and KID between two uint8 image sets (N, H, W, 3), in the judge's feature space by default."""
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance

    ta, tb = _to_unit(a), _to_unit(b)
    if feature is None:
        dim = judge.features(ta[:1] * 2 - 1).shape[-1]
        make, space = (lambda: _Features(judge, dim)), f"{judge.name} penultimate ({dim}-d)"
    else:
        make, space = (lambda: feature), f"torchmetrics {feature!r}"
    fid = FrechetInceptionDistance(feature=make(), normalize=True)
    subset = max(2, min(50, len(a) // 2))
    kid = KernelInceptionDistance(feature=make(), normalize=True, subset_size=subset, subsets=50)
    for m in (fid, kid):
        m.update(ta, real=True)
        m.update(tb, real=False)
    with torch.random.fork_rng():  # KID draws random subsets: seed them so reruns agree
        torch.manual_seed(0)
        kid_mean, kid_std = kid.compute()
    return {"fid": float(fid.compute()), "kid": float(kid_mean), "kid_std": float(kid_std), "feature_space": space}


def fidelity(judge: Any, original: np.ndarray, patched: np.ndarray) -> dict[str, Any]:
    """Both views for the non-target images; a judge without features (a detector) skips them."""
    dist = feature_distance(judge, original, patched)
    if dist is None:
        return {"feature_distance": None, "distribution": {"skipped": f"the {judge.name} judge has no image features"}}
    return {"feature_distance": dist, "distribution": distribution_distances(judge, original, patched)}
