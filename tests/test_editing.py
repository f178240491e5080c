"""SDEdit, RePaint-style inpainting and the x0 trajectory, on a tiny exported ONNX denoiser.

The network is a tiny random U-Net (its zero-initialised layers given random weights, so every
path matters) exported with `export.onnx` and run by onnxruntime on the CPU: the real backend.
"""

import numpy as np
import pytest
from tiny_model import make_checkpoint

from export.backends import OrtDenoiser
from pipeline.core import editing
from pipeline.core.sampling import generate, to_uint8

THREADS = 2
STEPS = 10
SIZE = 16


@pytest.fixture(scope="module")
def denoiser(tmp_path_factory):
    import torch

    from export.onnx import main as export_main

    torch.set_num_threads(THREADS)
    ckpt = make_checkpoint(tmp_path_factory.mktemp("run"))
    out = tmp_path_factory.mktemp("onnx") / "denoiser.onnx"
    assert export_main(["--ckpt", str(ckpt), "--out", str(out)]) == 0
    return OrtDenoiser(out, provider="cpu", threads=THREADS)


class Recording:
    """The real denoiser, noting the timesteps of every call."""

    def __init__(self, denoiser):
        self.denoiser, self.info, self.calls = denoiser, denoiser.info, []

    def __call__(self, x, t):
        self.calls.append(float(t[0]))
        return self.denoiser(x, t)


def faces(n: int, seed: int = 0) -> np.ndarray:
    """Smooth test images in [-1, 1], (n, 3, SIZE, SIZE) float32."""
    rng = np.random.default_rng(seed)
    yy, xx = np.meshgrid(np.linspace(-1, 1, SIZE), np.linspace(-1, 1, SIZE), indexing="ij")
    base = np.stack([xx, yy, xx * yy])[None]
    return np.clip(0.8 * base + 0.1 * rng.standard_normal((n, 3, 1, 1)), -1, 1).astype(np.float32)


def hole_mask(n: int) -> np.ndarray:
    """(n, 1, SIZE, SIZE): keep everything but a centered 8x8 square."""
    mask = np.ones((n, 1, SIZE, SIZE), np.float32)
    mask[:, :, 4:12, 4:12] = 0
    return mask


@pytest.mark.parametrize("sampler", ["ddim", "ddpm", "dpmpp_2m", "unipc"])
def test_sdedit_strength_0_returns_the_input(denoiser, sampler):
    images = faces(2)
    counted = Recording(denoiser)
    out = editing.sdedit(counted, images, 0.0, sampler=sampler, steps=STEPS, seed=1)
    np.testing.assert_allclose(out, images, atol=1e-6, rtol=0)
    assert counted.calls == []


@pytest.mark.parametrize(
    "sampler,eta", [("ddim", 0.0), ("ddim", 1.0), ("ddpm", 0.0), ("dpmpp_2m", 0.0), ("unipc", 0.0)]
)
def test_sdedit_strength_1_is_plain_generation_from_the_same_seed(denoiser, sampler, eta):
    images = faces(3)
    out = editing.sdedit(denoiser, images, 1.0, sampler=sampler, steps=STEPS, eta=eta, seed=7)
    plain = generate(denoiser, 3, batch=3, sampler=sampler, steps=STEPS, eta=eta, seed=7)
    np.testing.assert_array_equal(out, plain)
    # ... and the same images `python -m export.sample` would write.
    np.testing.assert_array_equal(
        to_uint8(out), to_uint8(generate(denoiser, 3, batch=2, sampler=sampler, steps=STEPS, eta=eta, seed=7))
    )


@pytest.mark.parametrize("sampler", ["ddim", "unipc"])
def test_sdedit_starts_at_strength_times_T_and_stays_closer_when_weak(denoiser, sampler):
    images = faces(2)
    distance = {}
    for strength in (0.2, 0.5, 0.9):
        counted = Recording(denoiser)
        out = editing.sdedit(counted, images, strength, sampler=sampler, steps=STEPS, seed=3)
        T = denoiser.info.diffusion.num_timesteps
        assert len(counted.calls) == round(strength * STEPS)
        assert strength * T - T / STEPS <= counted.calls[0] <= strength * T
        distance[strength] = float(np.abs(out - images).mean())
    assert distance[0.2] < distance[0.5] < distance[0.9]


