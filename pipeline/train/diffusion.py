"""The torch side of the diffusion process: q_sample on tensors and the training loss.

All coefficients come from `pipeline.core.schedule.DiffusionSchedule` (NumPy, float64) so training
and the NumPy samplers share one source of truth.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.core.config import LossWeighting, check_choice
from pipeline.core.schedule import DiffusionSchedule


def min_snr_weights(schedule: DiffusionSchedule, gamma: float) -> np.ndarray:
    """Per-timestep loss weights (T,), float64, of Min-SNR-gamma (Hang et al. 2023).

    The weight on the x0 error is min(SNR, gamma); an epsilon error is an x0 error times SNR
    and a v error one times SNR + 1, so those losses are divided by that factor.
    """
    snr = schedule.alphas_cumprod / (1.0 - schedule.alphas_cumprod)
    capped = np.minimum(snr, gamma)
    return {"epsilon": capped / snr, "v_prediction": capped / (snr + 1.0), "sample": capped}[schedule.prediction_type]


class GaussianDiffusion:
    """q_sample and the DDPM loss (plain MSE, or Min-SNR weighted per timestep), on torch tensors."""

    def __init__(self, schedule: DiffusionSchedule, loss_weighting: str = "uniform", snr_gamma: float = 5.0):
        check_choice(LossWeighting, loss_weighting, "train.loss_weighting")
        self.schedule = schedule
        self.num_timesteps = schedule.num_timesteps
        self.prediction_type = schedule.prediction_type
        # Kept in float64 on the host; gathered per batch and cast to the batch dtype.
        self.sqrt_alphas_cumprod = torch.from_numpy(schedule.sqrt_alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = torch.from_numpy(schedule.sqrt_one_minus_alphas_cumprod)
        self.loss_weights = (
            torch.from_numpy(min_snr_weights(schedule, snr_gamma)) if loss_weighting == "min_snr" else None
        )

    def _coef(self, values: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """values[t] as (B, 1, 1, 1) in like's dtype and device."""
        return values.to(like.device)[t.long()].to(like.dtype).reshape(-1, *([1] * (like.ndim - 1)))

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise. x0, noise: (B, C, H, W); t: (B,)."""
        return (
            self._coef(self.sqrt_alphas_cumprod, t, x0) * x0
            + self._coef(self.sqrt_one_minus_alphas_cumprod, t, x0) * noise
        )

    def target(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """What the network should output: epsilon, v = sqrt(abar) eps - sqrt(1-abar) x0, or x0."""
        if self.prediction_type == "epsilon":
            return noise
        if self.prediction_type == "sample":
            return x0
        return (
            self._coef(self.sqrt_alphas_cumprod, t, x0) * noise
            - self._coef(self.sqrt_one_minus_alphas_cumprod, t, x0) * x0
        )

    def sample_timesteps(self, batch_size: int, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
        """Uniform t in [0, T), shape (B,)."""
        return torch.randint(0, self.num_timesteps, (batch_size,), generator=generator, device=device)

    def training_loss(self, model, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Mean squared error between the model output at (x_t, t) and the target, each sample's
        weighted by its timestep's loss weight when there is one; a scalar."""
        x_t = self.q_sample(x0, t, noise)
        output = model(x_t, t).float()
        target = self.target(x0, t, noise).float()
        if self.loss_weights is None:
            return F.mse_loss(output, target)
        per_sample = (output - target).square().mean(dim=tuple(range(1, output.ndim)))
        return (self.loss_weights.to(output.device)[t.long()].float() * per_sample).mean()
