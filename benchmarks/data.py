"""Benchmark the first arrow: data_prep images/s and the training loader's, against the training step's appetite.

  python -m benchmarks data [--quick] [--out DIR]

data_prep: procedural faces at 32 and 256 px, and 1024 px JPEGs resized to 256 px, with 1 and 2 worker
processes (wall time including the pool start-up). Loader: batches/s after a warm-up batch, DataLoader workers
0, 1, 2. Consumption is images/s of our full training step (benchmarks.train: forward, loss, backward, AdamW)
for the config that trains at that resolution, the fastest batch size measured (the most demanding consumer):
the train benchmark's number when it ran into the same output directory, else measured now. On a shared
machine both sides see the same load, but they are not interleaved: read the ratio as an order of magnitude.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image

from benchmarks import artifacts, common, train
from benchmarks.record import Result, load, table
from data_prep.__main__ import main as data_prep
from data_prep.synthetic import draw_face
from export.backends import default_threads
from pipeline.train.data import make_loader

FLAGS = ("quick", "device", "out", "threads")
CONSUMER = {32: "tiny_cpu", 64: "celebahq64", 256: "celebahq256"}  # image size -> the config that trains on it
LoaderCase = NamedTuple("LoaderCase", [("shards", str), ("batch_size", int), ("batches", dict[str, int])])
LOADER_CASES = [
    LoaderCase("synthetic_32", 64, {"quick": 10, "full": 100}),
    LoaderCase("jpg1024_to_256", 16, {"quick": 5, "full": 40}),
]


@dataclass
class Prep:
    """One data_prep run; images per CPU-second stays meaningful when other jobs share the cores, wall images/s does not."""

    case: str
    workers: int
    images: int
    seconds: float
    images_per_second: float
    cpu_seconds: float
    images_per_cpu_second: float


@dataclass
class Loader:
    case: str
    resolution: int
    batch_size: int
    workers: int
    batches: int
    repeats: list[float]  # images/s of each pass
    images_per_second: float  # their median


@dataclass
class Consumer:
    config: str
    batch: int
    images_per_second: float


@dataclass
class DataResults:
    data_prep: list[Prep]
    loader: list[Loader]
    consumption: dict[str, Consumer]  # by image size


def consumption(args, progress) -> dict[str, Consumer]:
    """Training images/s by image size: from train.json of this output dir, else measured (tiny config)."""
    rows, train_json, threads = [], Path(args.out) / "train.json", args.threads or default_threads()
    if train_json.is_file():
        previous = load(train_json, train.TrainResults)
        if (previous.device, previous.quick, previous.config.get("threads")) == (args.device, args.quick, threads):
            rows = previous.results.throughput
    if not rows:
        progress.describe("data: training-step consumption (tiny_cpu)")
        timing = argparse.Namespace(**vars(args), repeats=3, warmup=1, contiguous_only=False, profile=False)
        batches, cfg = [8 if args.quick else 32], artifacts.config("tiny_cpu")
        rows = train.compare_with_diffusers(cfg, "tiny_cpu", batches, timing, common.no_progress())
    out = {}
    for size, name in CONSUMER.items():
        if mine := [r for r in rows if r.config == name]:
            best = max(mine, key=lambda r: r.ours_images_per_second)
            out[str(size)] = Consumer(name, best.batch, best.ours_images_per_second)
    return out


def _cpu_seconds() -> float:
    """User + system time of this process and its reaped children (the data_prep pool)."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def bench_data_prep(quick: bool, work: Path) -> tuple[list[Prep], dict[str, Path]]:
    n32, n256, nsrc = (400, 40, 40) if quick else (3000, 300, 300)
    corpus = work / "source_1024"
    corpus.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(nsrc):  # 1024 px JPEGs with photo-like noise, so decode cost resembles CelebA-HQ's data1024x1024
        face = np.asarray(draw_face(1, i, 256).resize((1024, 1024), Image.Resampling.BICUBIC), dtype=np.float32)
        face += rng.normal(0, 6, face.shape)
        Image.fromarray(np.clip(face, 0, 255).astype(np.uint8)).save(corpus / f"{i:05d}.jpg", quality=95)
    cases = {
        "synthetic_32": (f"--synthetic {n32} --size 32 --shard-size 1000".split(), n32),
        "synthetic_256": (f"--synthetic {n256} --size 256 --shard-size 100".split(), n256),
        "jpg1024_to_256": (["--src", str(corpus), *"--size 256 --shard-size 100".split()], nsrc),
    }
    results, shards = [], {}
    for name, (args, count) in cases.items():
        for workers in (1, 2):
            out = shards[name] = work / f"{name}_w{workers}"
            cpu0, start = _cpu_seconds(), time.perf_counter()
            assert data_prep([*args, "--val-fraction", "0.0", "--out", str(out), "--workers", str(workers)]) == 0
            seconds, cpu = time.perf_counter() - start, _cpu_seconds() - cpu0
            results.append(Prep(name, workers, count, seconds, count / seconds, cpu, count / cpu))
    return results, shards


