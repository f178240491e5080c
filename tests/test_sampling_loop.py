"""The NumPy sampling loop: against straightforward float64 DDPM/DDIM formulas, and a known answer.

The denoiser here is the exact posterior-mean predictor for Gaussian data x0 ~ N(mu, s^2 I),
a real network-free denoiser whose samples must follow N(mu, s^2): a check of the whole chain
that does not depend on any trained model.
"""

from pathlib import Path

import numpy as np
import pytest

from pipeline.core.config import DiffusionConfig, ModelConfig
from pipeline.core.sampling import (
    generate,
    image_rngs,
    initial_noise,
    plan_steps,
    sample_loop,
    sampler_timesteps,
    to_uint8,
)
from pipeline.core.schedule import DiffusionSchedule
from pipeline.core.sidecar import Sidecar

ROOT = Path(__file__).resolve().parents[1]
SHAPE = (3, 8, 8)


def make_info(prediction_type="epsilon", clip_sample=False, num_timesteps=1000, batch=(1, 1, None)):
    return Sidecar(
        format="onnx",
        dtype="float32",
        model=ModelConfig(image_size=SHAPE[1], in_channels=SHAPE[0], ch_mult=(1,), attn_resolutions=()),
        diffusion=DiffusionConfig(
            num_timesteps=num_timesteps, prediction_type=prediction_type, clip_sample=clip_sample
        ),
        batch_min=batch[0],
        batch_opt=batch[1],
        batch_max=batch[2],
    )


class GaussianDenoiser:
    """Exact E[eps | x_t] (or v, or x0) for x0 ~ N(mu, s^2 I); records the batch sizes it saw."""

    def __init__(self, info: Sidecar, mu: np.ndarray, s: float):
        self.info, self.mu, self.s = info, mu, s
        self.abar = info.schedule().alphas_cumprod
        self.batches = []

    def __call__(self, x, t):
        assert x.dtype == np.float32 and t.dtype == np.float32 and len(t) == len(x)
        self.batches.append(len(x))
        abar = self.abar[np.rint(t).astype(int)][:, None, None, None]
        eps = np.sqrt(1 - abar) * (x - np.sqrt(abar) * self.mu) / (abar * self.s**2 + 1 - abar)
        x0 = (x - np.sqrt(1 - abar) * eps) / np.sqrt(abar)
        out = {"epsilon": eps, "v_prediction": np.sqrt(abar) * eps - np.sqrt(1 - abar) * x0, "sample": x0}
        return out[self.info.diffusion.prediction_type].astype(np.float32)


def pattern():
    """A smooth 'image' mean in [-0.5, 0.5]."""
    c, h, w = SHAPE
    yy, xx = np.meshgrid(np.linspace(-1, 1, h), np.linspace(-1, 1, w), indexing="ij")
    return (0.5 * np.stack([xx, yy, xx * yy])[:c]).astype(np.float64)


def ddim_step(schedule, out, t, t_prev, x, eta, noise):
    """DDIM, Song et al. eq. 12 written out, eps re-derived from the clipped x0 (float64)."""
    abar, abar_prev = schedule.alphas_cumprod[t], (schedule.alphas_cumprod[t_prev] if t_prev >= 0 else 1.0)
    x0 = schedule.predict_x0(out, t, x)
    eps = (x - np.sqrt(abar) * x0) / np.sqrt(1 - abar)
    sigma = eta * np.sqrt((1 - abar_prev) / (1 - abar) * (1 - abar / abar_prev))
    x_prev = np.sqrt(abar_prev) * x0 + np.sqrt(max(1 - abar_prev - sigma**2, 0.0)) * eps
    return x_prev + sigma * noise if eta > 0 else x_prev


def ddpm_step(schedule, out, t, t_prev, x, noise):
    """The posterior q(x_t_prev | x_t, x0) of the respaced chain, sampled (float64)."""
    abar, abar_prev = schedule.alphas_cumprod[t], (schedule.alphas_cumprod[t_prev] if t_prev >= 0 else 1.0)
    beta = 1 - abar / abar_prev
    x0 = schedule.predict_x0(out, t, x)
    mean = np.sqrt(abar_prev) * beta / (1 - abar) * x0 + np.sqrt(1 - beta) * (1 - abar_prev) / (1 - abar) * x
    if t_prev < 0:
        return mean
    variance = (1 - abar_prev) / (1 - abar) * beta if schedule.variance_type == "fixed_small" else beta
    return mean + np.sqrt(variance) * noise


