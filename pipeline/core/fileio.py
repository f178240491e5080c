"""Atomic file writes: a reader sees the old file or the whole new one, never half of it.

The standard library only: data_prep (free of torch) writes its manifest and journal through it too.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import tempfile
from pathlib import Path


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a rename inside `path` durable (the directory entry is what changed)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


class NoSpaceError(OSError):
    """The disk filled up while writing `path`; the partial file has been removed."""

    def __init__(self, path: str | os.PathLike):
        super().__init__(errno.ENOSPC, "no space left on device", str(path))

    def __str__(self) -> str:
        return f"{self.filename}: no space left on device (the partial file was removed)"


_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def name_disk_full(error: BaseException, path: str | os.PathLike) -> BaseException:
    """A full disk (or quota) as NoSpaceError(path); any other error unchanged.

    Python's ENOSPC from write() or fsync() carries no file name, and a user needs to know which.
    """
    return NoSpaceError(path) if getattr(error, "errno", None) in _DISK_FULL else error


class _RecordingFile:
    """A file whose write errors are remembered: torch.save turns them into a bare RuntimeError."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, data) -> int:
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self) -> None:
        self.f.flush()


@contextlib.contextmanager
def atomic_writer(path: str | os.PathLike):
    """Yield a binary file beside `path`; on success fsync it and rename it over `path`.

    On any failure the temporary file is removed; a full disk is reported as NoSpaceError(path).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    f = None
    try:
        with os.fdopen(fd, "wb") as raw:
            f = _RecordingFile(raw)
            yield f
            raw.flush()
            os.fsync(raw.fileno())
        # mkstemp creates 0600; a model others on the cluster cannot read is no use to them.
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        recorded = f.error if f is not None else None
        if any(getattr(x, "errno", None) in _DISK_FULL for x in (e, recorded)):
            raise NoSpaceError(path) from None
        raise
    fsync_dir(path.parent)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to a temporary name beside `path`, fsync it, then rename over `path`."""
    with atomic_writer(path) as f:
        f.write(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
