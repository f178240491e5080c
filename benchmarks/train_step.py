"""One full training step on a fixed batch, the memory it adds, and the diffusers twin of our U-Net it is timed against.

Shared by the train benchmark and `python -m benchmarks gpu` (its unet_vs_diffusers step).
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch.profiler import record_function

from benchmarks.profile import BACKWARD, torch_profile
from pipeline.core.config import ModelConfig
from pipeline.model.diffusers_unet import import_diffusers_unet
from pipeline.model.unet import count_parameters
from pipeline.train.diffusion import GaussianDiffusion


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
