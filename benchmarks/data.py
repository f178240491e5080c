"""Benchmark the first arrow: data_prep images/s and pipeline.data loader images/s.

  python -m benchmarks.data [--quick] [--out DIR]

data_prep: procedural faces at 32 and 256 px, and CelebA-HQ-like 1024 px JPEGs resized to
256 px, with 1 and 2 worker processes (wall time including the pool start-up).
loader: batches/s after a warm-up batch, for DataLoader workers 0, 1 and 2, at 32 and 256 px.
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
import time
from pathlib import Path

import numpy as np
from PIL import Image


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
    return {"workers": workers, "images": num_images, "seconds": seconds, "images_per_second": num_images / seconds,
            "cpu_seconds": cpu, "images_per_cpu_second": num_images / cpu}


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
            print(f"data_prep {name:16s} workers={workers}: {row['images_per_second']:8.1f} images/s "
                  f"({row['images_per_cpu_second']:.1f} per CPU-second)", file=sys.stderr)
        shards[name] = out
    return results, shards


def bench_loader(quick: bool, shards: dict[str, Path]) -> list[dict]:
    import torch
    from pipeline.data import make_loader
    plan = {"synthetic_32": (64, 10 if quick else 100), "jpg1024_to_256": (16, 5 if quick else 40)}
    repeats = 2 if quick else 3
    results = []
    for name, (batch_size, num_batches) in plan.items():
        for workers in (0, 1, 2):
            loader = make_loader(shards[name], batch_size=batch_size, num_workers=workers,
                                 batches_per_epoch=num_batches + 1, pin_memory=torch.cuda.is_available())
            rates = []
            for _ in range(repeats):
                it = iter(loader)
                next(it)  # warm-up: worker start, first shard open, shuffle buffer fill
                start = time.perf_counter()
                count = sum(batch.shape[0] for batch in it)
                rates.append(count / (time.perf_counter() - start))
            del loader
            row = {"case": name, "resolution": int(name.rsplit("_", 1)[1]), "batch_size": batch_size,
                   "workers": workers, "batches": num_batches, "repeats": rates,
                   "images_per_second": statistics.median(rates)}
            results.append(row)
            print(f"loader {name:16s} workers={workers}: {row['images_per_second']:8.1f} images/s", file=sys.stderr)
    return results


def _markdown(result: dict) -> str:
    lines = ["# data benchmark", "", f"{result['machine']['cpu_count']} CPUs, Python {result['machine']['python']}",
             "", "| stage | case | workers | images/s | images per CPU-second |", "| --- | --- | ---: | ---: | ---: |"]
    for row in result["data_prep"]:
        lines.append(f"| data_prep | {row['case']} | {row['workers']} | {row['images_per_second']:.1f} | "
                     f"{row['images_per_cpu_second']:.1f} |")
    for row in result["loader"]:
        lines.append(f"| loader (batch {row['batch_size']}) | {row['case']} | {row['workers']} | "
                     f"{row['images_per_second']:.1f} | |")
    return "\n".join(lines) + "\n"


def run(quick: bool, out_dir: Path) -> dict:
    """Run both benchmarks; write data.json and data.md into out_dir and return the results."""
    import PIL
    import torch
    import webdataset
    out_dir = Path(out_dir)
    work = out_dir / "data_work"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        prep, shards = bench_data_prep(quick, work)
        loader = bench_loader(quick, shards)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result = {
        "benchmark": "data", "quick": quick,
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "cuda": torch.cuda.is_available()},
        "versions": {"torch": torch.__version__, "pillow": PIL.__version__, "numpy": np.__version__,
                     "webdataset": webdataset.__version__},
        "data_prep": prep, "loader": loader,
    }
    (out_dir / "data.json").write_text(json.dumps(result, indent=1) + "\n")
    (out_dir / "data.md").write_text(_markdown(result))
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.data", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small sizes: a smoke run of a minute or two")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"), help="directory for data.json / data.md")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    print(_markdown(run(args.quick, args.out)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
