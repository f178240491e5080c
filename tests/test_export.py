"""Export to ONNX (checked against torch through ONNX Runtime), the sidecar, the checkpoint record.

The tiny checkpoint is made in-process, no training (conftest's `ckpt`). The sampler CLI and the
TensorRT engines: test_sample_cli.py.
"""

import json
import shutil

import numpy as np
import pytest
from tiny_model import THREADS, tiny_sidecar

from export.backends import OrtDenoiser
from pipeline.checkpoint import read_checkpoint
from pipeline.core.sampling import image_rngs, initial_noise, sample_loop, sampler_timesteps
from pipeline.core.sidecar import SidecarError, read_sidecar, sidecar_path, write_sidecar


def random_batch(batch, seed=0, size=16):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, 3, size, size)).astype(np.float32)
    t = np.concatenate([[0.0, 999.0], rng.random(batch) * 999])[:batch].astype(np.float32)  # ends + fractional
    return x, t


# --- ONNX export -------------------------------------------------------------------------


@pytest.mark.integration
def test_onnx_graph_and_sidecar(onnx32, ckpt):
    import onnx

    model = onnx.load(str(onnx32))
    onnx.checker.check_model(model, full_check=True)
    inputs = {i.name: i.type.tensor_type for i in model.graph.input}
    assert list(inputs) == ["sample", "timestep"]
    assert inputs["sample"].elem_type == inputs["timestep"].elem_type == onnx.TensorProto.FLOAT
    dims = [d.dim_param or d.dim_value for d in inputs["sample"].shape.dim]
    assert isinstance(dims[0], str) and dims[1:] == [3, 16, 16]  # dynamic batch
    assert [o.name for o in model.graph.output] == ["model_output"]
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) == 18
    info = read_sidecar(onnx32)
    header = (info.format, info.dtype, info.timestep_dtype, info.image_size, info.channels)
    assert header == ("onnx", "float32", "float32", 16, 3)
    betas = info.schedule().betas
    assert (info.batch_min, info.batch_max, info.diffusion.num_timesteps, len(betas)) == (1, None, 1000, 1000)
    assert betas[0] == pytest.approx(1e-4) and betas[-1] == pytest.approx(0.02)
    assert info.model == read_checkpoint(ckpt).model and info.diffusion == read_checkpoint(ckpt).diffusion
    assert (info.diffusion.prediction_type, info.step, info.model_file) == ("epsilon", 10, "denoiser.onnx")
    assert info.source_checkpoint == str(ckpt.resolve())


@pytest.mark.integration
def test_weights_model_exports_the_online_weights(ckpt, onnx32, tmp_path, capsys):
    import torch

    from export.onnx import main
    from pipeline.checkpoint import MODEL_FILE, read_checkpoint

    out = tmp_path / "online.onnx"
    assert main(["--ckpt", str(ckpt), "--weights", "model", "--out", str(out)]) == 0
    assert (read_sidecar(out).weights, read_sidecar(onnx32).weights) == ("model", "ema")
    x, t = random_batch(3)
    online = OrtDenoiser(out, provider="cpu", threads=THREADS)(x, t)
    with torch.inference_mode():
        want = read_checkpoint(ckpt).load_unet(weights="model")(torch.from_numpy(x), torch.from_numpy(t)).numpy()
    np.testing.assert_allclose(online, want, atol=1e-4)
    assert np.abs(online - OrtDenoiser(onnx32, provider="cpu", threads=THREADS)(x, t)).max() > 1e-3

    old = tmp_path / "run"  # a checkpoint written before the online weights were saved
    shutil.copytree(ckpt, old / "checkpoints" / ckpt.name)
    (old / "checkpoints" / ckpt.name / MODEL_FILE).unlink()
    capsys.readouterr()
    assert main(["--ckpt", str(old), "--weights", "model", "--out", str(tmp_path / "x.onnx")]) == 2
    err = capsys.readouterr().err.strip()
    assert f"{MODEL_FILE}: missing" in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "x.onnx").exists()


@pytest.mark.integration
def test_ort_matches_torch_fp32(onnx32, torch_denoiser):
    ort = OrtDenoiser(onnx32, provider="cpu", threads=THREADS)
    assert ort.provider == "CPUExecutionProvider"
    for batch in (1, 3):
        x, t = random_batch(batch, seed=batch)
        want = torch_denoiser(x, t)
        assert np.abs(want).max() > 0.1  # the perturbed network really computes something
        assert np.abs(ort(x, t) - want).max() <= 1e-4


