"""Per-rank bytes of optimizer state, parameters and gradients under ZeRO stages, real DeepSpeed.

  torchrun --nproc_per_node 2 -m benchmarks zero_memory --config configs/tiny_cpu.yaml --stages 0,2,3 --out z.json

Each rank builds the engine exactly as pipeline.train does, takes one training step so that Adam's
state exists, and counts the bytes of the tensors the engine holds, by distinct storage. Rank 0
writes one `ZeroRank` per (config, stage, rank). Run by `python -m benchmarks train`; CPU runs use gloo.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from pipeline.config import load_config
from pipeline.core.fileio import atomic_write_json
from pipeline.core.schedule import DiffusionSchedule
from pipeline.train import distributed
from pipeline.train.diffusion import GaussianDiffusion
from pipeline.train.ds_config import build_ds_config
from pipeline.train.loop import build_engine

FLAGS: tuple[str, ...] = ()  # a torchrun worker: none of the benchmarks' common flags


@dataclass
class ZeroBytes:
    """Bytes on one rank; a storage counts once, in the first category that claims it (this order)."""

    parameters: int = 0  # the model's (ZeRO-3: this rank's partition)
    optimizer_state: int = 0  # the inner torch optimizer's state (exp_avg, exp_avg_sq)
    fp32_master_partition: int = 0  # the optimizer's own parameters, when they are not the model's
    gradients: int = 0  # .grad of both, and DeepSpeed's partitioned gradient buffers


@dataclass
class ZeroRank:
    config: str
    stage: int
    rank: int
    world_size: int
    precision: str
    model_parameters: int
    ds_config: dict
    after_backward: ZeroBytes
    after_step: ZeroBytes


def _flatten(value):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (dict, list, tuple)):
        for v in value.values() if isinstance(value, dict) else value:
            yield from _flatten(v)


def inner_optimizer(engine) -> torch.optim.Optimizer:
    """The torch optimizer that owns Adam's state (ZeRO wraps it; stage 0 uses it directly)."""
    opt = engine.optimizer
    while not isinstance(opt, torch.optim.Optimizer) and hasattr(opt, "optimizer"):
        opt = opt.optimizer
    return opt


def count_bytes(engine) -> ZeroBytes:
    model_params = list(engine.module.parameters())
    opt = inner_optimizer(engine)
    masters = list(_flatten([g["params"] for g in opt.param_groups]))
    held = ("averaged_gradients", "grad_partitions_flat_buffer", "ipg_buffer")  # by ZeRO's optimizer, by stage
    buffers = [getattr(engine.optimizer, name, None) for name in held]
    claims = {
        "parameters": [p.ds_tensor if hasattr(p, "ds_tensor") else p for p in model_params],
        "optimizer_state": _flatten(list(opt.state.values())),
        "fp32_master_partition": masters,
        "gradients": [p.grad for p in model_params + masters if p.grad is not None] + list(_flatten(buffers)),
    }
    seen, counted = set(), ZeroBytes()
    for category, tensors in claims.items():
        for t in tensors:
            if not isinstance(t, torch.Tensor) or t.device.type == "meta":
                continue
            s = t.untyped_storage()
            key = (s.data_ptr(), s.nbytes()) if s.nbytes() else (id(t), 0)
            if key not in seen:
                seen.add(key)
                setattr(counted, category, getattr(counted, category) + key[1])
    return counted


def measure(config_path: str, stage: int, device: str, env, deepspeed) -> ZeroRank:
    overrides = [f"zero.stage={stage}", f"train.batch_size={env.world_size}", "train.micro_batch_size=0"]
    overrides += ["train.grad_checkpointing=false"] + (["train.precision=fp32"] if device == "cpu" else [])
    cfg = load_config(config_path, overrides)
    ds_config = build_ds_config(cfg, env.world_size)
    engine = build_engine(cfg, ds_config, deepspeed)
    # The state does not depend on the image size; the smallest size the network accepts keeps it quick.
    size = max(8, 2 ** (len(cfg.model.ch_mult) - 1))
    g = torch.Generator().manual_seed(dist.get_rank())
    x0 = torch.rand(1, cfg.model.in_channels, size, size, generator=g).to(engine.device) * 2 - 1
    noise = torch.randn(x0.shape, generator=g).to(engine.device)
    t = torch.randint(0, cfg.diffusion.num_timesteps, (1,), generator=g).to(engine.device)
    dtype = next(engine.module.parameters()).dtype
    diffusion = GaussianDiffusion(DiffusionSchedule.from_config(cfg.diffusion))
    engine.backward(diffusion.training_loss(lambda x, ts: engine(x.to(dtype), ts), x0, t, noise))
    after_backward = count_bytes(engine)  # gradients alive
    engine.step()
    n_params = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in engine.module.parameters())
    rank = (config_path, stage, env.rank, env.world_size, cfg.train.precision, n_params, ds_config)
    return ZeroRank(*rank, after_backward, count_bytes(engine))


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="a config YAML, or several separated by commas")
    p.add_argument("--stages", default="0,2,3")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--out", required=True, help="the JSON file rank 0 writes")


def run(args: argparse.Namespace, progress=None) -> None:
    torch.set_num_threads(1)
    env = distributed.read_env(cuda=args.device == "cuda")
    deepspeed = distributed.init(env)
    rows = []
    for config_path in args.config.split(","):
        for stage in (int(s) for s in args.stages.split(",")):
            rows.append(measure(config_path, stage, args.device, env, deepspeed))
            dist.barrier()
    gathered: list[Any] = [None] * env.world_size
    dist.gather_object(rows, gathered if env.rank == 0 else None, dst=0)
    if env.rank == 0:
        ranks = [r for rank_rows in gathered for r in rank_rows]
        ranks.sort(key=lambda r: (r.model_parameters, r.stage, r.rank))
        atomic_write_json(args.out, [dataclasses.asdict(r) for r in ranks])
    distributed.shutdown()
