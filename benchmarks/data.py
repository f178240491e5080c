"""Benchmark the first arrow: data_prep images/s and the pipeline.train.data loader's, against the training step's appetite.

  python -m benchmarks data [--quick] [--out DIR]

data_prep: procedural faces at 32 and 256 px, and CelebA-HQ-like 1024 px JPEGs resized to
256 px, with 1 and 2 worker processes (wall time including the pool start-up).
loader: batches/s after a warm-up batch, for DataLoader workers 0, 1 and 2, at 32 and 256 px.
Both are set against the rate a training step consumes images on the same machine (our U-Net,
the train benchmark's number when it ran in this session, else measured now), giving the
target "loader >= 5x consumption".
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from benchmarks import common

# loader case -> the config that trains on images of that size
CONSUMER = {32: "tiny_cpu", 64: "celebahq64", 256: "celebahq256"}

METHOD = """
data_prep: procedural faces at 32 and 256 px, and 1024 px JPEGs resized to 256 px, with 1 and 2 worker processes
(wall time including the pool start-up). Loader: batches/s after a warm-up batch, DataLoader workers 0, 1, 2. Consumption is
images/s of our full training step (benchmarks.train: forward, loss, backward, AdamW) for the config that
trains at that resolution, the fastest batch size measured (the most demanding consumer). On a shared
machine both sides see the same load, but they are not interleaved: read the ratio as an order of magnitude.
"""


def consumption(args, progress) -> dict[int, dict]:
    """Training images/s by image size: from train.json of this output dir, else measured (tiny config)."""
    train_json = Path(args.out) / "train.json"
    rows = []
    if train_json.is_file():
        previous = json.loads(train_json.read_text())
        same = (previous.get("device"), previous.get("quick"), previous["config"].get("threads"))
        if same == (args.device, args.quick, args.threads or common.usable_cores()):
            rows = previous["results"]["throughput"]
    if not rows:
        from benchmarks import train
        from pipeline.config import load_config

        progress.describe("data: training-step consumption (tiny_cpu)")
        cfg = load_config(train.REPO / "configs" / "tiny_cpu.yaml")
        measure_args = argparse.Namespace(**{**vars(args), "repeats": 3, "warmup": 1})
        rows = train.compare_with_diffusers(
            cfg, "tiny_cpu", [8 if args.quick else 32], measure_args, common.no_progress()
        )
    out = {}
    for size, name in CONSUMER.items():
        mine = [r for r in rows if r["config"] == name]
        if mine:
            best = max(mine, key=lambda r: r["ours_images_per_second"])
            out[size] = {"config": name, "batch": best["batch"], "images_per_second": best["ours_images_per_second"]}
    return out


def _make_source_corpus(root: Path, count: int) -> None:
    """1024 px JPEGs with photo-like noise, so decode cost resembles CelebA-HQ's data1024x1024."""
    from data_prep.synthetic import draw_face

    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        face = np.asarray(draw_face(1, i, 256).resize((1024, 1024), Image.Resampling.BICUBIC), dtype=np.float32)
        face += rng.normal(0, 6, face.shape)
        Image.fromarray(np.clip(face, 0, 255).astype(np.uint8)).save(root / f"{i:05d}.jpg", quality=95)


def _time_data_prep(args: list[str], out: Path, workers: int, num_images: int) -> dict:
    from data_prep.__main__ import main

    shutil.rmtree(out, ignore_errors=True)
    cpu0, start = _cpu_seconds(), time.perf_counter()
    assert main([*args, "--out", str(out), "--workers", str(workers)]) == 0
    seconds, cpu = time.perf_counter() - start, _cpu_seconds() - cpu0
    # images per CPU-second stays meaningful when other jobs share the cores; wall images/s does not
    return {
        "workers": workers,
        "images": num_images,
        "seconds": seconds,
        "images_per_second": num_images / seconds,
        "cpu_seconds": cpu,
        "images_per_cpu_second": num_images / cpu,
    }


