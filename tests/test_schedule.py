"""pipeline.core.schedule against a straightforward float64 reference and against diffusers."""

import numpy as np
import pytest
from diffusers import DDIMScheduler, DDPMScheduler

from pipeline.core.schedule import DiffusionSchedule, beta_schedule, sampling_timesteps

PREDICTIONS = ("epsilon", "v_prediction", "sample")
DIFFUSERS_KIND = {"linear": "linear", "cosine": "squaredcos_cap_v2"}


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_betas_and_alphas_cumprod_match_diffusers(kind):
    ours = DiffusionSchedule(beta_schedule(kind, 1000))
    theirs = DDPMScheduler(num_train_timesteps=1000, beta_schedule=DIFFUSERS_KIND[kind])
    np.testing.assert_allclose(ours.betas, theirs.betas.double().numpy(), rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(ours.alphas_cumprod, theirs.alphas_cumprod.double().numpy(), rtol=1e-5, atol=1e-9)


def test_cosine_betas_follow_the_alpha_bar_definition():
    T = 1000

    def f(t):
        return np.cos((t / T + 0.008) / 1.008 * np.pi / 2) ** 2

    abar = np.array([f(t + 1) / f(0) for t in range(T)])
    betas = beta_schedule("cosine", T)
    # Below the clip the product of (1 - beta) reproduces alpha_bar(t) / alpha_bar(0).
    unclipped = betas < 0.999
    np.testing.assert_allclose(np.cumprod(1 - betas)[unclipped][:900], abar[unclipped][:900], rtol=1e-9)
    assert betas.max() == pytest.approx(0.999)


def test_posterior_matches_reference_loop():
    s = DiffusionSchedule(beta_schedule("linear", 50, 1e-3, 0.2))
    abar = 1.0
    for t, beta in enumerate(s.betas):
        abar_prev, abar = abar, abar * (1 - beta)
        assert s.alphas_cumprod[t] == pytest.approx(abar, rel=1e-12)
        assert s.posterior_variance[t] == pytest.approx(beta * (1 - abar_prev) / (1 - abar), rel=1e-12)
        assert s.posterior_mean_coef1[t] == pytest.approx(beta * np.sqrt(abar_prev) / (1 - abar), rel=1e-12)
        assert s.posterior_mean_coef2[t] == pytest.approx((1 - abar_prev) * np.sqrt(1 - beta) / (1 - abar), rel=1e-12)


def test_q_sample_and_predict_x0_invert_each_other():
    rng = np.random.default_rng(0)
    x0, noise = rng.uniform(-1, 1, (4, 3, 8, 8)), rng.standard_normal((4, 3, 8, 8))
    t = np.array([0, 10, 500, 999])
    for prediction in PREDICTIONS:
        s = DiffusionSchedule(beta_schedule("linear", 1000), prediction_type=prediction, clip_sample=False)
        x_t = s.q_sample(x0, t, noise)
        a = s.alphas_cumprod[t][:, None, None, None]
        np.testing.assert_allclose(x_t, np.sqrt(a) * x0 + np.sqrt(1 - a) * noise, rtol=1e-12)
        target = s.training_target(x0, t, noise)
        np.testing.assert_allclose(s.predict_x0(target, t, x_t), x0, atol=1e-8)


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("steps,offset", [(50, 0), (10, 1), (1000, 0), (7, 0)])
def test_sampling_timesteps_match_diffusers(spacing, steps, offset):
    theirs = DDIMScheduler(num_train_timesteps=1000, timestep_spacing=spacing, steps_offset=offset)
    theirs.set_timesteps(steps)
    ours = sampling_timesteps(1000, steps, spacing, steps_offset=offset if spacing == "leading" else 0)
    np.testing.assert_array_equal(ours, theirs.timesteps.numpy())
    assert np.all(np.diff(ours) < 0)


def test_sampling_timesteps_rejects_more_steps_than_T():
    with pytest.raises(ValueError, match="num_steps=1001"):
        sampling_timesteps(1000, 1001)


def test_bad_schedule_arguments_are_named():
    with pytest.raises(ValueError, match="prediction_type"):
        DiffusionSchedule(beta_schedule("linear", 10), prediction_type="x")
    with pytest.raises(ValueError, match="cosinus"):
        beta_schedule("cosinus", 10)
