"""On-disk image cache keyed by everything that determines an image."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..io import atomic_path


def default_cache_dir() -> Path:
    return Path(os.environ.get("ERASEKIT_CACHE", Path.home() / ".cache" / "erasekit")) / "images"


class ImageCache:
    """PNG files named by the hash of (model fingerprint, patch digest, prompt, seed, sampling)."""

    def __init__(self, root: str | Path | None = None) -> None:
        self.root = Path(root) if root is not None else default_cache_dir()
        self.root.mkdir(parents=True, exist_ok=True)
        self.hits = 0
        self.misses = 0

    @staticmethod
    def key(fingerprint: str, patch: str, prompt: str, seed: int, sampling: dict[str, Any]) -> str:
        blob = json.dumps({"m": fingerprint, "p": patch, "t": prompt, "s": int(seed), "x": sampling},
                          sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()

    def path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.png"

    def get(self, key: str) -> np.ndarray | None:
        p = self.path(key)
        if p.is_file():
            try:
                arr = np.asarray(Image.open(p).convert("RGB"))
                self.hits += 1
                return arr
            except OSError:
                p.unlink(missing_ok=True)
        self.misses += 1
        return None

    def put(self, key: str, image: np.ndarray) -> None:
        p = self.path(key)
        p.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(p) as tmp:
            Image.fromarray(image).save(tmp, format="PNG")