@pytest.mark.parametrize("sampler,resample", [("ddim", 1), ("ddim", 3), ("ddpm", 1), ("ddpm", 2)])
def test_inpaint_keeps_the_known_pixels_exactly(denoiser, sampler, resample):
    images, mask = faces(2), hole_mask(2)
    counted = Recording(denoiser)
    out = editing.inpaint(counted, images, mask, sampler=sampler, steps=STEPS, seed=0, resample=resample)
    keep = np.broadcast_to(mask > 0.5, images.shape)
    np.testing.assert_array_equal(out[keep], images[keep])
    assert not np.allclose(out[~keep], images[~keep], atol=0.05)  # the hole was really regenerated
    assert len(counted.calls) == STEPS * resample


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_different_seeds_differ_inside_the_hole_only(denoiser, sampler):
    images, mask = faces(2), hole_mask(2)
    a = editing.inpaint(denoiser, images, mask, sampler=sampler, steps=STEPS, seed=1)
    b = editing.inpaint(denoiser, images, mask, sampler=sampler, steps=STEPS, seed=2)
    keep = np.broadcast_to(mask > 0.5, images.shape)
    np.testing.assert_array_equal(a[keep], b[keep])
    assert np.mean(np.abs(a[~keep] - b[~keep]) > 1e-3) > 0.5
    np.testing.assert_array_equal(a, editing.inpaint(denoiser, images, mask, sampler=sampler, steps=STEPS, seed=1))


def test_inpaint_images_do_not_depend_on_the_batch_they_ran_in(denoiser):
    images, mask = faces(2), hole_mask(2)
    both = editing.inpaint(denoiser, images, mask, sampler="ddpm", steps=STEPS, seed=5, resample=2)
    second = editing.inpaint(denoiser, images[1:], mask[1:], sampler="ddpm", steps=STEPS, seed=5, resample=2, first=1)
    np.testing.assert_allclose(both[1:], second, atol=1e-6, rtol=0)


def test_inpaint_with_nothing_kept_is_plain_ddim_generation(denoiser):
    # With eta = 0 the pasted-in noise never reaches the hole: the chain must be generate's own.
    images = faces(2)
    out = editing.inpaint(denoiser, images, np.zeros((2, SIZE, SIZE)), sampler="ddim", steps=STEPS, seed=4)
    np.testing.assert_array_equal(out, generate(denoiser, 2, batch=2, sampler="ddim", steps=STEPS, seed=4))


def test_trajectory_records_x0_every_k_steps_and_ends_on_the_result(denoiser):
    ticks = []
    recorder = editing.X0Trajectory(STEPS, every=4, on_step=lambda: ticks.append(1))
    out = generate(denoiser, 5, batch=3, sampler="ddim", steps=STEPS, spacing="leading", seed=0, callback=recorder)
    assert [t for t, _ in recorder.frames] == [900, 500, 100, 0]  # steps 0, 4, 8 and the last
    assert all(x0.shape == (3, 3, SIZE, SIZE) for _, x0 in recorder.frames)  # the first chunk
    np.testing.assert_array_equal(recorder.frames[-1][1], out[:3])  # DDIM's last step lands on its x0
    assert len(ticks) == 2 * STEPS  # two chunks


def test_bad_arguments_are_clear_errors(denoiser):
    images = faces(1)
    with pytest.raises(ValueError, match="strength=1.5"):
        editing.sdedit(denoiser, images, 1.5)
    with pytest.raises(ValueError, match=r"\(B, 3, 16, 16\)"):
        editing.sdedit(denoiser, np.zeros((1, 3, 8, 8)), 0.5)
    with pytest.raises(ValueError, match="mask has shape"):
        editing.inpaint(denoiser, images, np.ones((1, 1, 8, 8)))
    with pytest.raises(ValueError, match="resample=0"):
        editing.inpaint(denoiser, images, hole_mask(1), resample=0)
    with pytest.raises(ValueError, match="use ddpm or ddim, not 'unipc'"):
        editing.inpaint(denoiser, images, hole_mask(1), sampler="unipc")
