"""Sample images from an exported denoiser (or a checkpoint) with the NumPy sampling core.

    python -m export.sample --model denoiser.onnx|denoiser.plan|CKPT_DIR [--sampler unipc|dpmpp_2m|ddim|ddpm]
        [--steps N] [--eta 0] [--spacing trailing] [--num 64] [--batch 16] [--seed 0]
        [--provider auto|cuda|cpu] [--threads N] --out grid.png|samples.npz [--grid grid.png]

`.npz` holds `images`, uint8 (N,H,W,C); `.png` is a grid; --grid also draws the first 64 as one.
Image i depends only on (seed, i), not on --batch. With an .onnx or .plan model this imports neither torch nor onnx.
Exit status: 0 done, 2 bad input (one line on stderr), 1 a runtime is missing or the disk is full.
"""

from __future__ import annotations

import argparse
import io
import math
import sys
import time
from pathlib import Path

import numpy as np

from export.backends import load_denoiser
from pipeline.core.denoiser import BackendUnavailable, ModelError
from pipeline.core.fileio import NoSpaceError, atomic_write_bytes
from pipeline.core.grid import image_grid
from pipeline.core.progress import Progress
from pipeline.core.sampling import (
    DEFAULT_SAMPLER,
    DEFAULT_SPACING,
    DEFAULT_STEPS,
    SAMPLERS,
    SamplerError,
    check_sampler,
    default_steps,
    generate,
    to_uint8,
)
from pipeline.core.schedule import SPACINGS
from pipeline.core.sidecar import SidecarError

OUT_SUFFIXES = (".png", ".npz")
GRID_IMAGES = 64  # what --grid draws: enough faces to judge, small enough to look at


class UsageError(ValueError):
    """A bad command-line value; the message names the flag."""


def save_images(images: np.ndarray, out: Path) -> None:
    """Atomically write a .npz (`images`) or a .png grid."""
    buffer = io.BytesIO()
    if out.suffix == ".npz":
        np.savez(buffer, images=images)
    else:
        from PIL import Image  # pillow: only for --grid

        grid = image_grid(images)
        Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid).save(buffer, format="PNG")
    atomic_write_bytes(out, buffer.getvalue())


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m export.sample", description=__doc__.splitlines()[0])
    p.add_argument(
        "--model", required=True, help=".onnx, .plan/.engine (each with its .json sidecar) or a checkpoint dir"
    )
    # Checked by check_args (one line naming the flag), not by argparse's choices.
    p.add_argument(
        "--sampler",
        default=DEFAULT_SAMPLER,
        metavar="|".join(SAMPLERS),
        help=f"default {DEFAULT_SAMPLER}: the best score per network call (benchmarks quality)",
    )
    p.add_argument(
        "--steps",
        type=int,
        help="network evaluations per image (default: "
        + ", ".join(f"{k} {v or 'all T'}" for k, v in DEFAULT_STEPS.items())
        + ")",
    )
    p.add_argument("--eta", type=float, default=0.0, help="DDIM only: 0 deterministic, 1 DDPM-like noise")
    p.add_argument("--spacing", choices=SPACINGS, default=DEFAULT_SPACING, help="how respaced steps are chosen")
    p.add_argument("--num", type=int, default=64, help="number of images")
    p.add_argument("--batch", type=int, help="images per engine call (default: 16 clamped to the engine's range)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--provider", choices=("auto", "cuda", "cpu"), default="auto", help="ONNX Runtime provider")
    p.add_argument("--threads", type=int, help="CPU threads for ONNX Runtime / torch (default: all allowed)")
    p.add_argument("--out", required=True, help="grid .png or .npz")
    p.add_argument("--grid", help=f"also write the first {GRID_IMAGES} images as a .png grid (beside an .npz)")
    return p.parse_args(argv)


def check_args(args, info) -> int:
    """Validate flags against the model; returns the batch size to use."""
    if args.num < 1:
        raise UsageError(f"--num {args.num}: must be >= 1")
    try:
        check_sampler(args.sampler, args.steps, args.eta, info.diffusion.num_timesteps)
    except SamplerError as e:
        raise UsageError(f"--{e.name} {getattr(args, e.name)}: {e}") from None
    if args.batch is None:
        batch = max(min(16, info.batch_max or 16), info.batch_min)
    elif not info.accepts_batch(args.batch):
        raise UsageError(
            f"--batch {args.batch}: outside the engine's batch range {info.batch_range()} "
            f"(rebuild the engine with --batch MIN,OPT,MAX to change it)"
        )
    else:
        batch = args.batch
    return batch


def check_output(path: Path, flag: str, suffixes: tuple[str, ...]) -> None:
    if path.suffix not in suffixes:
        raise UsageError(f"{flag} {path}: unknown output type {path.suffix!r}; expected {' or '.join(suffixes)}")
    if path.suffix == ".png":
        try:
            import PIL.Image  # noqa: F401  (pillow is optional: checked before sampling starts)
        except ImportError:
            raise UsageError(
                f"{flag} {path}: writing a PNG grid needs pillow (pip install pillow); or write .npz"
            ) from None
    if not path.parent.is_dir():
        raise UsageError(f"{flag} {path}: directory {path.parent} does not exist")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    try:
        check_output(out, "--out", OUT_SUFFIXES)  # before minutes of sampling, not after
        if args.grid:
            check_output(Path(args.grid), "--grid", (".png",))
        denoiser = load_denoiser(args.model, provider=args.provider, threads=args.threads)
        batch = check_args(args, denoiser.info)
    except (UsageError, ModelError, SidecarError, BackendUnavailable) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1 if isinstance(e, BackendUnavailable) else 2
    info = denoiser.info
    steps = args.steps or default_steps(info.schedule(), args.sampler)
    print(
        f"{args.model}: {info.image_size}px {info.dtype}, batch {info.batch_range()}; running on {denoiser.name}",
        file=sys.stderr,
    )
    progress = Progress(math.ceil(args.num / batch) * steps, lambda p: f"  step {p.done}/{p.total} ({p.elapsed:.1f}s)")
    start = time.perf_counter()
    images = to_uint8(
        generate(
            denoiser,
            args.num,
            batch=batch,
            sampler=args.sampler,
            steps=steps,
            eta=args.eta,
            spacing=args.spacing,
            seed=args.seed,
            callback=lambda *_: progress(),
        )
    )
    seconds = time.perf_counter() - start
    progress.close()
    try:
        save_images(images, out)
        if args.grid:
            save_images(images[:GRID_IMAGES], Path(args.grid))
    except NoSpaceError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(
        f"wrote {out}: {args.num} images, {args.sampler} {steps} steps, batch {batch}, {seconds:.2f}s, "
        f"{args.num / seconds:.2f} images/s on {denoiser.name}" + (f"; grid {args.grid}" if args.grid else "")
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
