"""The ``Edit`` protocol, the stack of applied edits on a pipeline, and the edit folder format.

An edit is what a method produces and a user keeps. Three kinds share this contract:
``weight_delta`` (``W += delta``), ``lora`` (low-rank adapters, merged while applied) and
``hook`` (a change to how the pipeline encodes or denoises, honoured by erasekit's sampling
loop). Applying pushes ``(edit, undo)`` onto one stack on the pipeline, whatever the kind;
edits revert in reverse order, weights bit for bit.

Folder format 2 (every kind): ``edit.json`` (kind, format version, method, config, concepts,
family, base fingerprint, measurements, the sha256 of every other file, and a hash of the
manifest itself) and ``edit.safetensors`` (the kind's tensors). Format 1 (``patch.json`` +
``patch.safetensors``, weight deltas only) is still read.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable, ClassVar

import torch

from ..adapters import family_of, get_adapter, sampling
from ..adapters.sd import FINGERPRINT_ATTR
from ..errors import ErasekitError, InvalidInputError

FORMAT_VERSION = 2
STACK_ATTR = "_erasekit_stack"
MANIFEST_FILE, TENSORS_FILE = "edit.json", "edit.safetensors"
LEGACY_MANIFEST, LEGACY_TENSORS = "patch.json", "patch.safetensors"

Undo = Callable[[], None]


class PatchError(ErasekitError):
    """An edit cannot be read or does not fit the pipeline."""


EditError = PatchError


def canonical(d: dict[str, Any]) -> bytes:
    """The JSON bytes a manifest's hash is taken over."""
    return json.dumps(d, sort_keys=True, separators=(",", ":"), default=str).encode()


def tensor_digest(h: "hashlib._Hash", tensors: dict[str, torch.Tensor]) -> None:
    for k in sorted(tensors):
        t = tensors[k].detach().to("cpu")
        h.update(k.encode())
        if t.dtype != torch.float32:  # float32 tensors hash as in 0.1, so old patches keep their digests
            h.update(str(t.dtype).encode())
        h.update(t.reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())


def applied(pipe: Any) -> list[tuple["Edit", Undo]]:
    """The pipeline's stack of applied edits, oldest first (empty when none)."""
    return list(getattr(pipe, STACK_ATTR, None) or [])


def resolve_module(pipe: Any, name: str) -> torch.nn.Module:
    """The module ``component.path`` of ``pipe`` (``unet.down_blocks.0...``), as an edit needs it."""
    try:
        return sampling.resolve_module(pipe, name)
    except InvalidInputError:
        raise PatchError(f"the pipeline has no module {name}; this edit was made for another architecture "
                         "or model family") from None


def resolve_param(pipe: Any, name: str) -> torch.nn.Parameter:
    """The parameter ``component.module.path.weight`` of ``pipe``."""
    mod_name, _, pname = name.rpartition(".")
    param = getattr(resolve_module(pipe, mod_name), pname, None)
    if not isinstance(param, torch.nn.Parameter):
        raise PatchError(f"the pipeline has no parameter {name}; this edit was made for another architecture")
    return param


def add_to_params(pipe: Any, deltas: dict[str, torch.Tensor]) -> Undo:
    """``W += delta`` for each named parameter; returns the undo that restores them bit for bit."""
    backups: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for name, d in deltas.items():
            p = resolve_param(pipe, name)
            backups[name] = p.detach().clone()
            p.add_(d.to(device=p.device, dtype=p.dtype))

    def undo() -> None:
        with torch.no_grad():
            for name, w in backups.items():
                resolve_param(pipe, name).copy_(w)

    return undo


