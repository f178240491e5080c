"""The training options that change what a run learns: Min-SNR loss weighting, v / x0 prediction,
the power-function EMA. Each against a straightforward formula, then a tiny real run of each that
trains, resumes bit-exactly and exports.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from tiny_model import losses, tiny_config

from pipeline.core.config import ConfigError, DiffusionConfig
from pipeline.core.schedule import DiffusionSchedule
from pipeline.train.diffusion import GaussianDiffusion
from pipeline.train.ema import EMA, power_exponent, power_sigma_rel


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("gamma", [1.0, 5.0])
def test_min_snr_loss_matches_the_formula(prediction, gamma):
    schedule = DiffusionSchedule.from_config(DiffusionConfig(prediction_type=prediction))
    diffusion = GaussianDiffusion(schedule, "min_snr", gamma)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.rand(5, 3, 4, 4, generator=g) * 2 - 1, torch.randn(5, 3, 4, 4, generator=g)
    t = torch.tensor([0, 10, 300, 700, 999])
    output = torch.randn(5, 3, 4, 4, generator=g)
    loss = diffusion.training_loss(lambda x, t: output, x0, t, noise).item()

    expected = 0.0
    for i, step in enumerate(t.tolist()):
        abar = float(np.prod(1 - np.linspace(1e-4, 0.02, 1000)[: step + 1]))
        snr = abar / (1 - abar)
        weight = {
            "epsilon": min(snr, gamma) / snr,
            "v_prediction": min(snr, gamma) / (snr + 1),
            "sample": min(snr, gamma),
        }[prediction]
        a, s = np.sqrt(abar), np.sqrt(1 - abar)
        target = {"epsilon": noise[i], "v_prediction": a * noise[i] - s * x0[i], "sample": x0[i]}[prediction]
        expected += weight * float(((output[i].double() - target.double()) ** 2).mean()) / len(t)
    assert loss == pytest.approx(expected, rel=1e-5)
    if prediction == "epsilon":  # at high noise (SNR < gamma) Min-SNR leaves the epsilon loss alone
        far = torch.tensor([999, 999])
        plain = GaussianDiffusion(schedule).training_loss(lambda x, t: output[:2], x0[:2], far, noise[:2])
        torch.testing.assert_close(diffusion.training_loss(lambda x, t: output[:2], x0[:2], far, noise[:2]), plain)


def test_uniform_weighting_is_the_plain_mse():
    diffusion = GaussianDiffusion(DiffusionSchedule.from_config(DiffusionConfig()), "uniform")
    x0, noise, t = torch.zeros(2, 3, 4, 4), torch.full((2, 3, 4, 4), 2.0), torch.tensor([1, 900])
    assert diffusion.training_loss(lambda x, t: torch.zeros_like(x), x0, t, noise).item() == 4.0
    with pytest.raises(ValueError, match=r"train.loss_weighting: 'snr' not uniform\|min_snr"):
        GaussianDiffusion(diffusion.schedule, "snr")


@pytest.mark.parametrize("sigma_rel", [0.05, 0.1, 0.2])
def test_power_ema_equals_the_weighted_average_in_float64(sigma_rel):
    # EDM2: after N updates the average weighs the weights w_i of step i = 1..N by
    # (i^(g+1) - (i-1)^(g+1)) / N^(g+1), i.e. ~ i^g; computed here directly, in float64.
    gamma = power_exponent(sigma_rel)
    assert power_sigma_rel(gamma) == pytest.approx(sigma_rel, rel=1e-9)
    model = torch.nn.Linear(4, 3)
    ema = EMA(model, decay=0.999, profile="power", sigma_rel=sigma_rel, chunk_numel=5)
    history = []
    g = torch.Generator().manual_seed(0)
    for _ in range(40):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=g))
        history.append({k: v.double().clone() for k, v in model.state_dict().items()})
        ema.update(model)
    n = len(history)
    i = np.arange(1, n + 1, dtype=np.float64)
    weights = (i ** (gamma + 1) - (i - 1) ** (gamma + 1)) / n ** (gamma + 1)
    assert weights.sum() == pytest.approx(1.0)
    for key in history[0]:
        direct = sum(float(w) * h[key] for w, h in zip(weights, history))
        torch.testing.assert_close(ema.state_dict()[key].double(), direct, rtol=0, atol=1e-5)
    # A narrower profile follows the latest weights more closely than a wider one.
    assert weights[-1] > 1 / n


def test_option_errors_name_the_key(tmp_path, shards16):
    for override, key in (
        ("train.loss_weighting=snr", "train.loss_weighting"),
        ("train.snr_gamma=0", "train.snr_gamma"),
        ("ema.profile=karras", "ema.profile"),
        ("ema.sigma_rel=0.3", "ema.sigma_rel"),
    ):
        with pytest.raises(ConfigError, match=key):
            tiny_config(tmp_path, shards16, override)


OPTIONS = {  # each pins its prediction type and weighting (the tiny config's own may change)
    "min_snr epsilon": ["diffusion.prediction_type=epsilon", "train.loss_weighting=min_snr", "train.snr_gamma=5"],
    "v_prediction min_snr": ["diffusion.prediction_type=v_prediction", "train.loss_weighting=min_snr"],
    "sample prediction": ["diffusion.prediction_type=sample", "train.loss_weighting=uniform"],
    "power EMA": [
        "diffusion.prediction_type=epsilon",
        "train.loss_weighting=uniform",
        "ema.profile=power",
        "ema.sigma_rel=0.1",
    ],
}


@pytest.mark.integration
@pytest.mark.parametrize("option", list(OPTIONS))
def test_option_trains_resumes_bit_exactly_and_exports(option, tmp_path, shards16, in_process):
    from safetensors.torch import load_file

    from export.backends import OrtDenoiser
    from export.onnx import export_onnx
    from pipeline.core.sampling import generate
    from pipeline.train.loop import train

    overrides = [*OPTIONS[option], "train.checkpoint_every=3", "data.num_workers=0"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert train(tiny_config(straight, shards16, *overrides, "train.max_steps=6")) == 0
    assert train(tiny_config(resumed, shards16, *overrides, "train.max_steps=3")) == 0
    assert train(tiny_config(resumed, shards16, *overrides, "train.max_steps=6")) == 0
    assert losses(straight / "run") == losses(resumed / "run") and len(losses(straight / "run")) == 6
    assert all(np.isfinite(losses(straight / "run")))
    last = "checkpoints/step_000000006/ema.safetensors"
    a, b = load_file(str(straight / "run" / last)), load_file(str(resumed / "run" / last))
    assert all(torch.equal(a[k], b[k]) for k in a)

    model_json = json.loads((straight / "run" / "checkpoints/step_000000006/model.json").read_text())
    prediction = next(o.split("=")[1] for o in OPTIONS[option] if o.startswith("diffusion.prediction_type"))
    assert model_json["diffusion"]["prediction_type"] == prediction
    onnx_path, _, _ = export_onnx(straight / "run", tmp_path / "denoiser.onnx")
    denoiser = OrtDenoiser(onnx_path, provider="cpu", threads=1)
    assert denoiser.info.diffusion.prediction_type == prediction
    for sampler in ("ddim", "dpmpp_2m", "unipc"):
        images = generate(denoiser, 2, batch=2, sampler=sampler, steps=3)
        assert images.shape == (2, 3, 16, 16) and np.isfinite(images).all()
