"""The tiny model the tests train, export and sample: its config overrides, a checkpoint made
without training, a sidecar, and 2-process torchrun trainings that tests start, watch and kill.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.config import load_config
from pipeline.core.config import Config, DiffusionConfig, ModelConfig
from pipeline.core.sidecar import Sidecar

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
TINY_CPU_YAML = REPO / "configs" / "tiny_cpu.yaml"
THREADS = 1  # the test machine is shared: one thread avoids OpenMP spin-wait pile-ups
TINY = [
    "model.image_size=16",
    "model.ch=32",
    "model.ch_mult=[1,2]",
    "model.num_res_blocks=1",
    "model.attn_resolutions=[8]",
    "model.dropout=0.1",
    "data.num_workers=0",
    "data.shuffle_buffer=50",
    "train.batch_size=8",
    "train.lr=1e-3",
    "train.warmup_steps=2",
    "ema.decay=0.999",
    "ema.warmup=true",
    "log.every=1",
    "log.sample_every=0",
    "log.tensorboard=false",
]


def tiny_config(tmp_path: Path, shards: Path, *overrides: str) -> Config:
    return load_config(TINY_CPU_YAML, TINY + [f"data.shards={shards}", f"run.dir={tmp_path / 'run'}", *overrides])


def losses(run_dir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def make_checkpoint(run_dir: Path, step: int = 10) -> Path:
    """A complete checkpoint of the tiny U-Net, no training: its zero-initialised layers get small
    random weights so that its output depends on every path through the network."""
    import torch

    from pipeline.checkpoint import checkpoint_dir, mark_complete, save_export_files
    from pipeline.core.config import DiffusionConfig, ModelConfig
    from pipeline.model.unet import UNet

    torch.manual_seed(0)
    cfg = Config(
        model=ModelConfig(image_size=16, ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,), dropout=0.0),
        diffusion=DiffusionConfig(num_timesteps=1000),
    )
    model = UNet(cfg.model)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.normal_(0.0, 0.05)
    ckpt = checkpoint_dir(run_dir, step)
    ckpt.mkdir(parents=True)
    online = {k: v + 0.01 * torch.randn_like(v) for k, v in model.state_dict().items()}  # differs from the EMA
    save_export_files(ckpt, model.state_dict(), cfg, step, images_seen=640, model_state=online)
    mark_complete(ckpt)
    return ckpt


def tiny_sidecar(fmt: str = "onnx", batch: tuple = (1, 1, None), **fields) -> Sidecar:
    """The sidecar of an 8 px float32 model with a two-step schedule; `fields` change any other key."""
    info = Sidecar(
        format=fmt,
        dtype="float32",
        model=ModelConfig(image_size=8, ch_mult=(1,), attn_resolutions=()),
        diffusion=DiffusionConfig(num_timesteps=2, beta_start=0.1, beta_end=0.2),
        batch_min=batch[0],
        batch_opt=batch[1],
        batch_max=batch[2],
    )
    return dataclasses.replace(info, **fields)


# --- 2-process trainings (torchrun, gloo, CPU) ------------------------------------------------------

TORCHRUN_2 = [PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def torchrun_cmd(*args: str) -> list[str]:
    """`torchrun --standalone --nproc_per_node 2 -m pipeline.train` on configs/tiny_cpu.yaml with `args`."""
    return [*TORCHRUN_2, "-m", "pipeline.train", "--config", str(TINY_CPU_YAML), *args]


def torchrun(
    shards: Path, run_dir: Path, *overrides: str, env: dict | None = None, launched: list | None = None
) -> subprocess.Popen:
    """Start a 2-process training of the tiny model; `launched` (the fixture) kills it if the test fails."""
    cmd = torchrun_cmd(*TINY, f"data.shards={shards}", f"run.dir={run_dir}", *overrides)
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    proc = subprocess.Popen(cmd, cwd=REPO, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if launched is not None:
        launched.append(proc)
    return proc


def finish(proc: subprocess.Popen, timeout: float = 240) -> tuple[int, str]:
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


def workers(proc: subprocess.Popen, recursive: bool = False) -> dict:
    """The training processes torchrun started, by rank (they live in sessions of their own);
    recursive: their DataLoader workers too, keyed by pid."""
    import psutil

    found = {}
    try:
        children = psutil.Process(proc.pid).children(recursive=recursive)
    except psutil.Error:
        return found
    for child in children:
        try:
            found[child.pid if recursive else int(child.environ()["RANK"])] = child
        except (KeyError, psutil.Error):
            pass
    return found


def kill_job(proc: subprocess.Popen) -> None:
    """SIGKILL torchrun and every process under it, as a lost node would."""
    for p in [*workers(proc, recursive=True).values()]:
        p.kill()
    proc.kill()
    proc.communicate()


def wait_for(condition, proc: subprocess.Popen, timeout: float = 180):
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None or time.monotonic() > deadline:
            out = proc.communicate()[0] if proc.poll() is not None else "(still running)"
            pytest.fail(f"condition not reached before the run ended or timed out:\n{out[-3000:]}")
        time.sleep(0.05)
