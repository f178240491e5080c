"""The GPU paths, checked as far as they run without a GPU: engine and graph sidecars that cannot
collide, TensorRT's batch range and CUDA handle helpers, the CUDA runtime missing, fp16 refused
at ZeRO stage 0, DeepSpeed's loss scaler giving up, start-up checks, the device of a Slurm task.

Nothing here fakes TensorRT or a GPU: where they are absent the real "absent" path is exercised.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import warnings

import pytest
import torch
from tiny_model import make_checkpoint, tiny_sidecar

from export.backends import OrtDenoiser
from export.trt_runtime import check_batch, require_cuda_runtime
from pipeline.core.config import Config, ConfigError, from_dict
from pipeline.core.denoiser import BackendUnavailable, ModelError
from pipeline.core.sidecar import SidecarError, read_sidecar, sidecar_path, write_sidecar
from pipeline.train.distributed import accelerator_mismatch, cuda_device_index, read_env
from pipeline.train.ds_config import cpu_adam_build_missing, ds_config_for

# --- sidecars: a graph and its engine each keep their own ----------------------------------------


@pytest.fixture(scope="module")
def default_export(tmp_path_factory):
    """`python -m export.onnx --ckpt RUN` with the default --out: <checkpoint>/denoiser.onnx."""
    from export.onnx import main

    torch.set_num_threads(1)
    ckpt = make_checkpoint(tmp_path_factory.mktemp("run"))
    assert main(["--ckpt", str(ckpt)]) == 0
    return ckpt / "denoiser.onnx"


@pytest.mark.integration
def test_engine_beside_the_default_onnx_leaves_the_onnx_usable(default_export):
    """The README's `python -m export.trt --ckpt RUN --fp16` writes denoiser.plan beside denoiser.onnx;
    its sidecar (what build_engine writes after a build) must not replace the ONNX's."""
    from export.trt import default_plan_path, engine_sidecar

    onnx_path = default_export
    plan = default_plan_path(onnx_path, None)
    assert plan == onnx_path.with_suffix(".plan")
    plan.write_bytes(b"a serialized engine would be here")
    write_sidecar(plan, engine_sidecar(read_sidecar(onnx_path), (1, 8, 16), "10.0", onnx_path.name, "fp16", 1.0))
    assert sidecar_path(onnx_path).name == "denoiser.onnx.json" and sidecar_path(plan).name == "denoiser.plan.json"
    onnx_info, plan_info = read_sidecar(onnx_path), read_sidecar(plan)
    assert (onnx_info.format, onnx_info.batch_max) == ("onnx", None)
    assert (plan_info.format, plan_info.batch_range()) == ("tensorrt", "1..16")
    assert plan_info.producer["onnx_file"] == "denoiser.onnx"
    assert plan_info.diffusion == onnx_info.diffusion and plan_info.model_sha256 != onnx_info.model_sha256
    ort = OrtDenoiser(onnx_path, provider="cpu", threads=1)
    assert ort.info == onnx_info  # still verifies: not stale
    if ort.nodes is not None:  # onnxruntime records where each node runs: all on the CPU here
        assert set(ort.nodes) == {"CPUExecutionProvider"} and ort.nodes["CPUExecutionProvider"] > 10
        assert ort.note == ""
    with pytest.raises(ValueError, match="expected a .plan or .engine"):
        default_plan_path(onnx_path, "x.onnx")


def test_reader_refuses_a_sidecar_of_another_format(tmp_path):
    graph, engine = tmp_path / "d.onnx", tmp_path / "d.plan"
    graph.write_bytes(b"graph")
    engine.write_bytes(b"graph")  # same size: only the format tells them apart
    write_sidecar(engine, tiny_sidecar("tensorrt", (1, 2, 4)))
    shutil.copy(sidecar_path(engine), sidecar_path(graph))
    with pytest.raises(SidecarError, match=r"d.onnx.json: format 'tensorrt' .* d.onnx is onnx"):
        read_sidecar(graph)
    with pytest.raises(SidecarError, match="format 'onnx'"):
        write_sidecar(engine, tiny_sidecar("onnx"))


def test_a_sidecar_of_an_older_export_asks_for_a_re_export(tmp_path):
    model = tmp_path / "denoiser.onnx"
    model.write_bytes(b"graph")
    write_sidecar(model, tiny_sidecar())
    data = json.loads(sidecar_path(model).read_text())
    sidecar_path(model).write_text(json.dumps(dict(data, sidecar_version=1)))
    with pytest.raises(
        SidecarError, match=r"denoiser.onnx.json: sidecar_version 1, this sampler reads 2 \(re-export\)"
    ):
        read_sidecar(model)


# --- TensorRT / CUDA without them ------------------------------------------------------------------


def test_batch_outside_the_profile_names_the_range(tmp_path):
    info = tiny_sidecar("tensorrt", (2, 4, 8))
    for batch in (2, 5, 8):
        check_batch(info, batch, tmp_path / "d.plan")
    for batch in (1, 9):
        with pytest.raises(ModelError, match=rf"d.plan: batch {batch} is outside the engine's batch range 2..8"):
            check_batch(info, batch, tmp_path / "d.plan")


def test_no_cuda_device_is_backend_unavailable_not_a_crash():
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: the missing-device path cannot be exercised")
    with pytest.raises(BackendUnavailable, match="no CUDA device|CUDA Python bindings are missing"):
        require_cuda_runtime("TensorRT 10")


def test_native_handle_reads_a_stream_without_int():
    pytest.importorskip("cuda.bindings", reason="cuda-python is not installed")
    from cuda.bindings import runtime as cudart

    from export.trt_runtime import native_handle

    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        assert native_handle(cudart.cudaStream_t(0x1234)) == 0x1234


