"""Fidelity to the original: how far patched images of non-target prompts move from the originals.

Two views: per seed, the distance between the judge's features of the original and the patched
image (paired, so it sees a changed picture even when the label survives), and between the two
sets, FID and KID computed by torchmetrics in the judge's feature space. Real checkpoints may pass
torchmetrics' Inception features instead (``features="inception"``, the ``fid`` extra) when its
weights can be had; never required offline.

Against real images, :func:`reference_distances` gives the utility figure the papers publish (FID of
COCO captions' images against COCO's photographs): FID and KID of the original's and the patched
model's images on the unrelated prompts against a folder of reference images, in the same feature
space, and the change the edit makes.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
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


def _metrics(make: Any, n: int, keep_real: bool = False) -> tuple[Any, Any]:
    """FID and KID on ``make()``'s features; KID's subsets hold at most half of ``n`` (the smaller
    set's size). ``keep_real``: ``reset()`` keeps the real images' features, so one pass over a
    large reference set serves several generated sets."""
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance

    subset = max(2, min(50, n // 2))
    with warnings.catch_warnings():  # KID's notice that it keeps every feature: it must, and they are small
        warnings.filterwarnings("ignore", message=".*will save all extracted features", category=UserWarning)
        return (FrechetInceptionDistance(feature=make(), normalize=True, reset_real_features=not keep_real),
                KernelInceptionDistance(feature=make(), normalize=True, subset_size=subset, subsets=50,
                                        reset_real_features=not keep_real))


def check_features(features: str) -> None:
    """Fail early (before any image is generated) on a feature space that cannot be had."""
    from ...errors import InvalidInputError

    if features not in FEATURE_SPACES:
        raise InvalidInputError(f"unknown FID feature space {features!r}; choose one of {', '.join(FEATURE_SPACES)}")
    if features == "inception":
        _inception(4)


def _inception(n: int, keep_real: bool = False) -> tuple[Any, Any]:
    from ...errors import InvalidInputError

    try:
        return _metrics(lambda: 2048, n, keep_real)
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


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def reference_files(path: str | Path) -> list[Path]:
    """The image files (by suffix, sorted by name) of a folder of reference images, each opened to
    check it is an image: called before anything is generated, so a bad folder fails at once."""
    from PIL import Image, UnidentifiedImageError

    from ...errors import InvalidInputError

    p = Path(path).expanduser()
    if not p.exists():
        raise InvalidInputError(f"the reference image folder {p} does not exist; pass a folder of real images "
                                "(e.g. the photographs of your --unrelated-file captions)")
    if not p.is_dir():
        raise InvalidInputError(f"reference images are a folder of images, not the file {p}; pass its folder")
    files = sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file())
    if len(files) < 2:
        raise InvalidInputError(f"{p} holds {len(files)} image(s) ({', '.join(IMAGE_SUFFIXES)}); FID needs at "
                                "least 2, and is only meaningful with hundreds")
    for f in files:
        try:
            with Image.open(f) as im:
                im.size  # noqa: B018  (reads the header only)
        except (OSError, UnidentifiedImageError, ValueError) as e:
            raise InvalidInputError(f"could not read the reference image {f} ({type(e).__name__}); remove it from "
                                    "the folder or replace it") from None
    return files


def load_reference(path: Path, height: int, width: int) -> np.ndarray:
    """One reference image as uint8 (height, width, 3): RGB, centre-cropped to the generated images'
    aspect ratio, then resized (bicubic) to their size, so both sets reach the feature extractor alike."""
    from PIL import Image

    from ...errors import InvalidInputError

    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
    except (OSError, ValueError) as e:
        raise InvalidInputError(f"could not decode the reference image {path} ({type(e).__name__}); remove it from "
                                "the folder or replace it") from None
    w, h = im.size
    target = width / height
    if w / h > target:  # too wide: keep the middle columns
        cw = max(1, round(h * target))
        box = ((w - cw) // 2, 0, (w - cw) // 2 + cw, h)
    else:  # too tall: keep the middle rows
        ch = max(1, round(w / target))
        box = (0, (h - ch) // 2, w, (h - ch) // 2 + ch)
    im = im.crop(box).resize((width, height), Image.Resampling.BICUBIC)
    return np.asarray(im, dtype=np.uint8)


def _chunks(files: Sequence[Path], height: int, width: int, chunk: int) -> Iterator[torch.Tensor]:
    for i in range(0, len(files), chunk):
        yield _to_unit(np.stack([load_reference(f, height, width) for f in files[i:i + chunk]]))


def reference_distances(judge: Any, files: Sequence[Path], generated: Mapping[str, np.ndarray],
                        features: str = "judge", chunk: int = 64) -> dict[str, Any]:
    """FID and KID of each generated set (uint8 (N, H, W, 3); e.g. ``original`` and ``patched``)
    against the reference images ``files``, read ``chunk`` at a time (only their features are kept).

    Returns ``{name: {"fid", "kid", "kid_std"}}`` for each set, ``fid_change`` (patched minus
    original, where both are given), the numbers of images and the feature space. FID is biased
    upwards at small N: compare figures only at the same numbers of images. Point estimates."""
    if not generated:
        raise ValueError("no generated set to compare with the reference images")
    sizes = {a.shape[1:3] for a in generated.values()}
    if len(sizes) != 1:
        raise ValueError(f"generated sets of different sizes {sorted(sizes)}")
    (height, width), = sizes
    n = min(len(files), *(len(a) for a in generated.values()))
    if features == "judge":
        probe = judge.features(_to_unit(next(iter(generated.values()))[:1]) * 2 - 1)
        if probe is None:
            return {"skipped": f"the {judge.name} judge has no image features"}
        dim = probe.shape[-1]
        fid, kid = _metrics(lambda: _Features(judge, dim), n, keep_real=True)
        space = f"{judge.name} penultimate ({dim}-d)"
    else:
        check_features(features)
        fid, kid = _inception(n, keep_real=True)
        space = "torchmetrics InceptionV3 pool (2048-d)"
    for batch in _chunks(files, height, width, chunk):
        fid.update(batch, real=True)
        kid.update(batch, real=True)
    out: dict[str, Any] = {}
    for name, images in generated.items():
        fid.reset()
        kid.reset()  # keeps the reference features
        for i in range(0, len(images), chunk):
            batch = _to_unit(images[i:i + chunk])
            fid.update(batch, real=False)
            kid.update(batch, real=False)
        with torch.random.fork_rng():  # KID draws random subsets: seed them so reruns agree
            torch.manual_seed(0)
            kid_mean, kid_std = kid.compute()
        out[name] = {"fid": float(fid.compute()), "kid": float(kid_mean), "kid_std": float(kid_std),
                     "n_images": len(images)}
    if "original" in out and "patched" in out:
        out["fid_change"] = out["patched"]["fid"] - out["original"]["fid"]
    out.update({"n_reference": len(files), "feature_space": space, "resized_to": [int(height), int(width)]})
    return out
