"""Process-group set-up for every launcher: a single process, torchrun, or srun under Slurm.

Rank, local rank and world size come from torchrun's variables (RANK, LOCAL_RANK, WORLD_SIZE)
or Slurm's (SLURM_PROCID, SLURM_LOCALID, SLURM_NTASKS); the rendezvous address from
MASTER_ADDR / MASTER_PORT, which the batch script exports. DeepSpeed's own launcher is not
needed. Without CUDA, DeepSpeed is pointed at its CPU accelerator and gloo.

Across nodes, each rank must also tell the others an address they can reach. Left alone, gloo
advertises whatever this host's name resolves to, which on many machines (Debian's /etc/hosts)
is 127.0.1.1: the rendezvous works, then `connectFullMesh` fails with "Connection refused,
remote=[127.0.0.1]". So before the process group forms, GLOO_SOCKET_IFNAME and
NCCL_SOCKET_IFNAME are set to the interface this host uses to reach MASTER_ADDR (on the master
node itself: the interface that holds that address), unless the user set them already.
How long a rank waits for a dead peer: see `init`.
"""

from __future__ import annotations

import gc
import ipaddress
import logging
import os
import socket
import sys
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


class LaunchError(RuntimeError):
    """The environment does not describe a usable process group; the message names the variable."""


