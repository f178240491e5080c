"""The lean reverse-process loop: DDPM (ancestral) and DDIM over any denoiser backend.

Imports numpy and `pipeline.schedule` only (no torch, no onnx), so a TensorRT or ONNX Runtime
engine plus numpy is a whole sampler. A denoiser is any callable
`denoiser(x (B,C,H,W) float32, t (B,) float32) -> model_output (B,C,H,W)` with an `info`
(`export.sidecar.Sidecar`) giving its image size, channels and batch range.

Both samplers reduce, per step, to five scalars computed once before the loop:
    x0     = clip(cx * x_t + co * model_output)
    x_prev = p0 * x0 + px * x_t + sigma * noise
so the loop itself is one network call and a handful of in-place float32 array operations.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from pipeline.schedule import DiffusionSchedule, sampling_timesteps

SAMPLERS = ("ddim", "ddpm")


@dataclass(frozen=True)
class StepCoefficients:
    """The scalars of one step t -> t_prev (t_prev = -1: the clean image)."""
    t: int
    t_prev: int
    cx: float
    co: float
    p0: float
    px: float
    sigma: float


def sampler_timesteps(schedule: DiffusionSchedule, sampler: str, steps: int | None = None,
                      spacing: str = "leading") -> np.ndarray:
    """Descending timesteps visited: DDPM defaults to all T steps, DDIM to 50."""
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; expected one of {SAMPLERS}")
    steps = steps or (schedule.num_timesteps if sampler == "ddpm" else min(50, schedule.num_timesteps))
    return sampling_timesteps(schedule.num_timesteps, steps, spacing)


def _x0_coefficients(schedule: DiffusionSchedule, abar: float) -> tuple[float, float]:
    """(cx, co) with x0 = cx * x_t + co * model_output, for the schedule's prediction type."""
    if schedule.prediction_type == "epsilon":
        return 1.0 / np.sqrt(abar), -np.sqrt(1.0 - abar) / np.sqrt(abar)
    if schedule.prediction_type == "v_prediction":
        return np.sqrt(abar), -np.sqrt(1.0 - abar)
    return 0.0, 1.0


def step_coefficients(schedule: DiffusionSchedule, timesteps: Sequence[int], sampler: str,
                      eta: float = 0.0, t_end: int = -1) -> list[StepCoefficients]:
    """Per-step scalars (float64 math) for the chain timesteps[0] -> ... -> timesteps[-1] -> t_end.

    Same arithmetic as `DiffusionSchedule.ddim_step` / `ddpm_step`, regrouped so that eps is
    eliminated: eps = (x_t - sqrt(abar_t) x0) / sqrt(1 - abar_t).
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; expected one of {SAMPLERS}")
    abar_of = np.append(schedule.alphas_cumprod, 1.0)  # index -1 -> abar = 1 (clean image)
    ts = [int(t) for t in timesteps]
    out = []
    for t, t_prev in zip(ts, ts[1:] + [int(t_end)]):
        if not (0 <= t < schedule.num_timesteps and -1 <= t_prev < t):
            raise ValueError(f"timesteps must descend within [0, {schedule.num_timesteps}); got {t} -> {t_prev}")
        abar, abar_prev = float(abar_of[t]), float(abar_of[t_prev])
        cx, co = _x0_coefficients(schedule, abar)
        ex, e0 = 1.0 / np.sqrt(1.0 - abar), -np.sqrt(abar) / np.sqrt(1.0 - abar)  # eps = ex x_t + e0 x0
        if sampler == "ddim":
            sigma = eta * np.sqrt((1 - abar_prev) / (1 - abar) * (1 - abar / abar_prev))
            direction = np.sqrt(max(1 - abar_prev - sigma ** 2, 0.0))
            p0, px = np.sqrt(abar_prev) + direction * e0, direction * ex
        else:
            beta = 1.0 - abar / abar_prev  # the respaced chain's own beta
            p0 = np.sqrt(abar_prev) * beta / (1 - abar)
            px = np.sqrt(1 - beta) * (1 - abar_prev) / (1 - abar)
            if t_prev < 0:
                sigma = 0.0
            elif schedule.variance_type == "fixed_small":
                sigma = np.sqrt(max((1 - abar_prev) / (1 - abar) * beta, 1e-20))
            else:
                sigma = np.sqrt(beta)
        out.append(StepCoefficients(t, t_prev, float(cx), float(co), float(p0), float(px), float(sigma)))
    return out


def _network(denoiser, x: np.ndarray, t: np.ndarray) -> np.ndarray:
    """One denoiser call; a batch below the engine's minimum is padded and the padding dropped."""
    b, need = len(x), denoiser.info.batch_min
    if b >= need:
        return denoiser(x, t)
    pad = np.concatenate([x, np.zeros((need - b,) + x.shape[1:], x.dtype)])
    return denoiser(pad, np.resize(t, need))[:b]


