"""Stream training images from the shards data_prep wrote: manifest check, then WebDataset.

Each (rank, worker) reads its own stream of shards, shuffles samples in a buffer, decodes
them to float tensors in [-1, 1], flips at random and batches. With `resampled=True`
every rank draws shards with replacement and yields exactly `batches_per_epoch` batches,
so DDP ranks never wait on one another at the end of an uneven epoch. All randomness
comes from (seed, rank, worker, epoch): the same arguments give the same batches.
"""

from __future__ import annotations

import io
import json
import logging
import math
import random
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info

from pipeline.fileio import sha256_file

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
        raise DataError(f"{path}: unreadable manifest ({e})") from e
    for key in ("format_version", "resolution", "image_format", "splits"):
        if key not in manifest:
            raise DataError(f"{path}: manifest has no '{key}'")
    if manifest["format_version"] not in SUPPORTED_FORMAT_VERSIONS:
        raise DataError(f"{path}: format_version {manifest['format_version']} is not one of {SUPPORTED_FORMAT_VERSIONS}")
    return manifest


def check_shards(shards_dir: str | Path, split: str = "train", verify_sha256: bool = False) -> list[Path]:
    """Paths of the split's shards after checking each against the manifest (size, optionally sha256)."""
    shards_dir = Path(shards_dir)
    manifest = read_manifest(shards_dir)
    where = shards_dir / MANIFEST_NAME
    if split not in manifest["splits"]:
        raise DataError(f"{where}: no split '{split}' (has {', '.join(sorted(manifest['splits']))})")
    entries = manifest["splits"][split]["shards"]
    if not entries:
        raise DataError(f"{where}: split '{split}' has no shards")
    paths = []
    for entry in entries:
        path = shards_dir / entry["name"]
        if not path.is_file():
            raise DataError(f"{path}: shard listed in {where} is missing")
        size = path.stat().st_size
        if size != entry["bytes"]:
            raise DataError(f"{path}: {size} bytes but {where} says {entry['bytes']}; re-run data_prep to repair")
        if verify_sha256 and sha256_file(path) != entry["sha256"]:
            raise DataError(f"{path}: sha256 does not match {where}; re-run data_prep to repair")
        paths.append(path)
    return paths


# ---------------------------------------------------------------- per-worker sample stream

class _CorruptCounter:
    """WebDataset exception handler: log and skip a bad sample, give up past `max_corrupt`."""

    def __init__(self, max_corrupt: int):
        self.max_corrupt, self.count = max_corrupt, 0

    def __call__(self, exn: Exception) -> bool:
        self.count += 1
        log.warning("skipping corrupt sample (%d so far): %s", self.count, exn)
        if self.count > self.max_corrupt:
            raise DataError(f"more than {self.max_corrupt} corrupt samples, last: {_first_line(exn)}; "
                            f"check the shards with `python -m data_prep --verify DIR`")
        return True


class ShardImages(IterableDataset):
    """One worker's stream of (3, H, W) float32 images in [-1, 1]; a new epoch on every iter()."""

    def __init__(self, urls: list[str], *, resolution: int, rank: int, world_size: int, seed: int,
                 shuffle_buffer: int, random_flip: bool, resampled: bool, max_corrupt: int):
        super().__init__()
        self.urls, self.resolution = urls, resolution
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.shuffle_buffer, self.random_flip, self.resampled = shuffle_buffer, random_flip, resampled
        self.handler = _CorruptCounter(max_corrupt)
        self.epoch = -1  # lives on in persistent workers, so each epoch reshuffles

    def _worker(self) -> tuple[int, int]:
        info = get_worker_info()
        return (0, 1) if info is None else (info.id, info.num_workers)

    def shard_urls(self, epoch: int, worker: int, num_workers: int) -> Iterator[dict]:
        """Resampled: endless draws seeded per rank and worker. Else: this slice of one shuffled pass."""
        if self.resampled:
            rng = random.Random(f"shards/{self.seed}/{self.rank}/{worker}/{epoch}")
            while True:
                yield {"url": rng.choice(self.urls)}
        order = list(self.urls)
        random.Random(f"order/{self.seed}/{epoch}").shuffle(order)  # the same order on every rank
        for url in order[self.rank::self.world_size][worker::num_workers]:
            yield {"url": url}

    def __iter__(self) -> Iterator[torch.Tensor]:
        self.epoch += 1
        worker, num_workers = self._worker()
        rng = random.Random(f"samples/{self.seed}/{self.rank}/{worker}/{self.epoch}")
        samples = wds.tarfile_samples(self.shard_urls(self.epoch, worker, num_workers), handler=self.handler)
        if self.shuffle_buffer > 1:
            samples = wds.shuffle(self.shuffle_buffer, min(self.shuffle_buffer, 100), rng=rng)(samples)
        for sample in samples:
            try:
                image = self.decode(sample)
            except Exception as exn:
                self.handler(ValueError(f"{sample.get('__url__')}: sample {sample.get('__key__')}: {exn}"))
                continue
            if self.random_flip and rng.random() < 0.5:
                image = image[:, ::-1]
            yield torch.from_numpy(image.transpose(2, 0, 1).astype(np.float32) / 127.5 - 1.0)

    def decode(self, sample: dict) -> np.ndarray:
        """Image bytes of one sample -> (H, W, 3) uint8, checked against the manifest's resolution."""
        ext = next((e for e in IMAGE_EXTENSIONS if e in sample), None)
        if ext is None:
            raise ValueError(f"no image in sample (has {sorted(k for k in sample if not k.startswith('__'))})")
        with Image.open(io.BytesIO(sample[ext])) as img:
            image = np.asarray(img.convert("RGB"))
        if image.shape != (self.resolution, self.resolution, 3):
            raise ValueError(f"image is {image.shape}, manifest says {self.resolution}x{self.resolution}x3")
        return image


