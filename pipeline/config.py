"""Experiment config: one YAML file per experiment, loaded into typed dataclasses.

`load_config("configs/x.yaml", ["train.lr=1e-4", "zero.stage=3"])` reads the file, applies the
command-line overrides, checks every key, type and value, and returns a `Config`. Any mistake
is a `ConfigError` whose one-line message names the file and the key.
"""

from __future__ import annotations

import dataclasses
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from pipeline.core.fileio import atomic_write_text
from pipeline.core.sampling import DEFAULT_SAMPLER, SAMPLERS


# DeepSpeed 0.19 scales the loss in engine.backward() only for ZeRO optimizers, while its plain fp16
# optimizer still divides every gradient by the loss scale: at stage 0 fp16 learns ~65536x too slowly.
FP16_NEEDS_ZERO = (
    "fp16 needs zero.stage >= 1 (DeepSpeed 0.19 does not scale the loss for its stage-0 fp16 "
    "optimizer, so the gradients shrink by the loss scale); set zero.stage=1 or 2, or use bf16"
)


class ConfigError(ValueError):
    """A user mistake in a config file or override; the message names the file and key."""


@dataclass
class ModelConfig:
    image_size: int = 32
    in_channels: int = 3
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 2, 2)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = (16,)
    dropout: float = 0.1
    num_groups: int = 32


@dataclass
class DiffusionConfig:
    num_timesteps: int = 1000
    beta_schedule: str = "linear"
    beta_start: float = 1e-4
    beta_end: float = 0.02
    prediction_type: str = "epsilon"
    variance_type: str = "fixed_small"
    clip_sample: bool = True


@dataclass
class DataConfig:
    shards: str = "data/synthetic32"
    num_workers: int = 2
    shuffle_buffer: int = 1000
    random_flip: bool = True
    max_corrupt: int = 100  # samples the decoder rejects (all ranks) before the run stops


@dataclass
class TrainConfig:
    max_steps: int = 1000
    batch_size: int = 64  # global: micro_batch_size * grad_accum * world_size
    micro_batch_size: int = 0  # per rank and forward pass; 0 = batch_size / world_size
    lr: float = 2e-5
    warmup_steps: int = 5000
    adam_betas: tuple[float, ...] = (0.9, 0.999)
    adam_eps: float = 1e-8
    weight_decay: float = 0.0
    precision: str = "fp32"  # fp16 | bf16 | fp32
    grad_checkpointing: bool = False
    grad_clip: float = 1.0
    checkpoint_every: int = 1000
    keep_checkpoints: int = 3
    resume_fallback: bool = False  # newest checkpoint unloadable: stop (default) or take the next older
    max_bad_steps: int = 50  # consecutive overflow / non-finite steps before giving up
    seed: int = 0
    deepspeed_config: str = ""  # a user-supplied DeepSpeed JSON, passed through
    loss_weighting: str = "uniform"  # uniform | min_snr (Hang et al. 2023: the loss of x0 capped at SNR = snr_gamma)
    snr_gamma: float = 5.0


@dataclass
class ZeroConfig:
    stage: int = 0
    offload_optimizer: bool = False


@dataclass
class EMAConfig:
    decay: float = 0.9999
    warmup: bool = False  # decay = min(decay, (1 + n) / (10 + n)) for short runs
    profile: str = "exponential"  # exponential (decay, warmup) | power (EDM2: length set by sigma_rel, any run length)
    sigma_rel: float = 0.05  # power: the EMA's width as a fraction of the training so far


@dataclass
class LogConfig:
    every: int = 100
    sample_every: int = 5000
    sample_steps: int = 10  # network calls per preview image
    sample_sampler: str = DEFAULT_SAMPLER  # any of pipeline.core.sampling.SAMPLERS
    num_samples: int = 16
    tensorboard: bool = True


