"""The one sampling core: DDPM, DDIM, DPM-Solver++(2M) and UniPC over any denoiser, in NumPy.

Part of the torch-free core (numpy only), so an ONNX Runtime or TensorRT engine plus numpy is a whole
sampler; the training previews, `export.sample`, the app and the benchmarks all run this loop. The
denoiser is `pipeline.core.denoiser.Denoiser`; `sample_loop` reads only `info.batch_min` / `batch_max`.

Every sampler is linear in what it has seen, so each step reduces to scalars computed once, in
float64, before the loop (a "plan"):
    x0_i   = clip(cx * x_i + co * model_output)                   the data prediction
    x_i    = qx * x_{i-1} + sum_k q0[k] * x0_{i-k}                UniPC's corrector (UniC) only
    x_i+1  = px * x_i + sum_k p0[k] * x0_{i-k} + sigma * noise    the step itself
so the loop is one network call and a few float32 array operations. The multistep solvers work
in half-log-SNR lambda = log(alpha / sigma), alpha = sqrt(abar), sigma = sqrt(1 - abar):
    DPM-Solver++(2M)  Lu et al. 2022, data prediction, midpoint form, first order at the ends.
    UniPC-bh2         Zhao et al. 2023, order 2, x0 prediction, UniC after every step but the last.
Both match diffusers' DPMSolverMultistepScheduler / UniPCMultistepScheduler with
final_sigmas_type="zero" (tests/test_sampling.py); DDPM and DDIM match its DDPM/DDIM schedulers.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from pipeline.core.config import DEFAULT_SAMPLER, Sampler, choices
from pipeline.core.denoiser import Denoiser
from pipeline.core.schedule import DiffusionSchedule, sampling_timesteps

SAMPLERS = choices(Sampler)
STOCHASTIC_SAMPLERS = ("ddpm", "ddim")  # step-by-step samplers: inpainting pastes between their steps
# Steps per sampler where none are asked for; DEFAULT_SAMPLER (pipeline.core.config) with its 10 steps is
# the best score per network call in `python -m benchmarks quality` (benchmarks/results/cpu/quality).
DEFAULT_STEPS = {"ddpm": None, "ddim": 50, "dpmpp_2m": 10, "unipc": 10}  # None: all T steps
# Trailing spacing starts every chain at t = T-1, where x_T ~ N(0, I) is what the model was
# trained on; leading spacing with few steps starts lower (t = 800 of 1000 at 5 steps) and the
# missing noise levels show as grey, washed-out images (Lin et al. 2023, table 2).
DEFAULT_SPACING = "trailing"


class SamplerError(ValueError):
    """A bad sampler setting; `name` is the setting ("sampler", "steps", "eta") for the caller's flag."""

    def __init__(self, name: str, message: str):
        super().__init__(message)
        self.name = name


def check_sampler(sampler: str, steps: int | None, eta: float, num_timesteps: int) -> None:
    """Refuse an unknown sampler, steps outside [1, T], or eta where the sampler has none.

    The message leaves out the value: callers say which flag or key held it.
    """
    if sampler not in SAMPLERS:
        raise SamplerError("sampler", f"unknown sampler; expected one of {', '.join(SAMPLERS)}")
    if steps is not None and not 1 <= steps <= num_timesteps:
        raise SamplerError("steps", f"must be in [1, {num_timesteps}] (the model's T)")
    if eta < 0:
        raise SamplerError("eta", "must be >= 0")
    if eta and sampler != "ddim":
        raise SamplerError("eta", f"only ddim takes eta ({sampler} has no noise setting)")


def default_steps(schedule: DiffusionSchedule, sampler: str) -> int:
    steps = DEFAULT_STEPS[sampler]
    return schedule.num_timesteps if steps is None else min(steps, schedule.num_timesteps)


def sampler_timesteps(
    schedule: DiffusionSchedule, sampler: str, steps: int | None = None, spacing: str = DEFAULT_SPACING
) -> np.ndarray:
    """Descending timesteps visited, one network call each (default: `DEFAULT_STEPS`)."""
    check_sampler(sampler, steps, 0.0, schedule.num_timesteps)
    return sampling_timesteps(schedule.num_timesteps, steps or default_steps(schedule, sampler), spacing)


# --- the plan: per-step scalars -------------------------------------------------------------


@dataclass(frozen=True)
class Step:
    """The scalars of one step t -> t_prev (t_prev = -1: the clean image); see the module docstring."""

    t: int
    t_prev: int
    cx: float
    co: float
    px: float
    p0: tuple[float, ...]
    sigma: float = 0.0
    qx: float | None = None  # None: no corrector before this step
    q0: tuple[float, ...] = ()


