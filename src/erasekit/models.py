"""Loading diffusers pipelines: the embedded world by default, any hub id or local folder."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from .errors import InvalidInputError, ModelLoadError
from .world.assets import model_path

WORLD = "world"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def resolve_model(model: str | os.PathLike | None) -> str:
    """Turn ``--model`` into a local folder or hub id, with one-line errors for bad input."""
    if model is None or str(model) in ("", WORLD):
        p = model_path()
        if not (p / "model_index.json").is_file():
            raise ModelLoadError(f"the embedded world model is missing at {p}; run `erasekit world train` to rebuild it")
        return str(p)
    s = str(model)
    p = Path(s).expanduser()
    if p.exists():
        if not p.is_dir():
            raise ModelLoadError(f"{p} is a file; pass a diffusers pipeline folder (with model_index.json) or a hub id")
        if not os.access(p, os.R_OK | os.X_OK):
            raise ModelLoadError(f"cannot read model folder {p}; check its permissions")
        if not (p / "model_index.json").is_file():
            raise ModelLoadError(f"{p} is not a diffusers pipeline folder (no model_index.json); "
                                 "pass a folder written by save_pretrained or a hub id")
        return str(p)
    if s.startswith((".", "/", "~")) or os.sep in s.strip("/") and not _HUB_ID.match(s):
        raise ModelLoadError(f"model path {s} does not exist; pass an existing folder, a hub id, or omit --model "
                             "for the embedded world")
    if not _HUB_ID.match(s):
        raise ModelLoadError(f"model {s!r} is neither an existing folder nor a hub id like 'owner/name'")
    return s


def sampling_defaults(model_dir: str) -> dict[str, Any]:
    """Recommended steps/guidance: from the model's ``erasekit.json`` if it has one, else SD's."""
    default = {"num_inference_steps": 50, "guidance_scale": 7.5}
    f = Path(model_dir) / "erasekit.json"
    if not f.is_file():
        return default
    try:
        sampling = json.loads(f.read_text()).get("sampling", default)
    except (ValueError, AttributeError, UnicodeDecodeError):
        raise ModelLoadError(f"{f} is not a valid erasekit.json; fix it or delete it to use SD's sampling defaults") from None
    ok = isinstance(sampling, dict) and isinstance(sampling.get("num_inference_steps", 50), int) and \
        isinstance(sampling.get("guidance_scale", 7.5), (int, float))
    if not ok:
        raise ModelLoadError(f"{f}: 'sampling' must hold an integer num_inference_steps and a number guidance_scale")
    return {**default, **sampling}


def check_device(device: str | None) -> str:
    """``--device`` as a torch device string (CUDA when present for ``None``); a device torch cannot name or
    does not have here is a one-line error before anything is loaded, not a traceback from inside torch."""
    import torch

    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        d = torch.device(device)
    except (RuntimeError, TypeError):
        raise InvalidInputError(f"unknown device {device!r}; use cpu, cuda, cuda:N or mps") from None
    if d.type == "cuda":
        if not torch.cuda.is_available():
            raise InvalidInputError(f"device {device!r} asked for, but this torch ({torch.__version__}) sees no GPU; "
                                    "use --device cpu")
        if d.index is not None and d.index >= torch.cuda.device_count():
            n = torch.cuda.device_count()
            raise InvalidInputError(f"device {device!r} asked for, but torch sees {n} GPU(s); use cuda:0..cuda:{n - 1} "
                                    "or --device cpu")
    elif d.type == "mps" and not torch.backends.mps.is_available():
        raise InvalidInputError(f"device {device!r} asked for, but MPS is not available here; use --device cpu")
    elif d.type not in ("cpu", "cuda", "mps"):
        backend = getattr(torch, d.type, None)  # xpu and the like: whatever torch says it has
        if not (backend is not None and getattr(backend, "is_available", lambda: False)()):
            raise InvalidInputError(f"device {device!r} is not available here; use cpu, cuda, cuda:N or mps")
    return str(d)


def load_pipeline(model: str | os.PathLike | None = None, device: str | None = None, dtype: Any = None):
    """Load a diffusers text-to-image pipeline (the embedded world when ``model`` is None).

    Args:
        model: ``None``/"world", a local diffusers folder, or a hub id (needs network or cache).
        device: torch device string; defaults to CUDA when available, else CPU.
        dtype: torch dtype for the weights; defaults to float32.
    """
    import torch
    from diffusers import DiffusionPipeline
    from safetensors import SafetensorError
    from diffusers.utils import logging as dlogging

    from transformers.utils import logging as tlogging

    dlogging.disable_progress_bar()  # "Loading pipeline components" would interleave with our output
    tlogging.disable_progress_bar()  # and so would transformers' "Loading weights"
    device = check_device(device)
    src = resolve_model(model)
    kwargs: dict[str, Any] = {"torch_dtype": dtype or torch.float32}
    local = Path(src).is_dir()
    if local:
        try:
            index = json.loads((Path(src) / "model_index.json").read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            raise ModelLoadError(f"could not load model {src}: its model_index.json is unreadable "
                                 f"({type(e).__name__}); check the folder's files") from None
        if not isinstance(index, dict):
            raise ModelLoadError(f"could not load model {src}: its model_index.json is not a JSON object; "
                                 "check the folder's files")
        if "safety_checker" in index:
            kwargs.update(safety_checker=None, requires_safety_checker=False)
    try:
        pipe = DiffusionPipeline.from_pretrained(src, local_files_only=local or None, **kwargs)
    except (OSError, ValueError, EnvironmentError, SafetensorError, RuntimeError, KeyError) as e:  # noqa: UP024
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        hint = "check the folder's files" if local else "check the id, your network, or HF_HUB_OFFLINE"
        raise ModelLoadError(f"could not load model {src}: {first[:200]}; {hint}") from None
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    pipe.erasekit_source = src  # type: ignore[attr-defined]
    return pipe
