"""CLIPScore: how well each image still matches its own prompt, by a CLIP judge's two encoders.

The erasure literature reports it on COCO captions as a measure of what an edit costs the model
(``erasekit eval --judge clip --unrelated-file coco.txt`` puts such captions in the unrelated set).
Each set's score is the mean over images with a cluster-bootstrap interval over prompts, before and
after the edit, and their paired change (same prompts and seeds). Only judges with both encoders
(``clip_score``) give it; the world's classifier and NudeNet read no text.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from ..stats import bootstrap, bootstrap_diff


def clip_scores(judge: Any, prompts: Mapping[str, Sequence[str]], images: Mapping[str, Mapping[str, np.ndarray]],
                clusters: Mapping[str, Sequence[Any]]) -> dict[str, Any] | None:
    """{set: {"original", "patched", "change"}} for every set, or None when the judge has no ``clip_score``.

    ``images[set][variant]`` are uint8 (N, H, W, 3) arrays in the prompts' order."""
    score = getattr(judge, "clip_score", None)
    if score is None:
        return None
    out: dict[str, Any] = {}
    for name, ps in prompts.items():
        s = {v: score(torch.from_numpy(images[name][v]).permute(0, 3, 1, 2).float() / 127.5 - 1, list(ps)).numpy()
             for v in ("original", "patched")}
        out[name] = {v: bootstrap(s[v], clusters=clusters[name], rate=False).as_dict() for v in s}
        out[name]["change"] = bootstrap_diff(s["patched"], s["original"], clusters=clusters[name],
                                             rate=False).as_dict()  # scores in [0, 100], never rates
    return out
