"""Preview grids during training: EMA weights through the one sampling core, one PNG.

The noise is the same at every call (fixed seed), so successive grids in run.dir/samples/
show the same faces taking shape. The sampler is `log.sample_sampler` (default: the core's
default, the best score per network call in `benchmarks quality`). A grid of a saved checkpoint is
`python -m export.sample --model CKPT --grid grid.png`.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pipeline.core.config import DEFAULT_SAMPLER, DiffusionConfig
from pipeline.core.fileio import atomic_write_bytes
from pipeline.core.grid import image_grid
from pipeline.core.sampling import generate
from pipeline.core.sidecar import Sidecar
from pipeline.model.denoiser import TorchDenoiser

NOISE_SEED = 1234


def model_samples(
    model: torch.nn.Module,
    diffusion: DiffusionConfig,
    num: int,
    steps: int,
    sampler: str = DEFAULT_SAMPLER,
    eta: float = 0.0,
    seed: int = NOISE_SEED,
    device: torch.device | str = "cpu",
) -> np.ndarray:
    """num samples of a torch model from the core's per-image noise -> (num, C, H, W) float32 in [-1, 1]."""
    info = Sidecar(format="torch", dtype="float32", model=model.cfg, diffusion=diffusion)
    x = generate(
        TorchDenoiser(model, info, device=device), num, batch=num, sampler=sampler, steps=steps, eta=eta, seed=seed
    )
    return np.clip(x, -1.0, 1.0)


def to_grid(images: np.ndarray, ncol: int | None = None, pad: int = 2) -> Image.Image:
    """(N, C, H, W) in [-1, 1] -> one RGB image, ncol images per row (default: square)."""
    pixels = np.round((images + 1.0) * 127.5).clip(0, 255).astype(np.uint8).transpose(0, 2, 3, 1)
    if pixels.shape[-1] == 1:
        pixels = np.repeat(pixels, 3, axis=-1)
    return Image.fromarray(image_grid(pixels, ncol, pad))


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def save_preview(
    model: torch.nn.Module,
    diffusion: DiffusionConfig,
    run_dir: str | Path,
    step: int,
    num: int,
    steps: int,
    sampler: str = DEFAULT_SAMPLER,
    device: torch.device | str = "cpu",
) -> Path:
    """Draw a grid, write samples/step_XXXXXXXXX.png and samples/grid.png (the latest), atomically."""
    was_training = model.training
    model.eval()
    try:
        data = png_bytes(to_grid(model_samples(model, diffusion, num, steps, sampler, device=device)))
    finally:
        model.train(was_training)
    samples = Path(run_dir) / "samples"
    path = samples / f"step_{step:09d}.png"
    atomic_write_bytes(path, data)
    atomic_write_bytes(samples / "grid.png", data)
    return path
