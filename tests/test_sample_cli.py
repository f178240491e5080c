"""export.sample, the standalone sampler CLI: it runs with torch blocked, says what is wrong with its
input in one line, never falls back from CUDA silently, and drives TensorRT engines where they run.
"""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from test_export import random_batch
from tiny_model import REPO, THREADS, tiny_sidecar

from export import sample as sample_cli
from export.backends import OrtDenoiser
from export.trt_runtime import require_tensorrt
from pipeline.core.denoiser import BackendUnavailable, ModelError
from pipeline.core.sidecar import sidecar_path, write_sidecar


def trt_missing_reason():
    try:
        require_tensorrt()
    except BackendUnavailable as e:
        return str(e)
    return None


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
        [sys.executable, "-c", BLOCK_TORCH, *args, "--grid", str(beside)], cwd=REPO, capture_output=True, text=True
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
        lambda m: _edit_sidecar(m, batch_max=4),
        ["--batch", "8"],
        "outside the engine's batch range 1..4",
    ),
    "wrong image size": (
        lambda m: _edit_sidecar(m, **{"model.image_size": 32, "model.attn_resolutions": [16]}),
        [],
        "wrong image size",
    ),
    "steps above T": (lambda m: None, ["--steps", "1001"], "--steps 1001: must be in [1, 1000]"),
    "steps below 1": (lambda m: None, ["--steps", "0"], "--steps 0: must be in [1, 1000]"),
    "unknown sampler": (lambda m: None, ["--sampler", "euler"], "--sampler euler: unknown sampler; expected one of"),
    "eta without ddim": (lambda m: None, ["--sampler", "unipc", "--eta", "1"], "--eta 1.0: only ddim takes eta"),
    "stale sidecar": (lambda m: m.write_bytes(m.read_bytes() + b"\0"), [], "stale sidecar"),
    "bad sidecar value": (
        lambda m: _edit_sidecar(m, **{"diffusion.prediction_type": "noise"}),
        [],
        "diffusion.prediction_type",
    ),
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
    missing = ["--model", str(tmp_path / "missing.onnx")]
    assert sample_cli.main([*missing, "--out", str(tmp_path / "x.jpg")]) == 2
    assert "unknown output type '.jpg'" in capsys.readouterr().err
    assert sample_cli.main([*missing, "--out", str(tmp_path / "x.npz"), "--grid", str(tmp_path / "g.npz")]) == 2
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
    plan = tmp_path / "d.plan"
    plan.write_bytes(b"a serialized engine would be here")
    write_sidecar(plan, tiny_sidecar("tensorrt", (1, 8, 16), dtype="float16"))
    assert sample_cli.main(["--model", str(plan), "--out", str(tmp_path / "s.npz")]) == 1
    assert err.strip() == capsys.readouterr().err.strip()


@pytest.mark.gpu
@pytest.mark.integration
@pytest.mark.parametrize("fp16", [False, True], ids=["fp32", "fp16"])
def test_trt_engine_matches_torch_and_samples(fp16, onnx32, onnx16, torch_denoiser, tmp_path):
    reason = trt_missing_reason()
    if reason:
        pytest.skip(reason)
    from export.trt import build_engine
    from export.trt_runtime import TrtDenoiser

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
