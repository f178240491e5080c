"""The diffusion schedule in plain NumPy (float64): betas, the forward process, x0 from a model output.

This module imports no torch: the standalone samplers (ONNX Runtime, TensorRT) run the
whole reverse process with numpy and the engine alone; the samplers' update rules are in
`pipeline.core.sampling`. Notation follows Ho et al. 2020
and Song et al. 2021 (DDIM); timesteps index the arrays below, 0 <= t < T.
"""

from __future__ import annotations

import math

import numpy as np

from pipeline.core.config import DiffusionConfig, PredictionType, VarianceType, check_choice

SPACINGS = ("leading", "trailing", "linspace")


def beta_schedule(kind: str, num_timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> np.ndarray:
    """Betas of shape (num_timesteps,): `linear` (DDPM) or `cosine` (Nichol & Dhariwal)."""
    if kind == "linear":
        return np.linspace(beta_start, beta_end, num_timesteps, dtype=np.float64)
    if kind == "cosine":

        def alpha_bar(s):
            return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2

        steps = np.arange(num_timesteps)
        betas = [1 - alpha_bar((i + 1) / num_timesteps) / alpha_bar(i / num_timesteps) for i in steps]
        # The last few cosine betas approach 1; clipping keeps the reverse process finite.
        return np.minimum(np.array(betas, dtype=np.float64), 0.999)
    raise ValueError(f"unknown beta schedule {kind!r}; expected 'linear' or 'cosine'")


def sampling_timesteps(num_train: int, num_steps: int, spacing: str = "leading", steps_offset: int = 0) -> np.ndarray:
    """The descending timesteps a sampler visits, shape (num_steps,), int64.

    Spacings are those of Lin et al. 2023 (Table 2), as diffusers implements them.
    """
    if not 1 <= num_steps <= num_train:
        raise ValueError(f"num_steps={num_steps} must be in [1, {num_train}]")
    if spacing == "leading":
        ratio = num_train // num_steps
        ts = np.arange(num_steps) * ratio + steps_offset
    elif spacing == "trailing":
        ts = np.round(np.arange(num_train, 0, -num_train / num_steps))[::-1] - 1
    elif spacing == "linspace":
        ts = np.round(np.linspace(0, num_train - 1, num_steps))
    else:
        raise ValueError(f"unknown spacing {spacing!r}; expected one of {SPACINGS}")
    return ts[::-1].astype(np.int64).copy()


def _at(values: np.ndarray, t, ndim: int) -> np.ndarray:
    """values[t] shaped to broadcast against a batch of rank `ndim` (t scalar or (B,))."""
    out = np.asarray(values[np.asarray(t)], dtype=np.float64)
    return out.reshape(out.shape + (1,) * (ndim - out.ndim)) if out.ndim else out


class DiffusionSchedule:
    """The forward process q(x_t | x_0) and the reverse-step arithmetic for one beta schedule."""

    def __init__(
        self,
        betas,
        prediction_type: str = "epsilon",
        variance_type: str = "fixed_small",
        clip_sample: bool = True,
        clip_range: float = 1.0,
    ):
        check_choice(PredictionType, prediction_type, "prediction_type")
        check_choice(VarianceType, variance_type, "variance_type")
        self.betas = np.asarray(betas, dtype=np.float64)
        if self.betas.ndim != 1 or not np.all((self.betas > 0) & (self.betas < 1)):
            raise ValueError("betas must be a 1-D array with values in (0, 1)")
        self.prediction_type = prediction_type
        self.variance_type = variance_type
        self.clip_sample = clip_sample
        self.clip_range = clip_range
        self.num_timesteps = len(self.betas)

        self.alphas = 1.0 - self.betas
        self.alphas_cumprod = np.cumprod(self.alphas)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
        # Posterior q(x_{t-1} | x_t, x_0) of the full-length chain (eq. 6-7 of Ho et al.).
        self.posterior_variance = self.betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef1 = self.betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (
            (1.0 - self.alphas_cumprod_prev) * np.sqrt(self.alphas) / (1.0 - self.alphas_cumprod)
        )

    @classmethod
    def from_config(cls, cfg: DiffusionConfig) -> DiffusionSchedule:
        """The schedule a `DiffusionConfig` describes (training, export and the sidecar all build it here)."""
        betas = beta_schedule(cfg.beta_schedule, cfg.num_timesteps, cfg.beta_start, cfg.beta_end)
        return cls(betas, cfg.prediction_type, cfg.variance_type, cfg.clip_sample)

    def q_sample(self, x0: np.ndarray, t, noise: np.ndarray) -> np.ndarray:
        """Draw x_t ~ q(x_t | x_0): sqrt(abar_t) x0 + sqrt(1 - abar_t) noise. x0: (B, ...)."""
        return (
            _at(self.sqrt_alphas_cumprod, t, x0.ndim) * x0 + _at(self.sqrt_one_minus_alphas_cumprod, t, x0.ndim) * noise
        )

    def training_target(self, x0: np.ndarray, t, noise: np.ndarray) -> np.ndarray:
        """What the network is trained to output for this prediction type."""
        if self.prediction_type == "epsilon":
            return noise
        if self.prediction_type == "sample":
            return x0
        return (
            _at(self.sqrt_alphas_cumprod, t, x0.ndim) * noise - _at(self.sqrt_one_minus_alphas_cumprod, t, x0.ndim) * x0
        )

    def predict_x0(self, model_output: np.ndarray, t, x_t: np.ndarray) -> np.ndarray:
        """The x0 implied by the model output at t (B, ...); clipped when clip_sample is set."""
        abar = _at(self.alphas_cumprod, t, x_t.ndim)
        if self.prediction_type == "epsilon":
            x0 = (x_t - np.sqrt(1 - abar) * model_output) / np.sqrt(abar)
        elif self.prediction_type == "v_prediction":
            x0 = np.sqrt(abar) * x_t - np.sqrt(1 - abar) * model_output
        else:
            x0 = model_output
        return np.clip(x0, -self.clip_range, self.clip_range) if self.clip_sample else x0