class _StepNoise:
    """The step noise, drawn one step ahead on a worker thread.

    numpy's generators release the GIL while filling arrays, so the next step's draw overlaps
    the network call (an engine waiting on the GPU, or ORT's own threads) instead of adding to
    it. One worker draws image by image in step order, so the streams match a sequential draw,
    and exactly `count` draws are made (the rngs may be reused after the loop).
    """

    def __init__(self, rngs: Sequence[np.random.Generator], shape: tuple[int, ...], count: int,
                 ahead: bool = True):
        self.rngs, self.remaining, self.turn = rngs, count, 0
        self.buffers = [np.empty(shape, np.float32) for _ in range(min(count, 2))]
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="step-noise") if ahead and count else None
        self.pending = None
        self._prefetch()

    def _draw(self, buffer: np.ndarray) -> np.ndarray:
        for j, rng in enumerate(self.rngs):
            rng.standard_normal(out=buffer[j], dtype=np.float32)
        return buffer

    def _prefetch(self) -> None:
        if self.pool is not None and self.remaining > 0:
            self.pending = self.pool.submit(self._draw, self.buffers[self.turn])

    def next(self) -> np.ndarray:
        """This step's noise (B, C, H, W); its buffer is refilled two steps later."""
        self.remaining -= 1
        noise = self.pending.result() if self.pool is not None else self._draw(self.buffers[self.turn])
        self.turn = (self.turn + 1) % len(self.buffers)
        self._prefetch()
        return noise

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)


def sample_loop(denoiser, schedule: DiffusionSchedule, x_t: np.ndarray, timesteps: Sequence[int], *,
                sampler: str = "ddim", eta: float = 0.0, rngs: Sequence[np.random.Generator] = (),
                t_end: int = -1, callback: Callable | None = None, prefetch_noise: bool = True) -> np.ndarray:
    """Run the reverse chain from x_t (B,C,H,W) at timesteps[0] down to t_end; returns float32.

    rngs: one Generator per image, for the step noise (DDPM, DDIM with eta > 0); per-image
    streams make each image independent of how the run is split into batches.
    callback(i, coef, x, x0), if given, is called after step i with the new x (modifiable in
    place, e.g. to paste in a known region) and that step's x0 prediction. It must not draw
    from `rngs` (a worker thread is drawing the next step's noise from them): give it its own,
    or pass prefetch_noise=False (same numbers, drawn on this thread when needed).
    """
    plan = step_coefficients(schedule, timesteps, sampler, eta, t_end)
    x = np.array(x_t, dtype=np.float32, copy=True)
    noisy_steps = sum(c.sigma > 0 for c in plan)
    if noisy_steps and len(rngs) != len(x):
        raise ValueError(f"{sampler} with noise needs one rng per image: got {len(rngs)} for {len(x)}")
    if denoiser.info.batch_max is not None and len(x) > denoiser.info.batch_max:
        raise ValueError(f"batch {len(x)} exceeds the engine's maximum {denoiser.info.batch_max}")
    t_in = np.empty(len(x), np.float32)
    x0, tmp = np.empty_like(x), np.empty_like(x)
    clip = schedule.clip_range if schedule.clip_sample else None
    f32 = np.float32
    noise = _StepNoise(rngs, x.shape, noisy_steps, ahead=prefetch_noise)
    try:
        for i, c in enumerate(plan):
            t_in.fill(c.t)
            out = _network(denoiser, x, t_in)
            np.multiply(out, f32(c.co), out=x0)             # x0 = cx x + co out
            np.multiply(x, f32(c.cx), out=tmp)
            x0 += tmp
            if clip is not None:
                np.clip(x0, -clip, clip, out=x0)
            x *= f32(c.px)                                  # x = px x + p0 x0 (+ sigma noise)
            np.multiply(x0, f32(c.p0), out=tmp)
            x += tmp
            if c.sigma > 0:
                np.multiply(noise.next(), f32(c.sigma), out=tmp)
                x += tmp
            if callback is not None:
                callback(i, c, x, x0)
    finally:
        noise.close()
    return x


def image_rngs(seed: int, first: int, count: int) -> list[np.random.Generator]:
    """Generators for images first..first+count-1 of a run: image i's stream depends on (seed, i) only."""
    return [np.random.default_rng([seed, i]) for i in range(first, first + count)]


def initial_noise(rngs: Sequence[np.random.Generator], shape: tuple[int, ...]) -> np.ndarray:
    """x_T ~ N(0, I), one draw per image from its own stream: (len(rngs), *shape) float32."""
    x = np.empty((len(rngs),) + tuple(shape), np.float32)
    for j, rng in enumerate(rngs):
        rng.standard_normal(out=x[j], dtype=np.float32)
    return x


def to_uint8(x: np.ndarray) -> np.ndarray:
    """(B,C,H,W) in [-1, 1] -> (B,H,W,C) uint8."""
    return np.clip(np.rint((x + 1.0) * 127.5), 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)


def generate(denoiser, num: int, *, batch: int, sampler: str = "ddim", steps: int | None = None,
             eta: float = 0.0, spacing: str = "leading", seed: int = 0,
             on_step: Callable[[], None] | None = None) -> np.ndarray:
    """`num` images as uint8 (num, H, W, C), sampled in chunks of at most `batch`."""
    info = denoiser.info
    schedule = info.schedule()
    timesteps = sampler_timesteps(schedule, sampler, steps, spacing)
    shape = (info.channels, info.image_size, info.image_size)
    callback = (lambda *_: on_step()) if on_step else None
    images = np.empty((num, info.image_size, info.image_size, info.channels), np.uint8)
    for first in range(0, num, batch):
        count = min(batch, num - first)
        rngs = image_rngs(seed, first, count)
        x = sample_loop(denoiser, schedule, initial_noise(rngs, shape), timesteps,
                        sampler=sampler, eta=eta, rngs=rngs, callback=callback)
        images[first:first + count] = to_uint8(x)
    return images