@dataclass
class RunConfig:
    dir: str = "runs/default"


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    zero: ZeroConfig = field(default_factory=ZeroConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    log: LogConfig = field(default_factory=LogConfig)
    run: RunConfig = field(default_factory=RunConfig)


def _coerce(value, annotation, where: str):
    """Check `value` against a field's type, converting only where YAML is ambiguous."""
    origin = typing.get_origin(annotation)
    if origin is tuple:
        (item_type, _) = typing.get_args(annotation)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return tuple(_coerce(v, item_type, f"{where}[{i}]") for i, v in enumerate(value))
    if annotation is bool:
        if isinstance(value, bool):
            return value
    elif annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif annotation is float:
        # YAML 1.1 reads `2e-5` (no dot) as a string; accept any number spelled as one.
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif annotation is str:
        if isinstance(value, str):
            return value
    raise ConfigError(f"{where}: expected {getattr(annotation, '__name__', annotation)}, got {value!r}")


def build_dataclass(cls, data: dict, where: str):
    """Instantiate dataclass `cls` (a section, or the whole Config) from a dict, rejecting unknown keys.

    `where` prefixes the keys in errors ("model" -> "model.channels: ..."); checkpoints use it too.
    """
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else key
        if key not in known:
            raise ConfigError(f"{path}: unknown key (known: {', '.join(sorted(known))})")
        if dataclasses.is_dataclass(hints[key]):
            kwargs[key] = build_dataclass(hints[key], value or {}, path)
        else:
            kwargs[key] = _coerce(value, hints[key], path)
    return cls(**kwargs)


def apply_override(data: dict, override: str) -> None:
    """Apply one `section.key=value` override (value parsed as YAML) to a raw config dict."""
    if "=" not in override:
        raise ConfigError(f"override {override!r}: expected section.key=value")
    dotted, raw = override.split("=", 1)
    keys = dotted.strip().split(".")
    node = data
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {override!r}: {key} is not a section")
    node[keys[-1]] = yaml.safe_load(raw) if raw.strip() else ""


# Keys that take one of a few names; checked alike, after the checks below.
CHOICES = {
    "diffusion.beta_schedule": ("linear", "cosine"),
    "diffusion.prediction_type": ("epsilon", "v_prediction", "sample"),
    "diffusion.variance_type": ("fixed_small", "fixed_large"),
    "train.precision": ("fp16", "bf16", "fp32"),
    "train.loss_weighting": ("uniform", "min_snr"),
    "ema.profile": ("exponential", "power"),
}


def validate(cfg: Config) -> None:
    """Reject impossible values; each message names the key."""
    m, d, train = cfg.model, cfg.diffusion, cfg.train
    levels = len(m.ch_mult)
    checks = [
        (
            m.image_size > 0 and m.image_size % 2 ** (levels - 1) == 0,
            "model.image_size",
            f"{m.image_size} is not divisible by the down-sampling factor {2 ** (levels - 1)} of ch_mult {list(m.ch_mult)}",
        ),
        (levels >= 1 and all(c > 0 for c in m.ch_mult), "model.ch_mult", f"{list(m.ch_mult)} must be positive"),
        (
            m.ch > 0 and all((m.ch * c) % m.num_groups == 0 for c in m.ch_mult),
            "model.ch",
            f"{m.ch} x ch_mult must be divisible by num_groups={m.num_groups}",
        ),
        (m.num_res_blocks >= 1, "model.num_res_blocks", f"{m.num_res_blocks} must be >= 1"),
        (0.0 <= m.dropout < 1.0, "model.dropout", f"{m.dropout} must be in [0, 1)"),
        (d.num_timesteps >= 2, "diffusion.num_timesteps", f"{d.num_timesteps} must be >= 2"),
        (0 < d.beta_start < d.beta_end < 1, "diffusion.beta_start", "need 0 < beta_start < beta_end < 1"),
        (train.lr > 0, "train.lr", f"{train.lr} must be > 0"),
        (train.max_steps >= 1, "train.max_steps", f"{train.max_steps} must be >= 1"),
        (train.batch_size >= 1, "train.batch_size", f"{train.batch_size} must be >= 1"),
        (train.micro_batch_size >= 0, "train.micro_batch_size", f"{train.micro_batch_size} must be >= 0"),
        (train.warmup_steps >= 0, "train.warmup_steps", f"{train.warmup_steps} must be >= 0"),
        (train.grad_clip >= 0, "train.grad_clip", f"{train.grad_clip} must be >= 0"),
        (train.checkpoint_every >= 1, "train.checkpoint_every", f"{train.checkpoint_every} must be >= 1"),
        (train.keep_checkpoints >= 1, "train.keep_checkpoints", f"{train.keep_checkpoints} must be >= 1"),
        (
            len(train.adam_betas) == 2 and all(0 <= b < 1 for b in train.adam_betas),
            "train.adam_betas",
            f"{list(train.adam_betas)} must be two values in [0, 1)",
        ),
        (train.snr_gamma > 0, "train.snr_gamma", f"{train.snr_gamma} must be > 0"),
        (cfg.zero.stage in (0, 1, 2, 3), "zero.stage", f"{cfg.zero.stage} not in 0..3"),
        (
            train.precision != "fp16" or cfg.zero.stage >= 1 or bool(train.deepspeed_config),
            "train.precision",
            FP16_NEEDS_ZERO,
        ),
        (0.0 <= cfg.ema.decay < 1.0, "ema.decay", f"{cfg.ema.decay} must be in [0, 1)"),
        # sigma_rel 0.2887 is the power exponent 0 (a plain running mean): no narrower profile is wider
        (0.0 < cfg.ema.sigma_rel < 0.28, "ema.sigma_rel", f"{cfg.ema.sigma_rel} must be in (0, 0.28)"),
        (cfg.log.every >= 1, "log.every", f"{cfg.log.every} must be >= 1"),
        (cfg.log.sample_every >= 0, "log.sample_every", f"{cfg.log.sample_every} must be >= 0"),
        (
            1 <= cfg.log.sample_steps <= d.num_timesteps,
            "log.sample_steps",
            f"{cfg.log.sample_steps} must be in [1, {d.num_timesteps}]",
        ),
        (
            cfg.log.sample_sampler in SAMPLERS,
            "log.sample_sampler",
            f"{cfg.log.sample_sampler!r} not one of {', '.join(SAMPLERS)}",
        ),
        (cfg.data.num_workers >= 0, "data.num_workers", f"{cfg.data.num_workers} must be >= 0"),
        (cfg.data.max_corrupt >= 0, "data.max_corrupt", f"{cfg.data.max_corrupt} must be >= 0"),
    ]
    for key, choices in CHOICES.items():
        section, field = key.split(".")
        value = getattr(getattr(cfg, section), field)
        checks.append((value in choices, key, f"{value!r} not {'|'.join(choices)}"))
    resolutions = [m.image_size // 2**i for i in range(levels)]
    for r in m.attn_resolutions:
        checks.append(
            (r in resolutions, "model.attn_resolutions", f"{r} is not a resolution of the network {resolutions}")
        )
    for ok, key, message in checks:
        if not ok:
            raise ConfigError(f"{key}: {message}")


def config_from_dict(data: dict) -> Config:
    cfg = build_dataclass(Config, data, "")
    validate(cfg)
    return cfg


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a YAML config, apply `key=value` overrides, check it; errors name the file."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as e:
        raise ConfigError(f"{path}: cannot read config ({e.strerror})") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not a text file ({e.reason} at byte {e.start})") from None
    if data is None:  # an empty file is a damaged one more often than a wish for every default
        raise ConfigError(f"{path}: empty config (an experiment names at least its run.dir and data.shards)")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections (model:, train:, ...), got a {type(data).__name__}")
    try:
        for override in overrides:
            apply_override(data, override)
        return config_from_dict(data)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def config_to_dict(cfg: Config) -> dict:
    """Plain dict (tuples as lists) suitable for YAML or JSON."""

    def plain(v):
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        return v

    return plain(dataclasses.asdict(cfg))


def load_config_or_report(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Config | None:
    """load_config for a command's main(): a ConfigError is printed as one line, and None returned."""
    try:
        return load_config(path, overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return None


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config as YAML, atomically."""
    atomic_write_text(path, yaml.safe_dump(config_to_dict(cfg), sort_keys=False))


if __name__ == "__main__":
    try:
        resolved = load_config(sys.argv[1], sys.argv[2:])
    except (ConfigError, IndexError) as e:
        sys.exit(
            f"error: {e}" if isinstance(e, ConfigError) else "usage: python -m pipeline.config FILE [key=value ...]"
        )
    print(yaml.safe_dump(config_to_dict(resolved), sort_keys=False), end="")