def bench_loader(quick: bool, shards: dict[str, Path]) -> list[Loader]:
    results = []
    for case in LOADER_CASES:
        for workers in (0, 1, 2):
            num, pin = case.batches["quick" if quick else "full"], torch.cuda.is_available()
            options: dict = {"num_workers": workers, "batches_per_epoch": num + 1, "pin_memory": pin}
            loader = make_loader(shards[case.shards], batch_size=case.batch_size, **options)
            rates = []
            for _ in range(2 if quick else 3):
                it = iter(loader)
                next(it)  # warm-up: worker start, first shard open, shuffle buffer fill
                start = time.perf_counter()
                count = sum(batch.shape[0] for batch in it)
                rates.append(count / (time.perf_counter() - start))
            del loader
            resolution = int(case.shards.rsplit("_", 1)[1])
            results.append(
                Loader(case.shards, resolution, case.batch_size, workers, num, rates, statistics.median(rates))
            )
    return results


def run(args, progress) -> Result:
    result = common.start("data", args, __doc__.split("\n\n", 2)[2], {"consumers": CONSUMER})
    progress.describe("data: data_prep and loader")
    with tempfile.TemporaryDirectory() as tmp:
        prep, shards = bench_data_prep(args.quick, Path(tmp))
        loader = bench_loader(args.quick, shards)
    progress.update()
    result.results = DataResults(prep, loader, consumption(args, progress))
    progress.update()
    report(result)
    return result


def report(result: Result) -> None:
    res, rows = result.results, []
    prep = [[r.case, r.workers, r.images, r.seconds, r.images_per_second] for r in res.data_prep]
    result.tables.append(table("data_prep", "case | workers | images | seconds | images/s", prep))
    for r in res.loader:
        need = res.consumption.get(str(r.resolution))
        rate, ratio = (need.images_per_second, r.images_per_second / need.images_per_second) if need else (None, None)
        rows.append([r.case, r.resolution, r.batch_size, r.workers, r.images_per_second, rate, ratio])
    columns = "case | px | batch | workers | loader images/s | training step images/s | loader / consumption"
    result.tables.append(table("Loader vs training-step consumption", columns, rows))
    for size in sorted({r[1] for r in rows}):
        if not (mine := [r for r in rows if r[1] == size and r[6] is not None]):
            result.notes.append(
                f"{size} px: no training-step rate for {CONSUMER.get(size)} on this machine, "
                f"so no loader target (the train benchmark measures it on a GPU run)"
            )
            continue
        best, c = max(mine, key=lambda r: r[6]), res.consumption[str(size)]
        detail = f"best with {best[3]} worker(s): {best[4]:.0f} vs {best[5]:.1f} images/s (training batch {c.batch}); "
        detail += "workers 0/1/2: " + ", ".join(f"{r[6]:.1f}x" for r in mine)
        what = f"loader >= 5x training consumption ({size} px, {c.config})"
        result.add_target(f"loader_vs_consumption[{size}px]", what, best[6], 5.0, ">=", detail=detail)


def steps(args) -> int:
    return 2
