"""One full training step on a fixed batch, the memory it adds, the diffusers twin of our U-Net it is timed against,
and the ZeRO worker: per-rank bytes of optimizer state, parameters and gradients under real DeepSpeed.

Shared by the train benchmark and `python -m benchmarks gpu` (its unet_vs_diffusers step). The ZeRO worker runs as
`torchrun --nproc_per_node 2 -m benchmarks train --zero-worker CONFIGS --device D --out FILE` (started by
`python -m benchmarks train`; CPU runs use gloo): each rank builds the engine exactly as pipeline.train does, takes
one training step so that Adam's state exists, and counts the bytes the engine holds, by distinct storage; rank 0
writes one `ZeroRank` per (config, stage, rank).
"""

from __future__ import annotations

import dataclasses
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.profiler import record_function

from benchmarks.profile import BACKWARD, torch_profile
from pipeline.config import load_config
from pipeline.core.config import ModelConfig
from pipeline.core.fileio import atomic_write_json
from pipeline.core.schedule import DiffusionSchedule
from pipeline.model.diffusers_unet import import_diffusers_unet
from pipeline.model.unet import count_parameters
from pipeline.train import distributed
from pipeline.train.diffusion import GaussianDiffusion
from pipeline.train.ds_config import build_ds_config

REPO = Path(__file__).resolve().parent.parent


