"""Submit training to Slurm with submitit: one task per GPU, every task trains, requeued on preemption.

    python -m pipeline.launch --config configs/celebahq256.yaml --nodes 2 --gpus-per-node 8 --time 1440
    python -m pipeline.launch --config configs/tiny_cpu.yaml --nodes 2 --cpus-per-task 1 --wait   (one rank per node)
    python -m pipeline.launch --config configs/tiny_cpu.yaml --local train.max_steps=10

How preemption works: Slurm sends USR1 to every task 120 s before the time limit (or on
`scancel --signal=USR1 JOB`). The training's own handler catches it, writes a checkpoint
on all ranks and returns REQUEUE_EXIT_CODE. Only then does rank 0 hand over to submitit's
handler (its USR2, raised here), which pickles `Train.checkpoint()` and runs
`scontrol requeue`. Letting Slurm send submitit's signal directly would requeue the job
at once, before the training saved anything.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import submitit

from pipeline.config import load_config_or_report

SIGNAL_DELAY_S = 120  # seconds between the USR1 warning and the kill; matches slurm/train.sh


def master_port(job_id: str) -> int:
    """A rendezvous port unique to the job and stable across its requeues (as slurm/train.sh)."""
    return 10000 + int(job_id) % 50000


def node_address(node: str) -> str:
    """The node's address as Slurm reaches it (NodeAddr), else its name; as slurm/train.sh.

    Not the name itself: on its own node a name may resolve to 127.0.1.1 (Debian's /etc/hosts).
    """
    try:
        out = subprocess.run(["scontrol", "show", "node", node], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return node
    found = re.search(r"\bNodeAddr=(\S+)", out.stdout)
    return found.group(1) if out.returncode == 0 and found else node


class Train(submitit.helpers.Checkpointable):
    """The job's callable: run `pipeline.train.loop.main(argv)` on this task; requeue after a checkpoint."""

    def __init__(self, argv: list[str]):
        self.argv = list(argv)

    def __call__(self) -> int:
        from pipeline.train import loop  # imported in the job: torch and DeepSpeed are not needed to submit

        in_slurm = os.environ.get("SUBMITIT_EXECUTOR") == "slurm"
        if in_slurm:
            env = submitit.JobEnvironment()
            os.environ.update(
                RANK=str(env.global_rank),
                LOCAL_RANK=str(env.local_rank),
                WORLD_SIZE=str(env.num_tasks),
                MASTER_ADDR=node_address(env.hostnames[0]),
                MASTER_PORT=str(master_port(env.raw_job_id)),
            )
        status = loop.main(self.argv)
        if not in_slurm:  # --local: the caller gets the exit status (REQUEUE_EXIT_CODE: run it again)
            return status
        if status == loop.REQUEUE_EXIT_CODE:
            self._requeue(status)
        if status != 0:  # submitit records the job as failed, with this message
            raise RuntimeError(f"pipeline.train exited with status {status}")
        return status

    def _requeue(self, status: int) -> None:
        """The checkpoint is on disk on every rank: let submitit requeue the job (rank 0) and exit."""
        usr_sig = getattr(signal, "SIG" + submitit.JobEnvironment.USR_SIG)
        if submitit.JobEnvironment().global_rank == 0:
            if not callable(signal.getsignal(usr_sig)):
                raise RuntimeError(f"submitit's {usr_sig.name} handler is gone; cannot requeue")
            # submitit's handler: has_timed_out bookkeeping, pickles self.checkpoint(),
            # `scontrol requeue`, sys.exit. It runs as soon as raise_signal returns.
            signal.raise_signal(usr_sig)
        # Other ranks: no result pickle, so submitit keeps waiting for the requeued run.
        raise SystemExit(status)

    def checkpoint(self, *args, **kwargs) -> submitit.helpers.DelayedSubmission:
        """Resubmit the same call: the training state lives in run.dir and auto-resumes from it."""
        return submitit.helpers.DelayedSubmission(Train(self.argv), *args, **kwargs)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m pipeline.launch", description=__doc__.split("\n")[0])
    p.add_argument("--config", required=True, help="experiment YAML, e.g. configs/celebahq256.yaml")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, default=0, help="0 trains on CPUs (gloo)")
    p.add_argument("--tasks-per-node", type=int, default=0, help="default: one per GPU (1 without GPUs)")
    p.add_argument("--cpus-per-task", type=int, default=8)
    p.add_argument("--partition", help="Slurm partition (default: the cluster's)")
    p.add_argument("--account", help="Slurm account to charge")
    p.add_argument("--time", type=int, default=1440, metavar="MIN", help="time limit per run of the job")
    p.add_argument("--max-requeues", type=int, default=10, help="after time-outs; preemptions are not counted")
    p.add_argument("--local", action="store_true", help="run the same callable in this process instead")
    p.add_argument("--wait", action="store_true", help="block until the job finishes; exit with its status")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.lr=1e-4")
    return p.parse_args(argv)


def tasks_per_node(args: argparse.Namespace) -> int:
    return args.tasks_per_node or max(args.gpus_per_node, 1)


def make_executor(args: argparse.Namespace, folder: Path) -> submitit.AutoExecutor:
    """An AutoExecutor for Slurm: USR1 as the warning signal, cpus-per-task passed on to srun."""
    executor = submitit.AutoExecutor(folder=folder, cluster="slurm", slurm_max_num_timeout=args.max_requeues)
    params = dict(
        name="ddpm",
        nodes=args.nodes,
        tasks_per_node=tasks_per_node(args),
        cpus_per_task=args.cpus_per_task,
        timeout_min=args.time,
        # The training's signal, not submitit's USR2 (see the module docstring).
        slurm_additional_parameters={"signal": f"USR1@{SIGNAL_DELAY_S}", "requeue": True},
        # srun (Slurm >= 22.05) no longer inherits --cpus-per-task from the allocation.
        slurm_srun_args=[f"--cpus-per-task={args.cpus_per_task}"],
        slurm_setup=[f"export OMP_NUM_THREADS={args.cpus_per_task}"],
    )
    if args.gpus_per_node:
        params["gpus_per_node"] = args.gpus_per_node
    if args.partition:
        params["slurm_partition"] = args.partition
    if args.account:
        params["slurm_account"] = args.account
    executor.update_parameters(**params)
    return executor


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cfg = load_config_or_report(args.config, args.overrides)
    if cfg is None:
        return 2
    train_argv = ["--config", args.config, *args.overrides]
    if args.local:
        return Train(train_argv)()

    folder = Path(cfg.run.dir).resolve() / "submitit"
    try:
        job = make_executor(args, folder).submit(Train(train_argv))
    except Exception as e:  # sbatch refused: bad partition, account, resources...
        print(f"error: submission failed: {str(e).strip().splitlines()[-1]}", file=sys.stderr)
        return 1
    print(f"submitted job {job.job_id}: {args.nodes} node(s) x {tasks_per_node(args)} task(s)", flush=True)
    print(f"logs: {job.paths.stdout} (rank 0), {job.paths.stderr}")
    print(f"all ranks' logs: {folder}/{job.job_id}_*_log.{{out,err}}")
    if not args.wait:
        return 0
    try:
        statuses = job.results()
    except Exception as e:  # a failed or cancelled job: submitit raises with the task's traceback
        print(f"error: job {job.job_id} failed: {str(e).strip().splitlines()[-1]}", file=sys.stderr)
        return 1
    print(f"job {job.job_id} finished: {statuses}")
    return max(statuses)


if __name__ == "__main__":
    sys.exit(main())
