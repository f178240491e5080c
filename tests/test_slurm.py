"""Training under a real Slurm: `sbatch slurm/train.sh`, the submitit launcher, USR1 preemption and requeue.

Needs a cluster: `bash slurm/dev-cluster.sh start` brings up a one-node one on this machine.
Each job runs 2 tasks (ranks) of the tiny model on CPU over gloo.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.checkpoint import complete_checkpoints, step_of

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[1]
TINY = [
    "model.image_size=16",
    "model.ch=32",
    "train.batch_size=4",
    "train.warmup_steps=2",
    "log.every=1",
    "log.sample_every=0",
    "log.tensorboard=false",
    "data.num_workers=0",
    "train.keep_checkpoints=5",
]
TWO_TASKS = ["--ntasks-per-node=2", "--cpus-per-task=1"]
JOB_TIMEOUT_S = 600  # generous: the first DeepSpeed start may compile its CPU comm op


def slurm_nodes() -> tuple[dict[str, str] | None, str]:
    """({node: state} as sinfo reports them, ""), or (None, why Slurm cannot be asked here)."""
    if shutil.which("sbatch") is None:
        return None, "sbatch is not on PATH"
    try:
        out = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %T"], capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        return None, "sinfo timed out: slurmctld is not answering (bash slurm/dev-cluster.sh status)"
    if out.returncode != 0:
        return None, f"sinfo failed: {out.stderr.strip()}"
    return {line.split()[0]: line.split()[1].rstrip("*~#") for line in out.stdout.splitlines() if line.strip()}, ""


def _cluster_missing() -> str | None:
    nodes, why = slurm_nodes()
    if nodes is None or not any(s in ("idle", "mixed", "allocated") for s in nodes.values()):
        return f"no Slurm node is up ({why or nodes}); run bash slurm/dev-cluster.sh start"
    return None


@pytest.fixture(scope="module", autouse=True)
def cluster():
    reason = _cluster_missing()
    if reason:
        pytest.skip(reason)


def job_env() -> dict:
    """The test's Python on PATH (sbatch exports the environment to the job), one thread per rank."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    if (Path(sys.prefix) / "bin" / "activate").is_file():
        env["DDPM_VENV"] = sys.prefix
    return env


def overrides(run_dir: Path, shards: Path, *extra: str) -> list[str]:
    return [f"run.dir={run_dir}", f"data.shards={shards}", *TINY, *extra]


def sacct_states(job_id: str) -> list[str]:
    """Every run of the job, oldest first: REQUEUED for each requeue, then the current state."""
    out = subprocess.run(
        ["sacct", "-n", "-X", "-P", "--duplicates", "-j", job_id, "-o", "State"],
        capture_output=True,
        text=True,
        check=True,
    )
    return [line.split()[0] for line in out.stdout.splitlines() if line.strip()]


def wait_for_job(job_id: str, timeout: float = JOB_TIMEOUT_S) -> str:
    """Poll accounting until the job's latest run has ended; returns its state."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        states = sacct_states(job_id)
        if states and states[-1] in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
            return states[-1]
        time.sleep(2)
    subprocess.run(["scancel", job_id])
    pytest.fail(f"job {job_id} did not finish within {timeout} s (states: {sacct_states(job_id)})")


def metric_steps(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line)["step"] for line in path.read_text().splitlines() if line.strip()]


def wait_for_step(run_dir: Path, step: int, job_id: str, timeout: float = JOB_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(s >= step for s in metric_steps(run_dir)):
            return
        if sacct_states(job_id)[-1:] in (["FAILED"], ["CANCELLED"], ["COMPLETED"]):
            pytest.fail(f"job {job_id} ended before step {step}")
        time.sleep(0.5)
    pytest.fail(f"job {job_id} did not reach step {step} within {timeout} s")


def steps_of(checkpoints: list[Path]) -> list[int]:
    return [step_of(c) for c in checkpoints]


def submit_train(tmp_path: Path, options: list[str], train_args: list[str]) -> tuple[str, subprocess.CompletedProcess]:
    """`sbatch --parsable OPTIONS slurm/train.sh configs/tiny_cpu.yaml TRAIN_ARGS`: the job id and sbatch's result."""
    script = ["slurm/train.sh", "configs/tiny_cpu.yaml", *train_args]
    cmd = ["sbatch", "--parsable", *options, f"--output={tmp_path}/slurm-%j.out", *script]
    done = subprocess.run(cmd, cwd=REPO, env=job_env(), capture_output=True, text=True, timeout=JOB_TIMEOUT_S)
    assert done.stdout.strip(), done.stderr
    return done.stdout.split()[0].split(";")[0], done


