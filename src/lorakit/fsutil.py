"""Atomic writes: a crash or a full disk mid-save leaves the previous file or directory intact."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

from lorakit.errors import LorakitError


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _fsync_tree(root: Path) -> None:
    """fsync every file under `root` (subdirectories included), then the directories themselves."""
    for dirpath, _dirnames, filenames in os.walk(root):
        for name in filenames:
            with open(os.path.join(dirpath, name), "rb") as fh:
                os.fsync(fh.fileno())
        _fsync_dir(Path(dirpath))


def _is_write_error(e: BaseException) -> bool:
    """An OS-level write failure (full disk, permissions, I/O error), also when safetensors reports it."""
    return isinstance(e, OSError) or (type(e).__name__ == "SafetensorError" and "I/O error" in str(e))


class WriteFailed(LorakitError, OSError):
    """A failed atomic write (full disk, permissions ...): both a LorakitError and an OSError (with its errno)."""


def write_failed(path: Path, e: BaseException, existed: bool, hint: str = "") -> WriteFailed:
    """The error for a failed atomic write: what failed, and that nothing half-written was left behind."""
    state = (f"{path} still holds its previous complete contents" if existed
             else f"{path} was not created")
    error = WriteFailed(f"Could not write {path} ({e}). Nothing was half-written: {state} and the partial copy was "
                        f"removed. {hint or 'Free disk space (or fix permissions) and try again.'}")
    error.errno = getattr(e, "errno", None)
    return error


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike, hint: str = "") -> Iterator[Path]:
    """Yield an empty temporary directory next to `path`; on success it replaces `path` in one rename.

    If `path` already exists it is moved aside first and deleted only after the new one is in place, so at every
    moment either the old or the new complete directory exists (`.<name>.old` holds the old one in between).
    A write failure (e.g. a full disk) raises LorakitError saying the previous copy is intact; `hint` is the next step.
    """
    path = Path(path)
    existed = path.exists()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    except OSError as e:
        raise write_failed(path, e, existed, hint) from e
    try:
        yield tmp
        _fsync_tree(tmp)
        old = path.parent / f".{path.name}.old"
        if old.exists():
            shutil.rmtree(old)
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
        shutil.rmtree(old, ignore_errors=True)
    except Exception as e:
        if _is_write_error(e):
            cause = e.__cause__ if isinstance(e, WriteFailed) else e  # a nested atomic write: report the root cause
            raise write_failed(path, cause, existed, hint) from cause
        raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    existed = path.exists()
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    except OSError as e:
        raise write_failed(path, e, existed) from e
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as e:
        raise write_failed(path, e, existed) from e
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_json(path: str | os.PathLike, data: Any) -> None:
    Path(path).write_text(json.dumps(data, indent=2, sort_keys=False) + "\n", encoding="utf-8")


def require_finite(tensors: dict, what: str) -> None:
    """Refuse to write NaN/inf weights: a non-finite checkpoint or adapter would replace a good one on disk."""
    import torch

    bad = [name for name, t in tensors.items() if torch.is_tensor(t) and t.is_floating_point()
           and not bool(torch.isfinite(t.detach()).all())]
    if bad:
        raise LorakitError(f"Not writing {what}: {len(bad)} tensor(s) hold NaN or inf (first: {bad[0]}). Nothing on "
                           "disk was changed; the previous checkpoint or adapter is intact. Lower the learning rate "
                           "or check the data, then train again from the last good checkpoint.")
