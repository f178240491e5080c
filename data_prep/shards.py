"""WebDataset shards written atomically and byte-for-byte reproducibly, plus the manifest.

A shard is a plain POSIX tar with members `<key>.<ext>`; every header field that could
vary between runs (mtime, owner, mode) is fixed, so the same samples give the same sha256.
Shards and the manifest appear under their final name only when whole (tmp, fsync, rename).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from dataclasses import asdict, dataclass
from pathlib import Path

# The file helpers are pipeline's, which import nothing but the standard library (data_prep stays free of torch).
from pipeline.core.fileio import fsync_dir, sha256_file

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
TAR_MTIME = 946684800  # 2000-01-01: a fixed timestamp keeps tar bytes independent of when they were made
_TMP_MARK = ".tmp-"


@dataclass
class ShardInfo:
    name: str
    num_samples: int
    bytes: int
    sha256: str


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


def tmp_path(path: Path) -> Path:
    """Hidden temporary sibling, so a half-written file never matches `*.tar`."""
    return path.with_name(f".{path.name}{_TMP_MARK}{os.getpid()}")


def remove_stale_tmp(out_dir: Path) -> None:
    """Delete temporaries left behind by a killed run: shards' and pipeline.core.fileio's (manifest, journal)."""
    for pattern in (f".*{_TMP_MARK}*", ".*.tmp"):
        for p in out_dir.glob(pattern):
            p.unlink(missing_ok=True)


class _HashingFile:
    """File wrapper that hashes and counts what tarfile writes through it."""

    def __init__(self, f):
        self.f, self.sha = f, hashlib.sha256()
        self.count = 0

    def write(self, data):
        self.sha.update(data)
        self.count += len(data)
        return self.f.write(data)

    def tell(self):
        return self.count


class ShardWriter:
    """Stream samples into `<out_dir>/<name>` via a temporary file; `close()` commits it."""

    def __init__(self, out_dir: Path, name: str):
        self.path = out_dir / name
        self.tmp = tmp_path(self.path)
        self._file = open(self.tmp, "wb")
        self._hashing = _HashingFile(self._file)
        self._tar = tarfile.open(fileobj=self._hashing, mode="w", format=tarfile.USTAR_FORMAT)
        self.num_samples = 0

    def add(self, key: str, files: dict[str, bytes]) -> None:
        """One sample: `files` maps extension ('png', 'json') to bytes, written in sorted order."""
        for ext in sorted(files):
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mtime, info.mode = len(files[ext]), TAR_MTIME, 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            self._tar.addfile(info, io.BytesIO(files[ext]))
        self.num_samples += 1

    def close(self) -> ShardInfo:
        self._tar.close()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.replace(self.tmp, self.path)
        fsync_dir(self.path.parent)
        return ShardInfo(self.path.name, self.num_samples, self._hashing.count, self._hashing.sha.hexdigest())

    def abort(self) -> None:
        try:
            self._file.close()  # may fail again flushing onto a full disk
        except OSError:
            pass
        self.tmp.unlink(missing_ok=True)


def check_shard(out_dir: Path, info: dict, hash_bytes: bool = True) -> str | None:
    """None if the shard on disk matches its manifest entry, else the reason it does not."""
    path = out_dir / info["name"]
    if not path.is_file():
        return f"{path}: missing"
    size = path.stat().st_size
    if size != info["bytes"]:
        return f"{path}: {size} bytes, manifest says {info['bytes']}"
    if hash_bytes and sha256_file(path) != info["sha256"]:
        return f"{path}: sha256 differs from the manifest"
    return None


def verify(out_dir: Path) -> tuple[int, list[str]]:
    """Re-hash every shard listed in the manifest: (number checked, problems found)."""
    manifest = json.loads((out_dir / MANIFEST_NAME).read_text())
    problems, checked = [], 0
    for split in manifest["splits"].values():
        for info in split["shards"]:
            checked += 1
            problem = check_shard(out_dir, info)
            if problem:
                problems.append(problem)
    return checked, problems


def shard_info_dict(info: ShardInfo) -> dict:
    return asdict(info)