def reference_chain(schedule: DiffusionSchedule, denoiser, x_t, timesteps, sampler, eta, rngs):
    """The straightforward loop in float64, same noise draws."""
    x = x_t.astype(np.float64)
    ts = list(timesteps) + [-1]
    for t, t_prev in zip(ts[:-1], ts[1:]):
        out = denoiser(x.astype(np.float32), np.full(len(x), t, np.float32)).astype(np.float64)
        needs_noise = (sampler == "ddpm" and t_prev >= 0) or (sampler == "ddim" and eta > 0)
        noise = np.stack([r.standard_normal(x.shape[1:], dtype=np.float32) for r in rngs]) if needs_noise else None
        if sampler == "ddim":
            x = ddim_step(schedule, out, t, t_prev, x, eta, noise)
        else:
            x = ddpm_step(schedule, out, t, t_prev, x, noise)
    return x


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize(
    "sampler,steps,eta", [("ddim", 20, 0.0), ("ddim", 20, 0.7), ("ddpm", 25, 0.0), ("ddpm", None, 0.0)]
)
def test_loop_matches_schedule_step_functions(prediction_type, sampler, steps, eta):
    info = make_info(prediction_type, clip_sample=True)
    schedule = info.schedule()
    denoiser = GaussianDenoiser(info, pattern(), 0.3)
    timesteps = sampler_timesteps(schedule, sampler, steps)
    assert len(timesteps) == (steps or 1000)
    rngs = image_rngs(7, 0, 4)
    x_t = initial_noise(rngs, SHAPE)
    got = sample_loop(denoiser, schedule, x_t, timesteps, sampler=sampler, eta=eta, rngs=rngs)
    ref_rngs = image_rngs(7, 0, 4)
    initial_noise(ref_rngs, SHAPE)  # the same streams, past the x_T draw
    want = reference_chain(schedule, denoiser, x_t, timesteps, sampler, eta, ref_rngs)
    assert got.dtype == np.float32
    assert np.abs(got - want).max() < 1e-4


@pytest.mark.parametrize("sampler,steps", [("ddim", 1000), ("ddpm", None)])
def test_samples_follow_the_data_distribution(sampler, steps):
    """With the exact denoiser, samples of N(mu, s^2) data have that mean and spread.

    All 1000 steps: with fewer, DDIM's discretization shrinks the spread (std 0.92 at 50 steps).
    """
    info = make_info("epsilon")
    mu, s = pattern(), 0.3
    denoiser = GaussianDenoiser(info, mu, s)
    schedule = info.schedule()
    rngs = image_rngs(0, 0, 48)
    x = sample_loop(
        denoiser,
        schedule,
        initial_noise(rngs, SHAPE),
        sampler_timesteps(schedule, sampler, steps),
        sampler=sampler,
        rngs=rngs,
    )
    z = (x - mu) / s  # standardized: should be N(0, 1) per pixel
    assert abs(z.mean()) < 0.05
    assert abs(z.std() - 1) < 0.05
    # The per-pixel mean follows the pattern (the denoiser is really used, not just the noise).
    assert np.corrcoef(x.mean(0).ravel(), mu.ravel())[0, 1] > 0.95


def test_ddim_eta0_is_deterministic_and_the_seed_matters():
    info = make_info(clip_sample=True)
    denoiser = GaussianDenoiser(info, pattern(), 0.3)
    a, b, c = (to_uint8(generate(denoiser, 3, batch=3, sampler="ddim", steps=10, seed=seed)) for seed in (1, 1, 2))
    assert a.dtype == np.uint8 and a.shape == (3, SHAPE[1], SHAPE[2], SHAPE[0])
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_images_do_not_depend_on_the_batch_split():
    info = make_info(clip_sample=True)
    denoiser = GaussianDenoiser(info, pattern(), 0.3)
    whole = generate(denoiser, 5, batch=5, sampler="ddpm", steps=20, seed=3)
    split = generate(denoiser, 5, batch=2, sampler="ddpm", steps=20, seed=3)
    assert denoiser.batches[-1] == 1
    assert np.array_equal(whole, split)


