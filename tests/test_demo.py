"""`make demo` end to end at a small size: the real Makefile, DeepSpeed, ONNX Runtime, evaluate, benchmark.

The same recipe as the full demo, shrunk with its own variables (fewer images, steps and samples), in a
temporary run and data directory, with this interpreter's environment instead of creating .venv.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.core.sampling import DEFAULT_SAMPLER, DEFAULT_STEPS

ROOT = Path(__file__).resolve().parents[1]
VENV = Path(sys.executable).parent.parent  # make's $(VENV): bin/python and bin/torchrun live here
FAST = f"{DEFAULT_SAMPLER}-{DEFAULT_STEPS[DEFAULT_SAMPLER]}"  # the Makefile's DEMO_SAMPLER-DEMO_STEPS
SETS = (f"EMA {FAST}", f"online {FAST}", "EMA DDIM-50 eta 1")


def test_the_demo_samples_with_the_core_default():
    """One default everywhere: the Makefile writes the sampling core's default out for its set names."""
    makefile = (ROOT / "Makefile").read_text()
    assert f"DEMO_SAMPLER ?= {DEFAULT_SAMPLER}\n" in makefile
    assert f"DEMO_STEPS ?= {DEFAULT_STEPS[DEFAULT_SAMPLER]}\n" in makefile


def make(tmp: Path, *targets: str, **variables: str) -> subprocess.CompletedProcess:
    small = {
        "VENV": str(VENV),
        "DEMO_RUN": str(tmp / "run"),
        "DEMO_DATA": str(tmp / "data"),
        "DEMO_NUM": "16",
        "DEMO_TRAIN_ARGS": "train.max_steps=4 train.warmup_steps=2 train.checkpoint_every=2 "
        "log.sample_every=2 log.num_samples=4 log.sample_steps=2 data.shuffle_buffer=50",
        "DEMO_EVAL_ARGS": "--feature-net-steps 20",
        **variables,
    }
    cmd = ["make", "--no-print-directory", "-o", "venv", *targets, *(f"{k}={v}" for k, v in small.items())]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)


@pytest.mark.integration
def test_make_demo_small_writes_grid_scores_benchmark_and_reuses_its_work(tmp_path):
    first = make(tmp_path, "demo")
    out = first.stdout + first.stderr
    assert first.returncode == 0, out[-5000:]
    run = tmp_path / "run"

    grid = np.asarray(Image.open(run / "samples" / "grid.png"))
    assert grid.shape == (4 * 34 + 2, 4 * 34 + 2, 3) and grid.std() > 0  # 16 images of 32 px, 2 px gutters
    scores = json.loads((run / "scores.json").read_text())["runs"]
    assert set(scores) == {*SETS, "val split (floor)"}
    for name, result in scores.items():
        assert result["n_fake"] == 16 and result["features"] == "classifier", name  # never called FID
        assert np.isfinite(result["metrics"]["classifier-FID"]) and 0 <= result["metrics"]["recall"] <= 1
    sidecars = [json.loads((run / f"{n}.onnx.json").read_text()) for n in ("denoiser", "denoiser_model")]
    assert [s["weights"] for s in sidecars] == ["ema", "model"] and sidecars[0]["step"] == 4
    assert (run / "bench" / "sampler.json").is_file()
    for line in (
        "grid of faces:",
        "checkpoint:      " + str(run / "checkpoints" / "step_000000004"),
        "ONNX denoiser:",
        "scores:",
        *SETS,
    ):
        assert line in first.stdout, line

    again = make(tmp_path, "demo")
    assert again.returncode == 0, (again.stdout + again.stderr)[-5000:]
    assert "nothing to do" in again.stderr  # the shards
    assert "already at step 4" in again.stdout  # the training
    assert "export.onnx" not in again.stdout and "export.sample" not in again.stdout  # nothing re-sampled
    assert f"online {FAST}" in again.stdout and "ort_vs_torch_cpu" in again.stdout  # the summary again


@pytest.mark.integration
def test_celebahq_variable_runs_the_demo_on_a_folder_of_images(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(300):  # not square and not 32 px: data_prep resizes them
        Image.fromarray(rng.integers(0, 256, (48, 40, 3), dtype=np.uint8)).save(images / f"{i:05d}.jpg")
    # No training previews: the samples folder must be made by the demo itself.
    done = make(
        tmp_path,
        "demo",
        CELEBAHQ=str(images),
        DEMO_DATA=str(tmp_path / "real"),
        DEMO_TRAIN_ARGS="train.max_steps=2 train.warmup_steps=1 train.checkpoint_every=2 log.sample_every=0",
    )
    assert done.returncode == 0, (done.stdout + done.stderr)[-5000:]
    prep = next(line for line in done.stdout.splitlines() if "-m data_prep" in line)
    assert f"--src {images}" in prep and "--synthetic" not in prep
    manifest = json.loads((tmp_path / "real" / "manifest.json").read_text())
    assert manifest["resolution"] == 32 and manifest["totals"]["num_samples"] == 300
    assert set(json.loads((tmp_path / "run" / "scores.json").read_text())["runs"]) == {*SETS, "val split (floor)"}
