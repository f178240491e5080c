"""The shard manifest data_prep writes: the one reader, and the check of a split's shards against it.

Imports no torch and no webdataset: the trainer's pre-flight check and evaluation use it as the
loader does. data_prep writes the format (data_prep.shards); tests/test_data_prep.py checks that
its constants agree with these.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from pipeline.core.fileio import atomic_write_json, sha256_file

log = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
SUPPORTED_FORMAT_VERSIONS = (1,)
IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp")


class DataError(Exception):
    """Shards that cannot be trained on; the message is one line naming the file."""


# ---------------------------------------------------------------- manifest


def read_manifest(shards_dir: str | Path) -> dict:
    """Load and sanity-check `<shards_dir>/manifest.json`; raises DataError."""
    path = Path(shards_dir) / MANIFEST_NAME
    if not path.is_file():
        raise DataError(f"{path}: no manifest (run `python -m data_prep ... --out {shards_dir}` first)")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: unreadable manifest ({getattr(e, 'strerror', None) or e})") from None
    if not isinstance(manifest, dict):
        raise DataError(f"{path}: expected a JSON object, got a {type(manifest).__name__}; re-run data_prep to repair")
    for key in ("format_version", "resolution", "image_format", "splits"):
        if key not in manifest:
            raise DataError(f"{path}: manifest has no '{key}'")
    if manifest["format_version"] not in SUPPORTED_FORMAT_VERSIONS:
        raise DataError(
            f"{path}: format_version {manifest['format_version']} is not one of {SUPPORTED_FORMAT_VERSIONS}"
        )
    return manifest


def check_shards(
    shards_dir: str | Path, split: str = "train", verify_sha256: bool = False, manifest: dict | None = None
) -> list[Path]:
    """Paths of the split's shards after checking each against the manifest: size, then sha256 if asked.

    Hashing costs one read of the split: 5.9 GB for 30,000 256 px images (raw size, an upper bound
    for their PNGs) at 1.1 GB/s is about 5 s, measured on this project's 2-core CPU. It is done
    before training rather than while streaming: a streamed check can only judge a shard at its
    end, so its samples would have to wait in memory (a shard per worker per rank), and every
    resampled pass would hash again. The cost is paid once: each verified shard's (size, mtime,
    inode) is cached in `<shards_dir>/.verified.json`, so every later start (and every rank after
    the first) only stats. `python -m data_prep --verify` re-hashes regardless (bit rot that keeps
    the mtime). `manifest`: the one already read from shards_dir, so it is not read twice.
    """
    shards_dir = Path(shards_dir)
    manifest = manifest if manifest is not None else read_manifest(shards_dir)
    where = shards_dir / MANIFEST_NAME
    if split not in manifest["splits"]:
        raise DataError(f"{where}: no split '{split}' (has {', '.join(sorted(manifest['splits']))})")
    entries = manifest["splits"][split]["shards"]
    if not entries:
        raise DataError(f"{where}: split '{split}' has no shards")
    paths = []
    for entry in entries:  # the cheap checks for every shard before minutes of hashing
        path = shards_dir / entry["name"]
        if not path.is_file():
            raise DataError(f"{path}: shard listed in {where} is missing" + (" (not a file)" if path.exists() else ""))
        size = path.stat().st_size
        if size != entry["bytes"]:
            raise DataError(f"{path}: {size} bytes but {where} says {entry['bytes']}; re-run data_prep to repair")
        paths.append(path)
    if verify_sha256:
        cache = _VerifiedCache(shards_dir)
        for path, entry in zip(paths, entries):
            if not cache.verified(path, entry["sha256"]):
                raise DataError(
                    f"{path}: sha256 does not match {where} (the shard is damaged); "
                    f"re-run the same data_prep command to rebuild it"
                )
        cache.save()
    return paths


class _VerifiedCache:
    """sha256 results keyed by (size, mtime_ns, inode): a shard is re-hashed only when it changed.

    Stored beside the manifest when that directory is writable; otherwise kept for this process.
    """

    NAME = ".verified.json"

    def __init__(self, shards_dir: Path):
        self.path, self.dirty = shards_dir / self.NAME, False
        try:
            self.entries = json.loads(self.path.read_text())
            if not isinstance(self.entries, dict):
                self.entries = {}
        except (OSError, ValueError):
            self.entries = {}  # none yet, or damaged: it only saves time, so start over

    def verified(self, path: Path, sha256: str) -> bool:
        st = path.stat()
        stamp = [st.st_size, st.st_mtime_ns, st.st_ino, sha256]
        if self.entries.get(path.name) == stamp:
            return True
        if sha256_file(path) != sha256:
            self.entries.pop(path.name, None)
            self.save()  # keep what was verified before this shard
            return False
        self.entries[path.name], self.dirty = stamp, True
        return True

    def save(self) -> None:
        if not self.dirty:
            return
        try:
            atomic_write_json(self.path, self.entries)
            self.dirty = False
        except OSError as e:
            log.warning("%s: cannot cache shard hashes (%s); they are re-hashed on every start", self.path, e)
