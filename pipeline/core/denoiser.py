"""The one denoiser interface: what every backend (ONNX Runtime, TensorRT, torch) is to the sampling core.

    denoiser(x (B, C, H, W) float32, t (B,) float32) -> model_output (B, C, H, W) float32

`info` is the model's sidecar (image size, batch range, and the diffusion it was trained for, from
which the sampler builds its schedule); `name` says what actually ran (runtime, version, device,
precision). `export.backends.load_denoiser` makes one from a model path; training previews wrap the
in-memory model in `pipeline.model.denoiser.TorchDenoiser`.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from pipeline.core.sidecar import Sidecar


class Denoiser(Protocol):
    info: Sidecar
    name: str

    def __call__(self, x: np.ndarray, t: np.ndarray) -> np.ndarray: ...


class ModelError(ValueError):
    """The model the user pointed at cannot be used as asked; the message names the file."""


class BackendUnavailable(RuntimeError):
    """A runtime the backend needs (TensorRT, a CUDA device, torch) is missing on this machine."""