def job_log(tmp_path: Path, job_id: str) -> str:
    return (tmp_path / f"slurm-{job_id}.out").read_text()


def job_outcome(tmp_path: Path, job_id: str, timeout: float = JOB_TIMEOUT_S) -> tuple[str, str]:
    """Wait for the job submitted by submit_train to end: its state and its log."""
    state = wait_for_job(job_id, timeout)
    return state, job_log(tmp_path, job_id)


def launcher_cmd(*args: str) -> list[str]:
    """`python -m pipeline.launch` on configs/tiny_cpu.yaml, one CPU per task, waiting for the job."""
    options = ["--config", "configs/tiny_cpu.yaml", "--cpus-per-task", "1", "--time", "30", "--wait"]
    return [sys.executable, "-m", "pipeline.launch", *options, *args]


def test_sbatch_two_tasks_train_and_checkpoint(tmp_path, shards):
    run_dir = tmp_path / "run"
    train_args = overrides(run_dir, shards, "train.max_steps=4", "train.checkpoint_every=2")
    job_id, done = submit_train(tmp_path, ["--wait", *TWO_TASKS], train_args)
    log = job_log(tmp_path, job_id)
    assert done.returncode == 0, f"{done.stderr}\n{log}"

    assert "2 process(es)" in log, log  # one world of 2 ranks, not 2 single-process runs
    assert steps_of(complete_checkpoints(run_dir)) == [2, 4]
    assert metric_steps(run_dir) == [1, 2, 3, 4]
    assert wait_for_job(job_id) == "COMPLETED"  # accounting may trail sbatch --wait by a moment
    assert sacct_states(job_id) == ["COMPLETED"]


def test_sbatch_usr1_checkpoints_requeues_and_resumes(tmp_path, shards):
    run_dir, max_steps = tmp_path / "run", 30
    train_args = overrides(run_dir, shards, f"train.max_steps={max_steps}", "train.checkpoint_every=1000")
    job_id, done = submit_train(tmp_path, TWO_TASKS, train_args)
    assert done.returncode == 0, done.stderr
    wait_for_step(run_dir, 2, job_id)
    # What Slurm does 120 s before the time limit (--signal=USR1@120): USR1 to every task.
    subprocess.run(["scancel", "--signal=USR1", job_id], check=True)
    state, log = job_outcome(tmp_path, job_id)
    assert state == "COMPLETED", log

    assert sacct_states(job_id) == ["REQUEUED", "COMPLETED"], log
    (preempted, final) = steps_of(complete_checkpoints(run_dir))
    assert 2 <= preempted < max_steps and final == max_steps, log
    assert f"step {preempted}: stopped on request" in log
    assert f"resumed from {run_dir}/checkpoints/step_{preempted:09d} (step {preempted}," in log
    assert "train.sh: job" in log and "(restart 1)" in log
    # every step logged exactly once: the resumed run picked up where the signal stopped the first
    assert metric_steps(run_dir) == list(range(1, max_steps + 1))


def test_submitit_launcher_trains_and_survives_preemption(tmp_path, shards):
    run_dir, max_steps = tmp_path / "run", 30
    train_args = overrides(run_dir, shards, f"train.max_steps={max_steps}", "train.checkpoint_every=1000")
    cmd = launcher_cmd("--tasks-per-node", "2", *train_args)
    launcher = subprocess.Popen(
        cmd, cwd=REPO, env=job_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        first = launcher.stdout.readline()
        assert first.startswith("submitted job "), first + launcher.stdout.read()
        job_id = first.split()[2].rstrip(":")
        wait_for_step(run_dir, 2, job_id)
        subprocess.run(["scancel", "--signal=USR1", job_id], check=True)
        rest, _ = launcher.communicate(timeout=JOB_TIMEOUT_S)
    finally:
        if launcher.poll() is None:
            launcher.kill()
    logs = "\n".join(p.read_text() for p in sorted((run_dir / "submitit").glob(f"{job_id}_*_log.*")))
    assert launcher.returncode == 0, first + rest + logs
    assert f"job {job_id} finished: [0, 0]" in rest  # both ranks ran the training and returned 0

    assert wait_for_job(job_id) == "COMPLETED"  # the results are in before the processes have left
    assert sacct_states(job_id) == ["REQUEUED", "COMPLETED"], logs
    (preempted, final) = steps_of(complete_checkpoints(run_dir))
    assert 2 <= preempted < max_steps and final == max_steps, logs
    assert f"resumed from {run_dir}/checkpoints/step_{preempted:09d}" in logs
    assert metric_steps(run_dir) == list(range(1, max_steps + 1))
