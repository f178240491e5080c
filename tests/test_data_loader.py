"""pipeline.train.data on real shards written by data_prep: splitting, epochs, determinism, bad shards."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from data_prep.__main__ import main as data_prep_main
from data_prep.shards import ShardWriter
from pipeline.core.fileio import atomic_write_json
from pipeline.train.data import DataError, check_shards, make_loader, read_manifest

SIZE = 16
torch.set_num_threads(1)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("faces") / "shards"
    assert (
        data_prep_main(
            [
                "--synthetic",
                "150",
                "--out",
                str(out),
                "--size",
                str(SIZE),
                "--shard-size",
                "10",
                "--val-fraction",
                "0.1",
                "--workers",
                "1",
            ]
        )
        == 0
    )
    return out


def source_images(shards_dir: Path, split: str = "train") -> dict[bytes, str]:
    """{digest of the [-1, 1] float tensor: sample key} for every image of the split, read with tarfile."""
    manifest = json.loads((shards_dir / "manifest.json").read_text())
    images = {}
    for entry in manifest["splits"][split]["shards"]:
        with tarfile.open(shards_dir / entry["name"]) as tar:
            for m in tar.getmembers():
                if m.name.endswith(".png"):
                    arr = np.asarray(Image.open(io.BytesIO(tar.extractfile(m).read())).convert("RGB"))
                    images[digest(torch.from_numpy(arr.transpose(2, 0, 1).astype(np.float32) / 127.5 - 1))] = m.name
    return images


def digest(image: torch.Tensor) -> bytes:
    return hashlib.sha1(image.contiguous().numpy().tobytes()).digest()


def test_batches_are_float_in_range(shards):
    loader = make_loader(shards, batch_size=8, seed=0)
    batches = list(loader)
    num_train = read_manifest(shards)["splits"]["train"]["num_samples"]
    assert len(batches) == len(loader) == -(-num_train // 8)  # default epoch: one pass over the train samples
    for b in batches:
        assert b.shape == (8, 3, SIZE, SIZE) and b.dtype == torch.float32
        assert b.min() >= -1 and b.max() <= 1
    assert batches[0].min() < -0.5 and batches[0].max() > 0.5


def test_two_ranks_two_workers_see_every_sample_once_without_resampling(shards):
    expected = source_images(shards)
    seen = []
    for rank in range(2):
        loader = make_loader(
            shards, batch_size=4, rank=rank, world_size=2, num_workers=2, resampled=False, random_flip=False, seed=3
        )
        seen += [digest(img) for batch in loader for img in batch]
    assert len(seen) == len(set(seen)), "a sample was seen twice within the epoch"
    assert set(seen) == set(expected) and len(seen) == read_manifest(shards)["splits"]["train"]["num_samples"]


def test_resampled_ranks_get_equal_batch_counts(shards):
    counts = []
    for rank in range(2):
        loader = make_loader(shards, batch_size=4, rank=rank, world_size=2, num_workers=2, batches_per_epoch=7, seed=0)
        for _ in range(2):  # two epochs, persistent workers
            batches = list(loader)
            counts.append(len(batches))
            assert all(b.shape == (4, 3, SIZE, SIZE) for b in batches)
    assert counts == [7, 7, 7, 7]


def test_same_seed_rank_world_size_gives_the_same_batches(shards):
    def take(**kw):
        return torch.cat(list(make_loader(shards, batch_size=4, batches_per_epoch=5, **kw)))

    a = take(seed=1, rank=0, world_size=2, num_workers=2)
    assert torch.equal(a, take(seed=1, rank=0, world_size=2, num_workers=2))
    assert not torch.equal(a, take(seed=1, rank=1, world_size=2, num_workers=2))
    assert not torch.equal(a, take(seed=2, rank=0, world_size=2, num_workers=2))
    loader = make_loader(shards, batch_size=4, batches_per_epoch=5, seed=1)
    assert not torch.equal(torch.cat(list(loader)), torch.cat(list(loader))), "epochs should reshuffle"


def test_random_flip_mirrors_some_images(shards):
    originals = source_images(shards)
    loader = make_loader(shards, batch_size=16, batches_per_epoch=4, random_flip=True, seed=0)
    plain = flipped = 0
    for batch in loader:
        for img in batch:
            if digest(img) in originals:
                plain += 1
            else:
                assert digest(torch.flip(img, dims=[2])) in originals
                flipped += 1
    assert plain > 10 and flipped > 10


def test_val_split_and_errors_name_the_file(shards, tmp_path):
    assert len(check_shards(shards, "val")) == 2
    with pytest.raises(DataError, match="no split 'test'"):
        check_shards(shards, "test")
    with pytest.raises(DataError, match=r"manifest\.json: no manifest"):
        read_manifest(tmp_path)


def copy_shards(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_mismatching_or_missing_shard_is_a_clear_error(shards, tmp_path):
    bad = copy_shards(shards, tmp_path / "bad")
    with open(bad / "train-000003.tar", "ab") as f:
        f.write(b"\0" * 512)
    with pytest.raises(DataError, match=r"train-000003\.tar: \d+ bytes but .*manifest\.json says"):
        make_loader(bad, batch_size=4)

    flipped = copy_shards(shards, tmp_path / "flipped")
    data = bytearray((flipped / "train-000002.tar").read_bytes())
    data[1500] ^= 0x55
    (flipped / "train-000002.tar").write_bytes(bytes(data))
    check_shards(flipped)  # same size: only the sha256 check can tell
    with pytest.raises(DataError, match=r"train-000002\.tar: sha256 does not match"):
        check_shards(flipped, verify_sha256=True)

    (flipped / "train-000005.tar").unlink()
    with pytest.raises(DataError, match=r"train-000005\.tar: shard listed in .* is missing"):
        make_loader(flipped, batch_size=4)


def write_corrupt_shards(out: Path, good: int, corrupt: int) -> None:
    """One shard with `good` images and `corrupt` undecodable ones, and a manifest that matches it."""
    out.mkdir()
    writer = ShardWriter(out, "train-000000.tar")
    rng = np.random.default_rng(0)
    for i in range(good + corrupt):
        if i % 3 == 1 and corrupt > 0:
            data = b"\x89PNG not really" if corrupt % 2 else _png(rng, SIZE + 4)  # garbage, or the wrong size
            corrupt -= 1
        else:
            data = _png(rng, SIZE)
        writer.add(f"{i:06d}", {"png": data, "json": b"{}"})
    info = writer.close()
    entry = {"name": info.name, "num_samples": info.num_samples, "bytes": info.bytes, "sha256": info.sha256}
    atomic_write_json(
        out / "manifest.json",
        {
            "format_version": 1,
            "resolution": SIZE,
            "image_format": "png",
            "splits": {
                "train": {"shards": [entry], "num_samples": info.num_samples},
                "val": {"shards": [], "num_samples": 0},
            },
        },
    )


def _png(rng, size) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def test_corrupt_samples_are_skipped_then_fatal_past_the_limit(tmp_path):
    write_corrupt_shards(tmp_path / "some", good=12, corrupt=4)
    loader = make_loader(tmp_path / "some", batch_size=4, resampled=False, max_corrupt=10)
    assert sum(len(b) for b in loader) == 12

    for workers in (0, 1):
        loader = make_loader(tmp_path / "some", batch_size=4, resampled=False, max_corrupt=2, num_workers=workers)
        with pytest.raises(DataError, match=r"^more than 2 corrupt samples, last: .*train-000000\.tar") as info:
            list(loader)
        assert "\n" not in str(info.value)
