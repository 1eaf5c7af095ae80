"""Atomic writes: a failed run leaves no half-written file."""

from __future__ import annotations

import contextlib
import glob
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from .errors import OutputPathError


def check_parent(path: str | Path) -> Path:
    """Return ``path`` as a Path after checking that its directory exists."""
    p = Path(path)
    try:
        str(p).encode("utf-8")
    except UnicodeEncodeError:
        raise OutputPathError(f"output path {str(p)!r} holds bytes that are not UTF-8; choose a UTF-8 name") from None
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.is_dir():
        raise OutputPathError(f"output directory {parent} does not exist; create it first or choose another path")
    return p


@contextlib.contextmanager
def atomic_path(path: str | Path, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary file path beside ``path``; rename it over ``path`` only on success.

    The file gets a plain write's mode (``mkstemp`` makes it 0600). With ``overwrite=False`` a file that
    appeared at ``path`` during the run is left alone and the run fails in one line."""
    p = check_parent(path)
    if p.is_dir():
        raise OutputPathError(f"{p} is a folder; name a file to write")
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.{os.getpid()}.", suffix=".tmp", dir=p.parent or ".")
    os.close(fd)
    try:
        yield Path(tmp)
        if p.is_dir():
            raise OutputPathError(f"{p} became a folder while this ran; nothing was written over it")
        # a replaced file keeps its mode; a new one gets a plain write's
        os.chmod(tmp, (p.stat().st_mode & 0o7777) if p.is_file() else 0o666 & ~_umask())
        if overwrite:
            os.replace(tmp, p)
        else:
            _link_new(Path(tmp), p)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


#: the file by which erasekit recognises a folder it wrote itself, listing what it put there
MARKER = ".erasekit-output"


def check_replaceable(path: Path) -> None:
    """Refuse to replace ``path`` unless it is a folder erasekit wrote and holds nothing else."""
    marker = path / MARKER
    if not path.is_dir() or not marker.is_file():
        what = "a file" if path.is_file() else "a folder erasekit did not write"
        raise OutputPathError(f"{path} exists and is {what}; erasekit replaces only its own output folders: "
                              "choose another output path, or move it away yourself")
    try:
        owned = {str(f) for f in json.loads(marker.read_text()).get("files", []) if isinstance(f, str)}
    except (ValueError, AttributeError, TypeError, OSError):
        owned = set()
    extra = sorted(f for f in _files(path) if f not in owned and f != MARKER)
    if extra:
        raise OutputPathError(f"{path} holds files erasekit did not write ({', '.join(extra[:3])}"
                              f"{', ...' if len(extra) > 3 else ''}); choose another output path or move them away")


def _files(folder: Path) -> list[str]:
    """Every file and folder below ``folder``, as paths relative to it."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def check_output(path: str | Path, overwrite: bool, owned: bool = False) -> Path:
    """Check, before any work, that an output folder may be written: its parent exists, and it does
    not exist or may be replaced (``overwrite``, and erasekit wrote it or the caller knows it is
    erasekit's own: ``owned``, for the shipped assets)."""
    p = check_parent(path)
    clean_stale(p)  # first: a killed run may have left the previous output aside
    if p.exists():
        if not overwrite:
            raise OutputPathError(f"{p} already exists; choose another path, or pass --overwrite to replace an "
                                  "output erasekit wrote")
        if not owned:
            check_replaceable(p)
    return p


@contextlib.contextmanager
def atomic_dir(path: str | Path, overwrite: bool = False, owned: bool = False) -> Iterator[Path]:
    """Yield a temporary directory beside ``path``; move it to ``path`` only on success.

    An existing ``path`` is replaced only with ``overwrite`` and only if erasekit wrote it (its
    marker file lists everything in it); the old folder is moved aside first and removed only after
    the new one is in place, so a failure at any point leaves the previous output intact.
    Temporary folders of an earlier run killed before it could clean up are removed first (and a
    previous output it had moved aside is put back).
    """
    p = check_output(path, overwrite, owned)
    tmp = Path(tempfile.mkdtemp(prefix=f".{p.name}.{os.getpid()}.", suffix=".tmp", dir=p.parent or "."))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp's 0700 would stay on the output: give it a plain folder's mode
    old: Path | None = None
    try:
        yield tmp
        (tmp / MARKER).write_text(json.dumps({"files": _files(tmp)}) + "\n")
        _plain_modes(tmp)
        check_output(p, overwrite, owned)  # again: the folder may have appeared (or changed) during the run
        if p.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{p.name}.{os.getpid()}.", suffix=".old.tmp", dir=p.parent or "."))
            os.replace(p, old / p.name)
        os.replace(tmp, p)
    except BaseException:
        if old is not None and not p.exists():
            os.replace(old / p.name, p)  # put the previous output back
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def _plain_modes(folder: Path) -> None:
    """Files and folders as a plain write would make them (some writers, safetensors', use 0600)."""
    mask = _umask()
    for q in folder.rglob("*"):
        if not q.is_symlink():
            os.chmod(q, (0o777 if q.is_dir() else 0o666) & ~mask)


def _link_new(tmp: Path, p: Path) -> None:
    """Move ``tmp`` to ``p`` only if nothing is there, atomically where the filesystem has hard links."""
    try:
        os.link(tmp, p)  # fails, atomically, if p exists
    except FileExistsError:
        raise OutputPathError(f"{p} appeared while this ran; nothing was written over it: choose another path, "
                              "or pass --overwrite") from None
    except OSError:  # no hard links here (some network or FUSE filesystems): check, then rename
        if os.path.lexists(p):
            raise OutputPathError(f"{p} appeared while this ran; nothing was written over it: choose another path, "
                                  "or pass --overwrite") from None
        os.replace(tmp, p)
        return
    os.unlink(tmp)


_UMASK: int | None = None


def _umask() -> int:
    """The process umask, read once (reading it means setting it, which is not safe while threads write)."""
    global _UMASK
    if _UMASK is None:
        _UMASK = os.umask(0)
        os.umask(_UMASK)
    return _UMASK


def clean_stale(path: Path) -> None:
    """Remove temporary siblings of ``path`` left by runs whose process is gone (killed, power loss).
    A previous output that such a run had moved aside, and not yet replaced, is put back first."""
    ours = re.compile(rf"\.{re.escape(path.name)}\.(\d+)\.[A-Za-z0-9_]{{8}}(\.old)?\.tmp")  # mkstemp/mkdtemp names
    found = [(t, m) for t in path.parent.glob(f".{glob.escape(path.name)}.*.tmp") if (m := ours.fullmatch(t.name))]
    for t, m in sorted(found, key=lambda tm: tm[1].group(2) is None):
        if not _alive(int(m.group(1))):
            if t.name.endswith(".old.tmp") and (t / path.name).is_dir() and not path.exists():
                os.replace(t / path.name, path)
            if t.is_dir():
                shutil.rmtree(t, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    t.unlink()


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
