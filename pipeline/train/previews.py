"""Preview grids during training: EMA weights through the one sampling core, one PNG.

The noise is the same at every call (fixed seed), so successive grids in run.dir/samples/
show the same faces taking shape. The sampler is `log.sample_sampler` (default: the core's
default, the best score per network call in `benchmarks quality`).

    python -m pipeline.train.previews --ckpt runs/demo [--sampler unipc] [--steps 10] [--num 16] [--out grid.png]
"""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from PIL import Image

from pipeline.checkpoint import CheckpointError, load_unet
from pipeline.core.fileio import atomic_write_bytes
from pipeline.core.grid import image_grid
from pipeline.core.sampling import DEFAULT_SAMPLER, SAMPLERS, SamplerError, check_sampler, generate
from pipeline.core.schedule import DiffusionSchedule, schedule_from_config

NOISE_SEED = 1234


class ModelDenoiser:
    """A torch U-Net as a sampling-core denoiser: numpy (x, t) in, numpy model output out."""

    info = SimpleNamespace(batch_min=1, batch_max=None)

    def __init__(self, model: torch.nn.Module, device: torch.device | str = "cpu"):
        self.model, self.device = model, torch.device(device)

    @torch.no_grad()
    def __call__(self, x: np.ndarray, t: np.ndarray) -> np.ndarray:
        out = self.model(torch.from_numpy(x).to(self.device), torch.from_numpy(t).to(self.device))
        return out.float().cpu().numpy()


def model_samples(
    model: torch.nn.Module,
    schedule: DiffusionSchedule,
    num: int,
    steps: int,
    sampler: str = DEFAULT_SAMPLER,
    eta: float = 0.0,
    seed: int = NOISE_SEED,
    device: torch.device | str = "cpu",
) -> np.ndarray:
    """num samples of a torch model from the core's per-image noise -> (num, C, H, W) float32 in [-1, 1]."""
    denoiser = ModelDenoiser(model, device)
    shape = (model.cfg.in_channels, model.cfg.image_size, model.cfg.image_size)
    x = generate(
        denoiser, num, batch=num, sampler=sampler, steps=steps, eta=eta, seed=seed, schedule=schedule, shape=shape
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
    schedule: DiffusionSchedule,
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
        data = png_bytes(to_grid(model_samples(model, schedule, num, steps, sampler, device=device)))
    finally:
        model.train(was_training)
    samples = Path(run_dir) / "samples"
    path = samples / f"step_{step:09d}.png"
    atomic_write_bytes(path, data)
    atomic_write_bytes(samples / "grid.png", data)
    return path


def main(argv: list[str] | None = None) -> int:

    p = argparse.ArgumentParser(prog="python -m pipeline.train.previews", description=__doc__.split("\n")[0])
    p.add_argument("--ckpt", required=True, help="a checkpoint directory or a run directory (newest checkpoint)")
    p.add_argument("--sampler", default=DEFAULT_SAMPLER, metavar="|".join(SAMPLERS))
    p.add_argument("--steps", type=int, default=10, help="network calls per image")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM only: 0 deterministic, 1 stochastic")
    p.add_argument("--num", type=int, default=16, help="number of images")
    p.add_argument("--seed", type=int, default=NOISE_SEED)
    p.add_argument("--out", default="grid.png")
    args = p.parse_args(argv)
    try:
        model, _, diffusion_cfg = load_unet(args.ckpt)
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    schedule = schedule_from_config(diffusion_cfg)
    try:
        check_sampler(args.sampler, args.steps, args.eta, schedule.num_timesteps)
    except SamplerError as e:
        print(f"error: --{e.name} {getattr(args, e.name)}: {e}", file=sys.stderr)
        return 2
    images = model_samples(model, schedule, args.num, args.steps, args.sampler, eta=args.eta, seed=args.seed)
    atomic_write_bytes(args.out, png_bytes(to_grid(images)))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
