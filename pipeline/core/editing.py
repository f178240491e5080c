"""Image editing on the NumPy sampler: SDEdit, RePaint-style inpainting, and the x0 trajectory.

Built on `pipeline.core.sampling.sample_loop` (its per-image rngs and its step callback), so like the
sampler it imports numpy and `pipeline`'s torch-free core only: no torch, no onnx. Images are float32
(B, C, H, W) in [-1, 1]; masks are (B, 1, H, W) or (B, H, W) with 1 = keep, 0 = regenerate.

    SDEdit   (Meng et al. 2022): noise the image to t0 ~ strength * T with q_sample, then denoise
             with any sampler from t0 (the multistep solvers start their history there).
    RePaint  (Lugmayr et al. 2022): after every step paste the known region, forward-noised to
             the new noise level; optionally re-noise one step back and redo it (`resample`).
             Step-by-step samplers only (DDPM, DDIM): the paste changes x between steps, which
             a multistep solver's history of earlier predictions would not know about.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from pipeline.core.sampling import (
    DEFAULT_SAMPLER,
    DEFAULT_SPACING,
    STOCHASTIC_SAMPLERS,
    Step,
    image_rngs,
    initial_noise,
    sample_loop,
    sampler_timesteps,
)

# callback(i, step, x, x0) after step i, as in `sample_loop`; x0 is that step's prediction.
Callback = Callable[[int, Step, np.ndarray, np.ndarray], None]


def _check_images(images: np.ndarray, info) -> np.ndarray:
    want = (info.channels, info.image_size, info.image_size)
    images = np.asarray(images, dtype=np.float32)
    if images.ndim != 4 or images.shape[1:] != want:
        raise ValueError(f"images have shape {images.shape}; the model takes (B, {', '.join(map(str, want))})")
    return images


def sdedit(
    denoiser,
    images: np.ndarray,
    strength: float,
    *,
    sampler: str = DEFAULT_SAMPLER,
    steps: int | None = None,
    eta: float = 0.0,
    spacing: str = DEFAULT_SPACING,
    seed: int = 0,
    first: int = 0,
    callback: Callback | None = None,
) -> np.ndarray:
    """Re-imagine images (B,C,H,W) in [-1,1]; strength in [0,1] is the fraction of the chain re-run.

    strength 0 returns the input; strength 1 is plain generation from the same seed (the image
    is drowned completely, so the chain starts from the very noise `generate` would draw).
    """
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength={strength} must be in [0, 1]")
    images = _check_images(images, denoiser.info)
    schedule = denoiser.info.schedule()
    timesteps = sampler_timesteps(schedule, sampler, steps, spacing)
    n_run = int(round(strength * len(timesteps)))
    if n_run == 0:
        return images.copy()
    rngs = image_rngs(seed, first, len(images))
    noise = initial_noise(rngs, images.shape[1:])  # the first draw of each stream, as in `generate`
    ts = timesteps[len(timesteps) - n_run :]
    x_t = noise if n_run == len(timesteps) else schedule.q_sample(images, int(ts[0]), noise).astype(np.float32)
    return sample_loop(denoiser, schedule, x_t, ts, sampler=sampler, eta=eta, rngs=rngs, callback=callback)


def _keep_mask(mask: np.ndarray, images: np.ndarray) -> np.ndarray:
    """Boolean (B,1,H,W) keep-mask that broadcasts against images."""
    mask = np.asarray(mask)
    if mask.ndim == 3:
        mask = mask[:, None]
    if (
        mask.ndim != 4
        or mask.shape[0] != images.shape[0]
        or mask.shape[1] not in (1, images.shape[1])
        or mask.shape[2:] != images.shape[2:]
    ):
        raise ValueError(f"mask has shape {mask.shape}; expected (B, 1, H, W) matching images {images.shape}")
    return mask > 0.5


def inpaint(
    denoiser,
    images: np.ndarray,
    mask: np.ndarray,
    *,
    sampler: str = "ddpm",
    steps: int | None = None,
    eta: float = 0.0,
    spacing: str = DEFAULT_SPACING,
    seed: int = 0,
    first: int = 0,
    resample: int = 1,
    callback: Callback | None = None,
) -> np.ndarray:
    """Regenerate where mask == 0 and keep the rest: (B,C,H,W) float32, kept pixels equal to `images`.

    sampler: ddpm or ddim (see the module docstring). resample: how often each step is done
    (RePaint's jumps of length 1); 1 = plain paste-in.
    """
    if sampler not in STOCHASTIC_SAMPLERS:
        raise ValueError(
            f"inpainting pastes the known region between steps: use {' or '.join(STOCHASTIC_SAMPLERS)}, not {sampler!r}"
        )
    if resample < 1:
        raise ValueError(f"resample={resample} must be >= 1")
    images = _check_images(images, denoiser.info)
    keep = _keep_mask(mask, images)
    schedule = denoiser.info.schedule()
    timesteps = [int(t) for t in sampler_timesteps(schedule, sampler, steps, spacing)]
    rngs = image_rngs(seed, first, len(images))
    x = initial_noise(rngs, images.shape[1:])
    noise = np.empty_like(x)

    def draw_noise() -> np.ndarray:
        for j, rng in enumerate(rngs):  # per-image streams: independent of the batch split
            rng.standard_normal(out=noise[j], dtype=np.float32)
        return noise

    last = {}

    def keep_x0(_, c, x_new, x0):  # sample_loop allocates x0 afresh per call: no copy needed
        last["c"], last["x0"] = c, x0

    for i, (t, t_prev) in enumerate(zip(timesteps, timesteps[1:] + [-1])):
        for r in range(resample):
            x = sample_loop(
                denoiser,
                schedule,
                x,
                [t],
                sampler=sampler,
                eta=eta,
                rngs=rngs,
                t_end=t_prev,
                callback=keep_x0 if callback is not None else None,
            )
            known = images if t_prev < 0 else schedule.q_sample(images, t_prev, draw_noise())
            np.copyto(x, known.astype(np.float32), where=keep)
            if r < resample - 1:  # RePaint: diffuse back to t and redo the step, to harmonise the seam
                a = schedule.alphas_cumprod[t] / (schedule.alphas_cumprod[t_prev] if t_prev >= 0 else 1.0)
                x = (np.sqrt(a) * x + np.sqrt(1.0 - a) * draw_noise()).astype(np.float32)
        if callback is not None:  # x0 shown with the known region in place: what the user will get
            callback(i, last["c"], x, np.where(keep, images, last["x0"]))
    np.copyto(x, images, where=keep)
    return x


class X0Trajectory:
    """A step callback keeping the x0 prediction every `every` steps and at the last one.

    Records the first batch it sees only (the first chunk of a `generate`): `frames` is
    [(t, x0 (B,C,H,W)), ...]. `on_step()`, if given, runs after every step (a progress bar).
    """

    def __init__(self, num_steps: int, every: int, on_step: Callable[[], None] | None = None):
        self.num_steps, self.every, self.on_step = num_steps, max(1, every), on_step
        self.frames: list[tuple[int, np.ndarray]] = []
        self._done = False

    def __call__(self, i, c, x, x0) -> None:
        if not self._done and (i % self.every == 0 or i == self.num_steps - 1):
            self.frames.append((c.t, x0.copy()))
            self._done = i == self.num_steps - 1
        if self.on_step is not None:
            self.on_step()
