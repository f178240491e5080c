"""The DeepSpeed JSON config, derived from our experiment config (or read from a user's file).

Batch arithmetic: train.batch_size is global = micro_batch * grad_accum * world_size.
With train.micro_batch_size = 0 every rank takes batch_size / world_size in one pass.
"""
from __future__ import annotations

import json
from pathlib import Path

from pipeline.config import Config, ConfigError, TrainConfig

# Dynamic loss scaling for fp16 (Micikevicius et al. 2018, DeepSpeed's names): start at 2^16,
# halve on overflow after `hysteresis` strikes, double after `loss_scale_window` clean steps.
FP16_LOSS_SCALING = {"loss_scale": 0, "initial_scale_power": 16, "loss_scale_window": 1000,
                     "hysteresis": 2, "min_loss_scale": 1}


def batch_sizes(train: TrainConfig, world_size: int) -> tuple[int, int]:
    """(micro_batch_size, gradient_accumulation_steps) for this world size; errors name the key."""
    b, m = train.batch_size, train.micro_batch_size
    if m == 0:
        if b % world_size:
            raise ConfigError(f"train.batch_size: {b} is not divisible by the world size {world_size}")
        return b // world_size, 1
    if b % (m * world_size):
        raise ConfigError(f"train.batch_size: {b} is not a multiple of train.micro_batch_size x world size "
                          f"= {m} x {world_size}")
    return m, b // (m * world_size)


def build_ds_config(cfg: Config, world_size: int) -> dict:
    """DeepSpeed config for cfg; optimizer and lr schedule are built in train.py (torch objects)."""
    t = cfg.train
    micro, accum = batch_sizes(t, world_size)
    ds = {
        "train_batch_size": t.batch_size,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accum,
        "gradient_clipping": t.grad_clip,
        "zero_optimization": {"stage": cfg.zero.stage},
        "steps_per_print": 2 ** 31 - 1,   # train.py logs; DeepSpeed's own lines would interleave
        "wall_clock_breakdown": False,
    }
    if t.precision == "fp16":
        ds["fp16"] = {"enabled": True, **FP16_LOSS_SCALING}
    elif t.precision == "bf16":
        ds["bf16"] = {"enabled": True}
    if cfg.zero.offload_optimizer:
        if cfg.zero.stage == 0:
            raise ConfigError("zero.offload_optimizer: needs zero.stage >= 1")
        ds["zero_optimization"]["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
        # With offload, DeepSpeed's compiled CPU Adam is the one that is fast enough; it is
        # built from this block (the torch optimizer would be refused).
        ds["optimizer"] = {"type": "AdamW", "params": {
            "lr": t.lr, "betas": list(t.adam_betas), "eps": t.adam_eps, "weight_decay": t.weight_decay}}
    return ds


def load_user_ds_config(path: str, cfg: Config, world_size: int) -> dict:
    """A user's DeepSpeed JSON, passed through; its batch keys must agree with train.batch_size."""
    try:
        ds = json.loads(Path(path).read_text())
    except OSError as e:
        raise ConfigError(f"train.deepspeed_config: cannot read {path} ({e.strerror})") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"train.deepspeed_config: {path} is not valid JSON ({e})") from None
    if not isinstance(ds, dict):
        raise ConfigError(f"train.deepspeed_config: {path} does not hold a JSON object")
    micro, accum = batch_sizes(cfg.train, world_size)
    ours = {"train_batch_size": cfg.train.batch_size, "train_micro_batch_size_per_gpu": micro,
            "gradient_accumulation_steps": accum}
    for key, value in ours.items():
        if key in ds and ds[key] != value:
            raise ConfigError(f"train.deepspeed_config: {path} sets {key}={ds[key]} but the experiment "
                              f"config implies {value} (train.batch_size={cfg.train.batch_size})")
        ds[key] = value
    return ds


def ds_config_for(cfg: Config, world_size: int) -> dict:
    if cfg.train.deepspeed_config:
        return load_user_ds_config(cfg.train.deepspeed_config, cfg, world_size)
    return build_ds_config(cfg, world_size)


def precision_of(ds: dict) -> str:
    """fp16 | bf16 | fp32, as DeepSpeed will run it."""
    if ds.get("fp16", {}).get("enabled"):
        return "fp16"
    if ds.get("bf16", {}).get("enabled"):
        return "bf16"
    return "fp32"
