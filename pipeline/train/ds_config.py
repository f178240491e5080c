"""The DeepSpeed JSON config, derived from our experiment config (or read from a user's file).

Batch arithmetic: train.batch_size is global = micro_batch * grad_accum * world_size.
With train.micro_batch_size = 0 every rank takes batch_size / world_size in one pass.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from pipeline.core.config import FP16_NEEDS_ZERO, Config, ConfigError, TrainConfig

# Dynamic loss scaling for fp16 (Micikevicius et al. 2018, DeepSpeed's names): start at 2^16,
# halve on overflow after `hysteresis` strikes, double after `loss_scale_window` clean steps.
FP16_LOSS_SCALING = {
    "loss_scale": 0,
    "initial_scale_power": 16,
    "loss_scale_window": 1000,
    "hysteresis": 2,
    "min_loss_scale": 1,
}


def batch_sizes(train: TrainConfig, world_size: int) -> tuple[int, int]:
    """(micro_batch_size, gradient_accumulation_steps) for this world size; errors name the key."""
    b, m = train.batch_size, train.micro_batch_size
    if m == 0:
        if b % world_size:
            raise ConfigError(f"train.batch_size: {b} is not divisible by the world size {world_size}")
        return b // world_size, 1
    if b % (m * world_size):
        raise ConfigError(
            f"train.batch_size: {b} is not a multiple of train.micro_batch_size x world size = {m} x {world_size}"
        )
    return m, b // (m * world_size)


def build_ds_config(cfg: Config, world_size: int) -> dict:
    """DeepSpeed config for cfg; optimizer and lr schedule are built in pipeline.train.loop (torch objects)."""
    train = cfg.train
    micro, accum = batch_sizes(train, world_size)
    ds = {
        "train_batch_size": train.batch_size,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accum,
        "gradient_clipping": train.grad_clip,
        "zero_optimization": {"stage": cfg.zero.stage},
        "steps_per_print": 2**31 - 1,  # the training loop logs; DeepSpeed's own lines would interleave
        "wall_clock_breakdown": False,
    }
    if train.precision == "fp16":
        ds["fp16"] = {"enabled": True, **FP16_LOSS_SCALING}
    elif train.precision == "bf16":
        ds["bf16"] = {"enabled": True}
    if cfg.zero.offload_optimizer:
        if cfg.zero.stage == 0:
            raise ConfigError("zero.offload_optimizer: needs zero.stage >= 1")
        ds["zero_optimization"]["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
        # With offload, DeepSpeed's compiled CPU Adam is the one that is fast enough; it is
        # built from this block (the torch optimizer would be refused).
        ds["optimizer"] = {
            "type": "AdamW",
            "params": {
                "lr": train.lr,
                "betas": list(train.adam_betas),
                "eps": train.adam_eps,
                "weight_decay": train.weight_decay,
            },
        }
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
    ours = {
        "train_batch_size": cfg.train.batch_size,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accum,
    }
    for key, value in ours.items():
        if key in ds and ds[key] != value:
            raise ConfigError(
                f"train.deepspeed_config: {path} sets {key}={ds[key]} but the experiment "
                f"config implies {value} (train.batch_size={cfg.train.batch_size})"
            )
        ds[key] = value
    return ds


def ds_config_for(cfg: Config, world_size: int) -> dict:
    if not cfg.train.deepspeed_config:
        return build_ds_config(cfg, world_size)
    ds = load_user_ds_config(cfg.train.deepspeed_config, cfg, world_size)
    if precision_of(ds) == "fp16" and not (ds.get("zero_optimization") or {}).get("stage", 0):
        reason = FP16_NEEDS_ZERO.replace("zero.stage", "zero_optimization.stage")
        raise ConfigError(f"train.deepspeed_config: {cfg.train.deepspeed_config}: {reason}")
    return ds


def cpu_adam_build_missing() -> list[str]:
    """What building DeepSpeed's CPU Adam op (for zero.offload_optimizer) lacks here; [] if it is
    pre-built or can be built. DeepSpeed JIT-builds it at engine start-up with ninja and a C++
    compiler, and on DeepSpeed versions whose CUDA accelerator builds it as a CUDA op, with nvcc too."""
    from deepspeed.accelerator import get_accelerator  # deepspeed: after DS_ACCELERATOR is set
    from deepspeed.git_version_info import installed_ops  # deepspeed, as above
    from deepspeed.ops.op_builder.builder import CUDAOpBuilder  # deepspeed, as above

    if installed_ops.get("cpu_adam"):
        return []
    missing = []
    if shutil.which("ninja") is None:
        missing.append("ninja (pip install ninja)")
    cxx = os.environ.get("CXX", "c++")  # what torch.utils.cpp_extension compiles with
    if shutil.which(cxx) is None:
        missing.append(f"a C++ compiler ({cxx!r} not on PATH)")
    if isinstance(get_accelerator().create_op_builder("CPUAdamBuilder"), CUDAOpBuilder):
        from torch.utils.cpp_extension import CUDA_HOME  # loads the C++ extension toolchain: only for offload

        if CUDA_HOME is None:
            missing.append("a CUDA toolkit (nvcc; set CUDA_HOME)")
    return missing


def check_offload_build(ds: dict) -> None:
    """With the optimizer offloaded, fail at start-up, not minutes later inside deepspeed.initialize."""
    if not (ds.get("zero_optimization") or {}).get("offload_optimizer"):
        return
    missing = cpu_adam_build_missing()
    if missing:
        raise ConfigError(
            f"zero.offload_optimizer: DeepSpeed must build its CPU Adam op here and needs "
            f"{', '.join(missing)}; install it, use a DeepSpeed built with DS_BUILD_CPU_ADAM=1, "
            f"or set zero.offload_optimizer=false"
        )


def precision_of(ds: dict) -> str:
    """fp16 | bf16 | fp32, as DeepSpeed will run it."""
    if ds.get("fp16", {}).get("enabled"):
        return "fp16"
    if ds.get("bf16", {}).get("enabled"):
        return "bf16"
    return "fp32"