def _alpha_sigma_lambda(schedule: DiffusionSchedule, t: int) -> tuple[float, float, float]:
    """alpha_t, sigma_t and lambda_t; t = -1 is the clean image (alpha 1, sigma 0, lambda +inf)."""
    if t < 0:
        return 1.0, 0.0, np.inf
    abar = float(schedule.alphas_cumprod[t])
    alpha, sigma = np.sqrt(abar), np.sqrt(1.0 - abar)
    return alpha, sigma, float(np.log(alpha) - np.log(sigma))


def _x0_coefficients(schedule: DiffusionSchedule, t: int) -> tuple[float, float]:
    """(cx, co) with x0 = cx * x_t + co * model_output, for the schedule's prediction type."""
    alpha, sigma, _ = _alpha_sigma_lambda(schedule, t)
    if schedule.prediction_type == "epsilon":
        return 1.0 / alpha, -sigma / alpha
    if schedule.prediction_type == "v_prediction":
        return alpha, -sigma
    return 0.0, 1.0


def _ddim(schedule, t, t_prev, eta):
    """DDIM (Song et al. eq. 12) with eps re-derived from the clipped x0: (px, p0, sigma)."""
    a, s, _ = _alpha_sigma_lambda(schedule, t)
    a_prev, s_prev, _ = _alpha_sigma_lambda(schedule, t_prev)
    noise = eta * s_prev / s * np.sqrt(1.0 - (a / a_prev) ** 2)
    direction = np.sqrt(max(s_prev**2 - noise**2, 0.0))  # eps = (x - a x0) / s
    return direction / s, (a_prev - direction * a / s,), noise


def _ddpm(schedule, t, t_prev):
    """Ancestral step on the respaced chain (its own beta = 1 - abar_t / abar_prev): (px, p0, sigma)."""
    abar, abar_prev = schedule.alphas_cumprod[t], (schedule.alphas_cumprod[t_prev] if t_prev >= 0 else 1.0)
    beta = 1.0 - abar / abar_prev
    p0 = np.sqrt(abar_prev) * beta / (1 - abar)
    px = np.sqrt(1 - beta) * (1 - abar_prev) / (1 - abar)
    if t_prev < 0:
        sigma = 0.0
    elif schedule.variance_type == "fixed_small":
        sigma = np.sqrt(max((1 - abar_prev) / (1 - abar) * beta, 1e-20))
    else:
        sigma = np.sqrt(beta)
    return px, (p0,), sigma


def _dpmpp_2m(schedule, ts, i):
    """DPM-Solver++(2M) from ts[i] to ts[i+1]: first order at the first and the last step."""
    _, s_s0, l_s0 = _alpha_sigma_lambda(schedule, ts[i])
    a_t, s_t, l_t = _alpha_sigma_lambda(schedule, ts[i + 1])
    h = l_t - l_s0
    px, phi = s_t / s_s0, -a_t * np.expm1(-h)  # x = px x + phi * D
    if i == 0 or i == len(ts) - 2:
        return px, (phi,)
    l_s1 = _alpha_sigma_lambda(schedule, ts[i - 1])[2]
    r = (l_s0 - l_s1) / h  # D = x0_i + (x0_i - x0_{i-1}) / (2 r)
    return px, (phi * (1 + 0.5 / r), -phi * 0.5 / r)


def _unipc_b(hh: float, order: int) -> np.ndarray:
    """UniPC's right-hand side b_k = phi_{k+1}(hh) k! / B(h) with bh2's B(h) = e^hh - 1."""
    b_h, phi, factorial, b = np.expm1(hh), np.expm1(hh) / hh - 1, 1, []
    for k in range(1, order + 1):
        b.append(phi * factorial / b_h)
        factorial *= k + 1
        phi = phi / hh - 1 / factorial
    return np.array(b)


def _unipc_predictor(schedule, ts, i, order):
    """UniP-bh2 from ts[i] to ts[i+1] (x0 prediction): (px, p0) over (x0_i, x0_{i-1})."""
    _, s_s0, l_s0 = _alpha_sigma_lambda(schedule, ts[i])
    a_t, s_t, l_t = _alpha_sigma_lambda(schedule, ts[i + 1])
    h = l_t - l_s0
    b_h = np.expm1(-h)
    px, c0 = s_t / s_s0, -a_t * b_h  # x = px x - a_t (e^-h - 1) x0_i - ...
    if order == 1:
        return px, (c0,)
    rk = (_alpha_sigma_lambda(schedule, ts[i - 1])[2] - l_s0) / h
    d = -a_t * b_h * 0.5 / rk  # ... - a_t B(h) rho (x0_{i-1} - x0_i) / rk, rho = 1/2
    return px, (c0 - d, d)


