"""Export to ONNX (checked against torch), the sidecar, the ORT / torch / TensorRT backends, the CLIs.

A tiny checkpoint is made in-process (no training): the U-Net's zero-initialised layers get small
random weights so that its output depends on every path through the network.
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from export import sample as sample_cli
from export.backends import BackendUnavailable, ModelError, OrtDenoiser
from export.trt_runtime import require_tensorrt
from pipeline.sampling import image_rngs, initial_noise, sample_loop, sampler_timesteps
from export.sidecar import SidecarError, read_sidecar, sidecar_path, write_sidecar

ROOT = Path(__file__).resolve().parents[1]
THREADS = 1  # the test machine is shared: one thread avoids OpenMP spin-wait pile-ups


def make_checkpoint(run_dir: Path, step: int = 10) -> Path:
    import torch
    from pipeline.checkpoint import checkpoint_dir, mark_complete, save_export_files
    from pipeline.config import Config, DiffusionConfig, ModelConfig
    from pipeline.unet import UNet

    torch.manual_seed(0)
    cfg = Config(
        model=ModelConfig(image_size=16, ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,), dropout=0.0),
        diffusion=DiffusionConfig(num_timesteps=1000),
    )
    model = UNet(cfg.model)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.normal_(0.0, 0.05)
    ckpt = checkpoint_dir(run_dir, step)
    ckpt.mkdir(parents=True)
    online = {k: v + 0.01 * torch.randn_like(v) for k, v in model.state_dict().items()}  # differs from the EMA
    save_export_files(ckpt, model.state_dict(), cfg, step, images_seen=640, model_state=online)
    mark_complete(ckpt)
    return ckpt


def trt_missing_reason():
    try:
        require_tensorrt()
    except BackendUnavailable as e:
        return str(e)
    return None


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    import torch

    torch.set_num_threads(THREADS)
    return make_checkpoint(tmp_path_factory.mktemp("run"))


@pytest.fixture(scope="module")
def onnx32(ckpt, tmp_path_factory):
    from export.onnx import main

    out = tmp_path_factory.mktemp("onnx") / "denoiser.onnx"
    assert main(["--ckpt", str(ckpt.parent.parent), "--out", str(out)]) == 0  # a run dir: newest checkpoint
    return out


@pytest.fixture(scope="module")
def onnx16(ckpt, tmp_path_factory):
    from export.onnx import main

    out = tmp_path_factory.mktemp("onnx") / "denoiser_fp16.onnx"
    assert main(["--ckpt", str(ckpt), "--out", str(out), "--fp16"]) == 0
    return out


@pytest.fixture(scope="module")
def torch_denoiser(ckpt):
    from export.backends import TorchDenoiser

    return TorchDenoiser(ckpt, threads=THREADS)


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
    assert (info.format, info.dtype, info.timestep_dtype, info.image_size, info.channels) == (
        "onnx",
        "float32",
        "float32",
        16,
        3,
    )
    assert (info.batch_min, info.batch_max, info.num_timesteps, len(info.betas)) == (1, None, 1000, 1000)
    assert info.betas[0] == pytest.approx(1e-4) and info.betas[-1] == pytest.approx(0.02)
    assert (info.prediction_type, info.step, info.model_file) == ("epsilon", 10, "denoiser.onnx")
    assert info.source_checkpoint == str(ckpt.resolve())


@pytest.mark.integration
def test_weights_model_exports_the_online_weights(ckpt, onnx32, tmp_path, capsys):
    import torch
    from export.onnx import main
    from pipeline.checkpoint import MODEL_FILE, load_unet

    out = tmp_path / "online.onnx"
    assert main(["--ckpt", str(ckpt), "--weights", "model", "--out", str(out)]) == 0
    assert (read_sidecar(out).weights, read_sidecar(onnx32).weights) == ("model", "ema")
    x, t = random_batch(3)
    online = OrtDenoiser(out, provider="cpu", threads=THREADS)(x, t)
    with torch.inference_mode():
        want = load_unet(ckpt, weights="model")[0](torch.from_numpy(x), torch.from_numpy(t)).numpy()
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
    from pipeline.checkpoint import CheckpointError, MODEL_FILE, load_unet, read_checkpoint, step_of

    record = read_checkpoint(ckpt.parent.parent)
    assert record == read_checkpoint(ckpt) and read_checkpoint(record) is record
    assert (record.dir, record.step, record.images_seen) == (ckpt, 10, 640)
    assert step_of(ckpt) == 10 and step_of(ckpt.parent) is None and step_of("step_12") is None
    assert record.model.image_size == 16 and record.diffusion.num_timesteps == 1000
    x, t = torch.zeros(1, 3, 16, 16), torch.tensor([3.0])
    with torch.inference_mode():
        assert torch.equal(record.load_unet()(x, t), load_unet(ckpt)[0](x, t))
        assert not torch.equal(record.load_unet(weights="model")(x, t), record.load_unet()(x, t))
    with pytest.raises(CheckpointError, match="weights 'online'"):
        record.load_unet(weights="online")
    copy = tmp_path / "step_000000010"
    shutil.copytree(ckpt, copy)
    (copy / MODEL_FILE).unlink()
    with pytest.raises(CheckpointError, match=f"{MODEL_FILE}: missing"):
        read_checkpoint(copy).load_unet(weights="model")


# --- the standalone sampler CLI ----------------------------------------------------------

BLOCK_TORCH = """
import importlib.abc, runpy, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('torch', 'onnx'):
            raise ImportError(f'{name} is blocked in this test')