def test_short_batches_are_padded_to_the_engine_minimum():
    info = make_info(clip_sample=True, batch=(4, 4, 4))
    denoiser = GaussianDenoiser(info, pattern(), 0.3)
    padded = generate(denoiser, 5, batch=4, sampler="ddim", steps=5, eta=1.0, seed=0)
    assert set(denoiser.batches) == {4}
    free = generate(
        GaussianDenoiser(make_info(clip_sample=True), pattern(), 0.3),
        5,
        batch=5,
        sampler="ddim",
        steps=5,
        eta=1.0,
        seed=0,
    )
    assert np.array_equal(padded, free)
    with pytest.raises(ValueError, match="exceeds the engine's maximum 4"):
        sample_loop(denoiser, info.schedule(), np.zeros((5,) + SHAPE, np.float32), [10, 0], sampler="ddim")


@pytest.mark.parametrize("sampler,eta", [("ddpm", 0.0), ("ddim", 0.3)])
def test_noise_drawn_ahead_equals_noise_drawn_in_line(sampler, eta):
    """The prefetching worker draws the same numbers, and exactly as many, as a sequential loop."""
    info = make_info(clip_sample=True)
    results, states = [], []
    for prefetch in (True, False):
        rngs = image_rngs(4, 0, 3)
        results.append(
            sample_loop(
                GaussianDenoiser(info, pattern(), 0.3),
                info.schedule(),
                initial_noise(rngs, SHAPE),
                [900, 600, 300, 100],
                sampler=sampler,
                eta=eta,
                rngs=rngs,
                prefetch_noise=prefetch,
            )
        )
        states.append([r.standard_normal() for r in rngs])  # streams left in the same place
    assert np.array_equal(results[0], results[1])
    assert states[0] == states[1]


def test_plans_end_clean_and_only_noise_where_asked():
    schedule = make_info().schedule()
    ddim = plan_steps(schedule, sampler_timesteps(schedule, "ddim", 10, "leading"), "ddim", eta=0.0)
    assert [c.t for c in ddim] == list(range(900, -1, -100)) and ddim[-1].t_prev == -1
    assert all(c.sigma == 0 for c in ddim)
    ddpm = plan_steps(schedule, sampler_timesteps(schedule, "ddpm", 10), "ddpm")
    assert all(c.sigma > 0 for c in ddpm[:-1]) and ddpm[-1].sigma == 0
    # The last step predicts the clean image itself: x_prev = x0.
    assert ddim[-1].p0 == pytest.approx((1.0,)) and ddim[-1].px == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="descend"):
        plan_steps(schedule, [10, 20], "ddim")


def test_callback_sees_every_step_and_may_edit_x():
    """The hook sdedit / inpainting build on: called after each step, x editable in place."""
    info = make_info(clip_sample=True)
    schedule = info.schedule()
    seen = []

    def paste_zero_corner(i, coef, x, x0):
        seen.append((i, coef.t, coef.t_prev))
        x[:, :, 0, 0] = 0.0

    rngs = image_rngs(0, 0, 2)
    x = sample_loop(
        GaussianDenoiser(info, pattern(), 0.3),
        schedule,
        initial_noise(rngs, SHAPE),
        [500, 300, 100],
        sampler="ddpm",
        rngs=rngs,
        callback=paste_zero_corner,
        t_end=50,
    )
    assert seen == [(0, 500, 300), (1, 300, 100), (2, 100, 50)]
    assert np.all(x[:, :, 0, 0] == 0.0)


def test_to_uint8_maps_the_range_and_layout():
    x = np.array([-1.0, 0.0, 1.0, 2.0], np.float32).reshape(1, 1, 2, 2)
    assert to_uint8(x).shape == (1, 2, 2, 1)
    assert to_uint8(x).ravel().tolist() == [0, 128, 255, 255]