@pytest.mark.integration
def test_ort_fp16_matches_torch_fp32_with_fp32_norms(onnx16, torch_denoiser):
    import onnx

    model = onnx.shape_inference.infer_shapes(onnx.load(str(onnx16)))
    inputs = {i.name: i.type.tensor_type.elem_type for i in model.graph.input}
    assert inputs == {"sample": onnx.TensorProto.FLOAT16, "timestep": onnx.TensorProto.FLOAT}
    types = {v.name: v.type.tensor_type.elem_type for v in list(model.graph.value_info) + list(model.graph.input)}
    norms = [n for n in model.graph.node if n.op_type in ("InstanceNormalization", "GroupNormalization")]
    sinusoid = [n for n in model.graph.node if n.op_type in ("Sin", "Cos")]
    assert norms and sinusoid
    assert {types[n.input[0]] for n in norms + sinusoid} == {onnx.TensorProto.FLOAT}  # statistics in fp32
    assert read_sidecar(onnx16).dtype == "float16"
    ort = OrtDenoiser(onnx16, provider="cpu", threads=THREADS)
    x, t = random_batch(4, seed=5)
    assert np.abs(ort(x, t) - torch_denoiser(x, t)).max() <= 2e-2


@pytest.mark.integration
def test_ddim_samples_through_ort_equal_torch(onnx32, torch_denoiser):
    ort = OrtDenoiser(onnx32, provider="cpu", threads=THREADS)
    schedule = ort.info.schedule()
    timesteps = sampler_timesteps(schedule, "ddim", 10)
    results = []
    for denoiser in (ort, torch_denoiser):
        rngs = image_rngs(0, 0, 3)
        results.append(
            sample_loop(
                denoiser, schedule, initial_noise(rngs, (3, 16, 16)), timesteps, sampler="ddim", eta=0.5, rngs=rngs
            )
        )
    assert np.abs(results[0] - results[1]).max() <= 1e-3
    # and eta = 0 is deterministic through the engine
    x_t = initial_noise(image_rngs(1, 0, 2), (3, 16, 16))
    a, b = (sample_loop(ort, schedule, x_t, timesteps, sampler="ddim") for _ in range(2))
    assert np.array_equal(a, b)


def test_export_cli_rejects_a_bad_checkpoint(tmp_path, capsys):
    from export.onnx import main

    assert main(["--ckpt", str(tmp_path / "nope")]) == 2
    assert "no such checkpoint" in capsys.readouterr().err
    half = tmp_path / "run" / "checkpoints" / "step_000000005"
    half.mkdir(parents=True)
    assert main(["--ckpt", str(half)]) == 2
    assert "COMPLETE" in capsys.readouterr().err


def test_checkpoint_is_read_once_into_a_record(ckpt, tmp_path):
    """A run directory and its checkpoint directory give the same record; weights load only on demand."""
    import torch

    from pipeline.checkpoint import MODEL_FILE, CheckpointError, read_checkpoint, step_of

    record = read_checkpoint(ckpt.parent.parent)
    assert record == read_checkpoint(ckpt) and read_checkpoint(record) is record
    assert (record.dir, record.step, record.images_seen) == (ckpt, 10, 640)
    assert step_of(ckpt) == 10 and step_of(ckpt.parent) is None and step_of("step_12") is None
    assert record.model.image_size == 16 and record.diffusion.num_timesteps == 1000
    x, t = torch.zeros(1, 3, 16, 16), torch.tensor([3.0])
    with torch.inference_mode():
        assert torch.equal(record.load_unet()(x, t), read_checkpoint(ckpt).load_unet()(x, t))
        assert not torch.equal(record.load_unet(weights="model")(x, t), record.load_unet()(x, t))
    with pytest.raises(CheckpointError, match="weights 'online'"):
        record.load_unet(weights="online")
    copy = tmp_path / "step_000000010"
    shutil.copytree(ckpt, copy)
    (copy / MODEL_FILE).unlink()
    with pytest.raises(CheckpointError, match=f"{MODEL_FILE}: missing"):
        read_checkpoint(copy).load_unet(weights="model")


# --- sidecar -----------------------------------------------------------------------------


def test_sidecar_round_trip_and_validation(tmp_path):
    model = tmp_path / "d.onnx"
    model.write_bytes(b"graph")
    info = tiny_sidecar(dtype="float16")
    write_sidecar(model, info)
    back = read_sidecar(model)
    assert back == info and back.model_bytes == 5 and len(back.model_sha256) == 64
    assert back.schedule().num_timesteps == 2
    assert not list(tmp_path.glob(".*.tmp"))  # atomic write leaves no temporary behind
    data = json.loads(sidecar_path(model).read_text())
    sidecar_path(model).write_text(json.dumps({**data, "diffusion": {**data["diffusion"], "prediction_type": "noise"}}))
    with pytest.raises(
        SidecarError, match=r"d.onnx.json: diffusion.prediction_type: 'noise' not epsilon\|v_prediction"
    ):
        read_sidecar(model)
    del data["diffusion"]
    sidecar_path(model).write_text(json.dumps(data))
    with pytest.raises(SidecarError, match="d.onnx.json: diffusion: missing"):
        read_sidecar(model)
