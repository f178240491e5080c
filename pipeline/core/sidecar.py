"""The model sidecar `<file>.json`: everything the sampler needs besides the network itself.

Written beside the model file it describes, named after the whole file name (`denoiser.onnx.json`,
`denoiser.plan.json`), so a graph and the engine built from it never overwrite each other's;
atomically, after the model file. Read by every backend, which checks that the sidecar describes
the format it was asked for. Imports no torch and no onnx: the standalone sampler reads it too.

    {"format": "onnx", "image_size": 64, "channels": 3, "dtype": "float16",
     "input_names": ["sample", "timestep"], "output_names": ["model_output"],
     "timestep_dtype": "float32", "batch": {"min": 1, "opt": 16, "max": null},
     "betas": [...], "num_timesteps": 1000, "prediction_type": "epsilon", ...}
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.core.fileio import atomic_write_json, sha256_file
from pipeline.core.schedule import PREDICTION_TYPES, VARIANCE_TYPES, DiffusionSchedule

SIDECAR_VERSION = 1
FORMATS = ("onnx", "tensorrt", "torch")
SUFFIX_FORMATS = {".onnx": "onnx", ".plan": "tensorrt", ".engine": "tensorrt"}
DTYPES = ("float32", "float16")
INPUT_NAMES = ("sample", "timestep")
OUTPUT_NAMES = ("model_output",)


class SidecarError(ValueError):
    """A missing, unreadable or inconsistent sidecar; the message names the file and key."""


@dataclass
class Sidecar:
    format: str  # onnx | tensorrt | torch
    image_size: int
    channels: int
    dtype: str  # of `sample` and `model_output`
    timestep_dtype: str  # always float32: respaced / fractional steps need no rounding
    batch_min: int
    batch_opt: int
    batch_max: int | None  # None: unbounded (ONNX)
    betas: list[float]
    num_timesteps: int
    prediction_type: str
    variance_type: str
    clip_sample: bool
    input_names: list[str] = field(default_factory=lambda: list(INPUT_NAMES))
    output_names: list[str] = field(default_factory=lambda: list(OUTPUT_NAMES))
    source_checkpoint: str = ""
    step: int = 0
    weights: str = "ema"  # which weights of the checkpoint: ema | model (online, for comparison)
    model_file: str = ""  # basename of the model this sidecar describes
    model_bytes: int | None = None  # its size: a cheap check that the pair belongs together
    model_sha256: str = ""
    model_config: dict = field(default_factory=dict)
    producer: dict = field(default_factory=dict)  # torch / onnx / tensorrt versions, opset

    def schedule(self) -> DiffusionSchedule:
        return DiffusionSchedule(
            self.betas,
            prediction_type=self.prediction_type,
            variance_type=self.variance_type,
            clip_sample=self.clip_sample,
        )

    def batch_range(self) -> str:
        return f"{self.batch_min}..{self.batch_max if self.batch_max is not None else 'any'}"

    def accepts_batch(self, batch: int) -> bool:
        return self.batch_min <= batch and (self.batch_max is None or batch <= self.batch_max)

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["batch"] = {"min": d.pop("batch_min"), "opt": d.pop("batch_opt"), "max": d.pop("batch_max")}
        return {"sidecar_version": SIDECAR_VERSION, **d}


def sidecar_path(model_path: str | Path) -> Path:
    """`denoiser.onnx` -> `denoiser.onnx.json`, `denoiser.plan` -> `denoiser.plan.json`."""
    model_path = Path(model_path)
    return model_path.with_name(model_path.name + ".json")


def _legacy_sidecar_path(model_path: Path) -> Path:
    """`denoiser.json`: the name exports had before engines got sidecars of their own."""
    return model_path.with_suffix(".json")


def write_sidecar(model_path: str | Path, sidecar: Sidecar) -> Path:
    """Record the model file's name, size and hash, then write its `<file>.json` atomically."""
    model_path = Path(model_path)
    sidecar.model_file = model_path.name
    sidecar.model_bytes = model_path.stat().st_size
    sidecar.model_sha256 = sha256_file(model_path)
    validate(sidecar, sidecar_path(model_path))
    _check_format(sidecar, model_path, sidecar_path(model_path))
    atomic_write_json(sidecar_path(model_path), sidecar.to_json())
    return sidecar_path(model_path)


def _field(data: dict, key: str, kind, where: Path, optional: bool = False):
    if key not in data:
        if optional:
            return None
        raise SidecarError(f"{where}: missing key {key!r}")
    value = data[key]
    ok = isinstance(value, kind) and not (kind in (int, float) and isinstance(value, bool))
    if optional and value is None:
        return None
    if not ok:
        raise SidecarError(f"{where}: {key} = {value!r} is not {getattr(kind, '__name__', kind)}")
    return value


