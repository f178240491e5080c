"""Shared pytest set-up: GPU tests skip with their reason where there is no CUDA device, and the
fixtures several test modules take: synthetic shards, the tiny model's checkpoint and exports, the
guards of in-process and torchrun trainings."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

# OpenMP threads that spin-wait for a busy core make torch many times slower on a shared
# 2-core machine; passive waiting costs nothing measurable when cores are free.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cuda_reason() -> str | None:
    try:
        import torch
    except ImportError:
        return "torch is not installed"
    if not torch.cuda.is_available():
        return "no CUDA device on this machine"
    return None


def pytest_collection_modifyitems(config, items):
    reason = None
    for item in items:
        if "gpu" in item.keywords:
            reason = reason or _cuda_reason()
            if reason:
                item.add_marker(pytest.mark.skip(reason=f"gpu test: {reason}"))


@pytest.fixture
def repo_root() -> str:
    return REPO


# --- synthetic shards: 64 faces of 16 px -----------------------------------------------------------


def synthetic_shards(out: Path, *options: str) -> Path:
    cmd = [sys.executable, "-m", "data_prep", "--synthetic", "64", "--out", str(out), "--size", "16", *options]
    subprocess.run(cmd, cwd=REPO, check=True, capture_output=True)
    return out


@pytest.fixture(scope="module")
def shards16(tmp_path_factory) -> Path:
    """One shard, for the training tests."""
    return synthetic_shards(tmp_path_factory.mktemp("shards") / "synthetic16")


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """Two shards of 32, for the Slurm and two-node tests (test_data_loader and test_evaluate have
    shards of their own)."""
    return synthetic_shards(tmp_path_factory.mktemp("slurm") / "shards", "--workers", "1", "--shard-size", "32")


# --- trainings in this process and under torchrun ---------------------------------------------------


@pytest.fixture(scope="module")
def in_process():
    """train() in the pytest process joins a one-process group and exports RANK, MASTER_PORT, ...:
    leave neither behind for the tests that follow (their subprocesses would inherit the variables)."""
    saved = dict(os.environ)
    yield
    from pipeline.train import distributed

    distributed.shutdown()
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture
def launched():
    """Popen objects of torchrun runs; whatever still runs when the test ends (failed) is killed."""
    from tiny_model import kill_job

    procs: list[subprocess.Popen] = []
    yield procs
    for proc in procs:
        if proc.poll() is None:
            kill_job(proc)


# --- the tiny model's checkpoint (no training) and its exports ---------------------------------------


@pytest.fixture(scope="session")
def ckpt(tmp_path_factory) -> Path:
    import torch
    from tiny_model import THREADS, make_checkpoint

    torch.set_num_threads(THREADS)
    return make_checkpoint(tmp_path_factory.mktemp("run"))


@pytest.fixture(scope="session")
def onnx32(ckpt, tmp_path_factory) -> Path:
    from export.onnx import main

    out = tmp_path_factory.mktemp("onnx") / "denoiser.onnx"
    assert main(["--ckpt", str(ckpt.parent.parent), "--out", str(out)]) == 0  # a run dir: newest checkpoint
    return out


@pytest.fixture(scope="session")
def onnx16(ckpt, tmp_path_factory) -> Path:
    from export.onnx import main

    out = tmp_path_factory.mktemp("onnx") / "denoiser_fp16.onnx"
    assert main(["--ckpt", str(ckpt), "--out", str(out), "--fp16"]) == 0
    return out


@pytest.fixture(scope="session")
def torch_denoiser(ckpt):
    from tiny_model import THREADS

    from pipeline.model.denoiser import TorchDenoiser

    return TorchDenoiser.from_checkpoint(ckpt, threads=THREADS)