def _unipc_corrector(schedule, ts, i, order):
    """UniC-bh2 at ts[i] from the sample at ts[i-1]: (qx, q0) over (x0_i, x0_{i-1}, x0_{i-2})."""
    _, s_s0, l_s0 = _alpha_sigma_lambda(schedule, ts[i - 1])
    a_t, s_t, l_t = _alpha_sigma_lambda(schedule, ts[i])
    h = l_t - l_s0
    b_h = np.expm1(-h)
    qx, w = s_t / s_s0, -a_t * b_h
    if order == 1:
        rho_t, rho_1, rk = 0.5, 0.0, 1.0
    else:
        rk = (_alpha_sigma_lambda(schedule, ts[i - 2])[2] - l_s0) / h
        rho_1, rho_t = np.linalg.solve(np.array([[1.0, 1.0], [rk, 1.0]]), _unipc_b(-h, 2))
    # x_i = qx x_{i-1} + w x0_{i-1} + w (rho_1 (x0_{i-2} - x0_{i-1}) / rk + rho_t (x0_i - x0_{i-1})), w = -a_t B(h)
    c_t, c_2 = w * rho_t, w * rho_1 / rk
    return qx, (c_t, w - c_t - c_2, c_2)


def _floats(values) -> tuple[float, ...]:
    return tuple(float(v) for v in values)


def plan_steps(
    schedule: DiffusionSchedule, timesteps: Sequence[int] | np.ndarray, sampler: str, eta: float = 0.0, t_end: int = -1
) -> list[Step]:
    """The per-step scalars for the chain timesteps[0] -> ... -> timesteps[-1] -> t_end."""
    check_sampler(sampler, None, eta, schedule.num_timesteps)
    ts = [int(t) for t in timesteps] + [int(t_end)]
    for t, t_prev in zip(ts, ts[1:]):
        if not (0 <= t < schedule.num_timesteps and -1 <= t_prev < t):
            raise ValueError(f"timesteps must descend within [0, {schedule.num_timesteps}); got {t} -> {t_prev}")
    plan, n = [], len(ts) - 1
    for i in range(n):
        t, t_prev = ts[i], ts[i + 1]
        qx, q0, sigma = None, (), 0.0
        if sampler == "ddim":
            px, p0, sigma = _ddim(schedule, t, t_prev, eta)
        elif sampler == "ddpm":
            px, p0, sigma = _ddpm(schedule, t, t_prev)
        elif sampler == "dpmpp_2m":
            px, p0 = _dpmpp_2m(schedule, ts, i)
        else:
            # Order 2 once a previous prediction exists, 1 on the last step (lower_order_final);
            # the corrector at step i has the order of the predictor that led to it.
            order = min(2, i + 1, n - i)
            px, p0 = _unipc_predictor(schedule, ts, i, order)
            if i > 0:
                qx, q0 = _unipc_corrector(schedule, ts, i, min(2, i, n - i + 1))
        cx, co = _x0_coefficients(schedule, t)
        qx = None if qx is None else float(qx)  # Python floats: numpy scalars would promote float32 x
        plan.append(Step(t, t_prev, float(cx), float(co), float(px), _floats(p0), float(sigma), qx, _floats(q0)))
    return plan


# --- the loop ------------------------------------------------------------------------------


def _network(denoiser, x: np.ndarray, t: np.ndarray) -> np.ndarray:
    """One denoiser call; a batch below the engine's minimum is padded and the padding dropped."""
    b, need = len(x), denoiser.info.batch_min
    if b >= need:
        return denoiser(x, t)
    pad = np.concatenate([x, np.zeros((need - b,) + x.shape[1:], x.dtype)])
    return denoiser(pad, np.resize(t, need))[:b]


def _combine(a: float, x: np.ndarray, coefficients: Sequence[float], history: Sequence[np.ndarray]) -> np.ndarray:
    """a * x + sum_k coefficients[k] * history[k] in x's dtype, in a new array."""
    scalar = x.dtype.type
    out = x * scalar(a)
    for c, x0 in zip(coefficients, history):
        out += scalar(c) * x0
    return out


