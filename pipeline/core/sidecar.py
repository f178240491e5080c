"""The model sidecar `<file>.json`: everything the sampler needs besides the network itself.

Written beside the model file it describes, named after the whole file name (`denoiser.onnx.json`,
`denoiser.plan.json`), so a graph and the engine built from it never overwrite each other's;
atomically, after the model file. The model and its diffusion are the checkpoint's own
`ModelConfig` and `DiffusionConfig` (pipeline.core.config), written and read by the same typed reader
as the YAML config and model.json, so the prediction type and the schedule are defined in one place.

    {"sidecar_version": 2, "format": "onnx", "dtype": "float32", "batch_min": 1, "batch_opt": 16,
     "batch_max": null, "model": {"image_size": 64, ...}, "diffusion": {"prediction_type": "epsilon", ...},
     "input_names": ["sample", "timestep"], "output_names": ["model_output"], "model_sha256": ..., ...}
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal

from pipeline.core.config import ConfigError, DiffusionConfig, ModelConfig, Section, from_dict, require, to_dict
from pipeline.core.fileio import atomic_write_json, sha256_file
from pipeline.core.schedule import DiffusionSchedule

SIDECAR_VERSION = 2
Format = Literal["onnx", "tensorrt", "torch"]
SUFFIX_FORMATS = {".onnx": "onnx", ".plan": "tensorrt", ".engine": "tensorrt"}
INPUT_NAMES = ("sample", "timestep")
OUTPUT_NAMES = ("model_output",)


class SidecarError(ValueError):
    """A missing, unreadable or inconsistent sidecar; the message names the file and key."""


@dataclass
class Sidecar(Section):
    """What one model file is: its format and I/O, the batch range it takes, and the model it was made from."""

    name: ClassVar[str] = ""
    format: Format
    dtype: Literal["float32", "float16"]
    """Of `sample` and `model_output`."""
    model: ModelConfig
    diffusion: DiffusionConfig
    batch_min: int = 1
    batch_opt: int = 1
    batch_max: int | None = None
    """None: unbounded (ONNX); a TensorRT engine's optimization profile is bounded."""
    timestep_dtype: Literal["float32"] = "float32"
    """Respaced and fractional timesteps need no rounding."""
    input_names: list[str] = field(default_factory=lambda: list(INPUT_NAMES))
    output_names: list[str] = field(default_factory=lambda: list(OUTPUT_NAMES))
    source_checkpoint: str = ""
    step: int = 0
    weights: Literal["ema", "model"] = "ema"
    """Which weights of the checkpoint: the EMA (served) or the online ones (for comparison)."""
    model_file: str = ""
    """Basename of the model this sidecar describes."""
    model_bytes: int | None = None
    """Its size: a cheap check that the pair belongs together."""
    model_sha256: str = ""
    producer: dict = field(default_factory=dict)
    """torch / onnx / tensorrt versions, opset."""
    sidecar_version: int = SIDECAR_VERSION

    @property
    def image_size(self) -> int:
        return self.model.image_size

    @property
    def channels(self) -> int:
        return self.model.in_channels

    def check(self) -> None:
        self.at_least(1, "batch_min")
        require(
            self.batch_max is None or self.batch_max >= self.batch_min,
            "batch_max",
            f"{self.batch_max} < batch_min {self.batch_min}",
        )
        require(
            self.format != "tensorrt" or self.batch_max is not None, "batch_max", "a TensorRT engine's range is bounded"
        )
        require(self.accepts_batch(self.batch_opt), "batch_opt", f"{self.batch_opt} outside {self.batch_range()}")
        require(
            len(self.input_names) == 2 and len(self.output_names) == 1,
            "input_names",
            f"expected 2 inputs and 1 output, got {self.input_names} -> {self.output_names}",
        )

    def schedule(self) -> DiffusionSchedule:
        return DiffusionSchedule.from_config(self.diffusion)

    def batch_range(self) -> str:
        return f"{self.batch_min}..{self.batch_max if self.batch_max is not None else 'any'}"

    def accepts_batch(self, batch: int) -> bool:
        return self.batch_min <= batch and (self.batch_max is None or batch <= self.batch_max)


def sidecar_path(model_path: str | Path) -> Path:
    """`denoiser.onnx` -> `denoiser.onnx.json`, `denoiser.plan` -> `denoiser.plan.json`."""
    model_path = Path(model_path)
    return model_path.with_name(model_path.name + ".json")


def write_sidecar(model_path: str | Path, sidecar: Sidecar) -> Path:
    """Record the model file's name, size and hash, then write its `<file>.json` atomically."""
    model_path, where = Path(model_path), sidecar_path(model_path)
    sidecar.model_file = model_path.name
    sidecar.model_bytes = model_path.stat().st_size
    sidecar.model_sha256 = sha256_file(model_path)
    _check_format(sidecar, model_path, where)
    atomic_write_json(where, to_dict(sidecar))
    return where


def _check_format(s: Sidecar, model_path: Path, where: Path) -> None:
    """A .onnx needs an onnx sidecar, a .plan / .engine a tensorrt one (other names: not checked)."""
    want = SUFFIX_FORMATS.get(model_path.suffix)
    if want is not None and s.format != want:
        raise SidecarError(
            f"{where}: format {s.format!r} describes a {s.format} model, but {model_path.name} "
            f"is {want} (a sidecar of another file; re-export {model_path.name})"
        )


def read_sidecar(model_path: str | Path) -> Sidecar:
    """The checked sidecar of a model file; checks it was written for that very file and format."""
    model_path = Path(model_path)
    where = sidecar_path(model_path)
    try:
        data = json.loads(where.read_text())
    except FileNotFoundError:
        raise SidecarError(
            f"{where}: missing sidecar for {model_path.name} (re-export the model; "
            f"the sampler needs its schedule and shapes)"
        ) from None
    except (OSError, ValueError) as e:
        raise SidecarError(f"{where}: unreadable sidecar ({e})") from None
    version = data.get("sidecar_version") if isinstance(data, dict) else None
    if version != SIDECAR_VERSION:
        raise SidecarError(f"{where}: sidecar_version {version!r}, this sampler reads {SIDECAR_VERSION} (re-export)")
    try:
        s = from_dict(Sidecar, data)
    except ConfigError as e:
        raise SidecarError(f"{where}: {e}") from None
    _check_format(s, model_path, where)
    if s.model_bytes is not None and model_path.exists() and model_path.stat().st_size != s.model_bytes:
        raise SidecarError(
            f"{where}: describes a {s.model_bytes}-byte {s.model_file or 'model'}, but "
            f"{model_path} has {model_path.stat().st_size} bytes (stale sidecar; re-export)"
        )
    return s