class Edit:
    """What every kind of edit offers. Subclasses set ``kind`` and implement ``tensors``,
    ``from_tensors``, ``_apply`` (change the pipeline, return the undo) and, where needed,
    ``_check_fits`` (shapes, modules)."""

    kind: ClassVar[str]
    manifest: dict[str, Any]

    # ------------------------------------------------------------------ identity
    @property
    def method(self) -> str:
        return str(self.manifest.get("method", "?"))

    @property
    def concepts(self) -> list[str]:
        return [str(c.get("target")) for c in self.manifest.get("concepts", [])]

    @property
    def digest(self) -> str:
        """Content hash: the kind, the tensors and whatever else decides what the edit does."""
        h = hashlib.sha256()
        self._digest_into(h)
        return h.hexdigest()[:16]

    def _digest_into(self, h: "hashlib._Hash") -> None:
        h.update(self.kind.encode())
        h.update(canonical({k: self.manifest.get(k) for k in ("method", "config", "concepts", "hook")}))
        tensor_digest(h, self.tensors())

    def tensors(self) -> dict[str, torch.Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], manifest: dict[str, Any]) -> "Edit":  # pragma: no cover
        raise NotImplementedError

    # ------------------------------------------------------------------ apply / revert
    def check(self, pipe: Any, force: bool = False) -> None:
        """Refuse a pipeline of another family, another base model (unless ``force``) or shape."""
        fam = family_of(pipe)
        want = self.manifest.get("family")
        if want and want != fam:
            raise PatchError(f"this {self.kind} edit is for a {want} pipeline but the pipeline is {fam}; load the "
                             "model the edit was made for")
        fp = self.manifest.get("base_fingerprint")
        have = get_adapter(pipe).fingerprint()
        if fp and fp != have and not force:
            raise PatchError(f"this edit was made for model {fp} but the pipeline is {have}; use the edit's base "
                             "model, or --force to apply anyway")
        self._check_fits(pipe)

    def _check_fits(self, pipe: Any) -> None:
        """Kind-specific checks (shapes, module names); nothing by default."""

    def _apply(self, pipe: Any) -> Undo:  # pragma: no cover - abstract
        raise NotImplementedError

    def apply(self, pipe: Any, force: bool = False) -> "Edit":
        """Apply to ``pipe`` in place, on top of the edits already applied; returns ``self``."""
        self.check(pipe, force)
        if not getattr(pipe, FINGERPRINT_ATTR, None):
            setattr(pipe, FINGERPRINT_ATTR, get_adapter(pipe).fingerprint())
        undo = self._apply(pipe)
        stack = getattr(pipe, STACK_ATTR, None)
        if stack is None:
            stack = []
            setattr(pipe, STACK_ATTR, stack)
        stack.append((self, undo))
        return self

    def revert(self, pipe: Any) -> None:
        """Undo this edit exactly; edits revert in reverse order of application."""
        stack = getattr(pipe, STACK_ATTR, None) or []
        if not stack or stack[-1][0] is not self:
            if any(e is self for e, _ in stack):
                raise PatchError("revert the edits applied after this one first (edits revert in reverse order)")
            raise PatchError("this edit is not applied to the pipeline")
        _, undo = stack.pop()
        undo()

    @contextlib.contextmanager
    def scoped(self, pipe: Any, force: bool = False) -> Iterator[Any]:
        """``with edit.scoped(pipe): ...`` applies the edit and always reverts it, also on errors."""
        self.apply(pipe, force=force)
        try:
            yield pipe
        finally:
            self.revert(pipe)

    # ------------------------------------------------------------------ files
    def save(self, folder: str | Path, overwrite: bool = False) -> Path:
        """Write ``edit.json`` + ``edit.safetensors`` into ``folder`` atomically."""
        from safetensors.torch import save_file

        from ..io import atomic_dir

        with atomic_dir(folder, overwrite=overwrite) as tmp:
            tensors = {k: v.detach().to("cpu").contiguous() for k, v in self.tensors().items()}
            save_file(tensors, str(tmp / TENSORS_FILE), metadata={"format": "pt", "erasekit": self.kind})
            manifest = {k: v for k, v in self.manifest.items()
                        if k not in ("manifest_sha256", "files", "tensors_sha256", "format_version")}
            manifest.update(format_version=FORMAT_VERSION, kind=self.kind,
                            tensors={k: list(v.shape) for k, v in tensors.items()},
                            files={TENSORS_FILE: _sha256(tmp / TENSORS_FILE)})
            manifest["manifest_sha256"] = hashlib.sha256(canonical(manifest)).hexdigest()
            (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str) + "\n")
        return Path(folder)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ---------------------------------------------------------------------- registry of kinds
