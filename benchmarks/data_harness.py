"""The `data` benchmark in the harness: benchmarks.data's measurements against the training step's appetite.

  python -m benchmarks data [--quick] [--out DIR]

`benchmarks.data.run` times data_prep (images/s) and the WebDataset loader (images/s, workers
0/1/2). Here that is set against the rate a training step consumes images on the same machine
(our U-Net, the train benchmark's number when it ran in this session, else measured now), giving the
target "loader >= 5x consumption".
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from benchmarks import common

# loader case of benchmarks.data -> the config that trains on images of that size
CONSUMER = {32: "tiny_cpu", 64: "celebahq64", 256: "celebahq256"}

METHOD = """
data_prep and loader numbers come from `benchmarks.data` (see its docstring: procedural faces and 1024 px
JPEGs resized to 256 px; loader batches/s after a warm-up batch, DataLoader workers 0, 1, 2). Consumption is
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
        rows = train.compare_with_diffusers(cfg, "tiny_cpu", [8 if args.quick else 32], measure_args,
                                            common.no_progress())
    out = {}
    for size, name in CONSUMER.items():
        mine = [r for r in rows if r["config"] == name]
        if mine:
            best = max(mine, key=lambda r: r["ours_images_per_second"])
            out[size] = {"config": name, "batch": best["batch"], "images_per_second": best["ours_images_per_second"]}
    return out


def run(args, progress=None) -> dict:
    from benchmarks import data
    progress = progress or common.no_progress()
    common.set_threads(args.threads)
    result = common.new_result("data", quick=args.quick, device=args.device, method=METHOD,
                               config={"wrapped": "benchmarks.data.run", "consumers": CONSUMER})
    progress.describe("data: data_prep and loader (benchmarks.data)")
    with tempfile.TemporaryDirectory() as tmp:
        measured = data.run(args.quick, Path(tmp))
    progress.update()
    consumers = consumption(args, progress)
    progress.update()
    result["results"] = {"data": measured, "consumption": {str(k): v for k, v in consumers.items()}}
    result["tables"].append(common.table(
        "data_prep", ["case", "workers", "images", "seconds", "images/s"],
        [[r["case"], r["workers"], r["images"], r["seconds"], r["images_per_second"]] for r in measured["data_prep"]]))
    rows = []
    for r in measured["loader"]:
        need = consumers.get(r["resolution"])
        ratio = r["images_per_second"] / need["images_per_second"] if need else None
        rows.append([r["case"], r["resolution"], r["batch_size"], r["workers"], r["images_per_second"],
                     need["images_per_second"] if need else None, ratio])
    result["tables"].append(common.table(
        "Loader vs training-step consumption", ["case", "px", "batch", "workers", "loader images/s",
                                                "training step images/s", "loader / consumption"], rows))
    for size in sorted({r[1] for r in rows}):
        mine = [r for r in rows if r[1] == size and r[6] is not None]
        if not mine:
            result["notes"].append(f"{size} px: no training-step rate for {CONSUMER.get(size)} on this machine, "
                                   f"so no loader target (the train benchmark measures it on a GPU run)")
            continue
        best = max(mine, key=lambda r: r[6])
        c = consumers[size]
        result["targets"].append(common.target(
            f"loader_vs_consumption[{size}px]", f"loader >= 5x training consumption ({size} px, {c['config']})",
            best[6], 5.0, ">=", detail=f"best with {best[3]} worker(s): {best[4]:.0f} vs {best[5]:.1f} images/s "
                                       f"(training batch {c['batch']}); workers 0/1/2: "
                                       + ", ".join(f"{r[6]:.1f}x" for r in mine)))
    return result


def steps(args) -> int:
    return 2


if __name__ == "__main__":
    from benchmarks.__main__ import main
    sys.exit(main(["data", *sys.argv[1:]]))
