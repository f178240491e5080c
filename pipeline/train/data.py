"""Stream training images from the shards data_prep wrote: manifest check (pipeline.core.manifest), then WebDataset.

Each (rank, worker) reads its own stream of shards, shuffles samples in a buffer, decodes
them to float tensors in [-1, 1], flips at random and batches. With `resampled=True`
every rank draws shards with replacement and yields exactly `batches_per_epoch` batches,
so DDP ranks never wait on one another at the end of an uneven epoch. All randomness
comes from (seed, rank, worker, epoch): the same arguments give the same batches.
"""

from __future__ import annotations

import io
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

from pipeline.core.manifest import IMAGE_EXTENSIONS, MANIFEST_NAME, DataError, check_shards, read_manifest

log = logging.getLogger(__name__)

# ---------------------------------------------------------------- per-worker sample stream


class _Rejected:
    """WebDataset exception handler and decode-failure sink: log the sample, keep it for the batch."""

    def __init__(self):
        self.pending: list[str] = []

    def __call__(self, exn: Exception) -> bool:
        message = _first_line(exn)
        log.warning("skipping corrupt sample: %s", message)
        self.pending.append(message)
        return True  # go on: ImageLoader (or the training loop, over all ranks) decides when to stop

    def take(self) -> list[str]:
        taken, self.pending = self.pending, []
        return taken


class ShardImages(IterableDataset):
    """One worker's stream of ((3, H, W) float32 image in [-1, 1], [rejected samples before it]).

    A new epoch on every iter(). Samples the tar reader or the decoder rejects are not trained on:
    each is logged as "<shard>: sample <key>: <reason>" and rides along with the next image, so the
    count reaches the main process (and metrics.jsonl) from DataLoader workers too.
    """

    def __init__(
        self,
        urls: list[str],
        *,
        resolution: int,
        rank: int,
        world_size: int,
        seed: int,
        shuffle_buffer: int,
        random_flip: bool,
        resampled: bool,
        max_corrupt: int | None = None,
    ):
        super().__init__()
        self.urls, self.resolution = urls, resolution
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.shuffle_buffer, self.random_flip, self.resampled = shuffle_buffer, random_flip, resampled
        self.handler, self.max_corrupt = _Rejected(), max_corrupt
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
        for url in order[self.rank :: self.world_size][worker::num_workers]:
            yield {"url": url}

    def __iter__(self) -> Iterator[tuple[torch.Tensor, list[str]]]:
        self.epoch += 1
        worker, num_workers = self._worker()
        rng = random.Random(f"samples/{self.seed}/{self.rank}/{worker}/{self.epoch}")
        samples = wds.tarfile_samples(self.shard_urls(self.epoch, worker, num_workers), handler=self.handler)
        if self.shuffle_buffer > 1:
            samples = wds.shuffle(self.shuffle_buffer, min(self.shuffle_buffer, 100), rng=rng)(samples)
        held = None  # one image behind, so rejects after the last image still ride with one
        for sample in samples:
            try:
                image = self.decode(sample)
            except Exception as exn:
                self.handler(ValueError(f"{sample.get('__url__')}: sample {sample.get('__key__')}: {exn}"))
                if self.max_corrupt is not None and len(self.handler.pending) > max(self.max_corrupt, 1000):
                    # nothing decodes at all: no batch would ever carry the count out of this worker
                    raise DataError(
                        f"more than {self.max_corrupt} corrupt samples in a row, last: "
                        f"{self.handler.pending[-1]}; check the shards with `python -m data_prep --verify DIR`"
                    )
                continue
            if self.random_flip and rng.random() < 0.5:
                image = image[:, ::-1]
            if held is not None:
                yield held, self.handler.take()
            held = torch.from_numpy(image.transpose(2, 0, 1).astype(np.float32) / 127.5 - 1.0)
        if held is not None:
            yield held, self.handler.take()

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


def _stack(samples: list[tuple[torch.Tensor, list[str]]]) -> tuple[torch.Tensor, list[str]]:
    return torch.stack([image for image, _ in samples]), [m for _, rejected in samples for m in rejected]


# ---------------------------------------------------------------- the loader