def _cpu_seconds() -> float:
    """User + system time of this process and its reaped children (the data_prep pool)."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def bench_data_prep(quick: bool, work: Path) -> tuple[list[dict], dict[str, Path]]:
    n32, n256, nsrc = (400, 40, 40) if quick else (3000, 300, 300)
    cases = {
        "synthetic_32": (["--synthetic", str(n32), "--size", "32", "--shard-size", "1000"], n32),
        "synthetic_256": (["--synthetic", str(n256), "--size", "256", "--shard-size", "100"], n256),
    }
    corpus = work / "source_1024"
    _make_source_corpus(corpus, nsrc)
    cases["jpg1024_to_256"] = (["--src", str(corpus), "--size", "256", "--shard-size", "100"], nsrc)
    results, shards = [], {}
    for name, (args, count) in cases.items():
        for workers in (1, 2):
            out = work / f"{name}_w{workers}"
            row = _time_data_prep(args + ["--val-fraction", "0.0"], out, workers, count)
            results.append({"case": name, **row})
            print(
                f"data_prep {name:16s} workers={workers}: {row['images_per_second']:8.1f} images/s "
                f"({row['images_per_cpu_second']:.1f} per CPU-second)",
                file=sys.stderr,
            )
        shards[name] = out
    return results, shards


def bench_loader(quick: bool, shards: dict[str, Path]) -> list[dict]:
    import torch
    from pipeline.train.data import make_loader

    plan = {"synthetic_32": (64, 10 if quick else 100), "jpg1024_to_256": (16, 5 if quick else 40)}
    repeats = 2 if quick else 3
    results = []
    for name, (batch_size, num_batches) in plan.items():
        for workers in (0, 1, 2):
            loader = make_loader(
                shards[name],
                batch_size=batch_size,
                num_workers=workers,
                batches_per_epoch=num_batches + 1,
                pin_memory=torch.cuda.is_available(),
            )
            rates = []
            for _ in range(repeats):
                it = iter(loader)
                next(it)  # warm-up: worker start, first shard open, shuffle buffer fill
                start = time.perf_counter()
                count = sum(batch.shape[0] for batch in it)
                rates.append(count / (time.perf_counter() - start))
            del loader
            row = {
                "case": name,
                "resolution": int(name.rsplit("_", 1)[1]),
                "batch_size": batch_size,
                "workers": workers,
                "batches": num_batches,
                "repeats": rates,
                "images_per_second": statistics.median(rates),
            }
            results.append(row)
            print(f"loader {name:16s} workers={workers}: {row['images_per_second']:8.1f} images/s", file=sys.stderr)
    return results


def measure(quick: bool, work: Path) -> dict:
    """data_prep and loader rates, measured in `work` (emptied before and after)."""
    import PIL
    import torch
    import webdataset

    work = Path(work) / "data_work"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        prep, shards = bench_data_prep(quick, work)
        loader = bench_loader(quick, shards)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {
        "benchmark": "data",
        "quick": quick,
        "machine": {
            "cpu_count": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "cuda": torch.cuda.is_available(),
        },
        "versions": {
            "torch": torch.__version__,
            "pillow": PIL.__version__,
            "numpy": np.__version__,
            "webdataset": webdataset.__version__,
        },
        "data_prep": prep,
        "loader": loader,
    }


def run(args, progress=None) -> dict:
    progress = progress or common.no_progress()
    result = common.start("data", args, METHOD, {"consumers": CONSUMER})
    progress.describe("data: data_prep and loader")
    with tempfile.TemporaryDirectory() as tmp:
        measured = measure(args.quick, Path(tmp))
    progress.update()
    consumers = consumption(args, progress)
    progress.update()
    result["results"] = {"data": measured, "consumption": {str(k): v for k, v in consumers.items()}}
    result["tables"].append(
        common.table(
            "data_prep",
            ["case", "workers", "images", "seconds", "images/s"],
            [
                [r["case"], r["workers"], r["images"], r["seconds"], r["images_per_second"]]
                for r in measured["data_prep"]
            ],
        )
    )
    rows = []
    for r in measured["loader"]:
        need = consumers.get(r["resolution"])
        ratio = r["images_per_second"] / need["images_per_second"] if need else None
        rows.append(
            [
                r["case"],
                r["resolution"],
                r["batch_size"],
                r["workers"],
                r["images_per_second"],
                need["images_per_second"] if need else None,
                ratio,
            ]
        )
    result["tables"].append(
        common.table(
            "Loader vs training-step consumption",
            ["case", "px", "batch", "workers", "loader images/s", "training step images/s", "loader / consumption"],
            rows,
        )
    )
    for size in sorted({r[1] for r in rows}):
        mine = [r for r in rows if r[1] == size and r[6] is not None]
        if not mine:
            result["notes"].append(
                f"{size} px: no training-step rate for {CONSUMER.get(size)} on this machine, "
                f"so no loader target (the train benchmark measures it on a GPU run)"
            )
            continue
        best = max(mine, key=lambda r: r[6])
        c = consumers[size]
        result["targets"].append(
            common.target(
                f"loader_vs_consumption[{size}px]",
                f"loader >= 5x training consumption ({size} px, {c['config']})",
                best[6],
                5.0,
                ">=",
                detail=f"best with {best[3]} worker(s): {best[4]:.0f} vs {best[5]:.1f} images/s "
                f"(training batch {c['batch']}); workers 0/1/2: " + ", ".join(f"{r[6]:.1f}x" for r in mine),
            )
        )
    return result


def steps(args) -> int:
    return 2


if __name__ == "__main__":
    from benchmarks.__main__ import main

    sys.exit(main(["data", *sys.argv[1:]]))