def validate(s: Sidecar, where: Path) -> None:
    """Reject values the sampler cannot use; each message names the key."""
    checks = [
        (s.format in FORMATS, "format", f"{s.format!r} not one of {FORMATS}"),
        (s.image_size > 0, "image_size", f"{s.image_size} must be > 0"),
        (s.channels > 0, "channels", f"{s.channels} must be > 0"),
        (s.dtype in DTYPES, "dtype", f"{s.dtype!r} not one of {DTYPES}"),
        (s.timestep_dtype == "float32", "timestep_dtype", f"{s.timestep_dtype!r}: only float32 is supported"),
        (s.batch_min >= 1, "batch.min", f"{s.batch_min} must be >= 1"),
        (s.batch_max is None or s.batch_max >= s.batch_min, "batch.max", f"{s.batch_max} < batch.min {s.batch_min}"),
        (s.format != "tensorrt" or s.batch_max is not None, "batch.max", "a TensorRT engine's range is bounded"),
        (s.accepts_batch(s.batch_opt), "batch.opt", f"{s.batch_opt} outside {s.batch_range()}"),
        (len(s.betas) == s.num_timesteps, "betas", f"{len(s.betas)} values for num_timesteps={s.num_timesteps}"),
        (all(0.0 < b < 1.0 for b in s.betas), "betas", "values must lie in (0, 1)"),
        (
            s.prediction_type in PREDICTION_TYPES,
            "prediction_type",
            f"{s.prediction_type!r} not one of {PREDICTION_TYPES}",
        ),
        (s.variance_type in VARIANCE_TYPES, "variance_type", f"{s.variance_type!r} not one of {VARIANCE_TYPES}"),
        (
            len(s.input_names) == 2 and len(s.output_names) == 1,
            "input_names",
            f"expected 2 inputs and 1 output, got {s.input_names} -> {s.output_names}",
        ),
    ]
    for ok, key, message in checks:
        if not ok:
            raise SidecarError(f"{where}: {key}: {message}")


def _check_format(s: Sidecar, model_path: Path, where: Path) -> None:
    """A .onnx needs an onnx sidecar, a .plan / .engine a tensorrt one (other names: not checked)."""
    want = SUFFIX_FORMATS.get(model_path.suffix)
    if want is not None and s.format != want:
        raise SidecarError(
            f"{where}: format {s.format!r} describes a {s.format} model, but {model_path.name} "
            f"is {want} (a sidecar of another file; re-export {model_path.name})"
        )


def _load_json(model_path: Path) -> tuple[dict, Path]:
    """The sidecar's JSON and where it was found: `<file>.json`, else an older export's
    `<stem>.json`, but only when that one names this very file."""
    where = sidecar_path(model_path)
    legacy = _legacy_sidecar_path(model_path)
    for path in (where, legacy):
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            continue
        except (OSError, ValueError) as e:
            raise SidecarError(f"{path}: unreadable sidecar ({e})") from None
        if not isinstance(data, dict):
            raise SidecarError(f"{path}: expected a JSON object")
        if path == where or data.get("model_file") == model_path.name:
            return data, path
    raise SidecarError(
        f"{where}: missing sidecar for {model_path.name} (re-export the model; "
        f"the sampler needs its schedule and shapes)"
    )


def read_sidecar(model_path: str | Path) -> Sidecar:
    """The validated sidecar of a model file; checks it was written for that very file and format."""
    model_path = Path(model_path)
    data, where = _load_json(model_path)
    version = data.get("sidecar_version")
    if version != SIDECAR_VERSION:
        raise SidecarError(f"{where}: sidecar_version {version!r}, this sampler reads {SIDECAR_VERSION}")
    batch = _field(data, "batch", dict, where)
    betas = _field(data, "betas", list, where)
    if not all(isinstance(b, (int, float)) and not isinstance(b, bool) for b in betas):
        raise SidecarError(f"{where}: betas must be a list of numbers")
    s = Sidecar(
        format=_field(data, "format", str, where),
        image_size=_field(data, "image_size", int, where),
        channels=_field(data, "channels", int, where),
        dtype=_field(data, "dtype", str, where),
        timestep_dtype=_field(data, "timestep_dtype", str, where),
        batch_min=_field(batch, "min", int, where),
        batch_opt=_field(batch, "opt", int, where),
        batch_max=_field(batch, "max", int, where, optional=True),
        betas=[float(b) for b in betas],
        num_timesteps=_field(data, "num_timesteps", int, where),
        prediction_type=_field(data, "prediction_type", str, where),
        variance_type=_field(data, "variance_type", str, where),
        clip_sample=_field(data, "clip_sample", bool, where),
        input_names=list(_field(data, "input_names", list, where)),
        output_names=list(_field(data, "output_names", list, where)),
        source_checkpoint=data.get("source_checkpoint", ""),
        step=data.get("step", 0),
        weights=data.get("weights", "ema"),
        model_file=data.get("model_file", ""),
        model_bytes=data.get("model_bytes"),
        model_sha256=data.get("model_sha256", ""),
        model_config=data.get("model_config", {}),
        producer=data.get("producer", {}),
    )
    validate(s, where)
    _check_format(s, model_path, where)
    if s.model_bytes is not None and model_path.exists() and model_path.stat().st_size != s.model_bytes:
        raise SidecarError(
            f"{where}: describes a {s.model_bytes}-byte {s.model_file or 'model'}, but "
            f"{model_path} has {model_path.stat().st_size} bytes (stale sidecar; re-export)"
        )
    return s


def sidecar_from_config(
    model_cfg,
    diffusion_cfg,
    betas,
    *,
    fmt: str,
    dtype: str,
    source: str = "",
    step: int = 0,
    batch: tuple = (1, 1, None),
    weights: str = "ema",
) -> Sidecar:
    """A Sidecar for a model built from `pipeline.config` ModelConfig / DiffusionConfig."""
    return Sidecar(
        format=fmt,
        image_size=model_cfg.image_size,
        channels=model_cfg.in_channels,
        dtype=dtype,
        timestep_dtype="float32",
        batch_min=batch[0],
        batch_opt=batch[1],
        batch_max=batch[2],
        betas=[float(b) for b in betas],
        num_timesteps=diffusion_cfg.num_timesteps,
        prediction_type=diffusion_cfg.prediction_type,
        variance_type=diffusion_cfg.variance_type,
        clip_sample=diffusion_cfg.clip_sample,
        source_checkpoint=source,
        step=step,
        weights=weights,
        model_config=dataclasses.asdict(model_cfg),
    )
