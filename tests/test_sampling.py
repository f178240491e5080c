"""pipeline.core.sampling against diffusers' schedulers: the same timesteps and the same stand-in network.

Whole chains for the multistep solvers (DPM-Solver++(2M), UniPC) and DDIM: the final images
agree to float32 rounding. Single DDPM/DDIM steps: the plan's scalars reproduce diffusers'
update in float64 to 1e-9. diffusers is a test-only dependency.
"""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, UniPCMultistepScheduler

from pipeline.core.sampling import (
    SamplerError,
    check_sampler,
    image_rngs,
    initial_noise,
    plan_steps,
    sample_loop,
    sampler_timesteps,
)
from pipeline.core.schedule import DiffusionSchedule, beta_schedule, sampling_timesteps

PREDICTIONS = ("epsilon", "v_prediction", "sample")
DIFFUSERS_KIND = {"linear": "linear", "cosine": "squaredcos_cap_v2"}
SHAPE = (3, 8, 8)


class StandInNetwork:
    """A deterministic, smooth, nonlinear (x, t) -> output in the schedule's prediction type.

    The exact denoiser of Gaussian data x0 ~ N(mu, 0.5^2) plus a nonlinear error, so the chain
    stays in the range of images (an arbitrary function would drive unclipped samples to
    +-100, where float32 rounding alone exceeds the tolerance).
    """

    info = SimpleNamespace(batch_min=1, batch_max=None)

    def __init__(self, schedule: DiffusionSchedule):
        self.schedule = schedule
        c, h, w = SHAPE
        self.mu = 0.6 * np.sin(np.linspace(0, 6, c * h * w)).reshape(1, c, h, w)

    def __call__(self, x: np.ndarray, t: np.ndarray) -> np.ndarray:
        abar = self.schedule.alphas_cumprod[np.rint(t).astype(int)][:, None, None, None]
        a, s = np.sqrt(abar), np.sqrt(1 - abar)
        dtype, x = x.dtype, x.astype(np.float64)
        eps = s * (x - a * self.mu) / (abar * 0.25 + 1 - abar) + 0.1 * np.tanh(x) * (1 - abar)
        x0 = (x - s * eps) / a
        out = {"epsilon": eps, "v_prediction": a * eps - s * x0, "sample": x0}[self.schedule.prediction_type]
        return out.astype(dtype)


def float64_tables(scheduler, schedule: DiffusionSchedule):
    """diffusers' tables (float32) rebuilt in float64 from our (tested equal) alphas_cumprod."""
    abar = torch.from_numpy(schedule.alphas_cumprod)
    scheduler.alphas_cumprod = abar
    if isinstance(scheduler, DDIMScheduler):
        scheduler.final_alpha_cumprod = torch.tensor(1.0, dtype=torch.float64)
    else:
        sigmas = ((1 - abar) / abar).sqrt()[scheduler.timesteps]
        scheduler.sigmas = torch.cat([sigmas, torch.zeros(1, dtype=torch.float64)])


def diffusers_chain(scheduler, network, x_T: np.ndarray) -> np.ndarray:
    # Our DDIM re-derives eps from the clipped x0 (improved-diffusion), as diffusers' option does.
    options = {"use_clipped_model_output": True} if isinstance(scheduler, DDIMScheduler) else {}
    x = torch.from_numpy(x_T)
    for t in scheduler.timesteps:
        out = network(x.numpy(), np.full(len(x), int(t)))
        x = scheduler.step(torch.from_numpy(out), t, x, **options).prev_sample
    return x.numpy()


def make_scheduler(sampler, kind, prediction, clip, steps, spacing):
    common = dict(
        num_train_timesteps=1000,
        beta_schedule=DIFFUSERS_KIND[kind],
        prediction_type=prediction,
        timestep_spacing=spacing,
    )
    # diffusers' thresholding with sample_max_value=1 is a clip to [-1, 1] (its quantile is floored at 1).
    threshold = dict(thresholding=clip, sample_max_value=1.0)
    if sampler == "dpmpp_2m":
        scheduler = DPMSolverMultistepScheduler(
            **common,
            **threshold,
            algorithm_type="dpmsolver++",
            solver_order=2,
            solver_type="midpoint",
            lower_order_final=True,
            final_sigmas_type="zero",
        )
    elif sampler == "unipc":
        scheduler = UniPCMultistepScheduler(
            **common,
            **threshold,
            solver_order=2,
            solver_type="bh2",
            predict_x0=True,
            lower_order_final=True,
            final_sigmas_type="zero",
        )
    else:
        scheduler = DDIMScheduler(**common, clip_sample=clip, set_alpha_to_one=True)
    scheduler.set_timesteps(steps)
    return scheduler


