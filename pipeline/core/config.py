"""The experiment's typed description: one dataclass per section, each field with its meaning and its check.

Standard library only, so the torch-free core can read the two sections that describe a trained model
(`ModelConfig`, `DiffusionConfig`) from a checkpoint's model.json or an engine's sidecar with the same
reader and checks as the YAML file (`pipeline.config` reads YAML into these). A choice is a `Literal`,
checked for every section in one place (`Section.__post_init__`); each other check sits in its
section's `check()`. Every failure is a `ConfigError` whose one line names the key.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Union

BetaSchedule = Literal["linear", "cosine"]
PredictionType = Literal["epsilon", "v_prediction", "sample"]
VarianceType = Literal["fixed_small", "fixed_large"]
Sampler = Literal["ddpm", "ddim", "dpmpp_2m", "unipc"]
# The default of every entry point, from `python -m benchmarks quality` on the demo model
# (benchmarks/results/cpu/quality): the sampler with the best score per network call.
DEFAULT_SAMPLER: Sampler = "unipc"
Precision = Literal["fp16", "bf16", "fp32"]
LossWeighting = Literal["uniform", "min_snr"]
EMAProfile = Literal["exponential", "power"]

# DeepSpeed 0.19 scales the loss in engine.backward() only for ZeRO optimizers, while its plain fp16
# optimizer still divides every gradient by the loss scale: at stage 0 fp16 learns ~65536x too slowly.
FP16_NEEDS_ZERO = (
    "fp16 needs zero.stage >= 1 (DeepSpeed 0.19 does not scale the loss for its stage-0 fp16 "
    "optimizer, so the gradients shrink by the loss scale); set zero.stage=1 or 2, or use bf16"
)


class ConfigError(ValueError):
    """A user mistake in a config file, override, model.json or sidecar; the message names the key."""


def choices(kind: Any) -> tuple[str, ...]:
    """The names a `Literal` type allows, e.g. choices(PredictionType)."""
    return typing.get_args(kind)


def check_choice(kind: Any, value: object, key: str) -> None:
    if value not in choices(kind):
        raise ConfigError(f"{key}: {value!r} not {'|'.join(choices(kind))}")


def require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {message}")


@dataclass
class Section:
    """Base of every section: checks its `Literal` fields, then its own `check()`."""

    name: ClassVar[str] = ""

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            if typing.get_origin(hints[f.name]) is Literal:
                check_choice(hints[f.name], getattr(self, f.name), self.key(f.name))
        self.check()

    def check(self) -> None:
        pass

    def key(self, attr: str) -> str:
        """The field's name in errors: `section.field`."""
        return f"{self.name}.{attr}" if self.name else attr

    def at_least(self, bound: int, *attrs: str) -> None:
        """Each named field is >= bound."""
        for attr in attrs:
            value = getattr(self, attr)
            require(value >= bound, self.key(attr), f"{value} must be >= {bound}")


