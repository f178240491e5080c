#!/bin/bash
# Train under Slurm: one process per task (= per GPU), resumed after preemption.
#
#   sbatch slurm/train.sh configs/celebahq256.yaml [key=value ...]
#   sbatch --nodes=4 --ntasks-per-node=8 --gpus-per-node=8 slurm/train.sh configs/celebahq256.yaml
#   sbatch --nodes=2 --ntasks-per-node=1 --cpus-per-task=1 slurm/train.sh configs/tiny_cpu.yaml   (dev cluster)
#
# Options on the sbatch line override the defaults below. Submit from the repository
# root (logs/ is relative to it). 120 s before the time limit (or on `scancel --signal=USR1`)
# every task gets USR1, writes a checkpoint and exits with the training's requeue status;
# this script then requeues the job, which resumes from that checkpoint.
#
#SBATCH --job-name=ddpm
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=8
#SBATCH --signal=USR1@120
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=logs/%x-%j.out

# Not B:USR1: the signal must reach the training processes in the srun step, not this
# shell. The shell only has to survive `scancel --full --signal=USR1` while srun runs.
trap 'echo "train.sh: USR1 received; the training checkpoints and exits"' USR1

cd "${DDPM_REPO:-$SLURM_SUBMIT_DIR}" || exit 2
if [[ ! -d pipeline ]]; then
    echo "train.sh: $(pwd) is not the repository root; submit from there or set DDPM_REPO" >&2
    exit 2
fi
if [[ $# -lt 1 ]]; then
    echo "usage: sbatch slurm/train.sh CONFIG.yaml [key=value ...]" >&2
    exit 2
fi
if [[ -f ${DDPM_VENV:-.venv}/bin/activate ]]; then
    source "${DDPM_VENV:-.venv}/bin/activate"
fi

# Rendezvous for torch.distributed: the first node's address as Slurm reaches it (NodeAddr;
# its name may resolve to 127.0.1.1 on that node), a port unique to the job (stable across
# requeues, so a restarted job finds the same port free again). Each rank then binds gloo/NCCL
# to its interface towards this address (pipeline/train/distributed.py; GLOO/NCCL_SOCKET_IFNAME win).
first_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
MASTER_ADDR=$(scontrol show node "$first_node" | sed -n 's/.*NodeAddr=\([^ ]*\).*/\1/p')
export MASTER_ADDR=${MASTER_ADDR:-$first_node}
export MASTER_PORT=$((10000 + SLURM_JOB_ID % 50000))
export OMP_NUM_THREADS=${SLURM_CPUS_PER_TASK:-1}

gpus=${SLURM_GPUS_ON_NODE:-0}
if ((gpus > 0 && gpus != SLURM_NTASKS_PER_NODE)); then
    echo "train.sh: warning: $gpus GPUs per node but --ntasks-per-node=$SLURM_NTASKS_PER_NODE;" \
        "one task per GPU is intended" >&2
fi
echo "train.sh: job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on $SLURM_JOB_NODELIST:" \
    "$SLURM_NTASKS tasks, $gpus GPUs per node, master $MASTER_ADDR:$MASTER_PORT, $(date -Is)"

# srun in Slurm 22.05+ does not inherit --cpus-per-task from sbatch: pass it on.
# --wait=60, not --kill-on-bad-exit: after a USR1 checkpoint every rank exits with the requeue
# status within moments of the others, and killing the slower ones would turn that status
# into 143. A rank that crashes still takes the others down, 60 s later, instead of leaving
# them blocked in a collective until the process-group timeout. A node that dies is Slurm's
# to notice (SlurmdTimeout): the job ends NODE_FAIL and, with --requeue, is requeued.
srun --wait=60 --cpus-per-task="${SLURM_CPUS_PER_TASK:-1}" \
    python -m pipeline.train --config "$@"
status=$?

if ((status != 0)); then
    requeue_status=$(python -c 'from pipeline.train.loop import REQUEUE_EXIT_CODE; print(REQUEUE_EXIT_CODE)')
    if [[ $status == "$requeue_status" ]]; then
        echo "train.sh: checkpointed on signal; requeueing job $SLURM_JOB_ID, $(date -Is)"
        scontrol requeue "$SLURM_JOB_ID"
        exit 0
    fi
fi
echo "train.sh: training exited with status $status, $(date -Is)"
exit "$status"