@pytest.mark.parametrize("steps", [5, 10, 25])
@pytest.mark.parametrize("clip", [True, False])
@pytest.mark.parametrize("kind", ["linear", "cosine"])
@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("sampler", ["dpmpp_2m", "unipc", "ddim"])
def test_whole_chain_matches_diffusers(sampler, prediction, kind, clip, steps):
    scheduler = make_scheduler(sampler, kind, prediction, clip, steps, "trailing")
    schedule = DiffusionSchedule(beta_schedule(kind, 1000), prediction_type=prediction, clip_sample=clip)
    timesteps = scheduler.timesteps.numpy()
    np.testing.assert_array_equal(timesteps, sampler_timesteps(schedule, sampler, steps))  # trailing: our default
    x_T = initial_noise(image_rngs(0, 0, 2), SHAPE)
    # Cosine betas end at abar_999 = 2.4e-9: an unclipped eps model's first x0 = (x - sigma eps) / alpha
    # multiplies float32 rounding of eps by 1 / alpha = 2e4 in any implementation (1.6e-3 apart
    # here). Both sides then run in float64, which shows the formulas agree where float32 cannot.
    if kind == "cosine" and prediction == "epsilon" and not clip:
        float64_tables(scheduler, schedule)
        x_T = x_T.astype(np.float64)
    network = StandInNetwork(schedule)
    ours = sample_loop(network, schedule, x_T, timesteps, sampler=sampler)
    theirs = diffusers_chain(scheduler, network, x_T)
    assert ours.dtype == x_T.dtype
    assert np.abs(ours - theirs).max() <= 2e-4
    assert np.abs(ours - x_T).max() > 0.1  # the chain did something


@pytest.mark.parametrize("sampler", ["dpmpp_2m", "unipc"])
@pytest.mark.parametrize("spacing", ["leading", "linspace"])
def test_any_timesteps_given_match_diffusers(sampler, spacing):
    """The solvers take whatever timesteps they are given: diffusers' other spacings too."""
    scheduler = make_scheduler(sampler, "linear", "epsilon", True, 10, spacing)
    schedule = DiffusionSchedule(beta_schedule("linear", 1000))
    x_T = initial_noise(image_rngs(1, 0, 2), SHAPE)
    network = StandInNetwork(schedule)
    ours = sample_loop(network, schedule, x_T, scheduler.timesteps.numpy(), sampler=sampler)
    assert np.abs(ours - diffusers_chain(scheduler, network, x_T)).max() <= 2e-4


def test_unipc_corrects_every_step_but_the_last():
    schedule = DiffusionSchedule(beta_schedule("linear", 1000))
    plan = plan_steps(schedule, sampling_timesteps(1000, 6, "trailing"), "unipc")
    assert [s.qx is not None for s in plan] == [False] + [True] * 5  # UniC runs on the new prediction
    assert [len(s.p0) for s in plan] == [1, 2, 2, 2, 2, 1]  # order 2 between first-order ends
    assert plan[-1].px == 0.0 and plan[-1].p0 == pytest.approx((1.0,))  # the last step returns x0


def test_dpmpp_2m_is_first_order_at_both_ends():
    schedule = DiffusionSchedule(beta_schedule("cosine", 1000), prediction_type="v_prediction")
    plan = plan_steps(schedule, sampling_timesteps(1000, 5, "trailing"), "dpmpp_2m")
    assert [len(s.p0) for s in plan] == [1, 2, 2, 2, 1]
    assert all(s.sigma == 0 and s.qx is None for s in plan)


def test_bad_sampler_settings_name_the_setting():
    for args, name in [
        (("euler", None, 0.0), "sampler"),
        (("ddim", 0, 0.0), "steps"),
        (("unipc", 1001, 0.0), "steps"),
        (("dpmpp_2m", 10, 0.5), "eta"),
        (("ddim", 10, -1.0), "eta"),
    ]:
        with pytest.raises(SamplerError) as e:
            check_sampler(*args, num_timesteps=1000)
        assert e.value.name == name
    check_sampler("ddim", 1000, 1.0, 1000)


# --- single DDPM / DDIM steps in float64 -------------------------------------------------------


def _float64(scheduler, betas):
    """diffusers keeps its tables in float32; 1 - abar_t / abar_prev then loses digits to
    cancellation at small t. Rebuild them in float64 from the (float32-equal, tested in
    test_schedule) betas, so the comparison tests the update formulas, not rounding."""
    scheduler.betas = torch.from_numpy(betas)
    scheduler.alphas = 1.0 - scheduler.betas
    scheduler.alphas_cumprod = torch.cumprod(scheduler.alphas, dim=0)
    scheduler.one = torch.tensor(1.0, dtype=torch.float64)
    if hasattr(scheduler, "final_alpha_cumprod"):
        scheduler.final_alpha_cumprod = torch.tensor(1.0, dtype=torch.float64)
    return scheduler