def test_trt_denoiser_refuses_an_onnx_before_touching_cuda(tmp_path):
    from export.trt_runtime import TrtDenoiser

    model = tmp_path / "d.onnx"
    model.write_bytes(b"graph")
    write_sidecar(model, tiny_sidecar())
    with pytest.raises(ModelError, match="not a TensorRT engine"):
        TrtDenoiser(model)  # and its __del__ -> close() on the half-built object raises nothing


# --- DeepSpeed fp16 -------------------------------------------------------------------------------


def test_fp16_at_zero_stage_0_is_refused_with_the_reason(tmp_path):
    with pytest.raises(ConfigError, match=r"train.precision: fp16 needs zero.stage >= 1 \(DeepSpeed 0.19"):
        from_dict(Config, {"train": {"precision": "fp16"}})
    assert from_dict(Config, {"train": {"precision": "fp16"}, "zero": {"stage": 2}}).zero.stage == 2
    user = tmp_path / "ds.json"
    user.write_text(json.dumps({"fp16": {"enabled": True}}))
    cfg = from_dict(Config, {"train": {"precision": "fp16", "deepspeed_config": str(user)}})
    with pytest.raises(ConfigError, match=r"ds.json: fp16 needs zero_optimization.stage >= 1"):
        ds_config_for(cfg, 1)
    user.write_text(json.dumps({"fp16": {"enabled": True}, "zero_optimization": {"stage": 1}}))
    assert ds_config_for(cfg, 1)["zero_optimization"]["stage"] == 1


LOSS_SCALER_SCRIPT = """
import json, torch
from deepspeed.runtime.fp16.loss_scaler import CreateLossScaler
from pipeline.train import distributed
from pipeline.train.ds_config import FP16_LOSS_SCALING as ours
from pipeline.train.loop import is_min_loss_scale_error
distributed.init(distributed.read_env({}, cuda=False))  # the scaler asks DeepSpeed's comm for the rank
args = {"init_scale": 2 ** ours["initial_scale_power"], "scale_window": ours["loss_scale_window"],
        "min_scale": ours["min_loss_scale"], "delayed_shift": ours["hysteresis"], "consecutive_hysteresis": False}
scaler, overflows, error = CreateLossScaler(torch.half, None, True, args), 0, None
while overflows < 100 and error is None:
    overflows += 1
    try:
        scaler.update_scale(True)
    except Exception as e:
        error = e
print(json.dumps({"overflows": overflows, "scale": scaler.cur_scale, "type": type(error).__name__,
                  "recognised": is_min_loss_scale_error(error)}))
distributed.shutdown()
"""


def test_dynamic_loss_scaler_gives_up_on_the_18th_overflow_and_is_recognised(repo_root):
    """Our FP16_LOSS_SCALING fed to DeepSpeed's own scaler as its engine does (2^16, hysteresis 2),
    in a process of its own: DeepSpeed's comm cannot be set up twice in one process."""
    proc = subprocess.run(
        [sys.executable, "-c", LOSS_SCALER_SCRIPT],
        cwd=repo_root,
        capture_output=True,
        text=True,
        env=dict(os.environ, PYTHONPATH=repo_root),
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result == {"overflows": 18, "scale": 1, "type": "Exception", "recognised": True}
    from pipeline.train.loop import is_min_loss_scale_error

    assert not is_min_loss_scale_error(RuntimeError("CUDA out of memory"))


# --- start-up checks and the device of a task ------------------------------------------------------


def test_leftover_ds_accelerator_on_a_cuda_machine_is_named():
    message = accelerator_mismatch({"DS_ACCELERATOR": "cpu"}, cuda=True)
    assert "DS_ACCELERATOR=cpu" in message and "unset DS_ACCELERATOR" in message
    assert accelerator_mismatch({"DS_ACCELERATOR": "cpu"}, cuda=False) is None
    assert accelerator_mismatch({"DS_ACCELERATOR": "cuda"}, cuda=True) is None
    assert accelerator_mismatch({}, cuda=True) is None


def test_offload_build_tools_are_checked(monkeypatch):
    from pipeline.train.distributed import import_deepspeed
    from pipeline.train.ds_config import check_offload_build

    monkeypatch.delenv("DS_ACCELERATOR", raising=False)  # import_deepspeed sets it on CPU: restored after
    import_deepspeed()
    from deepspeed.git_version_info import installed_ops

    if installed_ops.get("cpu_adam"):
        pytest.skip("this DeepSpeed has CPU Adam pre-built: nothing to build")
    monkeypatch.setenv("PATH", "")
    monkeypatch.setenv("CXX", "no-such-compiler")
    missing = cpu_adam_build_missing()
    assert any("ninja" in m for m in missing) and any("'no-such-compiler'" in m for m in missing)
    with pytest.raises(ConfigError, match="zero.offload_optimizer: DeepSpeed must build its CPU Adam op here"):
        check_offload_build({"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}})
    check_offload_build({"zero_optimization": {"stage": 2}})  # no offload: nothing to check


def test_slurm_task_device_is_local_rank_modulo_visible_devices():
    slurm = {"SLURM_PROCID": "7", "SLURM_LOCALID": "3", "SLURM_NTASKS": "8", "MASTER_ADDR": "n1", "MASTER_PORT": "1"}
    assert str(read_env(slurm, cuda=True, device_count=1).device) == "cuda:0"  # --gpus-per-task=1
    assert str(read_env(slurm, cuda=True, device_count=4).device) == "cuda:3"  # all 4 GPUs visible
    assert str(read_env(slurm, cuda=True, device_count=2).device) == "cuda:1"
    assert cuda_device_index(5, 4) == 1 and cuda_device_index(2, 0) == 2
