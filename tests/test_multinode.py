"""Two nodes for real: one rank per node over gloo, a rank killed, a node lost, a preemption.

Needs a cluster of two nodes in their own network namespaces: `bash slurm/dev-cluster.sh start
--nodes 2` (CI starts it). Every run trains the tiny model for STEPS steps on CPU in fp32, and
each must log the very losses of one uninterrupted 2-process run on this host (torchrun).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_slurm import (
    JOB_TIMEOUT_S,
    TINY,
    job_env,
    job_outcome,
    launcher_cmd,
    sacct_states,
    slurm_nodes,
    steps_of,
    submit_train,
    wait_for_step,
)
from tiny_model import torchrun_cmd

from pipeline.checkpoint import EMA_FILE, complete_checkpoints
from pipeline.launch import node_address
from pipeline.train.distributed import LaunchError, bind_interface, read_env

REPO = Path(__file__).resolve().parents[1]
STEPS, CHECKPOINT_EVERY = 20, 4
TWO_NODES = ["--nodes=2", "--ntasks-per-node=1", "--cpus-per-task=1"]
# A killed rank's peer fails its next collective at once ("Connection closed by peer"); srun
# --wait=60 (slurm/train.sh) would end a rank that did not. So the job ends within this bound.
RANK_DEATH_BOUND_S = 90
# SlurmdTimeout (30 s in the dev cluster) until the node is DOWN, KillWait (30 s) for the
# survivors, some pings of slack.
NODE_DOWN_BOUND_S = 120


def _two_nodes_missing() -> str | None:
    nodes, why = slurm_nodes()
    if nodes is None or not all(nodes.get(n) in ("idle", "mixed") for n in ("node1", "node2")):
        return f"node1 and node2 are not both up ({why or nodes}); run bash slurm/dev-cluster.sh start --nodes 2"
    return None


@pytest.fixture(scope="module")
def two_nodes():
    reason = _two_nodes_missing()
    if reason:
        pytest.skip(reason)


needs_two_nodes = pytest.mark.usefixtures("two_nodes")


# --- binding the right interface (no cluster needed) --------------------------------------------


def test_bind_interface_picks_the_route_to_master_and_refuses_loopback_across_nodes():
    env = read_env({"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "localhost", "MASTER_PORT": "29400"}, cuda=False)
    environ = {}
    line = bind_interface(env, environ)
    assert environ == {"GLOO_SOCKET_IFNAME": "lo", "NCCL_SOCKET_IFNAME": "=lo"}
    assert "gloo on lo (127.0.0.1), master localhost=127.0.0.1:29400" in line
    environ = {"GLOO_SOCKET_IFNAME": "eth7"}  # the user's choice stands
    bind_interface(env, environ)
    assert environ["GLOO_SOCKET_IFNAME"] == "eth7"
    # The failure of every Debian cluster whose hostname maps to 127.0.1.1: caught before gloo hangs.
    with pytest.raises(
        LaunchError,
        match=r"MASTER_ADDR=localhost is 127\.0\.0\.1 .* loopback address, but the "
        r"job spans several nodes",
    ):
        bind_interface(env, {"SLURM_NNODES": "2"})
    with pytest.raises(LaunchError, match=r"MASTER_ADDR=no-such-node\.invalid does not resolve on "):
        bind_interface(dataclasses.replace(env, master_addr="no-such-node.invalid"), {})


@pytest.mark.integration
@needs_two_nodes
def test_master_addr_is_the_node_address_slurm_uses():
    assert node_address("node2") == socket.gethostbyname("node2") != "node2"
    assert node_address("no-such-node") == "no-such-node"  # unknown to Slurm: the name as given


# --- helpers ----------------------------------------------------------------------------------


def overrides(run_dir: Path, shards: Path) -> list[str]:
    return [
        f"run.dir={run_dir}",
        f"data.shards={shards}",
        *TINY,
        f"train.max_steps={STEPS}",
        f"train.checkpoint_every={CHECKPOINT_EVERY}",
    ]


def history(run_dir: Path) -> list[tuple]:
    """(step, loss, grad norm, lr) of every logged step, floats exactly as written."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [(r["step"], r["loss"], r["grad_norm"], r["lr"]) for r in rows]


