"""The serving install is torch-free for real: a fresh venv with only `.[serve-onnx]` samples an export."""

import subprocess
import venv
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.integration
def test_serve_onnx_extra_alone_runs_export_sample(tmp_path):
    from tiny_model import make_checkpoint

    from export.onnx import main as export_onnx

    onnx = tmp_path / "denoiser.onnx"
    assert export_onnx(["--ckpt", str(make_checkpoint(tmp_path / "run")), "--out", str(onnx)]) == 0

    env_dir = tmp_path / "serve-venv"
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    subprocess.run([python, "-m", "pip", "install", "-q", f"{ROOT}[serve-onnx]"], check=True, timeout=900)
    installed = subprocess.run(
        [python, "-m", "pip", "list", "--format=freeze"], check=True, capture_output=True, text=True
    ).stdout.lower()
    assert "onnxruntime-gpu" in installed
    assert not [p for p in ("torch", "onnx==", "pyyaml", "deepspeed") if p in installed], installed

    # From a directory outside the repository: the installed package runs, not the source tree.
    out = tmp_path / "samples.npz"
    done = subprocess.run(
        [
            python,
            "-m",
            "export.sample",
            "--model",
            str(onnx),
            "--sampler",
            "unipc",
            "--steps",
            "5",
            "--num",
            "3",
            "--out",
            str(out),
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "unipc 5 steps" in done.stdout
    images = np.load(out)["images"]
    assert images.shape == (3, 16, 16, 3) and images.dtype == np.uint8 and images.std() > 0