def float64_schedules(scheduler_class, kind, prediction, steps, variance_type=None, **options):
    """diffusers' scheduler set to `steps`, its tables in float64, and ours on the same betas, both
    clipping; variance_type goes to both, `options` to diffusers only."""
    variance = {"variance_type": variance_type} if variance_type else {}
    theirs = scheduler_class(
        num_train_timesteps=1000,
        beta_schedule=DIFFUSERS_KIND[kind],
        prediction_type=prediction,
        clip_sample=True,
        **variance,
        **options,
    )
    theirs.set_timesteps(steps)
    ours = DiffusionSchedule(beta_schedule(kind, 1000), prediction_type=prediction, **variance)
    return _float64(theirs, ours.betas), ours


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64), torch.randn(
        2, 3, 4, 4, generator=g, dtype=torch.float64
    )


def one_step(schedule, sampler, model_output, t, t_prev, x, eta=0.0, noise=None):
    """The plan's step in float64: x_prev = px x + p0 clip(cx x + co out) + sigma noise."""
    (step,) = plan_steps(schedule, [t], sampler, eta, t_end=t_prev)
    x0 = step.cx * x + step.co * model_output
    if schedule.clip_sample:
        x0 = np.clip(x0, -schedule.clip_range, schedule.clip_range)
    return step.px * x + step.p0[0] * x0 + (step.sigma * noise if step.sigma else 0.0)


@pytest.mark.parametrize("kind", ["linear", "cosine"])
@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("spacing", ["leading", "trailing"])
def test_ddim_step_matches_diffusers(kind, prediction, eta, spacing):
    steps = 20
    theirs, ours = float64_schedules(DDIMScheduler, kind, prediction, steps, timestep_spacing=spacing)
    ts = sampling_timesteps(1000, steps, spacing)
    x, _ = _batch(1)
    for i, t in enumerate(ts):
        model_output, noise = _batch(100 + i)
        t_prev = int(ts[i + 1]) if i + 1 < len(ts) else -1
        # diffusers steps to t - T // n, which is the next visited timestep for these spacings.
        expected = theirs.step(
            model_output, int(t), x, eta=eta, use_clipped_model_output=True, variance_noise=noise
        ).prev_sample.numpy()
        got = one_step(ours, "ddim", model_output.numpy(), int(t), t_prev, x.numpy(), eta=eta, noise=noise.numpy())
        np.testing.assert_allclose(got, expected, atol=1e-9, rtol=1e-9)
        x = torch.from_numpy(got)


@pytest.mark.parametrize("kind", ["linear", "cosine"])
@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("variance", ["fixed_small", "fixed_large"])
@pytest.mark.parametrize("steps", [1000, 25])
def test_ddpm_step_matches_diffusers(kind, prediction, variance, steps):
    theirs, ours = float64_schedules(DDPMScheduler, kind, prediction, steps, variance_type=variance)
    ts = sampling_timesteps(1000, steps, "leading")
    np.testing.assert_array_equal(ts, theirs.timesteps.numpy())
    x, _ = _batch(2)
    # Check a spread of steps, not all 1000: early, middle and the last two.
    for i in sorted({0, 1, len(ts) // 2, len(ts) - 2, len(ts) - 1}):
        t = int(ts[i])
        t_prev = int(ts[i + 1]) if i + 1 < len(ts) else -1
        model_output, _ = _batch(200 + i)
        seed = 300 + i
        expected = theirs.step(model_output, t, x, generator=torch.Generator().manual_seed(seed)).prev_sample
        noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed), dtype=x.dtype)
        got = one_step(ours, "ddpm", model_output.numpy(), t, t_prev, x.numpy(), noise=noise.numpy())
        np.testing.assert_allclose(got, expected.numpy(), atol=1e-9, rtol=1e-9)


def test_ddpm_step_equals_posterior_formula():
    s = DiffusionSchedule(beta_schedule("linear", 100), clip_sample=False)
    rng = np.random.default_rng(3)
    x_t, eps, noise = (rng.standard_normal((1, 3, 2, 2)) for _ in range(3))
    t = 40
    x0 = (x_t - np.sqrt(1 - s.alphas_cumprod[t]) * eps) / np.sqrt(s.alphas_cumprod[t])
    mean = s.posterior_mean_coef1[t] * x0 + s.posterior_mean_coef2[t] * x_t
    expected = mean + np.sqrt(s.posterior_variance[t]) * noise
    np.testing.assert_allclose(one_step(s, "ddpm", eps, t, t - 1, x_t, noise=noise), expected, rtol=1e-10)


def test_ddim_eta0_last_step_returns_x0():
    s = DiffusionSchedule(beta_schedule("linear", 1000))
    rng = np.random.default_rng(0)
    x_t, eps = rng.standard_normal((1, 3, 4, 4)), rng.standard_normal((1, 3, 4, 4))
    np.testing.assert_allclose(one_step(s, "ddim", eps, 5, -1, x_t), s.predict_x0(eps, 5, x_t), rtol=1e-12)