KINDS: dict[str, type[Edit]] = {}


def register_kind(cls: type[Edit]) -> type[Edit]:
    """Register an edit kind (class decorator); a duplicate kind raises."""
    if cls.kind in KINDS:
        raise RuntimeError(f"two edit kinds are registered as {cls.kind!r}")
    KINDS[cls.kind] = cls
    return cls


def _read_manifest(path: Path) -> dict[str, Any]:
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise PatchError(f"{path} is not valid JSON; re-create the edit with `erasekit erase`") from None
    if not isinstance(manifest, dict):
        raise PatchError(f"{path} is not an erasekit manifest; re-create the edit with `erasekit erase`")
    claimed = manifest.pop("manifest_sha256", None)
    if claimed != hashlib.sha256(canonical(manifest)).hexdigest():
        raise PatchError(f"{path} was edited after it was written (hash mismatch); re-create the edit")
    manifest["manifest_sha256"] = claimed
    return manifest


def _load_tensors(path: Path, want_sha: str | None) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        raise PatchError(f"{path} is missing; an edit folder holds {MANIFEST_FILE} and {TENSORS_FILE}")
    if _sha256(path) != want_sha:
        raise PatchError(f"{path} is truncated or modified (hash mismatch); re-create the edit")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise PatchError(f"{path} cannot be read ({e}); re-create the edit") from None


def _migrate_format_1(manifest: dict[str, Any]) -> dict[str, Any]:
    """0.1's UCE token policy 'all' is what is now called 'from_last' ('all' became the original
    script's policy): rename it, so that refitting from the recorded config gives the same edit."""
    cfg = dict(manifest.get("config") or {})
    for key in ("token", "uce_token"):
        if cfg.get(key) == "all":
            cfg[key] = "from_last"
    return {**manifest, "config": cfg, "migrated_from_format": 1}


def load_edit(folder: str | Path) -> Edit:
    """Read an edit folder of any kind (format 2, or a format-1 patch folder), verifying every hash."""
    if not isinstance(folder, (str, Path)):
        raise PatchError(f"an edit folder is a path, not {type(folder).__name__}; pass the -o folder of `erasekit erase`")
    folder = Path(folder)
    if folder.is_file():
        raise PatchError(f"{folder} is a file, not an edit folder; pass the -o folder of `erasekit erase`")
    if not folder.is_dir():
        raise PatchError(f"edit folder {folder} does not exist; pass the -o folder of `erasekit erase`")
    if (folder / MANIFEST_FILE).is_file():
        manifest = _read_manifest(folder / MANIFEST_FILE)
        if manifest.get("format_version") != FORMAT_VERSION or manifest.get("kind") not in KINDS:
            raise PatchError(f"{folder} holds an edit format or kind this erasekit cannot read "
                             f"({manifest.get('kind')!r}, format {manifest.get('format_version')}); upgrade erasekit")
        files = manifest.get("files") or {}
        tensors = _load_tensors(folder / TENSORS_FILE, files.get(TENSORS_FILE))
        return KINDS[manifest["kind"]].from_tensors(tensors, manifest)
    if (folder / LEGACY_MANIFEST).is_file():
        manifest = _read_manifest(folder / LEGACY_MANIFEST)
        if manifest.get("format_version") != 1 or manifest.get("kind") != "weight_delta":
            raise PatchError(f"{folder} is a patch format this erasekit cannot read; upgrade erasekit")
        tensors = _load_tensors(folder / LEGACY_TENSORS, manifest.get("tensors_sha256"))
        return KINDS["weight_delta"].from_tensors(tensors, _migrate_format_1(manifest))
    raise PatchError(f"{folder / MANIFEST_FILE} is missing; an edit folder holds {MANIFEST_FILE} and {TENSORS_FILE}")
