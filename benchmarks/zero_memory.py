"""Per-rank bytes of optimizer state, parameters and gradients under ZeRO stages, real DeepSpeed.

  torchrun --nproc_per_node 2 -m benchmarks.zero_memory --config configs/tiny_cpu.yaml --stages 0,2,3 --out z.json

Each rank builds the engine exactly as pipeline.train does, takes one training step so that Adam's
state exists, and counts the bytes of the tensors the engine holds, by distinct storage. Rank 0
writes one row per (stage, rank). Run by `python -m benchmarks train`; CPU runs use gloo.
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.distributed as dist

from pipeline.train import distributed
from pipeline.config import load_config
from pipeline.train.ds_config import build_ds_config
from pipeline.core.fileio import atomic_write_json


def _storage_key(t: torch.Tensor):
    s = t.untyped_storage()
    return (s.data_ptr(), s.nbytes()) if s.nbytes() else (id(t), 0)


class StorageCounter:
    """Counts each storage once, in the first category that claims it."""

    def __init__(self):
        self.seen, self.bytes = set(), {}

    def add(self, category: str, tensors) -> None:
        self.bytes.setdefault(category, 0)
        for t in tensors:
            if not isinstance(t, torch.Tensor) or t.device.type == "meta":
                continue
            key = _storage_key(t)
            if key in self.seen:
                continue
            self.seen.add(key)
            self.bytes[category] += key[1]


def inner_optimizer(engine) -> torch.optim.Optimizer:
    """The torch optimizer that owns Adam's state (ZeRO wraps it; stage 0 uses it directly)."""
    opt = engine.optimizer
    while not isinstance(opt, torch.optim.Optimizer) and hasattr(opt, "optimizer"):
        opt = opt.optimizer
    return opt


def _flatten(value):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _flatten(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _flatten(v)


def gradient_buffers(engine):
    """DeepSpeed's own gradient holders (partitioned, flat or bucketed), whatever the stage."""
    zero = engine.optimizer
    for name in ("averaged_gradients", "grad_partitions_flat_buffer", "ipg_buffer"):
        yield from _flatten(getattr(zero, name, None))
    for p in _flatten([g["params"] for g in inner_optimizer(engine).param_groups]):
        if p.grad is not None:
            yield p.grad


def count_bytes(engine) -> dict:
    """Bytes per category on this rank; a storage counts once, in the first category listed."""
    model_params = list(engine.module.parameters())
    local = [p.ds_tensor if hasattr(p, "ds_tensor") else p for p in model_params]  # ZeRO-3: this rank's shard
    opt = inner_optimizer(engine)
    counter = StorageCounter()
    counter.add("parameters", local)
    counter.add("optimizer_state", _flatten(list(opt.state.values())))
    counter.add("fp32_master_partition", _flatten([g["params"] for g in opt.param_groups]))
    counter.add("gradients", [p.grad for p in model_params if p.grad is not None])
    counter.add("gradients", gradient_buffers(engine))
    return counter.bytes


def one_step(engine, cfg, micro_batch: int, size: int) -> dict:
    """Forward, backward (bytes counted here, gradients alive), step (bytes counted again)."""
    from pipeline.train.diffusion import GaussianDiffusion, schedule_from_config

    diffusion = GaussianDiffusion(schedule_from_config(cfg.diffusion))
    device = engine.device
    g = torch.Generator().manual_seed(dist.get_rank())
    x0 = torch.rand(micro_batch, cfg.model.in_channels, size, size, generator=g).to(device) * 2 - 1
    noise = torch.randn(x0.shape, generator=g).to(device)
    t = torch.randint(0, cfg.diffusion.num_timesteps, (micro_batch,), generator=g).to(device)
    dtype = next(engine.module.parameters()).dtype
    loss = diffusion.training_loss(lambda x, ts: engine(x.to(dtype), ts), x0, t, noise)
    engine.backward(loss)
    after_backward = count_bytes(engine)
    engine.step()
    return {"after_backward": after_backward, "after_step": count_bytes(engine)}


def measure(config_path: str, stage: int, device: str, env, deepspeed) -> dict:
    from pipeline.train.loop import build_engine

    precision = "fp32" if device == "cpu" else None
    overrides = [
        f"zero.stage={stage}",
        f"train.batch_size={env.world_size}",
        "train.micro_batch_size=0",
        "train.grad_checkpointing=false",
    ] + ([f"train.precision={precision}"] if precision else [])
    cfg = load_config(config_path, overrides)
    ds_config = build_ds_config(cfg, env.world_size)
    engine = build_engine(cfg, ds_config, deepspeed)
    # The state does not depend on the image size; the smallest size the network accepts keeps it quick.
    size = max(8, 2 ** (len(cfg.model.ch_mult) - 1))
    counts = one_step(engine, cfg, micro_batch=1, size=size)
    n_params = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in engine.module.parameters())
    row = {
        "stage": stage,
        "rank": env.rank,
        "world_size": env.world_size,
        "precision": cfg.train.precision,
        "model_parameters": n_params,
        "ds_config": ds_config,
        **counts,
    }
    del engine
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.zero_memory", description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True, help="a config YAML, or several separated by commas")
    p.add_argument("--stages", default="0,2,3")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    env = distributed.read_env(cuda=args.device == "cuda")
    deepspeed = distributed.init(env)
    rows = []
    for config_path in args.config.split(","):
        for stage in (int(s) for s in args.stages.split(",")):
            rows.append({"config_path": config_path, **measure(config_path, stage, args.device, env, deepspeed)})
            dist.barrier()
    gathered = [None] * env.world_size
    dist.gather_object(rows, gathered if env.rank == 0 else None, dst=0)
    if env.rank == 0:
        atomic_write_json(
            args.out,
            sorted(
                (r for rank_rows in gathered for r in rank_rows),
                key=lambda r: (r["model_parameters"], r["stage"], r["rank"]),
            ),
        )
    distributed.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
