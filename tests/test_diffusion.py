"""The torch side of the diffusion (q_sample, targets, loss) agrees with the NumPy schedule."""

import numpy as np
import pytest
import torch

from pipeline.core.config import DiffusionConfig
from pipeline.core.schedule import DiffusionSchedule
from pipeline.train.diffusion import GaussianDiffusion


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_q_sample_and_target_match_numpy(prediction, kind):
    schedule = DiffusionSchedule.from_config(DiffusionConfig(beta_schedule=kind, prediction_type=prediction))
    diffusion = GaussianDiffusion(schedule)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.rand(4, 3, 8, 8, generator=g) * 2 - 1, torch.randn(4, 3, 8, 8, generator=g)
    t = torch.tensor([0, 1, 500, 999])
    np.testing.assert_allclose(
        diffusion.q_sample(x0, t, noise).numpy(),
        schedule.q_sample(x0.double().numpy(), t.numpy(), noise.double().numpy()),
        atol=1e-6,
    )
    np.testing.assert_allclose(
        diffusion.target(x0, t, noise).numpy(),
        schedule.training_target(x0.double().numpy(), t.numpy(), noise.double().numpy()),
        atol=1e-6,
    )


def test_training_loss_is_mse_of_the_model_output():
    diffusion = GaussianDiffusion(DiffusionSchedule.from_config(DiffusionConfig()))
    x0, noise, t = torch.zeros(2, 3, 4, 4), torch.ones(2, 3, 4, 4), torch.tensor([10, 20])
    # A "model" that always predicts zero noise has loss mean(noise^2) = 1 on an epsilon target.
    assert diffusion.training_loss(lambda x, t: torch.zeros_like(x), x0, t, noise).item() == pytest.approx(1.0)
    assert diffusion.training_loss(lambda x, t: torch.ones_like(x), x0, t, noise).item() == pytest.approx(0.0)
