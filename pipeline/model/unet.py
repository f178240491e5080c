"""The DDPM U-Net (Ho et al. 2020), as in the paper's CelebA-HQ 256 model.

Residual blocks with a projected timestep embedding, single-head self-attention at chosen
resolutions and in the middle, strided-conv down-sampling, nearest+conv up-sampling, and a
decoder that consumes the encoder's activations as skips. Module layout mirrors diffusers'
`UNet2DModel` level by level so that importing one (pipeline.model.diffusers_unet) is a renaming, not a rewrite.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from pipeline.core.config import ModelConfig


class GroupNorm32(nn.GroupNorm):
    """GroupNorm whose statistics are computed in fp32 whatever the input dtype.

    DeepSpeed fp16 casts the whole module to half; variance over 32 groups of a 256x256 map
    overflows or loses precision in fp16, so (as improved-diffusion does) we upcast here.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight.float() if self.weight is not None else None
        bias = self.bias.float() if self.bias is not None else None
        return F.group_norm(x.float(), self.num_groups, weight, bias, self.eps).to(x.dtype)


def normalization(channels: int, num_groups: int) -> GroupNorm32:
    return GroupNorm32(num_groups, channels, eps=1e-6)


def zero_module(module: nn.Module) -> nn.Module:
    """Zero a layer's parameters so a residual branch starts as the identity."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def timestep_embedding(timesteps: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of (B,) timesteps -> (B, dim), always in fp32 (as in the DDPM code)."""
    half = dim // 2
    freqs = torch.exp(
        -math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / (half - 1)
    )
    args = timesteps.float()[:, None] * freqs[None]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv3, + projected time embedding, GroupNorm-SiLU-dropout-conv3, + skip."""

    def __init__(self, in_ch: int, out_ch: int, temb_ch: int, dropout: float, num_groups: int):
        super().__init__()
        self.norm1 = normalization(in_ch, num_groups)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.temb_proj = nn.Linear(temb_ch, out_ch)
        self.norm2 = normalization(out_ch, num_groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = zero_module(nn.Conv2d(out_ch, out_ch, 3, padding=1))
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        """x: (B, in_ch, H, W), temb: (B, temb_ch) -> (B, out_ch, H, W)."""
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.temb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all H*W positions, residual."""

    def __init__(self, ch: int, num_groups: int):
        super().__init__()
        self.norm = normalization(ch, num_groups)
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)
        self.proj = zero_module(nn.Conv2d(ch, ch, 1))

    def forward(self, x: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, C, H, W) -> (B, C, H, W); temb is unused (uniform block signature)."""
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, c, h * w).transpose(-1, -2).unbind(1)
        out = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])[:, 0]  # (B, HW, C)
        return x + self.proj(out.transpose(-1, -2).reshape(b, c, h, w))


class Downsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Asymmetric (0, 1) padding, as the original TF code and diffusers (downsample_padding=0).
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """One resolution of the encoder or decoder: res blocks, optional attention, resampler."""

    def __init__(self, res: list[ResBlock], attn: bool, resample: nn.Module | None):
        super().__init__()
        self.res = nn.ModuleList(res)
        ch = res[0].conv1.out_channels
        num_groups = res[0].norm2.num_groups
        self.attn = nn.ModuleList([AttnBlock(ch, num_groups) for _ in res]) if attn else None
        self.resample = resample


class UNet(nn.Module):
    """DDPM denoiser: (B, C, H, W) in [-1, 1] and (B,) timesteps -> (B, C, H, W) model output."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.grad_checkpointing = False
        ch, g, p = cfg.ch, cfg.num_groups, cfg.dropout
        temb_ch = 4 * ch
        self.time_mlp = nn.Sequential(nn.Linear(ch, temb_ch), nn.SiLU(), nn.Linear(temb_ch, temb_ch))
        self.conv_in = nn.Conv2d(cfg.in_channels, ch, 3, padding=1)

        levels = len(cfg.ch_mult)
        skip_chs, in_ch, res = [ch], ch, cfg.image_size
        self.down = nn.ModuleList()
        for i, mult in enumerate(cfg.ch_mult):
            out_ch = ch * mult
            blocks = []
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResBlock(in_ch, out_ch, temb_ch, p, g))
                in_ch = out_ch
                skip_chs.append(out_ch)
            last = i == levels - 1
            self.down.append(Level(blocks, res in cfg.attn_resolutions, None if last else Downsample(out_ch)))
            if not last:
                skip_chs.append(out_ch)
                res //= 2

        self.mid = Level([ResBlock(in_ch, in_ch, temb_ch, p, g)], True, None)
        self.mid_res2 = ResBlock(in_ch, in_ch, temb_ch, p, g)

        self.up = nn.ModuleList()
        for i, mult in reversed(list(enumerate(cfg.ch_mult))):
            out_ch = ch * mult
            blocks = []
            for _ in range(cfg.num_res_blocks + 1):
                blocks.append(ResBlock(in_ch + skip_chs.pop(), out_ch, temb_ch, p, g))
                in_ch = out_ch
            self.up.append(Level(blocks, res in cfg.attn_resolutions, Upsample(out_ch) if i > 0 else None))
            res *= 2

        self.norm_out = normalization(in_ch, g)
        self.conv_out = zero_module(nn.Conv2d(in_ch, cfg.in_channels, 3, padding=1))

    def _block(self, block: nn.Module, h: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        if self.grad_checkpointing and self.training and torch.is_grad_enabled():
            # Recompute this block's activations in backward instead of storing them.
            return checkpoint(block, h, temb, use_reentrant=False)
        return block(h, temb)

    def _level(self, level: Level, i: int, h: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self._block(level.res[i], h, temb)
        return self._block(level.attn[i], h, temb) if level.attn is not None else h

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """x: (B, C, H, W), timesteps: (B,) int or float -> (B, C, H, W)."""
        emb = timestep_embedding(timesteps.reshape(-1).expand(x.shape[0]), self.cfg.ch)
        temb = self.time_mlp(emb.to(self.time_mlp[0].weight.dtype))

        hs = [self.conv_in(x)]
        for level in self.down:
            for i in range(len(level.res)):
                hs.append(self._level(level, i, hs[-1], temb))
            if level.resample is not None:
                hs.append(level.resample(hs[-1]))

        h = self._level(self.mid, 0, hs[-1], temb)
        h = self._block(self.mid_res2, h, temb)

        for level in self.up:
            for i in range(len(level.res)):
                h = self._level(level, i, torch.cat([h, hs.pop()], dim=1), temb)
            if level.resample is not None:
                h = level.resample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
