"""Images in: generated samples from an .npz, real ones decoded straight from a shard split's tars."""

from __future__ import annotations

import io
import tarfile
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.core import manifest


class EvaluateError(Exception):
    """A user error (file, split, flag): printed as one line by main, exit code 2."""


def load_samples(path) -> np.ndarray:
    """samples.npz -> uint8 (N, H, W, 3) from its `images` array."""
    path = Path(path)
    try:
        loaded = np.load(path)
        if not isinstance(loaded, np.lib.npyio.NpzFile):
            raise ValueError(f"a {type(loaded).__name__}, not an .npz archive")
        with loaded as npz:
            if "images" not in npz:
                raise EvaluateError(f"{path}: no 'images' array (has: {', '.join(npz.files) or 'nothing'})")
            images = npz["images"]
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        reason = getattr(e, "strerror", None) or str(e) or f"{type(e).__name__}: empty or truncated"
        raise EvaluateError(f"{path}: cannot read as .npz ({reason})") from None
    return check_images(images, f"{path}:images")


def check_images(images: np.ndarray, what: str) -> np.ndarray:
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3) or len(images) < 2:
        raise EvaluateError(f"{what}: expected uint8 (N>=2, H, W, 1|3), got {images.dtype} {tuple(images.shape)}")
    return np.repeat(images, 3, axis=-1) if images.shape[-1] == 1 else images


def read_manifest(shards_dir) -> dict:
    try:
        return manifest.read_manifest(shards_dir)
    except manifest.DataError as e:
        raise EvaluateError(str(e)) from None


def check_split(shards_dir, split: str) -> None:
    """The split's shards match the manifest (size and sha256, cached as for training)."""
    try:
        manifest.check_shards(shards_dir, split, verify_sha256=True)
    except manifest.DataError as e:
        raise EvaluateError(str(e)) from None


def read_split(shards_dir, split: str, max_images: int | None = None, seed: int = 0) -> np.ndarray:
    """Decode a split's images straight from its tars -> uint8 (N, H, W, 3).

    With more images than max_images, a seeded random subset (same every call) is taken,
    so the reference is not biased towards the first shards.
    """
    shards_dir = Path(shards_dir)
    splits = read_manifest(shards_dir).get("splits", {})
    if split not in splits or not splits[split].get("shards"):
        raise EvaluateError(
            f"{shards_dir}/manifest.json: no '{split}' split with shards "
            f"(has: {', '.join(s for s in splits if splits[s].get('shards')) or 'none'})"
        )
    check_split(shards_dir, split)
    shards = splits[split]["shards"]
    total = sum(s["num_samples"] for s in shards)
    keep = None
    if max_images is not None and total > max_images:
        keep = set(np.random.default_rng(seed).choice(total, max_images, replace=False).tolist())
    images, index = [], 0
    for shard in shards:
        path = shards_dir / shard["name"]
        try:
            with tarfile.open(path) as tar:
                for member in tar:
                    ext = member.name.rpartition("/")[2].partition(".")[2]  # webdataset: key.ext
                    if ext.lower() not in manifest.IMAGE_EXTENSIONS:
                        continue
                    if keep is None or index in keep:
                        images.append(_decode(tar.extractfile(member).read(), f"{path}:{member.name}"))
                    index += 1
        except (OSError, tarfile.TarError) as e:
            raise EvaluateError(f"{path}: unreadable shard ({e})") from e
    if not images:
        raise EvaluateError(f"{shards_dir}: split '{split}' holds no images")
    if len({im.shape for im in images}) > 1:
        raise EvaluateError(f"{shards_dir}: split '{split}' mixes image sizes {sorted({im.shape for im in images})}")
    return np.stack(images)


def _decode(data: bytes, what: str) -> np.ndarray:
    try:
        return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    except Exception as e:  # PIL raises many types for a bad image
        raise EvaluateError(f"{what}: cannot decode image ({e})") from e