@dataclass
class ModelConfig(Section):
    """The U-Net (Ho et al. 2020, appendix B): widths, depth and where attention sits."""

    name: ClassVar[str] = "model"
    image_size: int = 32
    in_channels: int = 3
    ch: int = 128
    """Channels of the first level; level i has ch * ch_mult[i]."""
    ch_mult: tuple[int, ...] = (1, 2, 2, 2)
    num_res_blocks: int = 2
    """Residual blocks per level on the way down (one more on the way up)."""
    attn_resolutions: tuple[int, ...] = (16,)
    """Feature-map sizes that get a self-attention block."""
    dropout: float = 0.1
    num_groups: int = 32
    """GroupNorm groups; every level's width must divide by it."""

    def check(self) -> None:
        levels, factor = len(self.ch_mult), 2 ** (len(self.ch_mult) - 1)
        require(
            self.image_size > 0 and self.image_size % factor == 0,
            "model.image_size",
            f"{self.image_size} is not divisible by the down-sampling factor {factor} of ch_mult {list(self.ch_mult)}",
        )
        require(
            levels >= 1 and all(c > 0 for c in self.ch_mult), "model.ch_mult", f"{list(self.ch_mult)} must be positive"
        )
        require(
            self.ch > 0 and all((self.ch * c) % self.num_groups == 0 for c in self.ch_mult),
            "model.ch",
            f"{self.ch} x ch_mult must be divisible by num_groups={self.num_groups}",
        )
        self.at_least(1, "num_res_blocks")
        require(0.0 <= self.dropout < 1.0, "model.dropout", f"{self.dropout} must be in [0, 1)")
        resolutions = [self.image_size // 2**i for i in range(levels)]
        for r in self.attn_resolutions:
            require(r in resolutions, "model.attn_resolutions", f"{r} is not a resolution of the network {resolutions}")


@dataclass
class DiffusionConfig(Section):
    """The forward process and what the network predicts: all a sampler needs besides the network."""

    name: ClassVar[str] = "diffusion"
    num_timesteps: int = 1000
    beta_schedule: BetaSchedule = "linear"
    """linear (Ho et al.) from beta_start to beta_end, or cosine (Nichol & Dhariwal)."""
    beta_start: float = 1e-4
    beta_end: float = 0.02
    prediction_type: PredictionType = "epsilon"
    """What the network outputs: the noise, v = alpha eps - sigma x0 (Salimans & Ho), or x0 itself."""
    variance_type: VarianceType = "fixed_small"
    """DDPM's reverse variance: the posterior's (small) or beta_t (large)."""
    clip_sample: bool = True
    """Clip each x0 prediction to [-1, 1] while sampling."""

    def check(self) -> None:
        self.at_least(2, "num_timesteps")
        require(0 < self.beta_start < self.beta_end < 1, "diffusion.beta_start", "need 0 < beta_start < beta_end < 1")


@dataclass
class DataConfig(Section):
    name: ClassVar[str] = "data"
    shards: str = "data/synthetic32"
    """A data_prep output directory (shards + manifest.json)."""
    num_workers: int = 2
    shuffle_buffer: int = 1000
    random_flip: bool = True
    max_corrupt: int = 100
    """Samples the decoder may reject (all ranks together) before the run stops."""

    def check(self) -> None:
        self.at_least(0, "num_workers", "max_corrupt")


@dataclass
class TrainConfig(Section):
    name: ClassVar[str] = "train"
    max_steps: int = 1000
    batch_size: int = 64
    """Global: micro_batch_size * grad_accum * world_size."""
    micro_batch_size: int = 0
    """Per rank and forward pass; 0 = batch_size / world_size."""
    lr: float = 2e-5
    warmup_steps: int = 5000
    adam_betas: tuple[float, ...] = (0.9, 0.999)
    adam_eps: float = 1e-8
    weight_decay: float = 0.0
    precision: Precision = "fp32"
    grad_checkpointing: bool = False
    grad_clip: float = 1.0
    checkpoint_every: int = 1000
    keep_checkpoints: int = 3
    resume_fallback: bool = False
    """Newest checkpoint unloadable: stop (default) or take the next older one."""
    max_bad_steps: int = 50
    """Consecutive overflow / non-finite steps before giving up."""
    seed: int = 0
    deepspeed_config: str = ""
    """A user-supplied DeepSpeed JSON, passed through."""
    loss_weighting: LossWeighting = "uniform"
    """min_snr: Hang et al. 2023, the loss of x0 capped at SNR = snr_gamma."""
    snr_gamma: float = 5.0

    def check(self) -> None:
        for key in ("lr", "snr_gamma"):
            require(getattr(self, key) > 0, f"train.{key}", f"{getattr(self, key)} must be > 0")
        self.at_least(1, "max_steps", "batch_size", "checkpoint_every", "keep_checkpoints")
        self.at_least(0, "micro_batch_size", "warmup_steps", "grad_clip")
        require(
            len(self.adam_betas) == 2 and all(0 <= b < 1 for b in self.adam_betas),
            "train.adam_betas",
            f"{list(self.adam_betas)} must be two values in [0, 1)",
        )


@dataclass
class ZeroConfig(Section):
    name: ClassVar[str] = "zero"
    stage: int = 0
    offload_optimizer: bool = False

    def check(self) -> None:
        require(self.stage in (0, 1, 2, 3), "zero.stage", f"{self.stage} not in 0..3")


@dataclass
class EMAConfig(Section):
    name: ClassVar[str] = "ema"
    decay: float = 0.9999
    warmup: bool = False
    """decay = min(decay, (1 + n) / (10 + n)) for short runs."""
    profile: EMAProfile = "exponential"
    """exponential (decay, warmup) or power (EDM2: the length set by sigma_rel, for any run length)."""
    sigma_rel: float = 0.05
    """power: the EMA's width as a fraction of the training so far."""

    def check(self) -> None:
        require(0.0 <= self.decay < 1.0, "ema.decay", f"{self.decay} must be in [0, 1)")
        # sigma_rel 0.2887 is the power exponent 0 (a plain running mean): no narrower profile is wider
        require(0.0 < self.sigma_rel < 0.28, "ema.sigma_rel", f"{self.sigma_rel} must be in (0, 0.28)")


@dataclass
class LogConfig(Section):
    name: ClassVar[str] = "log"
    every: int = 100
    sample_every: int = 5000
    sample_steps: int = 10
    """Network calls per preview image."""
    sample_sampler: Sampler = DEFAULT_SAMPLER
    num_samples: int = 16
    tensorboard: bool = True

    def check(self) -> None:
        self.at_least(1, "every")
        self.at_least(0, "sample_every")


@dataclass
class RunConfig(Section):
    name: ClassVar[str] = "run"
    dir: str = "runs/default"


@dataclass
class Config:
    """One experiment: the sections above, and the checks that span two of them."""

    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    zero: ZeroConfig = field(default_factory=ZeroConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    log: LogConfig = field(default_factory=LogConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def __post_init__(self) -> None:
        train, T = self.train, self.diffusion.num_timesteps
        require(
            train.precision != "fp16" or self.zero.stage >= 1 or bool(train.deepspeed_config),
            "train.precision",
            FP16_NEEDS_ZERO,
        )
        require(1 <= self.log.sample_steps <= T, "log.sample_steps", f"{self.log.sample_steps} must be in [1, {T}]")


def _coerce(value, annotation, where: str):
    """Check `value` against a field's type, converting only where YAML is ambiguous."""
    origin = typing.get_origin(annotation)
    if origin is tuple:
        (item_type, _) = typing.get_args(annotation)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return tuple(_coerce(v, item_type, f"{where}[{i}]") for i, v in enumerate(value))
    if origin is Literal:  # checked once, by Section.__post_init__, however the section was built
        return value
    if origin in (Union, types.UnionType):  # `int | None`: None, or the other type
        if value is None:
            return None
        (other,) = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _coerce(value, other, where)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (item_type,) = typing.get_args(annotation)
        return [_coerce(v, item_type, f"{where}[{i}]") for i, v in enumerate(value)]
    if annotation is dict:
        if isinstance(value, dict):
            return value
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


def from_dict(cls, data: dict, where: str = ""):
    """Instantiate dataclass `cls` (a section, the whole Config, a sidecar) from a dict; unknown keys refused.

    `where` prefixes the keys in errors ("model" -> "model.ch: ..."). Field types are checked here;
    the values' own checks run in the dataclass's __post_init__.
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
            kwargs[key] = from_dict(hints[key], value or {}, path)
        else:
            kwargs[key] = _coerce(value, hints[key], path)
    for f in dataclasses.fields(cls):
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if required and f.name not in kwargs:
            raise ConfigError(f"{where}.{f.name}: missing" if where else f"{f.name}: missing")
    return cls(**kwargs)


def to_dict(obj) -> dict:
    """A dataclass as a plain dict (tuples as lists) for YAML or JSON."""

    def plain(v):
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        return v

    return plain(dataclasses.asdict(obj))