class ImageLoader:
    """Iterable of (batch_size, 3, H, W) float32 batches; len() is the batches per epoch when fixed.

    `rejected` counts the samples skipped as corrupt so far; past `max_corrupt` (None: no limit,
    the caller decides, as the training loop does over all ranks) iterating raises DataError.
    """

    def __init__(self, loader, batches_per_epoch: int | None, manifest: dict, max_corrupt: int | None):
        self.loader, self.batches_per_epoch, self.manifest = loader, batches_per_epoch, manifest
        self.max_corrupt, self.rejected, self.last_rejected = max_corrupt, 0, ""
        self._untaken = 0

    def __len__(self) -> int:
        if self.batches_per_epoch is None:
            raise TypeError("a single non-resampled pass has no fixed length")
        return self.batches_per_epoch

    def __iter__(self) -> Iterator[torch.Tensor]:
        try:
            for images, rejected in self.loader:
                if rejected:
                    self.rejected, self._untaken, self.last_rejected = (
                        self.rejected + len(rejected),
                        self._untaken + len(rejected),
                        rejected[-1],
                    )
                    if self.max_corrupt is not None and self.rejected > self.max_corrupt:
                        raise DataError(
                            f"more than {self.max_corrupt} corrupt samples, last: {self.last_rejected}; "
                            f"check the shards with `python -m data_prep --verify DIR`"
                        )
                yield images
        except DataError as e:  # from a worker, DataLoader prepends the worker's traceback
            raise DataError(_first_line(e, last=True)) from None

    def take_rejected(self) -> int:
        """Corrupt samples skipped since the last call."""
        taken, self._untaken = self._untaken, 0
        return taken

    def forever(self, skip: int = 0) -> "Batches":
        """Endless epochs (each resampled epoch has the same length on every rank), less the first `skip`."""
        return Batches(self, skip)


def _epochs(loader: ImageLoader) -> Iterator[torch.Tensor]:
    while True:
        yield from loader


class Batches:
    """next() gives the next batch of an ImageLoader's endless epochs; `.loader` counts the rejects."""

    def __init__(self, loader: ImageLoader, skip: int = 0):
        # No reference back to self from the generator: dropping a Batches must free the DataLoader
        # iterator at once, which stops its workers (they block SIGTERM, so exit could not kill them).
        self.loader, self._stream = loader, _epochs(loader)
        for _ in range(skip):
            next(self._stream)

    def __iter__(self) -> "Batches":
        return self

    def __next__(self) -> torch.Tensor:
        return next(self._stream)


def _first_line(exn: Exception, last: bool = False) -> str:
    lines = [line for line in str(exn).splitlines() if line.strip()]
    if not lines:
        return type(exn).__name__
    if last:  # "pipeline.train.data.DataError: <message>" is the last line of a re-raised worker traceback
        return lines[-1].split("DataError: ", 1)[-1]
    return lines[0]


def make_loader(
    shards_dir,
    *,
    split="train",
    batch_size: int,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 0,
    seed: int = 0,
    shuffle_buffer: int = 1000,
    random_flip: bool = True,
    resampled: bool = True,
    batches_per_epoch: int | None = None,
    max_corrupt: int | None = 100,
    pin_memory: bool | None = None,
    verify_sha256: bool = True,
) -> ImageLoader:
    """Batches of (batch_size, 3, H, W) float32 in [-1, 1] for one rank; batch_size is per rank.

    resampled=True: shards drawn with replacement, exactly `batches_per_epoch` batches per
    iteration on every rank (default: one pass over the split's samples across all ranks).
    resampled=False: one pass over this rank's share of shards (last batch may be partial),
    or `batches_per_epoch` batches from repeated passes if given.
    verify_sha256: hash the shards against the manifest first (cached, see `check_shards`).
    """
    if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size or num_workers < 0:
        raise ValueError(
            f"bad loader arguments: batch_size={batch_size} rank={rank} "
            f"world_size={world_size} num_workers={num_workers}"
        )
    manifest = read_manifest(shards_dir)
    paths = check_shards(shards_dir, split, verify_sha256, manifest=manifest)
    if not resampled and len(paths) < world_size:
        raise DataError(
            f"{Path(shards_dir) / MANIFEST_NAME}: split '{split}' has {len(paths)} shard(s) for "
            f"{world_size} ranks; re-run data_prep with a smaller --shard-size"
        )
    if resampled and batches_per_epoch is None:
        batches_per_epoch = max(1, math.ceil(manifest["splits"][split]["num_samples"] / (batch_size * world_size)))

    dataset = ShardImages(
        [str(p) for p in paths],
        resolution=manifest["resolution"],
        rank=rank,
        world_size=world_size,
        seed=seed,
        shuffle_buffer=shuffle_buffer,
        random_flip=random_flip,
        resampled=resampled,
        max_corrupt=max_corrupt,
    )
    # a partial batch only ends a single pass; a fixed-length epoch always has full batches
    batches = wds.DataPipeline(dataset, wds.batched(batch_size, collation_fn=_stack, partial=batches_per_epoch is None))
    if batches_per_epoch is not None:
        # each worker makes its share; DataLoader interleaves workers in order, so the cut is deterministic
        batches = batches.with_epoch(nbatches=math.ceil(batches_per_epoch / max(1, num_workers)))
    if pin_memory is None:
        pin_memory = torch.cuda.is_available()
    loader = wds.WebLoader(
        batches,
        batch_size=None,
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=num_workers > 0,
        prefetch_factor=2 if num_workers > 0 else None,
    )
    if batches_per_epoch is not None:
        loader = loader.with_epoch(nbatches=batches_per_epoch)
    return ImageLoader(loader, batches_per_epoch, manifest, max_corrupt)
