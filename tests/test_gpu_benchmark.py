"""`python -m benchmarks gpu --cpu-smoke`: the GPU machine's one command, run here so it cannot rot.

GPU-only steps must report "no CUDA device"; the others run at tiny sizes and report what the GPU
run reports. A step that overruns its time box is killed and recorded, and the run goes on.
"""

import json
import os
import subprocess
import sys

import pytest
from test_benchmarks import run_benchmarks

GPU_ONLY = (
    "ds_fp16_zero2",
    "ds_fp16_zero3",
    "celebahq256_b16",
    "celebahq256_b16_ckpt",
    "celebahq256_b64",
    "celebahq256_b64_ckpt",
    "sampling_torch_graphs",
    "sampling_onnxruntime_cuda",
    "sampling_tensorrt",
)


def run_gpu_benchmark(repo_root, out, *args):
    run_benchmarks(repo_root, "gpu", "--cpu-smoke", "--out", str(out), *args, timeout=900, OMP_NUM_THREADS="1")
    return json.loads((out / "gpu.json").read_text()), (out / "gpu.md").read_text()


@pytest.mark.integration
def test_cpu_smoke_reports_every_step(tmp_path, repo_root):
    report, md = run_gpu_benchmark(repo_root, tmp_path / "gpu")
    steps = {s["name"]: s for s in report["results"]["steps"]}
    assert list(steps) == [
        "env",
        "ds_fp16_zero2",
        "ds_bf16_zero2",
        "ds_fp16_zero3",
        "celebahq256_b16",
        "celebahq256_b16_ckpt",
        "celebahq256_b64",
        "celebahq256_b64_ckpt",
        "sampling_torch_eager",
        "sampling_torch_graphs",
        "unet_vs_diffusers",
        "sampling_onnxruntime_cuda",
        "sampling_tensorrt",
    ]
    for name in GPU_ONLY:
        assert (steps[name]["status"], steps[name]["reason"]) == ("skipped", "no CUDA device"), steps[name]
    for name in ("env", "ds_bf16_zero2", "sampling_torch_eager"):
        assert steps[name]["status"] == "ok", steps[name]
    bf16 = report["results"]["ds_bf16_zero2"]
    assert bf16["steps"] == 4 and bf16["images_per_second"] > 0 and bf16["nonfinite_applied_steps"] == 0
    assert bf16["resume"]["steps_compared"] == 2 and bf16["resume"]["verdict"] == "bit-exact"  # CPU fp32 math
    runs = report["results"]["sampling_torch_eager"]["runs"]
    assert {r["sampler"] for r in runs} >= {"ddim"} and all(r["evaluations_per_second"] > 0 for r in runs)
    diffusers = steps["unet_vs_diffusers"]
    assert diffusers["status"] == "ok" or diffusers["reason"].startswith("absent: diffusers")
    assert {t["name"] for t in report["targets"]} == {
        "celebahq256_fp16_images_per_second",
        "fp16_nonfinite_steps",
        "gpu_run_seconds",
    }
    assert md.startswith("# gpu") and "| ds_fp16_zero2 | skipped | 0 | no CUDA device |" in md
    assert "===== ds_bf16_zero2" in (tmp_path / "gpu" / "gpu.log").read_text()


@pytest.mark.integration
def test_a_step_over_its_time_box_is_killed_and_recorded(tmp_path, repo_root):
    """6 s cannot hold a DeepSpeed training (its imports alone take longer): killed, recorded, report kept."""
    report, md = run_gpu_benchmark(
        repo_root, tmp_path / "gpu", "--only", "ds_bf16_zero2,sampling_tensorrt", "--budget-s", "6"
    )
    steps = {s["name"]: s for s in report["results"]["steps"]}
    assert list(steps) == ["ds_bf16_zero2", "sampling_tensorrt"]  # the next step still gets its entry
    late = steps["ds_bf16_zero2"]
    assert late["status"] == "timeout" and "timed out after 6 s" in late["reason"], late
    assert late["seconds"] < 30
    assert steps["sampling_tensorrt"]["status"] == "skipped" and "| ds_bf16_zero2 | timeout |" in md


@pytest.mark.integration
def test_engine_step_code_runs_at_tiny_size_in_bf16(tmp_path, repo_root):
    """The celebahq256 steps are fp16 (GPU only); their code runs here in bf16 on the tiny config."""
    params = {
        "config": "tiny_cpu",
        "precision": "bf16",
        "stage": 2,
        "batch": 4,
        "grad_checkpointing": True,
        "warmup": 1,
        "steps": 2,
    }
    out = tmp_path / "step.json"
    env = dict(os.environ, PYTHONPATH=repo_root, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks",
            "gpu",
            "--step",
            "engine_steps",
            "--params",
            json.dumps(params),
            "--work",
            str(tmp_path),
            "--step-out",
            str(out),
        ],
        cwd=repo_root,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    result = json.loads(out.read_text())
    assert result["status"] == "ok", proc.stdout[-2000:] + proc.stderr[-2000:]
    assert result["data"]["images_per_second"] > 0 and len(result["data"]["step_seconds"]["repeats"]) == 2
    assert result["rows"][0][:3] == ["tiny_cpu", 4, True] and result["data"]["skipped_steps"] == 0