class _StepNoise:
    """The step noise, drawn one step ahead on a worker thread.

    numpy's generators release the GIL while filling arrays, so the next step's draw overlaps
    the network call (an engine waiting on the GPU, or ORT's own threads) instead of adding to
    it. One worker draws image by image in step order, so the streams match a sequential draw,
    and exactly `count` draws are made (the rngs may be reused after the loop).
    """

    def __init__(self, rngs: Sequence[np.random.Generator], shape: tuple[int, ...], count: int, ahead: bool = True):
        self.rngs, self.remaining, self.turn = rngs, count, 0
        self.buffers = [np.empty(shape, np.float32) for _ in range(min(count, 2))]
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="step-noise") if ahead and count else None
        self.pending: Future[np.ndarray] | None = None
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
        noise = self.pending.result() if self.pending is not None else self._draw(self.buffers[self.turn])
        self.turn = (self.turn + 1) % len(self.buffers)
        self._prefetch()
        return noise

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)


def sample_loop(
    denoiser,
    schedule: DiffusionSchedule,
    x_t: np.ndarray,
    timesteps: Sequence[int] | np.ndarray,
    *,
    sampler: str,
    eta: float = 0.0,
    rngs: Sequence[np.random.Generator] = (),
    t_end: int = -1,
    callback: Callable | None = None,
    prefetch_noise: bool = True,
) -> np.ndarray:
    """Run the reverse chain from x_t (B,C,H,W) at timesteps[0] down to t_end; returns float32
    (float64 if x_t is: the tests use it where float32 itself is the error).

    rngs: one Generator per image, for the step noise (DDPM, DDIM with eta > 0); per-image
    streams make each image independent of how the run is split into batches.
    callback(i, step, x, x0), if given, is called after step i with the new x (modifiable in
    place, e.g. to paste in a known region) and that step's x0 prediction. It must not draw
    from `rngs` (a worker thread is drawing the next step's noise from them): give it its own,
    or pass prefetch_noise=False (same numbers, drawn on this thread when needed).
    """
    plan = plan_steps(schedule, timesteps, sampler, eta, t_end)
    x = np.array(x_t, dtype=np.float64 if np.asarray(x_t).dtype == np.float64 else np.float32, copy=True)
    noisy_steps = sum(s.sigma > 0 for s in plan)
    if noisy_steps and len(rngs) != len(x):
        raise ValueError(f"{sampler} with noise needs one rng per image: got {len(rngs)} for {len(x)}")
    if denoiser.info.batch_max is not None and len(x) > denoiser.info.batch_max:
        raise ValueError(f"batch {len(x)} exceeds the engine's maximum {denoiser.info.batch_max}")
    t_in = np.empty(len(x), np.float32)
    clip = schedule.clip_range if schedule.clip_sample else None
    history: list[np.ndarray] = []  # x0 predictions, newest first
    x_last = x  # the sample before the last step (UniPC's corrector restarts from it)
    noise = _StepNoise(rngs, x.shape, noisy_steps, ahead=prefetch_noise)
    try:
        for i, step in enumerate(plan):
            t_in.fill(step.t)
            x0 = _combine(step.co, _network(denoiser, x, t_in).astype(x.dtype, copy=False), (step.cx,), (x,))
            if clip is not None:
                np.clip(x0, -clip, clip, out=x0)
            history = [x0] + history[:2]
            if step.qx is not None:
                x = _combine(step.qx, x_last, step.q0, history)
            x_last = x
            x = _combine(step.px, x, step.p0, history)
            if step.sigma > 0:
                x += x.dtype.type(step.sigma) * noise.next()
            if callback is not None:
                callback(i, step, x, x0)
    finally:
        noise.close()
    return x


# --- whole runs ----------------------------------------------------------------------------


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


def generate(
    denoiser: Denoiser,
    num: int,
    *,
    batch: int,
    sampler: str = DEFAULT_SAMPLER,
    steps: int | None = None,
    eta: float = 0.0,
    spacing: str = DEFAULT_SPACING,
    seed: int = 0,
    callback: Callable | None = None,
) -> np.ndarray:
    """`num` images (num, C, H, W) float32 in chunks of at most `batch`; image i depends on (seed, i) only.

    The schedule and image shape are the model's (`denoiser.info`); callback is `sample_loop`'s,
    called for every chunk.
    """
    info = denoiser.info
    schedule, shape = info.schedule(), (info.channels, info.image_size, info.image_size)
    timesteps = sampler_timesteps(schedule, sampler, steps, spacing)
    out = np.empty((num,) + tuple(shape), np.float32)
    for first in range(0, num, batch):
        count = min(batch, num - first)
        rngs = image_rngs(seed, first, count)
        x_T = initial_noise(rngs, shape)
        out[first : first + count] = sample_loop(
            denoiser, schedule, x_T, timesteps, sampler=sampler, eta=eta, rngs=rngs, callback=callback
        )
    return out
