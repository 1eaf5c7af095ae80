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


def state_key(pipe: Any) -> str:
    """Hash of everything in the pipeline, as it is now, that decides an image: every parameter and
    buffer of every component that generation runs (UNet, text encoders, VAE: not only what
    methods edit, so a fine-tuned UNet never meets the base model's images), attention
    processors and adapter/FreeU settings, the tokenizers, the hook edits on its stack, device
    and dtype, and the versions of erasekit, diffusers and torch. Costs one pass over the weights
    (about a second per GB)."""
    import diffusers
    import torch

    from .. import __version__
    from ..edits import applied

    h = hashlib.sha256(json.dumps({"erasekit": __version__, "diffusers": diffusers.__version__,
                                   "torch": torch.__version__, "class": type(pipe).__name__}).encode())
    for name, comp in sorted(getattr(pipe, "components", {}).items()):
        if isinstance(comp, torch.nn.Module):
            for pname, t in [*comp.named_parameters(), *comp.named_buffers()]:
                h.update(f"{name}.{pname}:{t.device}:{t.dtype}:{tuple(t.shape)}".encode())
                h.update(t.detach().to("cpu").reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
            h.update(json.dumps(_module_state(comp), sort_keys=True, default=repr).encode())
        elif comp is not None and hasattr(comp, "get_vocab"):  # a tokenizer
            h.update(f"{name}:{json.dumps(comp.get_vocab(), sort_keys=True)}:{comp.model_max_length}".encode())
    for edit, _ in applied(pipe):
        if edit.kind == "hook":  # weight and LoRA edits are in the weights already
            h.update(f"hook:{edit.digest}".encode())
    return h.hexdigest()


#: module attributes that change outputs without being weights: peft adapter scales and switches,
#: FreeU's factors, attention scales
_STATE_ATTRS = ("scaling", "active_adapter", "merged_adapters", "_disable_adapters", "b1", "b2", "s1", "s2", "scale")


def _module_state(module: Any) -> dict[str, Any]:
    """What, beside weights, decides a module's output: each attention processor's class and the
    plain attributes above, by submodule name."""
    out: dict[str, Any] = {}
    for n, m in module.named_modules():
        proc = getattr(m, "processor", None)
        attrs = {k: v for k in _STATE_ATTRS if isinstance(v := getattr(m, k, None), (int, float, str, bool, dict, list))}
        if proc is not None:
            attrs["processor"] = type(proc).__qualname__
        if attrs:
            out[n] = attrs
    return out


def edits_key(state: str, edits: list[Any]) -> str:
    """The state key of ``state`` with ``edits`` applied on top, without hashing the weights again."""
    if not edits:
        return state
    return hashlib.sha256(f"{state}+{'+'.join(f'{e.kind}:{e.digest}' for e in edits)}".encode()).hexdigest()


class ImageCache:
    """PNG files named by the hash of (pipeline state, prompt or its embeddings, seed, sampling)."""

    def __init__(self, root: str | Path | None = None) -> None:
        self.root = Path(root) if root is not None else default_cache_dir()
        self.root.mkdir(parents=True, exist_ok=True)
        self.hits = 0
        self.misses = 0

    @staticmethod
    def key(state: str, prompt: str, seed: int, sampling: dict[str, Any]) -> str:
        """``state`` from :func:`state_key`; ``prompt`` the text or :meth:`PromptSet.key`."""
        blob = json.dumps({"m": state, "t": prompt, "s": int(seed), "x": sampling}, sort_keys=True, default=str).encode()
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
