"""End-to-end benchmark: images/s of `python -m export.sample` with DDIM-50 at the configs' sizes.

  python -m benchmarks end_to_end [--quick] [--device cpu|cuda] [--out DIR]

Runs the real command in a subprocess (as a user would), on the exported ONNX graph and, side by
side, on the checkpoint directory (the torch backend), and where present on a TensorRT engine.
Reports the images/s the command prints (sampling only) and the wall time including start-up.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import artifacts, common

REPO = Path(__file__).resolve().parent.parent
# config -> (num images, batch, runs per backend); quick: the tiny config only
PLAN = {
    "quick": {"cpu": [("tiny_cpu", 4, 4, 1)], "cuda": [("tiny_cpu", 16, 16, 1)]},
    "full": {
        "cpu": [("tiny_cpu", 16, 16, 2), ("celebahq64", 2, 2, 1)],
        "cuda": [("tiny_cpu", 256, 64, 2), ("celebahq64", 128, 64, 2), ("celebahq256", 32, 16, 2)],
    },
}
STEPS = 50
# export.sample's last line: "wrote OUT: N images, ddim 50 steps, batch B, 12.34s, 1.23 images/s on BACKEND"
RATE = re.compile(r"batch \d+, ([0-9.]+)s, [0-9.]+ images/s on (.+)$", re.M)
# The torch backend runs beside ORT for the tiny config only (export.sample runs a checkpoint on the CPU;
# the sampler benchmark compares the backends per evaluation on the device).
TORCH_SIDE_BY_SIDE = {"tiny_cpu"}

METHOD = f"""
`python -m export.sample --model M --sampler ddim --steps {STEPS} --num N --batch B --seed 0 --out x.npz`
in a fresh process per run (threads = usable cores). M is the exported `denoiser.onnx` (ONNX Runtime), the
checkpoint directory (torch eager backend) or a TensorRT `.plan`, all with the same random weights.
"images/s" is what the command reports (sampling time only, after the model is loaded); "wall" is the whole
process, including Python start-up, imports and model loading. Runs alternate between backends.
"""


def models_for(name: str, args) -> dict[str, Path]:
    cfg = artifacts.config(name)
    cuda = args.device.startswith("cuda")
    models = {"onnxruntime": artifacts.onnx_model(cfg, fp16=cuda)}
    if name in TORCH_SIDE_BY_SIDE:
        models["torch"] = artifacts.random_checkpoint(cfg)
    if cuda and artifacts.tensorrt_available() is None:
        batch = {c: b for c, _, b, _ in PLAN[common.size(args)]["cuda"]}[name]
        models["tensorrt"] = artifacts.tensorrt_engine(cfg, (1, batch, batch), fp16=True)
    return models


def sample_once(model: Path, num: int, batch: int, args) -> dict:
    """One `python -m export.sample` run: its reported images/s and the process wall time."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [
            sys.executable,
            "-m",
            "export.sample",
            "--model",
            str(model),
            "--sampler",
            "ddim",
            "--steps",
            str(STEPS),
            "--num",
            str(num),
            "--batch",
            str(batch),
            "--seed",
            "0",
            "--threads",
            str(args.threads or common.usable_cores()),
            "--provider",
            "cuda" if args.device.startswith("cuda") else "cpu",
            "--out",
            str(Path(tmp) / "x.npz"),
        ]
        env = dict(os.environ, PYTHONPATH=str(REPO))
        start = time.perf_counter()
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=3600)
        wall = time.perf_counter() - start
    match = RATE.search(proc.stdout)
    if proc.returncode != 0 or not match:
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-10:])
        raise RuntimeError(f"export.sample failed on {model} (exit {proc.returncode}):\n{tail}")
    seconds = float(match.group(1))  # the printed images/s has 2 decimals; seconds are more precise
    return {
        "images_per_second": num / seconds,
        "sampling_seconds": seconds,
        "backend": match.group(2).strip(),
        "wall_seconds": wall,
        "wall_images_per_second": num / wall,
    }


def steps(args) -> int:
    cuda = args.device.startswith("cuda")
    plan = common.device_plan(PLAN, args)
    return sum(runs * (1 + int(cuda) + int(name in TORCH_SIDE_BY_SIDE)) for name, _, _, runs in plan)


def run(args, progress=None) -> dict:
    progress = progress or common.no_progress()
    plan = common.device_plan(PLAN, args)
    cases = [{"config": c, "num": n, "batch": b, "runs": r} for c, n, b, r in plan]
    result = common.start("end_to_end", args, METHOD, {"cases": cases, "sampler": "ddim", "steps": STEPS})
    rows = []
    for name, num, batch, runs in plan:
        models = models_for(name, args)
        samples = {label: [] for label in models}
        for r in range(runs):
            for label in list(models) if r % 2 == 0 else list(models)[::-1]:
                progress.describe(f"end_to_end: {name} {label} DDIM-{STEPS} x {num}")
                samples[label].append(sample_once(models[label], num, batch, args))
                progress.update()
        for label, runs_ in samples.items():
            rows.append(
                {
                    "config": name,
                    "image_size": artifacts.config(name).model.image_size,
                    "num": num,
                    "batch": batch,
                    "model": label,
                    "backend": runs_[0]["backend"],
                    "images_per_second": common.summarize([s["images_per_second"] for s in runs_]),
                    "wall_seconds": common.summarize([s["wall_seconds"] for s in runs_]),
                }
            )
    if args.device == "cpu":
        result["notes"].append(
            "celebahq256 is not run on CPU: one DDIM-50 image of the 114M-parameter model takes "
            "minutes on 2 cores; the CUDA run covers it. On CPU the torch backend runs beside "
            "ORT for the tiny config only (the sampler benchmark compares them per evaluation)."
        )
    result["results"] = {"runs": rows}
    result["tables"].append(
        common.table(
            f"export.sample, DDIM-{STEPS}",
            [
                "config",
                "size",
                "images",
                "batch",
                "backend",
                "images/s (median)",
                "images/s spread",
                "wall s (process)",
            ],
            [
                [
                    r["config"],
                    r["image_size"],
                    r["num"],
                    r["batch"],
                    r["backend"],
                    r["images_per_second"]["median"],
                    f"{r['images_per_second']['min']:.3g}–{r['images_per_second']['max']:.3g}",
                    r["wall_seconds"]["median"],
                ]
                for r in rows
            ],
        )
    )
    return result


if __name__ == "__main__":
    from benchmarks.__main__ import main

    sys.exit(main(["end_to_end", *sys.argv[1:]]))
