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


# --- diffusers interop -------------------------------------------------------------------

_RESNET_NAMES = {
    "norm1": "norm1",
    "conv1": "conv1",
    "time_emb_proj": "temb_proj",
    "norm2": "norm2",
    "conv2": "conv2",
    "conv_shortcut": "skip",
}
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
        layer, _, param = key[len(prefix_in) + 1 :].rpartition(".")
        value = sd.pop(key)
        if layer not in _ATTN_NAMES:
            raise KeyError(f"unexpected attention weight {key!r}")
        out[f"{prefix_out}.{_ATTN_NAMES[layer]}.{param}"] = value[:, :, None, None] if value.ndim == 2 else value


def convert_diffusers_state_dict(sd: dict) -> dict:
    """Map a diffusers `UNet2DModel` (DDPM layout) state dict to this module's names."""
    sd, out = dict(sd), {}
    top = {
        "time_embedding.linear_1": "time_mlp.0",
        "time_embedding.linear_2": "time_mlp.2",
        "conv_in": "conv_in",
        "conv_norm_out": "norm_out",
        "conv_out": "conv_out",
    }
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
        out[f"{mid[layer]}.{_rename_resnet(key[len(layer) + 1 :])}"] = sd.pop(key)
    if any(k.startswith("mid_block.attentions.0.") for k in sd):
        _convert_attention("mid_block.attentions.0", "mid.attn.0", sd, out)
    if sd:
        raise KeyError(f"diffusers weights with no counterpart here: {sorted(sd)[:5]}")
    return out


class DiffusersConfigError(ValueError):
    """A diffusers config this U-Net cannot reproduce; the message names the field and its value."""


