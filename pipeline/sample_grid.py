"""Preview grids during training: EMA weights, a few DDIM steps of the NumPy sampler, one PNG.

The noise is the same at every call (fixed seed), so successive grids in run.dir/samples/
show the same faces taking shape. Previews use eta = 1 (stochastic DDIM): with the
deterministic eta = 0, a partly trained model leaves visible residual noise in some samples
after 25 steps, while the fresh noise of each stochastic step washes such errors out.

    python -m pipeline.sample_grid --ckpt runs/demo [--steps 25] [--eta 1] [--num 16] [--out grid.png]
"""
from __future__ import annotations

import argparse
import io
import math
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pipeline.fileio import atomic_write_bytes
from pipeline.schedule import DiffusionSchedule, sampling_timesteps

NOISE_SEED = 1234


@torch.no_grad()
def ddim_samples(model: torch.nn.Module, schedule: DiffusionSchedule, num: int, steps: int, eta: float = 1.0,
                 seed: int = NOISE_SEED, device: torch.device | str = "cpu") -> np.ndarray:
    """DDIM from x_T ~ N(0, I), all noise from `seed` -> (num, C, H, W) float64 in [-1, 1]."""
    cfg = model.cfg
    rng = np.random.default_rng(seed)
    shape = (num, cfg.in_channels, cfg.image_size, cfg.image_size)
    x = rng.standard_normal(shape)
    timesteps = sampling_timesteps(schedule.num_timesteps, steps, spacing="trailing")  # starts at T-1
    for t, t_prev in zip(timesteps, list(timesteps[1:]) + [-1]):
        x_t = torch.from_numpy(x).to(device, torch.float32)
        model_output = model(x_t, torch.full((num,), int(t), device=device)).double().cpu().numpy()
        x = schedule.ddim_step(model_output, int(t), int(t_prev), x, eta=eta, noise=rng.standard_normal(shape))
    return np.clip(x, -1.0, 1.0)


def to_grid(images: np.ndarray, ncol: int | None = None, pad: int = 2) -> Image.Image:
    """(N, C, H, W) in [-1, 1] -> one RGB image, ncol images per row (default: square)."""
    n, c, h, w = images.shape
    ncol = ncol or math.ceil(math.sqrt(n))
    nrow = math.ceil(n / ncol)
    pixels = np.round((images + 1.0) * 127.5).clip(0, 255).astype(np.uint8).transpose(0, 2, 3, 1)
    if c == 1:
        pixels = np.repeat(pixels, 3, axis=-1)
    grid = np.full((nrow * (h + pad) + pad, ncol * (w + pad) + pad, 3), 255, dtype=np.uint8)
    for i, image in enumerate(pixels):
        r, col = divmod(i, ncol)
        grid[pad + r * (h + pad):pad + r * (h + pad) + h, pad + col * (w + pad):pad + col * (w + pad) + w] = image
    return Image.fromarray(grid)


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def save_preview(model: torch.nn.Module, schedule: DiffusionSchedule, run_dir: str | Path, step: int,
                 num: int, steps: int, device: torch.device | str = "cpu") -> Path:
    """Draw a grid, write samples/step_XXXXXXXXX.png and samples/grid.png (the latest), atomically."""
    was_training = model.training
    model.eval()
    try:
        data = png_bytes(to_grid(ddim_samples(model, schedule, num, steps, device=device)))
    finally:
        model.train(was_training)
    samples = Path(run_dir) / "samples"
    path = samples / f"step_{step:09d}.png"
    atomic_write_bytes(path, data)
    atomic_write_bytes(samples / "grid.png", data)
    return path


def main(argv: list[str] | None = None) -> int:
    from pipeline.checkpoint import CheckpointError, load_unet
    from pipeline.diffusion import schedule_from_config
    p = argparse.ArgumentParser(prog="python -m pipeline.sample_grid", description=__doc__.split("\n")[0])
    p.add_argument("--ckpt", required=True, help="a checkpoint directory or a run directory (newest checkpoint)")
    p.add_argument("--steps", type=int, default=25, help="DDIM steps")
    p.add_argument("--eta", type=float, default=1.0, help="0: deterministic DDIM, 1: stochastic (default)")
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
    if not 1 <= args.steps <= schedule.num_timesteps:
        print(f"error: --steps {args.steps} must be in [1, {schedule.num_timesteps}]", file=sys.stderr)
        return 2
    images = ddim_samples(model, schedule, args.num, args.steps, eta=args.eta, seed=args.seed)
    atomic_write_bytes(args.out, png_bytes(to_grid(images)))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
