"""diffusers' `UNet2DModel` as our UNet: its config mapped to a ModelConfig, its weights renamed.

The module layout of pipeline.model.unet mirrors UNet2DModel level by level, so the import renames
parameters (and fuses q/k/v into one 1x1 conv); every config field that changes the computation is
honoured or refused with a DiffusersConfigError naming the file, field and value.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import load_file

from pipeline.core.config import ModelConfig
from pipeline.model.unet import UNet

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