def diffusers_twin(cfg: ModelConfig):
    """The same network expressed as a diffusers UNet2DModel (the model people would otherwise use)."""
    from diffusers import UNet2DModel  # optional: the baseline's library

    sizes = [cfg.image_size // 2**i for i in range(len(cfg.ch_mult))]
    down = tuple("AttnDownBlock2D" if s in cfg.attn_resolutions else "DownBlock2D" for s in sizes)
    up = tuple("AttnUpBlock2D" if s in cfg.attn_resolutions else "UpBlock2D" for s in reversed(sizes))
    shape = {"sample_size": cfg.image_size, "in_channels": cfg.in_channels, "out_channels": cfg.in_channels}
    blocks = {
        "block_out_channels": tuple(cfg.ch * m for m in cfg.ch_mult),
        "down_block_types": down,
        "up_block_types": up,
    }
    layers = {"layers_per_block": cfg.num_res_blocks, "norm_num_groups": cfg.num_groups, "dropout": cfg.dropout}
    # our U-Net's choices where diffusers' defaults differ: epsilon, padding, timestep embedding, one attention head
    ours = {
        "norm_eps": 1e-6,
        "downsample_padding": 0,
        "flip_sin_to_cos": False,
        "freq_shift": 1,
        "attention_head_dim": None,
    }
    return UNet2DModel(**shape, **blocks, **layers, **ours)


class SampleOutput(torch.nn.Module):
    """diffusers returns a dataclass; the loss wants the tensor."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x, t):
        return self.model(x, t).sample


def build_pair(cfg: ModelConfig, device: str, seed: int = 0) -> tuple[torch.nn.Module, torch.nn.Module, float]:
    """(ours, theirs, max |difference| of outputs): ours carries theirs' random weights."""
    torch.manual_seed(seed)
    theirs = diffusers_twin(cfg)
    with torch.no_grad():  # zero-initialised output layers would make the equivalence check vacuous
        for p in theirs.parameters():
            if not p.any():
                p.normal_(0, 0.02)
    ours = import_diffusers_unet(theirs.state_dict(), cfg)
    if count_parameters(ours) != count_parameters(theirs):
        raise RuntimeError("diffusers twin has a different parameter count: the comparison would be unfair")
    ours, theirs = ours.to(device).eval(), theirs.to(device).eval()
    x = torch.randn(2, cfg.in_channels, cfg.image_size, cfg.image_size, device=device)
    t = torch.tensor([10, 900], device=device)
    with torch.no_grad():
        diff = (ours(x, t) - theirs(x, t).sample).abs().max().item()
    return ours.train(), SampleOutput(theirs).train(), diff


def make_batch(cfg: ModelConfig, batch: int, device: str, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    shape = (batch, cfg.in_channels, cfg.image_size, cfg.image_size)
    x0 = (torch.rand(shape, generator=g) * 2 - 1).to(device)
    noise = torch.randn(shape, generator=g).to(device)
    t = torch.randint(0, 1000, (batch,), generator=g).to(device)
    return x0, t, noise


def autocast(device: str, precision: str):
    if precision == "fp32":
        return nullcontext()
    dtype = torch.float16 if precision == "fp16" else torch.bfloat16
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


def make_train_step(model, diffusion: GaussianDiffusion, batch, device: str, precision: str, lr: float = 1e-4):
    """A closure running one full training step on a fixed batch."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    scaler = torch.amp.GradScaler(torch.device(device).type) if precision == "fp16" else None
    x0, t, noise = batch

    def step():
        optimizer.zero_grad(set_to_none=True)
        with autocast(device, precision):
            loss = diffusion.training_loss(model, x0, t, noise)
        if scaler is None:
            loss.backward()
            optimizer.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        return loss

    return step


@dataclass
class StepMemory:
    peak_bytes: int
    held_after_forward_bytes: int
    method: str


def step_memory(model, diffusion: GaussianDiffusion, batch, device: str, precision: str) -> StepMemory:
    """Bytes a forward+backward adds on top of parameters and their (pre-allocated) gradients."""
    for p in model.parameters():
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    x0, t, noise = batch

    def forward():
        with autocast(device, precision):
            return diffusion.training_loss(model, x0, t, noise)

    def step():
        loss = forward()
        with record_function(BACKWARD):
            loss.backward()

    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        loss = forward()
        held = torch.cuda.memory_allocated() - base
        loss.backward()
        torch.cuda.synchronize()
        memory = StepMemory(torch.cuda.max_memory_allocated() - base, held, "torch.cuda.max_memory_allocated")
    else:  # no allocator peak counter on the CPU: the profiler's allocation events
        profile = torch_profile(step, memory=True)
        memory = StepMemory(profile.peak_bytes, profile.held_bytes, "torch.profiler CPU allocator total_allocated")
    model.zero_grad(set_to_none=True)
    return memory


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


def measure(config: str, stage: int, device: str, env, deepspeed) -> ZeroRank:
    from pipeline.train.loop import build_engine  # webdataset: a wheel on the lent machine (gpu's env reports it)

    overrides = [f"zero.stage={stage}", f"train.batch_size={env.world_size}", "train.micro_batch_size=0"]
    overrides += ["train.grad_checkpointing=false"] + (["train.precision=fp32"] if device == "cpu" else [])
    cfg = load_config(REPO / "configs" / f"{config}.yaml", overrides)
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
    rank = (config, stage, env.rank, env.world_size, cfg.train.precision, n_params, ds_config)
    return ZeroRank(*rank, after_backward, count_bytes(engine))


def zero_worker(configs: list[str], device: str, out: Path) -> None:
    """One rank of the torchrun job: ZeRO stages 0, 2, 3 of each config; rank 0 writes every rank's bytes to `out`."""
    torch.set_num_threads(1)
    env = distributed.read_env(cuda=device == "cuda")
    deepspeed = distributed.init(env)
    rows = []
    for config in configs:
        for stage in (0, 2, 3):
            rows.append(measure(config, stage, device, env, deepspeed))
            dist.barrier()
    gathered: list[Any] = [None] * env.world_size
    dist.gather_object(rows, gathered if env.rank == 0 else None, dst=0)
    if env.rank == 0:
        ranks = sorted(
            (r for rank_rows in gathered for r in rank_rows), key=lambda r: (r.model_parameters, r.stage, r.rank)
        )
        atomic_write_json(out, [dataclasses.asdict(r) for r in ranks])
    distributed.shutdown()
