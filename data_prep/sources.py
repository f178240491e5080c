"""Enumerate the images of a source: a folder (recursively) or a .zip archive.

Every input is named by its path relative to the source (POSIX slashes), which is what
the manifest, the per-sample json and the train/val split use. Files are chosen by
extension only: a text file named `.jpg` is an input, and is later skipped with a reason.
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif"}


class SourceError(Exception):
    """A source that cannot be read at all (missing path, not a folder or zip)."""


@dataclass(frozen=True)
class Source:
    """A folder or zip of images; `names` sorted, `fingerprint` changes if any input does."""

    kind: str  # "folder" | "zip"
    path: Path
    names: tuple[str, ...]
    fingerprint: str


def _wanted(name: str, match: str | None) -> bool:
    parts = name.split("/")
    # macOS archives carry `__MACOSX/` resource forks and `._x.jpg` shadows; dot-folders are never data.
    if parts[0] == "__MACOSX" or any(p.startswith(".") for p in parts):
        return False
    if os.path.splitext(name)[1].lower() not in IMAGE_EXTENSIONS:
        return False
    return match is None or fnmatch.fnmatch(name, match)


def open_source(path: str | Path, match: str | None = None) -> Source:
    """List the image files of a folder or zip, sorted by name. Raises SourceError."""
    path = Path(path)
    if not path.exists():
        raise SourceError(f"--src {path}: no such file or directory")
    if not os.access(path, os.R_OK | (os.X_OK if path.is_dir() else 0)):
        raise SourceError(f"--src {path}: permission denied")
    digest = hashlib.sha256()
    if path.is_dir():
        entries = []
        for root, dirs, files in os.walk(path, onerror=_raise):
            dirs.sort()
            for f in files:
                full = os.path.join(root, f)
                name = Path(full).relative_to(path).as_posix()
                if _wanted(name, match):
                    st = os.stat(full)
                    entries.append((name, f"{st.st_size}:{st.st_mtime_ns}"))
        kind = "folder"
    elif zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as zf:
                entries = [
                    (i.filename, f"{i.file_size}:{i.CRC}")
                    for i in zf.infolist()
                    if not i.is_dir() and _wanted(i.filename, match)
                ]
        except (OSError, zipfile.BadZipFile) as e:
            raise SourceError(f"--src {path}: cannot read zip ({e})") from e
        kind = "zip"
    else:
        raise SourceError(f"--src {path}: not a folder or a .zip archive")
    entries.sort()
    for name, stamp in entries:
        digest.update(f"{name}\0{stamp}\n".encode())
    return Source(kind, path.resolve(), tuple(n for n, _ in entries), digest.hexdigest())


def _raise(err: OSError):
    raise SourceError(f"--src {err.filename}: {err.strerror}")


# One open ZipFile per process: pool workers read many members of the same archive.
_open_zips: dict[Path, zipfile.ZipFile] = {}


def read_bytes(kind: str, root: Path, name: str) -> bytes:
    """Raw bytes of one input; OSError / zipfile errors propagate to the caller."""
    if kind == "folder":
        return (root / name).read_bytes()
    zf = _open_zips.get(root)
    if zf is None:
        zf = _open_zips[root] = zipfile.ZipFile(root)
    return zf.read(name)
