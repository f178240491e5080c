"""End-to-end benchmark: images/s of `python -m export.sample` with DDIM-50 at the configs' sizes.

  python -m benchmarks end_to_end [--quick] [--device cpu|cuda] [--out DIR]

`python -m export.sample --model M --sampler ddim --steps 50 --num N --batch B --seed 0 --out x.npz`, the real
command in a fresh process per run, as a user would run it (threads = usable cores). M is the exported
`denoiser.onnx` (ONNX Runtime), the checkpoint directory (torch eager backend) or a TensorRT `.cases`, all with the
same random weights. "images/s" is what the command reports (sampling time only, after the model is loaded);
"wall" is the whole process, including Python start-up, imports and model loading. Runs alternate between backends.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from benchmarks import artifacts, common
from benchmarks.record import Result, Spread, summarize, table
from export.backends import default_threads

REPO = Path(__file__).resolve().parent.parent
FLAGS = ("quick", "device", "out", "threads")


# num: images per run; runs: per backend
Case = NamedTuple("Case", [("config", str), ("num", int), ("batch", int), ("runs", int)])

CASES = {
    "quick": {"cpu": [Case("tiny_cpu", 4, 4, 1)], "cuda": [Case("tiny_cpu", 16, 16, 1)]},
    "full": {
        "cpu": [Case("tiny_cpu", 16, 16, 2), Case("celebahq64", 2, 2, 1)],
        "cuda": [Case("tiny_cpu", 256, 64, 2), Case("celebahq64", 128, 64, 2), Case("celebahq256", 32, 16, 2)],
    },
}
STEPS = 50  # as the method says
# export.sample's last line: "wrote OUT: N images, ddim 50 steps, batch B, 12.34s, 1.23 images/s on BACKEND"
RATE = re.compile(r"batch \d+, ([0-9.]+)s, [0-9.]+ images/s on (.+)$", re.M)
# The torch backend runs beside ORT for the tiny config only (export.sample runs a checkpoint on the CPU;
# the sampler benchmark compares the backends per evaluation on the device).
TORCH_SIDE_BY_SIDE = {"tiny_cpu"}


@dataclass
class Run:
    config: str
    image_size: int
    num: int
    batch: int
    model: str  # onnxruntime, torch, tensorrt
    backend: str  # what export.sample says ran
    images_per_second: Spread
    wall_seconds: Spread


@dataclass
class EndToEndResults:
    runs: list[Run]


def models_for(case: Case, args) -> dict[str, Path]:
    cfg, cuda = artifacts.config(case.config), args.device.startswith("cuda")
    models = {"onnxruntime": artifacts.onnx_model(cfg, fp16=cuda)}
    if case.config in TORCH_SIDE_BY_SIDE:
        models["torch"] = artifacts.random_checkpoint(cfg)
    if cuda and artifacts.tensorrt_available() is None:
        models["tensorrt"] = artifacts.tensorrt_engine(cfg, (1, case.batch, case.batch), fp16=True)
    return models


def sample_once(model: Path, num: int, batch: int, args) -> tuple[float, str, float]:
    """One `python -m export.sample` run: (sampling seconds, the backend it names, process wall seconds)."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "export.sample", "--model", str(model), "--sampler", "ddim", "--steps", str(STEPS)]
        cmd += ["--num", str(num), "--batch", str(batch), "--seed", "0", "--out", str(Path(tmp) / "x.npz")]
        cmd += ["--threads", str(args.threads or default_threads()), "--provider", args.device.split(":")[0]]
        start, env = time.perf_counter(), dict(os.environ, PYTHONPATH=str(REPO))
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=3600)
        wall = time.perf_counter() - start
    match = RATE.search(proc.stdout)
    if proc.returncode != 0 or not match:
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-10:])
        raise RuntimeError(f"export.sample failed on {model} (exit {proc.returncode}):\n{tail}")
    return float(match.group(1)), match.group(2).strip(), wall  # the printed seconds: more digits than images/s


def steps(args) -> int:
    cuda = args.device.startswith("cuda")
    return sum(c.runs * (1 + int(cuda) + int(c.config in TORCH_SIDE_BY_SIDE)) for c in common.cases_for(CASES, args))


def run(args, progress) -> Result:
    cases = common.cases_for(CASES, args)
    config = {"cases": [c._asdict() for c in cases], "sampler": "ddim", "steps": STEPS}
    result = common.start("end_to_end", args, __doc__.split("\n\n", 2)[2], config)
    runs = []
    for case in cases:
        models = models_for(case, args)
        samples: dict[str, list] = {label: [] for label in models}
        for r in range(case.runs):
            for label in list(models) if r % 2 == 0 else list(models)[::-1]:
                progress.describe(f"end_to_end: {case.config} {label} DDIM-{STEPS} x {case.num}")
                samples[label].append(sample_once(models[label], case.num, case.batch, args))
                progress.update()
        size = artifacts.config(case.config).model.image_size
        for label, s in samples.items():
            rates, walls = summarize([case.num / seconds for seconds, _, _ in s]), summarize([w for _, _, w in s])
            runs.append(Run(case.config, size, case.num, case.batch, label, s[0][1], rates, walls))
    if args.device == "cpu":
        result.notes.append(
            "celebahq256 is not run on CPU: one DDIM-50 image of the 114M-parameter model takes "
            "minutes on 2 cores; the CUDA run covers it. On CPU the torch backend runs beside "
            "ORT for the tiny config only (the sampler benchmark compares them per evaluation)."
        )
    result.results = EndToEndResults(runs)
    rows = [
        [r.config, r.image_size, r.num, r.batch, r.backend, r.images_per_second.median]
        + [f"{r.images_per_second.min:.3g}–{r.images_per_second.max:.3g}", r.wall_seconds.median]
        for r in runs
    ]
    columns = "config | size | images | batch | backend | images/s (median) | images/s spread | wall s (process)"
    result.tables.append(table(f"export.sample, DDIM-{STEPS}", columns, rows))
    return result