def _stack(images: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack(images)


# ---------------------------------------------------------------- the loader

class ImageLoader:
    """Iterable of (batch_size, 3, H, W) float32 batches; len() is the batches per epoch when fixed."""

    def __init__(self, loader, batches_per_epoch: int | None, manifest: dict):
        self.loader, self.batches_per_epoch, self.manifest = loader, batches_per_epoch, manifest

    def __len__(self) -> int:
        if self.batches_per_epoch is None:
            raise TypeError("a single non-resampled pass has no fixed length")
        return self.batches_per_epoch

    def __iter__(self) -> Iterator[torch.Tensor]:
        try:
            yield from self.loader
        except DataError as e:  # from a worker, DataLoader prepends the worker's traceback
            raise DataError(_first_line(e, last=True)) from None


def _first_line(exn: Exception, last: bool = False) -> str:
    lines = [line for line in str(exn).splitlines() if line.strip()]
    if not lines:
        return type(exn).__name__
    if last:  # "pipeline.data.DataError: <message>" is the last line of a re-raised worker traceback
        return lines[-1].split("DataError: ", 1)[-1]
    return lines[0]


def make_loader(shards_dir, *, split="train", batch_size: int, rank: int = 0, world_size: int = 1,
                num_workers: int = 0, seed: int = 0, shuffle_buffer: int = 1000, random_flip: bool = True,
                resampled: bool = True, batches_per_epoch: int | None = None, max_corrupt: int = 100,
                pin_memory: bool | None = None) -> ImageLoader:
    """Batches of (batch_size, 3, H, W) float32 in [-1, 1] for one rank; batch_size is per rank.

    resampled=True: shards drawn with replacement, exactly `batches_per_epoch` batches per
    iteration on every rank (default: one pass over the split's samples across all ranks).
    resampled=False: one pass over this rank's share of shards (last batch may be partial),
    or `batches_per_epoch` batches from repeated passes if given.
    """
    if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size or num_workers < 0:
        raise ValueError(f"bad loader arguments: batch_size={batch_size} rank={rank} "
                         f"world_size={world_size} num_workers={num_workers}")
    paths = check_shards(shards_dir, split)
    manifest = read_manifest(shards_dir)
    if not resampled and len(paths) < world_size:
        raise DataError(f"{Path(shards_dir) / MANIFEST_NAME}: split '{split}' has {len(paths)} shard(s) for "
                        f"{world_size} ranks; re-run data_prep with a smaller --shard-size")
    if resampled and batches_per_epoch is None:
        batches_per_epoch = max(1, math.ceil(manifest["splits"][split]["num_samples"] / (batch_size * world_size)))

    dataset = ShardImages([str(p) for p in paths], resolution=manifest["resolution"], rank=rank,
                          world_size=world_size, seed=seed, shuffle_buffer=shuffle_buffer,
                          random_flip=random_flip, resampled=resampled, max_corrupt=max_corrupt)
    # a partial batch only ends a single pass; a fixed-length epoch always has full batches
    batches = wds.DataPipeline(dataset, wds.batched(batch_size, collation_fn=_stack,
                                                    partial=batches_per_epoch is None))
    if batches_per_epoch is not None:
        # each worker makes its share; DataLoader interleaves workers in order, so the cut is deterministic
        batches = batches.with_epoch(nbatches=math.ceil(batches_per_epoch / max(1, num_workers)))
    if pin_memory is None:
        pin_memory = torch.cuda.is_available()
    loader = wds.WebLoader(batches, batch_size=None, num_workers=num_workers, pin_memory=pin_memory,
                           persistent_workers=num_workers > 0, prefetch_factor=2 if num_workers > 0 else None)
    if batches_per_epoch is not None:
        loader = loader.with_epoch(nbatches=batches_per_epoch)
    return ImageLoader(loader, batches_per_epoch, manifest)
