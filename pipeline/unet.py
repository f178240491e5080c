"""The DDPM U-Net (Ho et al. 2020), as in the paper's CelebA-HQ 256 model.

Residual blocks with a projected timestep embedding, single-head self-attention at chosen
resolutions and in the middle, strided-conv down-sampling, nearest+conv up-sampling, and a
decoder that consumes the encoder's activations as skips. Module layout mirrors diffusers'
`UNet2DModel` level by level so that `import_diffusers_unet` is a renaming, not a rewrite.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from pipeline.config import ModelConfig


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
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=timesteps.device)
                      / (half - 1))
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


# --- diffusers interop -------------------------------------------------------------------

_RESNET_NAMES = {"norm1": "norm1", "conv1": "conv1", "time_emb_proj": "temb_proj", "norm2": "norm2",
                 "conv2": "conv2", "conv_shortcut": "skip"}
# diffusers renamed the attention projections in 0.15; checkpoints on the hub use either set.
_ATTN_NAMES = {"group_norm": "norm", "to_out.0": "proj", "proj_attn": "proj"}
_QKV_NAMES = (("to_q", "to_k", "to_v"), ("query", "key", "value"))


def _rename_resnet(rest: str) -> str:
    layer, _, param = rest.rpartition(".")
    return f"{_RESNET_NAMES[layer]}.{param}"


def _convert_attention(prefix_in: str, prefix_out: str, sd: dict, out: dict) -> None:
    """Fuse diffusers' q/k/v Linear layers into one 1x1 qkv conv; rename norm and projection."""
    for names in _QKV_NAMES:
        if f"{prefix_in}.{names[0]}.weight" in sd:
            for param in ("weight", "bias"):
                parts = [sd.pop(f"{prefix_in}.{n}.{param}") for n in names]
                fused = torch.cat(parts, dim=0)
                out[f"{prefix_out}.qkv.{param}"] = fused[:, :, None, None] if param == "weight" else fused
    for key in [k for k in sd if k.startswith(prefix_in + ".")]:
        layer, _, param = key[len(prefix_in) + 1:].rpartition(".")
        value = sd.pop(key)
        if layer not in _ATTN_NAMES:
            raise KeyError(f"unexpected attention weight {key!r}")
        out[f"{prefix_out}.{_ATTN_NAMES[layer]}.{param}"] = value[:, :, None, None] if value.ndim == 2 else value


def convert_diffusers_state_dict(sd: dict) -> dict:
    """Map a diffusers `UNet2DModel` (DDPM layout) state dict to this module's names."""
    sd, out = dict(sd), {}
    top = {"time_embedding.linear_1": "time_mlp.0", "time_embedding.linear_2": "time_mlp.2",
           "conv_in": "conv_in", "conv_norm_out": "norm_out", "conv_out": "conv_out"}
    for key in list(sd):
        layer, _, param = key.rpartition(".")
        if layer in top:
            out[f"{top[layer]}.{param}"] = sd.pop(key)
    for prefix_in, prefix_out in (("down_blocks", "down"), ("up_blocks", "up")):
        for key in [k for k in sd if k.startswith(prefix_in + ".")]:
            if key not in sd:
                continue  # consumed with its attention siblings
            _, i, kind, j, rest = key.split(".", 4)
            if kind == "resnets":
                out[f"{prefix_out}.{i}.res.{j}.{_rename_resnet(rest)}"] = sd.pop(key)
            elif kind in ("downsamplers", "upsamplers"):
                out[f"{prefix_out}.{i}.resample.{rest}"] = sd.pop(key)
            elif kind == "attentions":
                _convert_attention(f"{prefix_in}.{i}.attentions.{j}", f"{prefix_out}.{i}.attn.{j}", sd, out)
    mid = {"mid_block.resnets.0": "mid.res.0", "mid_block.resnets.1": "mid_res2"}
    for key in [k for k in sd if k.startswith("mid_block.resnets.")]:
        layer = ".".join(key.split(".")[:3])
        out[f"{mid[layer]}.{_rename_resnet(key[len(layer) + 1:])}"] = sd.pop(key)
    if any(k.startswith("mid_block.attentions.0.") for k in sd):
        _convert_attention("mid_block.attentions.0", "mid.attn.0", sd, out)
    if sd:
        raise KeyError(f"diffusers weights with no counterpart here: {sorted(sd)[:5]}")
    return out


def import_diffusers_unet(state_dict_or_dir, cfg: ModelConfig | None = None) -> UNet:
    """Build a UNet from a diffusers `UNet2DModel` state dict or saved model directory.

    With a directory, the config is read from its `config.json`; with a state dict, pass `cfg`.
    """
    if isinstance(state_dict_or_dir, (str, Path)):
        import json
        from safetensors.torch import load_file
        folder = Path(state_dict_or_dir)
        dcfg = json.loads((folder / "config.json").read_text())
        cfg = model_config_from_diffusers(dcfg)
        weights = folder / "diffusion_pytorch_model.safetensors"
        if weights.exists():
            sd = load_file(str(weights))
        else:
            sd = torch.load(folder / "diffusion_pytorch_model.bin", map_location="cpu", weights_only=True)
    else:
        sd = state_dict_or_dir
        if cfg is None:
            raise ValueError("import_diffusers_unet: pass cfg with a bare state dict")
    model = UNet(cfg)
    model.load_state_dict(convert_diffusers_state_dict(sd), strict=True)
    return model


def model_config_from_diffusers(dcfg: dict) -> ModelConfig:
    """ModelConfig equivalent of a diffusers UNet2DModel config dict (DDPM layout only)."""
    chs = list(dcfg["block_out_channels"])
    ch = chs[0]
    size = dcfg["sample_size"]
    size = size[0] if isinstance(size, (list, tuple)) else size
    attn = tuple(size // 2 ** i for i, t in enumerate(dcfg["down_block_types"]) if t.startswith("Attn"))
    return ModelConfig(image_size=size, in_channels=dcfg.get("in_channels", 3), ch=ch,
                       ch_mult=tuple(c // ch for c in chs), num_res_blocks=dcfg.get("layers_per_block", 2),
                       attn_resolutions=attn, dropout=dcfg.get("dropout", 0.0),
                       num_groups=dcfg.get("norm_num_groups", 32))
