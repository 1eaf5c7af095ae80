"""Edits: the artifacts users keep. ``WeightDelta`` is a patch of weight deltas plus a manifest.

A patch folder holds ``patch.safetensors`` (only the changed tensors, as float32 deltas) and
``patch.json`` (method, config, concepts, base-model fingerprint, erasekit version, wall time,
per-layer solve residuals, and hashes of both files so that a truncated or hand-edited patch is
refused). Applying keeps an exact copy of the touched weights, so ``revert`` restores them bit
for bit; patches stack and must be reverted in reverse order.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .adapters import family_of, get_adapter
from .adapters.sd import FINGERPRINT_ATTR
from .errors import ErasekitError, InvalidInputError

FORMAT_VERSION = 1
STACK_ATTR = "_erasekit_stack"
TENSORS_FILE, MANIFEST_FILE = "patch.safetensors", "patch.json"


class PatchError(ErasekitError):
    """A patch cannot be read or does not fit the pipeline."""


def _canonical(d: dict[str, Any]) -> bytes:
    return json.dumps(d, sort_keys=True, separators=(",", ":"), default=str).encode()


def _resolve_param(pipe: Any, name: str) -> torch.nn.Parameter:
    comp, _, rest = name.partition(".")
    module = getattr(pipe, comp, None)
    if module is None:
        raise PatchError(f"the pipeline has no component {comp!r} that this patch edits; use a pipeline of the "
                         "patch's model family")
    try:
        return module.get_parameter(rest)
    except AttributeError:
        raise PatchError(f"the pipeline has no parameter {name}; this patch was made for another architecture") from None


@dataclass(frozen=True)
class WeightDelta:
    """A closed-form or fine-tuned weight edit: ``W <- W + delta`` for each named parameter.

    Attributes:
        deltas: parameter name (``component.module.path.weight``) -> float32 delta.
        manifest: method, config, concepts, family, base fingerprint and measurements.
    """

    deltas: dict[str, torch.Tensor]
    manifest: dict[str, Any] = field(default_factory=dict)

    # ------------------------------------------------------------------ identity
    @property
    def method(self) -> str:
        return str(self.manifest.get("method", "?"))

    @property
    def digest(self) -> str:
        """Content hash of the deltas (identifies the patch)."""
        h = hashlib.sha256()
        for k in sorted(self.deltas):
            h.update(k.encode())
            h.update(self.deltas[k].detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
        return h.hexdigest()[:16]

    # ------------------------------------------------------------------ apply / revert
    def _check(self, pipe: Any, force: bool) -> None:
        fam = family_of(pipe)
        want = self.manifest.get("family")
        if want and want != fam:
            raise PatchError(f"this patch is for a {want} pipeline but the pipeline is {fam}; load the model the patch "
                             "was made for")
        fp = self.manifest.get("base_fingerprint")
        have = get_adapter(pipe).fingerprint()
        if fp and fp != have and not force:
            raise PatchError(f"this patch was made for model {fp} but the pipeline is {have}; use the patch's base "
                             "model, or --force to apply anyway")
        for name, d in self.deltas.items():
            p = _resolve_param(pipe, name)
            if tuple(p.shape) != tuple(d.shape):
                raise PatchError(f"{name} has shape {tuple(p.shape)} but the patch has {tuple(d.shape)}; "
                                 "this patch was made for another model")

    def apply(self, pipe: Any, force: bool = False) -> WeightDelta:
        """Add the deltas to ``pipe`` in place (after checking family, fingerprint and shapes)."""
        self._check(pipe, force)
        if not getattr(pipe, FINGERPRINT_ATTR, None):
            setattr(pipe, FINGERPRINT_ATTR, get_adapter(pipe).fingerprint())
        backups: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            for name, d in self.deltas.items():
                p = _resolve_param(pipe, name)
                backups[name] = p.detach().clone()
                p.add_(d.to(device=p.device, dtype=p.dtype))
        stack = getattr(pipe, STACK_ATTR, None)
        if stack is None:
            stack = []
            setattr(pipe, STACK_ATTR, stack)
        stack.append((self, backups))
        return self

    def revert(self, pipe: Any) -> None:
        """Restore the weights this patch changed, exactly; patches revert in reverse order."""
        stack = getattr(pipe, STACK_ATTR, None) or []
        if not stack or stack[-1][0] is not self:
            if any(p is self for p, _ in stack):
                raise PatchError("revert the patches applied after this one first (patches revert in reverse order)")
            raise PatchError("this patch is not applied to the pipeline")
        _, backups = stack.pop()
        with torch.no_grad():
            for name, w in backups.items():
                _resolve_param(pipe, name).copy_(w)

    @contextlib.contextmanager
    def scoped(self, pipe: Any, force: bool = False) -> Iterator[Any]:
        """``with patch.scoped(pipe): ...`` applies the patch and always reverts it."""
        self.apply(pipe, force=force)
        try:
            yield pipe
        finally:
            self.revert(pipe)

    # ------------------------------------------------------------------ files
    def save(self, folder: str | Path, overwrite: bool = False) -> Path:
        """Write ``patch.safetensors`` + ``patch.json`` into ``folder`` (atomically)."""
        from safetensors.torch import save_file

        from .io import atomic_dir

        with atomic_dir(folder, overwrite=overwrite) as tmp:
            tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in self.deltas.items()}
            save_file(tensors, str(tmp / TENSORS_FILE), metadata={"format": "pt", "erasekit": "weight_delta"})
            manifest = dict(self.manifest)
            manifest.update(format_version=FORMAT_VERSION, kind="weight_delta",
                            tensors={k: list(v.shape) for k, v in tensors.items()},
                            tensors_sha256=hashlib.sha256((tmp / TENSORS_FILE).read_bytes()).hexdigest())
            manifest.pop("manifest_sha256", None)
            manifest["manifest_sha256"] = hashlib.sha256(_canonical(manifest)).hexdigest()
            (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str) + "\n")
        return Path(folder)


def load_patch(folder: str | Path) -> WeightDelta:
    """Read a patch folder written by :meth:`WeightDelta.save`, verifying both files' hashes."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(folder)
    mpath, tpath = folder / MANIFEST_FILE, folder / TENSORS_FILE
    if not folder.is_dir():
        raise PatchError(f"patch folder {folder} does not exist; pass the -o folder of `erasekit erase`")
    for p in (mpath, tpath):
        if not p.is_file():
            raise PatchError(f"{p} is missing; a patch folder holds {MANIFEST_FILE} and {TENSORS_FILE}")
    try:
        manifest = json.loads(mpath.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise PatchError(f"{mpath} is not valid JSON; re-create the patch with `erasekit erase`") from None
    claimed = manifest.pop("manifest_sha256", None)
    if claimed != hashlib.sha256(_canonical(manifest)).hexdigest():
        raise PatchError(f"{mpath} was edited after it was written (hash mismatch); re-create the patch")
    manifest["manifest_sha256"] = claimed
    if manifest.get("format_version") != FORMAT_VERSION or manifest.get("kind") != "weight_delta":
        raise PatchError(f"{folder} is a patch format this erasekit cannot read; upgrade erasekit")
    if hashlib.sha256(tpath.read_bytes()).hexdigest() != manifest.get("tensors_sha256"):
        raise PatchError(f"{tpath} is truncated or modified (hash mismatch); re-create the patch")
    try:
        deltas = load_file(str(tpath))
    except (SafetensorError, OSError) as e:
        raise PatchError(f"{tpath} cannot be read ({e}); re-create the patch") from None
    return WeightDelta(deltas, manifest)


def export_pipeline(pipe: Any, patches: list[WeightDelta], out_dir: str | Path, overwrite: bool = False,
                    force: bool = False) -> Path:
    """Write a full diffusers pipeline with ``patches`` merged; loadable by ``from_pretrained``."""
    from .io import atomic_dir

    applied: list[WeightDelta] = []
    try:
        for p in patches:
            applied.append(p.apply(pipe, force=force))
        with atomic_dir(out_dir, overwrite=overwrite) as tmp:
            pipe.save_pretrained(tmp, safe_serialization=True)
            src = Path(getattr(pipe, "erasekit_source", "") or "")
            if (src / "erasekit.json").is_file():
                meta = json.loads((src / "erasekit.json").read_text())
            else:
                meta = {}
            meta["merged_patches"] = [{"method": p.method, "digest": p.digest,
                                       "concepts": [c.get("target") for c in p.manifest.get("concepts", [])]}
                                      for p in patches]
            if "sampling" not in meta:
                meta["sampling"] = {"num_inference_steps": 50, "guidance_scale": 7.5}
            (tmp / "erasekit.json").write_text(json.dumps(meta, indent=2) + "\n")
    finally:
        for p in reversed(applied):
            p.revert(pipe)
    return Path(out_dir)


def now() -> float:
    return time.perf_counter()


__all__ = ["WeightDelta", "PatchError", "load_patch", "export_pipeline", "InvalidInputError"]
