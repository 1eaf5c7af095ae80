"""Fidelity to the original: how far patched images of non-target prompts move from the originals.

Two views: per seed, the distance between the judge's features of the original and the patched
image (paired, so it sees a changed picture even when the label survives), and between the two
sets, FID and KID computed by torchmetrics in the judge's feature space. Real checkpoints may pass
torchmetrics' Inception features instead (``features="inception"``, the ``fid`` extra) when its
weights can be had; never required offline.
"""

from __future__ import annotations

from collections.abc import Sequence
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


def feature_distance(judge: Any, original: np.ndarray, patched: np.ndarray,
                     clusters: Sequence[Any] | None = None) -> dict[str, Any] | None:
    """Mean per-seed distance ||f(patched) - f(original)|| / mean ||f(original)||; None without
    features. The interval resamples prompts (``clusters``: each image's prompt)."""
    fo, fp = judge.features(_to_unit(original) * 2 - 1), judge.features(_to_unit(patched) * 2 - 1)
    if fo is None:
        return None
    scale = fo.norm(dim=-1).mean()
    return bootstrap(((fp - fo).norm(dim=-1) / scale).numpy(), clusters=clusters, rate=False).as_dict()


FEATURE_SPACES = ("judge", "inception")


def _metrics(make: Any, n: int) -> tuple[Any, Any]:
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance

    subset = max(2, min(50, n // 2))
    return (FrechetInceptionDistance(feature=make(), normalize=True),
            KernelInceptionDistance(feature=make(), normalize=True, subset_size=subset, subsets=50))


def check_features(features: str) -> None:
    """Fail early (before any image is generated) on a feature space that cannot be had."""
    from ...errors import InvalidInputError

    if features not in FEATURE_SPACES:
        raise InvalidInputError(f"unknown FID feature space {features!r}; choose one of {', '.join(FEATURE_SPACES)}")
    if features == "inception":
        _inception(4)


def _inception(n: int) -> tuple[Any, Any]:
    from ...errors import InvalidInputError

    try:
        return _metrics(lambda: 2048, n)
    except ModuleNotFoundError:
        raise InvalidInputError("Inception features need torch-fidelity: pip install 'erasekit[fid]' (its weights "
                                "download on first use), or use --fid-features judge") from None
    except Exception as e:  # e.g. no network for the weights
        first = (str(e).splitlines() or [""])[0][:120]
        raise InvalidInputError(f"could not load the Inception weights ({type(e).__name__}: {first}); fetch them "
                                "once with network access, or use --fid-features judge") from None


def distribution_distances(judge: Any, a: np.ndarray, b: np.ndarray, features: str = "judge") -> dict[str, Any]:
    """FID and KID between two uint8 image sets (N, H, W, 3).

    ``features="judge"``: the judge's own feature space (always available offline).
    ``features="inception"``: torchmetrics' standard 2048-d InceptionV3 pool features, comparable
    with published FIDs; needs the ``fid`` extra (torch-fidelity) and its weights, which it
    downloads on first use.
    """
    ta, tb = _to_unit(a), _to_unit(b)
    if features == "judge":
        dim = judge.features(ta[:1] * 2 - 1).shape[-1]
        fid, kid = _metrics(lambda: _Features(judge, dim), len(a))
        space = f"{judge.name} penultimate ({dim}-d)"
    else:
        check_features(features)
        fid, kid = _inception(len(a))
        space = "torchmetrics InceptionV3 pool (2048-d)"
    for m in (fid, kid):
        m.update(ta, real=True)
        m.update(tb, real=False)
    with torch.random.fork_rng():  # KID draws random subsets: seed them so reruns agree
        torch.manual_seed(0)
        kid_mean, kid_std = kid.compute()
    return {"fid": float(fid.compute()), "kid": float(kid_mean), "kid_std": float(kid_std), "feature_space": space}


def fidelity(judge: Any, original: np.ndarray, patched: np.ndarray, features: str = "judge",
             clusters: Sequence[Any] | None = None) -> dict[str, Any]:
    """Both views for the non-target images; a judge without features (a detector) skips the
    per-seed distance, and FID/KID too unless Inception features are asked for. FID and KID are
    point estimates (KID with the spread over its random subsets), without a confidence interval."""
    dist = feature_distance(judge, original, patched, clusters)
    if dist is None and features == "judge":
        return {"feature_distance": None, "distribution": {"skipped": f"the {judge.name} judge has no image features"}}
    return {"feature_distance": dist, "distribution": distribution_distances(judge, original, patched, features)}