# diffusers' UNet2DModel defaults: a field absent from config.json has this value there.
_DIFFUSERS_DEFAULTS = {
    "in_channels": 3,
    "out_channels": 3,
    "center_input_sample": False,
    "time_embedding_type": "positional",
    "time_embedding_dim": None,
    "freq_shift": 0,
    "flip_sin_to_cos": True,
    "mid_block_type": "UNetMidBlock2D",
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "downsample_padding": 1,
    "downsample_type": "conv",
    "upsample_type": "conv",
    "dropout": 0.0,
    "act_fn": "silu",
    "attention_head_dim": 8,
    "norm_num_groups": 32,
    "attn_norm_num_groups": None,
    "norm_eps": 1e-5,
    "resnet_time_scale_shift": "default",
    "add_attention": True,
    "class_embed_type": None,
    "num_class_embeds": None,
    "down_block_types": ("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
    "up_block_types": ("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    "block_out_channels": (224, 448, 672, 896),
}
# Fields whose value this network has built in (the DDPM layout), with what it computes there.
_FIXED = {
    "center_input_sample": (False, "inputs used as given"),
    "time_embedding_type": ("positional", "a sinusoidal timestep embedding"),
    "flip_sin_to_cos": (False, "the embedding ordered [sin, cos]"),
    "freq_shift": (1, "frequencies exp(-ln(10000) i / (half - 1))"),
    "mid_block_type": ("UNetMidBlock2D", "a middle block of resnet, attention, resnet"),
    "add_attention": (True, "attention in the middle block"),
    "mid_block_scale_factor": (1, "unscaled residuals in the middle block"),
    "downsample_padding": (0, "down-sampling by a stride-2 conv after (0, 1, 0, 1) padding"),
    "downsample_type": ("conv", "down-sampling by a strided conv"),
    "upsample_type": ("conv", "up-sampling by nearest neighbour and a conv"),
    "norm_eps": (1e-6, "GroupNorm eps 1e-6"),
    "resnet_time_scale_shift": ("default", "the time embedding added, not a scale and shift"),
    "class_embed_type": (None, "no class conditioning"),
    "num_class_embeds": (None, "no class conditioning"),
}
_DOWN_TYPES, _UP_TYPES = ("DownBlock2D", "AttnDownBlock2D"), ("UpBlock2D", "AttnUpBlock2D")


def check_diffusers_config(dcfg: dict, where: str = "config.json") -> None:
    """Refuse a UNet2DModel config that computes something this U-Net does not, naming the field."""

    def value(key):
        return dcfg.get(key, _DIFFUSERS_DEFAULTS.get(key))

    def refuse(key, why):
        raise DiffusersConfigError(f"{where}: {key}={value(key)!r} is not supported: {why}")

    for key, (wanted, meaning) in _FIXED.items():
        v = value(key)
        same = (v == wanted and type(v) is not bool) if type(wanted) is not bool else v is wanted
        if not same and not (key == "norm_eps" and isinstance(v, float) and math.isclose(v, wanted, rel_tol=1e-9)):
            refuse(key, f"this U-Net computes {meaning} ({key}={wanted!r})")
    if value("act_fn") not in ("silu", "swish"):
        refuse("act_fn", "this U-Net's activation is SiLU (act_fn='silu')")
    chs = list(value("block_out_channels"))
    if any(c % chs[0] for c in chs):
        refuse("block_out_channels", f"every width must be a multiple of the first, {chs[0]}")
    if value("time_embedding_dim") not in (None, 4 * chs[0]):
        refuse("time_embedding_dim", f"this U-Net's time embedding is 4 x {chs[0]} = {4 * chs[0]} wide")
    if value("in_channels") != value("out_channels"):
        refuse("out_channels", f"this U-Net outputs as many channels as it takes (in_channels={value('in_channels')})")
    if value("norm_num_groups") is None or value("attn_norm_num_groups") not in (None, value("norm_num_groups")):
        refuse(
            "attn_norm_num_groups" if value("norm_num_groups") else "norm_num_groups",
            "one GroupNorm group count for resnets and attention (norm_num_groups)",
        )
    down, up = list(value("down_block_types")), list(value("up_block_types"))
    for key, types, allowed in (("down_block_types", down, _DOWN_TYPES), ("up_block_types", up, _UP_TYPES)):
        if len(types) != len(chs) or any(t not in allowed for t in types):
            refuse(key, f"one of {'/'.join(allowed)} per entry of block_out_channels")
    if [t.startswith("Attn") for t in down] != [t.startswith("Attn") for t in reversed(up)]:
        refuse("up_block_types", f"attention at the same resolutions as down_block_types={down!r}")
    size = value("sample_size")
    if not isinstance(size, (int, list, tuple)):
        refuse("sample_size", "the image size is needed (an int or [h, w])")
    if isinstance(size, (list, tuple)) and len(set(size)) != 1:
        refuse("sample_size", "square images only")
    # Single-head attention: a head as wide as the block (attention_head_dim None or the block's width).
    head = value("attention_head_dim")
    attn_widths = {c for c, t in zip(chs, down) if t.startswith("Attn")} | {chs[-1]}
    if head is not None and any(head != c for c in attn_widths):
        refuse(
            "attention_head_dim",
            f"this U-Net's attention has one head as wide as the block "
            f"({', '.join(map(str, sorted(attn_widths)))} channels): use null",
        )


def import_diffusers_unet(state_dict_or_dir, cfg: ModelConfig | None = None) -> UNet:
    """Build a UNet from a diffusers `UNet2DModel` state dict or saved model directory.

    With a directory, the config is read from its `config.json` and every field that changes
    what the network computes is honoured or refused (DiffusersConfigError); with a state dict, pass `cfg`.
    """
    if isinstance(state_dict_or_dir, (str, Path)):
        import json
        from safetensors.torch import load_file

        folder = Path(state_dict_or_dir)
        dcfg = json.loads((folder / "config.json").read_text())
        cfg = model_config_from_diffusers(dcfg, where=str(folder / "config.json"))
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


def model_config_from_diffusers(dcfg: dict, where: str = "config.json") -> ModelConfig:
    """ModelConfig equivalent of a diffusers UNet2DModel config dict; DiffusersConfigError when there is none."""
    check_diffusers_config(dcfg, where)
    d = {**_DIFFUSERS_DEFAULTS, **dcfg}
    chs = list(d["block_out_channels"])
    ch = chs[0]
    size = d["sample_size"]
    size = size[0] if isinstance(size, (list, tuple)) else size
    attn = tuple(size // 2**i for i, t in enumerate(d["down_block_types"]) if t.startswith("Attn"))
    return ModelConfig(
        image_size=size,
        in_channels=d["in_channels"],
        ch=ch,
        ch_mult=tuple(c // ch for c in chs),
        num_res_blocks=d["layers_per_block"],
        attn_resolutions=attn,
        dropout=d["dropout"],
        num_groups=d["norm_num_groups"],
    )
