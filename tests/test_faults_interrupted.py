"""The fault suite, interrupted work: a full disk (a real small tmpfs) and kill -9 at seeded points.
README's "What survives what" is built from it and from test_faults.py (damaged files).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from test_faults import EVERY_2, SEED, one_line
from tiny_model import PYTHON, REPO, finish, kill_job, losses, tiny_config, torchrun, wait_for, workers

from pipeline.checkpoint import complete_checkpoints
from pipeline.core.sidecar import read_sidecar, sidecar_path

pytestmark = pytest.mark.integration


# --- a full disk: a real small tmpfs ----------------------------------------------------------------


@contextlib.contextmanager
def small_tmpfs(where: Path, size: str):
    where.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True, text=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {(mounted.stderr or mounted.stdout).strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def fill(where: Path, leave_bytes: int) -> None:
    """Leave about `leave_bytes` free on the filesystem of `where`."""
    st = os.statvfs(where)
    free = st.f_bavail * st.f_frsize
    with open(where / "filler", "wb") as f:
        f.write(b"\0" * max(0, free - leave_bytes))


def digests(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def no_temporaries(root: Path) -> None:
    left = [p for p in root.rglob("*") if ".tmp" in p.name]
    assert not left, left


def test_full_disk_while_checkpointing_keeps_the_earlier_checkpoints(shards16, tmp_path, capsys, in_process):
    from pipeline.checkpoint import read_checkpoint, verify_deepspeed_files
    from pipeline.train.loop import train

    with small_tmpfs(tmp_path / "disk", "48m") as disk:
        run = disk / "run"
        args = [*EVERY_2, f"run.dir={run}"]
        assert train(tiny_config(tmp_path, shards16, "train.max_steps=4", *args)) == 0
        before = digests(run / "checkpoints")
        fill(disk, 256 * 1024)
        capsys.readouterr()
        assert train(tiny_config(tmp_path, shards16, "train.max_steps=6", *args)) == 2
        line = one_line(
            capsys.readouterr().err,
            "no space left on device",
            f"removed the unfinished checkpoint {run / 'checkpoints' / 'step_000000006'}",
        )
        assert str(run / "checkpoints" / "step_000000006") in line.split(": no space")[0]
        assert not (run / "checkpoints" / "step_000000006").exists()
        assert digests(run / "checkpoints") == before  # every earlier file intact and whole
        no_temporaries(run)
        for ckpt in complete_checkpoints(run):
            read_checkpoint(ckpt).load_unet()
            verify_deepspeed_files(ckpt / "deepspeed")


def test_full_disk_while_writing_shards_keeps_the_finished_ones(tmp_path):
    with small_tmpfs(tmp_path / "disk", "2m") as disk:
        out = disk / "shards"
        fill(disk, 96 * 1024)
        options = ["--synthetic", "200", "--size", "16", "--out", str(out), "--shard-size", "20", "--workers", "1"]
        cli = subprocess.run(
            [PYTHON, "-m", "data_prep", *options], cwd=REPO, capture_output=True, text=True, timeout=120
        )
        assert cli.returncode == 1, cli.stderr
        line = one_line(cli.stderr, "no space left on device", str(out))
        assert "Traceback" not in cli.stderr and line.startswith("data_prep: error:")
        no_temporaries(out)
        from data_prep.build import JOURNAL_NAME
        from data_prep.shards import check_shard

        journal = [json.loads(x) for x in (out / JOURNAL_NAME).read_text().splitlines()[1:] if x.strip()]
        finished = [e["shard"] for e in journal if e.get("shard")]
        assert all(check_shard(out, info) is None for info in finished)  # whole, hashes as journaled
        assert {p.name for p in out.glob("*.tar")} == {info["name"] for info in finished} != set()
        print(line)


def test_full_disk_while_exporting_or_sampling_keeps_the_earlier_files(onnx32, tmp_path, capsys):
    from export.onnx import main as export_onnx
    from export.sample import main as sample

    with small_tmpfs(tmp_path / "disk", "4m") as disk:
        grid = disk / "grid.npz"
        assert sample(["--model", str(onnx32), "--out", str(grid), "--num", "2", "--steps", "2"]) == 0
        kept = grid.read_bytes()
        fill(disk, 8 * 1024)
        capsys.readouterr()
        assert sample(["--model", str(onnx32), "--out", str(grid), "--num", "64", "--steps", "2", "--seed", "1"]) == 1
        err = capsys.readouterr().err  # the model line and progress, then the error
        assert "Traceback" not in err and f"{grid}: no space left on device" in err.strip().splitlines()[-1], err
        assert grid.read_bytes() == kept
        source = read_sidecar(onnx32).source_checkpoint  # the checkpoint it was exported from
        assert export_onnx(["--ckpt", source, "--out", str(disk / "d.onnx")]) == 1
        one_line(capsys.readouterr().err, f"{disk / 'd.onnx'}: no space left on device")
        assert not (disk / "d.onnx").exists() and not sidecar_path(disk / "d.onnx").exists()
        no_temporaries(disk)


# --- kill -9 at seeded points, bit-exact resume (2 ranks, ZeRO-1: per-rank optimizer files) ----------

KILL_ARGS = ["zero.stage=1", "train.max_steps=6", *EVERY_2]


@pytest.fixture(scope="module")
def straight(shards16, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("straight") / "run"
    status, out = finish(torchrun(shards16, run, *KILL_ARGS))
    assert status == 0, out[-3000:]
    return run


def same_run(resumed: Path, straight: Path) -> None:
    from safetensors.torch import load_file

    assert losses(resumed) == losses(straight)  # bit-equal, step by step
    name = "checkpoints/step_000000006/ema.safetensors"
    a, b = load_file(str(resumed / name)), load_file(str(straight / name))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


KILL_CASES = [
    ("job", "mid-step"),
    ("job", "deepspeed files"),
    ("job", "export files"),
    ("rank 1", "mid-step"),
    ("rank 1", "deepspeed files"),
]


@pytest.mark.parametrize("victim,point", KILL_CASES)
def test_kill_9_at_a_seeded_point_resumes_bit_exact(victim, point, shards16, straight, tmp_path, launched):
    """SIGKILL the whole job (torchrun and every process under it) or rank 1 alone: mid-step, while
    DeepSpeed writes a checkpoint's per-rank files, or after the export files but before COMPLETE."""
    from pipeline.train.resume import PAUSE_BEFORE_COMPLETE_ENV

    rng = random.Random(f"{SEED}/{victim}/{point}")
    at, rows, delay = rng.choice([2, 4]), rng.randint(1, 5), rng.uniform(0.0, 0.05)
    run = tmp_path / "run"
    ckpt = run / "checkpoints" / f"step_{at:09d}"
    metrics = run / "metrics.jsonl"
    proc = torchrun(shards16, run, *KILL_ARGS, env={PAUSE_BEFORE_COMPLETE_ENV: f"{at}:60"}, launched=launched)
    if point == "mid-step":
        wait_for(lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= rows, proc)
    elif point == "deepspeed files":
        wait_for(lambda: (ckpt / "deepspeed").is_dir() and any((ckpt / "deepspeed").iterdir()), proc)
    else:
        wait_for(lambda: (ckpt / "model.json").exists(), proc)
    time.sleep(delay)
    if victim == "job":
        kill_job(proc)
    else:
        workers(proc)[1].send_signal(signal.SIGKILL)  # torchrun sees it die and stops rank 0
        status, out = finish(proc, timeout=120)
        assert status != 0, out[-3000:]
    if point != "mid-step":
        assert not (ckpt / "COMPLETE").exists()
    status, out = finish(torchrun(shards16, run, *KILL_ARGS, launched=launched))
    assert status == 0, out[-3000:]
    if point != "mid-step":
        assert f"removed incomplete checkpoint {ckpt}" in out
    same_run(run, straight)