@dataclass(frozen=True)
class DistEnv:
    rank: int
    local_rank: int
    world_size: int
    master_addr: str
    master_port: int
    backend: str  # nccl | gloo
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _int_var(environ, name: str) -> int:
    try:
        return int(environ[name])
    except ValueError:
        raise LaunchError(f"environment variable {name}={environ[name]!r} is not an integer") from None


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (for a single-node rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_env(environ=os.environ, cuda: bool | None = None, device_count: int | None = None) -> DistEnv:
    """Where this process sits in the job, from torchrun's or Slurm's variables (or alone)."""
    cuda = torch.cuda.is_available() if cuda is None else cuda
    if "RANK" in environ and "WORLD_SIZE" in environ:  # torchrun, submitit, or set by hand
        rank, world_size = _int_var(environ, "RANK"), _int_var(environ, "WORLD_SIZE")
        local_rank = _int_var(environ, "LOCAL_RANK") if "LOCAL_RANK" in environ else rank
    elif "SLURM_PROCID" in environ and "SLURM_NTASKS" in environ:  # srun, one task per GPU
        rank, world_size = _int_var(environ, "SLURM_PROCID"), _int_var(environ, "SLURM_NTASKS")
        local_rank = _int_var(environ, "SLURM_LOCALID") if "SLURM_LOCALID" in environ else 0
    else:
        rank, local_rank, world_size = 0, 0, 1
    if not 0 <= rank < world_size:
        raise LaunchError(f"rank {rank} is outside world size {world_size}")

    if world_size > 1 and ("MASTER_ADDR" not in environ or "MASTER_PORT" not in environ):
        raise LaunchError(
            "MASTER_ADDR and MASTER_PORT must be set for a multi-process run "
            "(torchrun sets them; under srun the batch script exports them, see slurm/train.sh)"
        )
    master_addr = environ.get("MASTER_ADDR", "127.0.0.1")
    master_port = _int_var(environ, "MASTER_PORT") if "MASTER_PORT" in environ else free_port()
    device = torch.device("cuda", cuda_device_index(local_rank, device_count)) if cuda else torch.device("cpu")
    return DistEnv(rank, local_rank, world_size, master_addr, master_port, "nccl" if cuda else "gloo", device)


def cuda_device_index(local_rank: int, device_count: int | None = None) -> int:
    """The GPU of this process: the local rank modulo the devices it sees. With srun's
    --gpus-per-task or --gpu-bind each task sees only its own GPU(s), so local rank 3 may see one."""
    count = torch.cuda.device_count() if device_count is None else device_count
    return local_rank % count if count else local_rank


def accelerator_mismatch(environ, cuda: bool) -> str | None:
    """A DS_ACCELERATOR left over from a CPU run (import_deepspeed sets it there) would build a CPU
    engine beside NCCL and cuda:N tensors on a GPU machine; say so instead."""
    name = environ.get("DS_ACCELERATOR", "")
    if cuda and name not in ("", "cuda"):
        return (
            f"DS_ACCELERATOR={name} is set but this machine has CUDA GPUs: unset it (`unset DS_ACCELERATOR`) "
            f"to train on the GPUs, or hide them (CUDA_VISIBLE_DEVICES=) to train on the CPU"
        )
    return None


def interface_towards(master_addr: str) -> tuple[str, str, str]:
    """(master IPv4, this host's source address, its interface) for traffic to master_addr."""
    import psutil  # a DeepSpeed dependency, needed on multi-node launches only

    try:
        master_ip = socket.gethostbyname(master_addr)
    except OSError as e:
        raise LaunchError(f"MASTER_ADDR={master_addr} does not resolve on {node_name()}: {e}") from None
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect((master_ip, 9))  # a UDP connect sends nothing: the kernel only picks the route
        except OSError as e:
            raise LaunchError(f"MASTER_ADDR={master_addr} ({master_ip}): no route from {node_name()}: {e}") from None
        source = s.getsockname()[0]
    for name, addrs in psutil.net_if_addrs().items():
        if any(a.family == socket.AF_INET and a.address == source for a in addrs):
            return master_ip, source, name
    raise LaunchError(f"no interface of {node_name()} holds {source}, its address towards MASTER_ADDR={master_addr}")


def node_name() -> str:
    return os.environ.get("SLURMD_NODENAME") or socket.gethostname()


def spans_nodes(environ, world_size: int) -> bool:
    """Whether the job's ranks sit on more than one node, as far as the launcher says."""
    try:
        return int(environ.get("SLURM_NNODES", 1)) > 1 or int(environ.get("LOCAL_WORLD_SIZE", world_size)) < world_size
    except ValueError:
        return False


def bind_interface(env: DistEnv, environ=os.environ) -> str:
    """Set GLOO_SOCKET_IFNAME and NCCL_SOCKET_IFNAME (unless set) to the interface towards MASTER_ADDR.

    Returns a line for the log naming the node, the interface and its address.
    """
    master_ip, source, ifname = interface_towards(env.master_addr)
    if ipaddress.ip_address(master_ip).is_loopback and spans_nodes(environ, env.world_size):
        raise LaunchError(
            f"MASTER_ADDR={env.master_addr} is {master_ip} on {node_name()}, a loopback address, but "
            f"the job spans several nodes: set MASTER_ADDR to the first node's network address"
        )
    environ.setdefault("GLOO_SOCKET_IFNAME", ifname)
    environ.setdefault("NCCL_SOCKET_IFNAME", "=" + ifname)  # "=": this name exactly, not a prefix
    chosen = environ["NCCL_SOCKET_IFNAME" if env.backend == "nccl" else "GLOO_SOCKET_IFNAME"]
    return (
        f"rank {env.rank}/{env.world_size} on {node_name()}: {env.backend} on {chosen} ({source}), "
        f"master {env.master_addr}={master_ip}:{env.master_port}"
    )


def import_deepspeed():
    """Import DeepSpeed, first selecting its CPU accelerator when there is no CUDA device.

    DeepSpeed picks its accelerator once, at import; it must be told before that.
    """
    cpu = not torch.cuda.is_available()
    mismatch = accelerator_mismatch(os.environ, cuda=not cpu)
    if mismatch:
        raise LaunchError(mismatch)
    if cpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed  # after DS_ACCELERATOR is set: it picks its accelerator on import

    if cpu and "__compatible_ops__" not in vars(deepspeed.ops):
        # On CPU, DeepSpeed's comm backend probes every op (spawning compilers) and JIT-builds a
        # shared-memory all-reduce that serves only inference_all_reduce under its own launcher
        # (LOCAL_SIZE set). Training never calls it; building it costs minutes on a fresh machine.
        deepspeed.ops.__compatible_ops__ = {"deepspeed_shm_comm": False}
    deepspeed.utils.logger.setLevel(logging.WARNING)  # its INFO lines drown the training log
    return deepspeed


def init(env: DistEnv, timeout_minutes: float = 30.0):
    """Start the process group and DeepSpeed's view of it. Returns the deepspeed module.

    A rank whose peer died learns it at its next collective, when the peer's sockets close
    (gloo: "Read error ... Connection reset by peer"); a peer that vanished without closing them
    (node crash, cut link) holds the collectives until timeout_minutes, unless the launcher ends
    the job first (Slurm: SlurmdTimeout marks the node down and kills the job; srun --wait;
    torchrun's agent).
    """
    # DeepSpeed and torch's env:// rendezvous read these, whichever launcher set the job up.
    os.environ.update(
        RANK=str(env.rank),
        LOCAL_RANK=str(env.local_rank),
        WORLD_SIZE=str(env.world_size),
        MASTER_ADDR=env.master_addr,
        MASTER_PORT=str(env.master_port),
    )
    if env.world_size > 1 and not dist.is_initialized():
        print(bind_interface(env), flush=True)
    deepspeed = import_deepspeed()
    if env.device.type == "cuda":
        torch.cuda.set_device(env.device)
    if dist.is_initialized() and (dist.get_rank(), dist.get_world_size()) != (env.rank, env.world_size):
        raise LaunchError(
            f"this process already belongs to a process group as rank {dist.get_rank()} of "
            f"{dist.get_world_size()}, not {env.rank} of {env.world_size}"
        )
    if not dist.is_initialized():
        dist.init_process_group(
            env.backend,
            rank=env.rank,
            world_size=env.world_size,
            timeout=timedelta(minutes=timeout_minutes),
            device_id=env.device if env.device.type == "cuda" else None,
        )
    deepspeed.init_distributed(dist_backend=env.backend, auto_mpi_discovery=False)
    return deepspeed


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def shutdown() -> None:
    """Leave the process group before the process exits (NCCL wants it destroyed explicitly).

    Through DeepSpeed when it was started: it caches groups of the process group (the data-parallel
    one, for instance), and only its own destroy_process_group drops them, so that a later `init`
    in this process (the tests' in-process trainings, one after another) starts from a clean state.
    """
    if not dist.is_initialized():
        return
    # The DeepSpeed engine holds its groups inside reference cycles: collected here, its gloo groups
    # (and their worker threads) are freed while the interpreter is whole, not during finalization.
    gc.collect()
    ds_comm = sys.modules.get("deepspeed.comm")
    if ds_comm is not None and ds_comm.is_initialized():
        ds_comm.destroy_process_group()
    else:
        dist.destroy_process_group()
