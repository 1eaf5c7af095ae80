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
from collections.abc import Mapping, Sequence
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
_UNREADABLE = (OSError, ValueError, SyntaxError)  # what Pillow raises for a damaged file (plus DecompressionBombError)


def _bad_image(e: BaseException) -> bool:
    from PIL import Image

    return isinstance(e, _UNREADABLE + (Image.DecompressionBombError,))


def reference_files(path: str | Path) -> list[Path]:
    """The image files (by suffix, sorted by name) of a folder of reference images, each one's
    header read to check it is an image (fully decoded later, by :func:`reference_features`)."""
    from PIL import Image

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
        except Exception as e:  # noqa: BLE001 - narrowed by _bad_image
            if not _bad_image(e):
                raise
            raise InvalidInputError(f"could not read the reference image {f} ({type(e).__name__}); remove it from "
                                    "the folder or replace it") from None
    return files


def _rgb(im: Any) -> Any:
    """An opened image as 8-bit RGB: 16-bit greyscale scaled (not clipped), transparency composited
    onto white, EXIF orientation applied."""
    from PIL import Image, ImageOps

    im = ImageOps.exif_transpose(im)
    if im.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        a = np.asarray(im, dtype=np.float64)
        top = 65535.0 if im.mode != "F" and a.max(initial=0) > 255 else 255.0
        im = Image.fromarray(np.clip(a / top * 255 + 0.5, 0, 255).astype(np.uint8))
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        im = Image.alpha_composite(Image.new("RGBA", im.size, (255, 255, 255, 255)), im.convert("RGBA"))
    return im.convert("RGB")


def load_reference(path: Path, height: int, width: int) -> np.ndarray:
    """One reference image as uint8 (height, width, 3): RGB (:func:`_rgb`), centre-cropped to the
    generated images' aspect ratio, then resized (bicubic) to their size, so both sets reach the
    feature extractor alike."""
    from PIL import Image

    from ...errors import InvalidInputError

    try:
        with Image.open(path) as opened:
            im = _rgb(opened)
    except Exception as e:  # noqa: BLE001 - narrowed by _bad_image
        if not _bad_image(e):
            raise
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


class _Given(torch.nn.Module):
    """Features already extracted, passed through to torchmetrics (so each image is embedded once)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.num_features = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.double()


def _extractor(judge: Any, features: str) -> tuple[Any, str]:
    """(unit-float images -> features or None, the feature space's name)."""
    if features == "judge":
        return (lambda x: judge.features(x.float() * 2 - 1)), f"{judge.name} penultimate"
    check_features(features)
    net = _inception(4)[0].inception  # torchmetrics' InceptionV3 (uint8 input, resized inside)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    net.to(device)
    return (lambda x: net((x * 255).round().byte().to(device)).cpu()), "torchmetrics InceptionV3 pool"


def _embed(extract: Any, images: np.ndarray, chunk: int) -> torch.Tensor | None:
    out = []
    for i in range(0, len(images), chunk):
        f = extract(_to_unit(images[i:i + chunk]))
        if f is None:
            return None
        out.append(f.detach().double().cpu())
    return torch.cat(out)


def reference_features(judge: Any, files: Sequence[Path], height: int, width: int, features: str = "judge",
                       chunk: int = 64) -> dict[str, Any]:
    """The reference images' features, read ``chunk`` at a time at the generated size (only the
    features are kept): ``{"features", "feature_space", "n", "size", "extract"}`` (``extract``
    embeds generated images the same way), or ``{"skipped": why}``
    for a judge without image features. Extract once, compare with many sets
    (:func:`reference_distances`)."""
    extract, space = _extractor(judge, features)
    feats = []
    for i in range(0, len(files), chunk):
        f = extract(_to_unit(np.stack([load_reference(p, height, width) for p in files[i:i + chunk]])))
        if f is None:
            return {"skipped": f"the {judge.name} judge has no image features"}
        feats.append(f.detach().double().cpu())
    x = torch.cat(feats)
    return {"features": x, "feature_space": f"{space} ({x.shape[-1]}-d)", "n": len(files),
            "size": [int(height), int(width)], "extract": extract}


def reference_distances(judge: Any, reference: Sequence[Path] | Mapping[str, Any],
                        generated: Mapping[str, np.ndarray], features: str = "judge",
                        chunk: int = 64) -> dict[str, Any]:
    """FID and KID of each generated set (uint8 (N, H, W, 3); e.g. ``original`` and ``patched``)
    against reference images: their files, or :func:`reference_features`' output for the same
    image size and feature space (so a large folder is embedded once for many comparisons).

    Returns ``{name: {"fid", "kid", "kid_std", "n_images"}}`` for each set, ``fid_change``
    (patched minus original, where both are given), the numbers of images and the feature space.
    FID is biased upwards at small N: compare figures only at the same numbers of images. Point
    estimates; KID over up to 100 random subsets of up to 1000 images (seeded)."""
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance

    if not generated:
        raise ValueError("no generated set to compare with the reference images")
    sizes = {a.shape[1:3] for a in generated.values()}
    if len(sizes) != 1:
        raise ValueError(f"generated sets of different sizes {sorted(sizes)}")
    (height, width), = sizes
    ref = reference if isinstance(reference, Mapping) else \
        reference_features(judge, reference, height, width, features, chunk)
    if "skipped" in ref:
        return {"skipped": ref["skipped"]}
    if ref["size"] != [int(height), int(width)]:
        raise ValueError(f"reference features were made at {ref['size']}, the images are {[height, width]}")
    real = ref["features"]
    n = min(len(real), *(len(a) for a in generated.values()))
    if n < 2:
        raise ValueError("FID needs at least 2 images on each side")
    dim = real.shape[-1]
    with warnings.catch_warnings():  # KID's notice that it keeps every feature: it must
        warnings.filterwarnings("ignore", message=".*will save all extracted features", category=UserWarning)
        fid = FrechetInceptionDistance(feature=_Given(dim), reset_real_features=False)
        kid = KernelInceptionDistance(feature=_Given(dim), subset_size=max(2, min(1000, n // 2)), subsets=100,
                                      reset_real_features=False)
    fid.update(real, real=True)
    kid.update(real, real=True)
    out: dict[str, Any] = {}
    for name, images in generated.items():
        fake = _embed(ref["extract"], images, chunk)
        fid.reset()
        kid.reset()  # both keep the reference features
        fid.update(fake, real=False)
        kid.update(fake, real=False)
        with torch.random.fork_rng():  # KID draws random subsets: seed them so reruns agree
            torch.manual_seed(0)
            kid_mean, kid_std = kid.compute()
        out[name] = {"fid": float(fid.compute()), "kid": float(kid_mean), "kid_std": float(kid_std),
                     "n_images": len(images)}
    if "original" in out and "patched" in out:
        out["fid_change"] = out["patched"]["fid"] - out["original"]["fid"]
    out.update({"n_reference": ref["n"], "feature_space": ref["feature_space"], "resized_to": ref["size"]})
    return out