sys.meta_path.insert(0, Block())
sys.argv = ['export.sample'] + sys.argv[1:]
try:
    runpy.run_module('export.sample', run_name='__main__', alter_sys=True)
finally:
    assert 'torch' not in sys.modules and 'onnx' not in sys.modules
"""


@pytest.mark.integration
def test_standalone_sampler_runs_with_torch_blocked(onnx32, tmp_path):
    out = tmp_path / "samples.npz"
    args = [
        "--model",
        str(onnx32),
        "--sampler",
        "dpmpp_2m",
        "--steps",
        "5",
        "--num",
        "5",
        "--batch",
        "2",
        "--seed",
        "3",
        "--threads",
        str(THREADS),
        "--out",
        str(out),
    ]
    beside = tmp_path / "beside.png"
    run = subprocess.run(
        [sys.executable, "-c", BLOCK_TORCH, *args, "--grid", str(beside)], cwd=ROOT, capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr
    assert "images/s" in run.stdout and "CPUExecutionProvider" in run.stdout
    images = np.load(out)["images"]
    assert images.dtype == np.uint8 and images.shape == (5, 16, 16, 3)
    assert images.std() > 0
    grid = tmp_path / "grid.png"
    assert sample_cli.main(args[:-1] + [str(grid)]) == 0
    from PIL import Image

    assert Image.open(grid).size == (3 * 18 + 2, 2 * 18 + 2)  # 5 images: 3 columns, 2 rows, 2 px gutters
    assert np.array_equal(np.asarray(Image.open(beside)), np.asarray(Image.open(grid)))  # the same 5 images


@pytest.fixture
def model_copy(onnx32, tmp_path):
    """A private copy of the fp32 model and its sidecar, free to break."""
    dst = tmp_path / "m.onnx"
    shutil.copy(onnx32, dst)
    shutil.copy(sidecar_path(onnx32), sidecar_path(dst))
    return dst


def _edit_sidecar(path, **changes):
    data = json.loads(sidecar_path(path).read_text())
    for key, value in changes.items():
        node, *rest = key.split(".")
        (data[node] if rest else data)[rest[0] if rest else node] = value
    sidecar_path(path).write_text(json.dumps(data))


CLI_ERRORS = {
    "missing sidecar": (lambda m: sidecar_path(m).unlink(), [], "missing sidecar"),
    "batch outside range": (
        lambda m: _edit_sidecar(m, **{"batch.max": 4}),
        ["--batch", "8"],
        "outside the engine's batch range 1..4",
    ),
    "wrong image size": (lambda m: _edit_sidecar(m, image_size=32), [], "wrong image size"),
    "steps above T": (lambda m: None, ["--steps", "1001"], "--steps 1001: must be in [1, 1000]"),
    "steps below 1": (lambda m: None, ["--steps", "0"], "--steps 0: must be in [1, 1000]"),
    "unknown sampler": (lambda m: None, ["--sampler", "euler"], "--sampler euler: unknown sampler; expected one of"),
    "eta without ddim": (lambda m: None, ["--sampler", "unipc", "--eta", "1"], "--eta 1.0: only ddim takes eta"),
    "stale sidecar": (lambda m: m.write_bytes(m.read_bytes() + b"\0"), [], "stale sidecar"),
    "bad sidecar value": (lambda m: _edit_sidecar(m, prediction_type="noise"), [], "prediction_type"),
    "unknown model type": (lambda m: m.rename(m.with_suffix(".pt")), [], "unknown model type"),
}


@pytest.mark.integration
@pytest.mark.parametrize("case", list(CLI_ERRORS))
def test_sample_cli_bad_input_is_one_line_exit_2(case, model_copy, tmp_path, capsys):
    breaker, extra, message = CLI_ERRORS[case]
    breaker(model_copy)
    model = model_copy.with_suffix(".pt") if case == "unknown model type" else model_copy
    out = tmp_path / "s.npz"
    assert sample_cli.main(["--model", str(model), "--num", "2", "--out", str(out), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert not out.exists()


def test_sample_cli_checks_the_output_type_first(tmp_path, capsys):
    assert sample_cli.main(["--model", str(tmp_path / "missing.onnx"), "--out", str(tmp_path / "x.jpg")]) == 2
    assert "unknown output type '.jpg'" in capsys.readouterr().err
    assert (
        sample_cli.main(
            [
                "--model",
                str(tmp_path / "missing.onnx"),
                "--out",
                str(tmp_path / "x.npz"),
                "--grid",
                str(tmp_path / "g.npz"),
            ]
        )
        == 2
    )
    assert "--grid" in capsys.readouterr().err


@pytest.mark.integration
def test_cuda_provider_is_never_a_silent_fallback(onnx32, tmp_path, capsys):
    import onnxruntime

    try:
        ort = OrtDenoiser(onnx32, provider="cuda", threads=THREADS)
    except BackendUnavailable as e:
        assert "--provider cuda" in str(e)
        assert sample_cli.main(["--model", str(onnx32), "--provider", "cuda", "--out", str(tmp_path / "a.npz")]) == 1
        assert capsys.readouterr().err.count("\n") == 1
    else:  # a machine with a GPU: then it must really be running on CUDA
        assert ort.provider == "CUDAExecutionProvider", onnxruntime.get_available_providers()
    auto = OrtDenoiser(onnx32, provider="auto", threads=THREADS)
    assert auto.provider in auto.session.get_providers() and auto.provider in auto.name


# --- sidecar -----------------------------------------------------------------------------


def test_sidecar_round_trip_and_validation(tmp_path):
    from export.sidecar import Sidecar

    model = tmp_path / "d.onnx"
    model.write_bytes(b"graph")
    info = Sidecar(
        format="onnx",
        image_size=8,
        channels=3,
        dtype="float16",
        timestep_dtype="float32",
        batch_min=1,
        batch_opt=1,
        batch_max=None,
        betas=[0.1, 0.2],
        num_timesteps=2,
        prediction_type="epsilon",
        variance_type="fixed_small",
        clip_sample=True,
    )
    write_sidecar(model, info)
    back = read_sidecar(model)
    assert back == info and back.model_bytes == 5 and len(back.model_sha256) == 64
    assert back.schedule().num_timesteps == 2
    assert not list(tmp_path.glob(".*.tmp"))  # atomic write leaves no temporary behind
    info.num_timesteps = 3
    with pytest.raises(SidecarError, match="betas: 2 values for num_timesteps=3"):
        write_sidecar(model, info)
    data = json.loads(sidecar_path(model).read_text())
    del data["betas"]
    sidecar_path(model).write_text(json.dumps(data))
    with pytest.raises(SidecarError, match="missing key 'betas'"):
        read_sidecar(model)


# --- TensorRT ----------------------------------------------------------------------------


def test_trt_cli_without_tensorrt_says_what_is_missing(tmp_path, capsys):
    if trt_missing_reason() is None:
        pytest.skip("TensorRT and a CUDA device are present; the missing-runtime path cannot be exercised")
    from export.trt import main

    assert main(["--onnx", str(tmp_path / "d.onnx")]) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    assert "pip install tensorrt" in err or "no CUDA device" in err
    with pytest.raises(BackendUnavailable):
        require_tensorrt()
    # The sampler says the same for an engine file it cannot run here.
    from export.sidecar import Sidecar

    plan = tmp_path / "d.plan"
    plan.write_bytes(b"a serialized engine would be here")
    write_sidecar(
        plan,
        Sidecar(
            format="tensorrt",
            image_size=16,
            channels=3,
            dtype="float16",
            timestep_dtype="float32",
            batch_min=1,
            batch_opt=8,
            batch_max=16,
            betas=[0.1, 0.2],
            num_timesteps=2,
            prediction_type="epsilon",
            variance_type="fixed_small",
            clip_sample=True,
        ),
    )
    assert sample_cli.main(["--model", str(plan), "--out", str(tmp_path / "s.npz")]) == 1
    assert err.strip() == capsys.readouterr().err.strip()


@pytest.mark.gpu
@pytest.mark.integration
@pytest.mark.parametrize("fp16", [False, True], ids=["fp32", "fp16"])
def test_trt_engine_matches_torch_and_samples(fp16, onnx32, onnx16, torch_denoiser, tmp_path):
    reason = trt_missing_reason()
    if reason:
        pytest.skip(reason)
    from export.trt_runtime import TrtDenoiser
    from export.trt import build_engine

    src = onnx16 if fp16 else onnx32
    plan = build_engine(src, tmp_path / "d.plan", batch=(1, 2, 4), timing_cache=tmp_path / "cache.bin")
    assert (tmp_path / "cache.bin").stat().st_size > 0
    engine = TrtDenoiser(plan)
    assert (engine.info.format, engine.info.batch_min, engine.info.batch_max) == ("tensorrt", 1, 4)
    for batch in (1, 3, 4):
        x, t = random_batch(batch, seed=batch)
        assert np.abs(engine(x, t) - torch_denoiser(x, t)).max() <= (5e-2 if fp16 else 1e-2)
    out = tmp_path / "s.npz"
    assert sample_cli.main(["--model", str(plan), "--num", "5", "--batch", "4", "--steps", "5", "--out", str(out)]) == 0
    assert np.load(out)["images"].shape == (5, 16, 16, 3)
    assert sample_cli.main(["--model", str(plan), "--batch", "8", "--out", str(out)]) == 2
    with pytest.raises(ModelError, match="disagrees with its sidecar"):
        _edit_sidecar(plan, **{"batch.max": 8})
        TrtDenoiser(plan)
