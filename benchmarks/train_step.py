"""One full training step on a fixed batch, and the diffusers twin of our U-Net it is timed against.

Shared by the train benchmark and `python -m benchmarks gpu` (its unet_vs_diffusers step).
"""

from __future__ import annotations

from contextlib import nullcontext

import torch

from pipeline.config import ModelConfig
from pipeline.model.diffusers_unet import import_diffusers_unet
from pipeline.train.diffusion import GaussianDiffusion
from pipeline.model.unet import count_parameters


# --- the two models --------------------------------------------------------------------------


def diffusers_twin(cfg: ModelConfig):
    """The same network expressed as a diffusers UNet2DModel (the model people would otherwise use)."""
    from diffusers import UNet2DModel

    sizes = [cfg.image_size // 2**i for i in range(len(cfg.ch_mult))]
    down = tuple("AttnDownBlock2D" if s in cfg.attn_resolutions else "DownBlock2D" for s in sizes)
    up = tuple("AttnUpBlock2D" if s in cfg.attn_resolutions else "UpBlock2D" for s in reversed(sizes))
    return UNet2DModel(
        sample_size=cfg.image_size,
        in_channels=cfg.in_channels,
        out_channels=cfg.in_channels,
        block_out_channels=tuple(cfg.ch * m for m in cfg.ch_mult),
        down_block_types=down,
        up_block_types=up,
        layers_per_block=cfg.num_res_blocks,
        norm_num_groups=cfg.num_groups,
        norm_eps=1e-6,
        downsample_padding=0,
        flip_sin_to_cos=False,
        freq_shift=1,
        dropout=cfg.dropout,
        attention_head_dim=None,
    )


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


# --- one training step ------------------------------------------------------------------------


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