def final_ema(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(complete_checkpoints(run_dir)[-1] / EMA_FILE)


def assert_same_training(run_dir: Path, reference: Path, log: str) -> None:
    assert history(run_dir) == history(reference), log
    ours, theirs = final_ema(run_dir), final_ema(reference)
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours), "EMA weights differ from the one-node run"


@pytest.fixture(scope="module")
def reference(tmp_path_factory, shards) -> Path:
    """The same training as 2 processes on this host (torchrun), uninterrupted."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    cmd = torchrun_cmd(*overrides(run_dir, shards))
    done = subprocess.run(cmd, cwd=REPO, env=job_env(), capture_output=True, text=True, timeout=JOB_TIMEOUT_S)
    assert done.returncode == 0, done.stdout + done.stderr
    assert [s for s, *_ in history(run_dir)] == list(range(1, STEPS + 1))
    return run_dir


def sbatch(tmp_path: Path, run_dir: Path, shards: Path) -> str:
    return submit_train(tmp_path, TWO_NODES, overrides(run_dir, shards))[0]


def running_job(tmp_path: Path, shards: Path, step: int) -> tuple[Path, str]:
    """Submit the two-node training and wait until it has logged `step`: its run directory and job id."""
    run_dir = tmp_path / "run"
    job_id = sbatch(tmp_path, run_dir, shards)
    wait_for_step(run_dir, step, job_id)
    return run_dir, job_id


def training_pid_on(node: str) -> int:
    """The training process running in the node's namespace (the dev cluster's node = namespace)."""
    pids = subprocess.run(["ip", "netns", "pids", f"ddpm-{node}"], capture_output=True, text=True, check=True)
    for pid in pids.stdout.split():
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except FileNotFoundError:
            continue
        if b"pipeline.train" in cmdline and os.path.basename(cmdline[0]).startswith(b"python"):
            return int(pid)
    pytest.fail(f"no training process on {node} (pids in its namespace: {pids.stdout.split()})")


def node_states() -> dict[str, str]:
    out = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %T"], capture_output=True, text=True, check=True)
    return dict(line.split() for line in out.stdout.splitlines())


# --- cross-node training --------------------------------------------------------------------------


@pytest.mark.integration
@needs_two_nodes
def test_sbatch_one_rank_per_node_equals_two_processes_on_one(tmp_path, shards, reference):
    run_dir = tmp_path / "run"
    job_id = sbatch(tmp_path, run_dir, shards)
    state, log = job_outcome(tmp_path, job_id)  # every 2 s; sbatch --wait polls at growing intervals
    assert state == "COMPLETED", log

    # Each rank on its own node, bound to that node's own interface and address.
    for rank, node in enumerate(["node1", "node2"]):
        addr = socket.gethostbyname(node)
        assert re.search(
            rf"rank {rank}/2 on {node}: gloo on eth0 \({re.escape(addr)}\), master "
            rf"{re.escape(socket.gethostbyname('node1'))}=",
            log,
        ), log
    assert "2 process(es)" in log
    out = subprocess.run(["sacct", "-n", "-X", "-P", "-j", job_id, "-o", "NodeList"], capture_output=True, text=True)
    assert out.stdout.split() == ["node[1-2]"]
    assert steps_of(complete_checkpoints(run_dir))[-1] == STEPS
    assert_same_training(run_dir, reference, log)


@pytest.mark.integration
@needs_two_nodes
def test_submitit_launcher_on_two_nodes(tmp_path, shards, reference):
    run_dir = tmp_path / "run"
    cmd = launcher_cmd("--nodes", "2", *overrides(run_dir, shards))
    done = subprocess.run(cmd, cwd=REPO, env=job_env(), capture_output=True, text=True, timeout=JOB_TIMEOUT_S)
    logs = "\n".join(p.read_text() for p in sorted((run_dir / "submitit").glob("*_log.*")))
    assert done.returncode == 0, done.stdout + done.stderr + logs
    job_id = done.stdout.split()[2].rstrip(":")
    assert f"job {job_id} finished: [0, 0]" in done.stdout
    assert "rank 1/2 on node2: gloo on eth0" in logs
    assert_same_training(run_dir, reference, logs)


# --- losing a rank, a node; preemption -------------------------------------------------------


@pytest.mark.integration
@needs_two_nodes
def test_rank_killed_on_node2_ends_the_job_and_a_resubmission_resumes(tmp_path, shards, reference):
    run_dir, job_id = running_job(tmp_path, shards, CHECKPOINT_EVERY + 1)  # a complete checkpoint is behind it
    os.kill(training_pid_on("node2"), signal.SIGKILL)
    killed = time.monotonic()
    state, log = job_outcome(tmp_path, job_id, timeout=RANK_DEATH_BOUND_S)
    ended_after = time.monotonic() - killed
    assert state == "FAILED", log
    assert "srun: error: node2: task 1: Killed" in log, log
    assert ended_after < RANK_DEATH_BOUND_S
    print(f"job {job_id} ended {ended_after:.1f} s after its rank on node2 was killed")

    # Resubmitted, the same command resumes from the newest complete checkpoint and finishes.
    resumed = steps_of(complete_checkpoints(run_dir))[-1]
    assert resumed >= CHECKPOINT_EVERY
    again = sbatch(tmp_path, run_dir, shards)
    state, log = job_outcome(tmp_path, again)
    assert state == "COMPLETED", log
    assert f"resumed from {run_dir}/checkpoints/step_{resumed:09d}" in log
    assert_same_training(run_dir, reference, log)


@pytest.mark.integration
@needs_two_nodes
def test_usr1_reaches_both_nodes_checkpoints_requeues_and_resumes(tmp_path, shards, reference):
    run_dir, job_id = running_job(tmp_path, shards, 2)
    subprocess.run(["scancel", "--signal=USR1", job_id], check=True)
    state, log = job_outcome(tmp_path, job_id)
    assert state == "COMPLETED", log

    assert sacct_states(job_id) == ["REQUEUED", "COMPLETED"], log
    assert "rank 0: SIGUSR1 received" in log and "rank 1: SIGUSR1 received" in log, log
    stopped = int(re.search(r"step (\d+): stopped on request", log).group(1))
    assert stopped < STEPS
    assert f"resumed from {run_dir}/checkpoints/step_{stopped:09d}" in log and "(restart 1)" in log
    assert_same_training(run_dir, reference, log)


@pytest.mark.integration
@needs_two_nodes
def test_node2_lost_job_requeued_waits_for_it_and_resumes(tmp_path, shards, reference):
    """node2 crashes (link cut, everything on it killed): Slurm marks it DOWN, ends the job with
    NODE_FAIL and requeues it (--requeue); with one node left the job waits. node2 back: it resumes."""
    run_dir, job_id = running_job(tmp_path, shards, CHECKPOINT_EVERY + 1)
    cluster = ["bash", "slurm/dev-cluster.sh"]
    subprocess.run([*cluster, "fail", "node2"], cwd=REPO, check=True, capture_output=True)
    failed = time.monotonic()
    try:
        deadline = failed + NODE_DOWN_BOUND_S
        # requeued: the failed run and the new one are both in accounting, the new one waits
        while time.monotonic() < deadline and not (
            sacct_states(job_id)[:1] == ["NODE_FAIL"]
            and len(sacct_states(job_id)) == 2
            and squeue(job_id).startswith("PENDING")
        ):
            time.sleep(2)
        down_after = time.monotonic() - failed
        assert sacct_states(job_id)[:1] == ["NODE_FAIL"], (sacct_states(job_id), node_states())
        assert node_states()["node2"].startswith("down"), node_states()
        assert squeue(job_id).startswith("PENDING"), squeue(job_id)
        print(f"job {job_id}: NODE_FAIL and requeued {down_after:.0f} s after node2 was lost; waits: {squeue(job_id)}")
    finally:
        subprocess.run([*cluster, "restore", "node2"], cwd=REPO, check=True, capture_output=True)
    state, log = job_outcome(tmp_path, job_id)
    assert state == "COMPLETED", log
    assert "DUE TO NODE FAILURE" in log
    resumed = int(re.search(r"resumed from .*/step_(\d+) ", log).group(1))
    assert resumed >= CHECKPOINT_EVERY and "(restart 1)" in log
    assert_same_training(run_dir, reference, log)


def squeue(job_id: str) -> str:
    """'STATE REASON' of a queued job, '' once it left the queue."""
    out = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T %r"], capture_output=True, text=True)
    return out.stdout.strip()
