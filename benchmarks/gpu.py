"""Every GPU path in one prepared command, each step time-boxed, the report written as it goes.

  python -m benchmarks gpu [--out DIR] [--budget-s 480] [--cpu-smoke] [--fast-sampler dpmpp_2m:20]

Made for a GPU machine lent for minutes (no package registry: `make gpu-wheels` carries
DeepSpeed, diffusers, WebDataset, submitit as wheels). Steps, in order:
  1. the environment (GPU, versions, which optional runtimes import);
  2. DeepSpeed ZeRO-2 fp16 (dynamic loss scaling, gradient checkpointing) on celebahq64 through
     pipeline.train, ~100 steps on synthetic faces made on the spot: images/s, peak memory, the
     loss-scale trace, skipped steps, non-finite steps; then a resume from the middle checkpoint,
     compared step by step; then a few steps of bf16 ZeRO-2 and of fp16 ZeRO-3;
  3. celebahq256 (the paper's model) fp16 ZeRO-2 at batch 16 and 64, with and without
     checkpointing: time, peak memory, images/s beside the paper's 141 images/s (TPU v3-8);
  4. sampling, DDIM-50 and a faster sampler at batch 1, 16, 64: torch eager fp16, torch fp16
     channels_last with CUDA graphs (then our U-Net against diffusers' UNet2DModel, one fp16
     training step each), onnxruntime's CUDA provider and TensorRT where they import.
Each step runs in a process of its own under a time limit (a hang, an out-of-memory or a crash
costs that step only, recorded with its reason); the whole run stays within --budget-s.
--cpu-smoke runs the same command on a CPU: GPU-only steps report "no CUDA device", the rest
runs at tiny sizes (a test runs it, so the command cannot rot).

On the lent machine, after `make gpu-wheels` here (carry `.whl`), one call:
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl &&
  PYTHONPATH=/tmp/site python3 -m benchmarks gpu --out $OUT/gpu
then commit $OUT/gpu/gpu.{json,md} under benchmarks/results/<device kind>/.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

from benchmarks import common

REPO = Path(__file__).resolve().parent.parent
MIN_STEP_SECONDS = 5.0  # less is not worth starting a process for

METHOD = """
Each step is `python -m benchmarks.gpu --step KIND --params JSON` in a new process session, killed
(with its children) when its time box or the remaining budget runs out; its output is appended to
gpu.log. Training steps run the real `pipeline.train.loop.train` (DeepSpeed engine, data loader, EMA,
checkpoints) and read its metrics.jsonl: images/s is the median over logged steps after the first
five, peak memory `torch.cuda.max_memory_allocated`. The resume check copies the run without its
last checkpoint, trains the copy from the middle checkpoint to the end, and compares the per-step
losses and loss scales. The celebahq256 steps time `pipeline.train.loop.train_step` on one in-memory
batch (no data loading), median of the timed steps after a warm-up. Sampling times a whole
`generate` call (the one sampling loop) after a 2-step warm-up; evaluations/s counts batched network
calls. Nothing is faked: a runtime that is not installed is reported absent.
"""

# The celebahq256 training steps, name -> (batch, gradient checkpointing): celebahq256_b16, _b16_ckpt, _b64, _b64_ckpt
CELEBAHQ256_STEPS = {
    f"celebahq256_b{b}{'_ckpt' if ckpt else ''}": (b, ckpt) for b in (16, 64) for ckpt in (False, True)
}
# name -> (kind, GPU only, time box in seconds), in the order they run
STEPS = {
    "env": ("env", False, 60),
    "ds_fp16_zero2": ("ds_train", True, 240),
    "ds_bf16_zero2": ("ds_train", False, 90),
    "ds_fp16_zero3": ("ds_train", True, 90),
    **dict.fromkeys(CELEBAHQ256_STEPS, ("engine_steps", True, 90)),
    "sampling_torch_eager": ("sampling", False, 120),
    "sampling_torch_graphs": ("sampling", True, 120),
    "unet_vs_diffusers": ("unet_vs_diffusers", False, 90),
    "sampling_onnxruntime_cuda": ("sampling", True, 120),
    "sampling_tensorrt": ("sampling", True, 240),
}
TINY_MODEL = [
    "model.image_size=16",
    "model.ch=32",
    "model.ch_mult=[1,2]",
    "model.num_res_blocks=1",
    "model.attn_resolutions=[8]",
    "data.num_workers=0",
    "data.shuffle_buffer=50",
    "train.batch_size=8",
]


def plan(smoke: bool, fast: tuple[str, int]) -> dict[str, dict]:
    """Parameters of every step: the GPU sizes, or tiny ones for --cpu-smoke."""
    train = {
        "config": "celebahq64",
        "image_size": 64,
        "images": 512,
        "grad_checkpointing": True,
        "checkpoint_every": 1000,
        "resume": False,
        "overrides": ["data.num_workers=6"],
    }
    if smoke:
        train = dict(train, config="tiny_cpu", image_size=16, images=64, overrides=TINY_MODEL)
    samplers = [["ddim", 3 if smoke else 50], [fast[0], 3 if smoke else fast[1]]]
    sample = {
        "config": "tiny_cpu" if smoke else "celebahq256",
        "batches": [1, 2] if smoke else [1, 16, 64],
        "samplers": samplers,
    }
    engine = {"config": "celebahq256", "precision": "fp16", "stage": 2, "warmup": 2, "steps": 5}
    return {
        "env": {},
        "ds_fp16_zero2": dict(train, precision="fp16", stage=2, steps=100, checkpoint_every=50, resume=True),
        "ds_bf16_zero2": dict(
            train,
            precision="bf16",
            stage=2,
            steps=4 if smoke else 10,
            **({"checkpoint_every": 2, "resume": True} if smoke else {}),
        ),
        "ds_fp16_zero3": dict(train, precision="fp16", stage=3, steps=10),
        "unet_vs_diffusers": {
            "config": "tiny_cpu" if smoke else "celebahq64",
            "batch": 4 if smoke else 64,
            "precision": "fp32" if smoke else "fp16",
            "warmup": 1 if smoke else 3,
            "repeats": 2 if smoke else 10,
        },
        **{name: dict(engine, batch=b, grad_checkpointing=ckpt) for name, (b, ckpt) in CELEBAHQ256_STEPS.items()},
        "sampling_torch_eager": dict(sample, backend="torch-eager"),
        "sampling_torch_graphs": dict(sample, backend="torch-graphs"),
        "sampling_onnxruntime_cuda": dict(sample, backend="onnxruntime-cuda"),
        "sampling_tensorrt": dict(sample, backend="tensorrt"),
    }


# --- one step, in its own process ------------------------------------------------------------------


def run_step(kind: str, params: dict, work: Path, out_file: Path) -> int:
    from benchmarks import gpu_steps

    try:
        result = dict(getattr(gpu_steps, kind)(params, work), status="ok")
    except gpu_steps.Skipped as e:
        result = {"status": "skipped", "reason": str(e)}
    except Exception as e:
        traceback.print_exc()
        result = {"status": "failed", "reason": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]}
    finally:
        if "torch" in sys.modules:  # NCCL wants its process group destroyed before the process exits
            from pipeline.train import distributed

            distributed.shutdown()
    out_file.write_text(json.dumps(result, default=str))
    return 0


def spawn(name: str, kind: str, params: dict, work: Path, timeout: float, log: Path, env: dict) -> dict:
    """Run one step in a new session; kill the whole session when it overruns."""
    out_file = work / f"{name}.result.json"
    out_file.unlink(missing_ok=True)
    command = [
        sys.executable,
        "-m",
        "benchmarks.gpu",
        "--step",
        kind,
        "--params",
        json.dumps(params),
        "--work",
        str(work),
        "--step-out",
        str(out_file),
    ]
    with open(log, "a") as f:
        f.write(f"\n===== {name}: {shlex.join(command[2:5])} (time box {timeout:.0f} s)\n")
        f.flush()
        proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            proc.wait(timeout=timeout)
            timed_out = False
        except subprocess.TimeoutExpired:
            timed_out = True
        try:  # the step's session: data-loader workers, compilers, whatever it left behind
            os.killpg(proc.pid, signal.SIGKILL)
        except OSError:  # nothing left of it
            pass
        proc.wait()
    if timed_out:
        return {"status": "timeout", "reason": f"timed out after {timeout:.0f} s (its time box or the budget left)"}
    if out_file.is_file():
        return json.loads(out_file.read_text())
    return {"status": "failed", "reason": f"exited {proc.returncode} without a result ({_last_line(log)})"}


def _last_line(log: Path) -> str:
    lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1][:300] if lines else "no output"


# --- the report ----------------------------------------------------------------------------------


def render(result: dict) -> None:
    """Tables and targets from what the steps returned so far."""
    steps = result["results"]["steps"]
    result["tables"] = [
        common.table(
            "Steps",
            ["step", "status", "seconds", "result or reason"],
            [[s["name"], s["status"], s["seconds"], s.get("summary") or s.get("reason", "")] for s in steps],
        )
    ]
    from benchmarks.gpu_steps import ENGINE_COLUMNS, SAMPLING_COLUMNS

    engine_rows = [r for s in steps if s["name"] in CELEBAHQ256_STEPS for r in s.get("rows", [])]
    sampling_rows = [r for s in steps if s["name"].startswith("sampling") for r in s.get("rows", [])]
    if engine_rows:
        result["tables"].append(common.table("celebahq256, fp16 ZeRO-2 training steps", ENGINE_COLUMNS, engine_rows))
    if sampling_rows:
        result["tables"].append(
            common.table("Sampling (whole runs of the sampling loop)", SAMPLING_COLUMNS, sampling_rows)
        )
    result["tables"] += [t for s in steps for t in s.get("tables", [])]
    data = result["results"]
    best256 = max(
        (data[n]["images_per_second"] for n in ("celebahq256_b64", "celebahq256_b64_ckpt") if n in data), default=None
    )
    fp16 = data.get("ds_fp16_zero2", {})
    result["targets"] = [
        common.target(
            "celebahq256_fp16_images_per_second",
            "celebahq256 fp16 ZeRO-2 batch 64 images/s >= the DDPM paper's 141 on a TPU v3-8",
            best256,
            141.0,
            ">=",
            unit="images/s",
        ),
        common.target(
            "fp16_nonfinite_steps",
            "no non-finite loss on an applied fp16 step (celebahq64, ZeRO-2)",
            fp16.get("nonfinite_applied_steps"),
            0.0,
            "<=",
            unit="steps",
        ),
        common.target(
            "gpu_run_seconds",
            f"the whole command within its budget ({result['config']['budget_s']:.0f} s)",
            result["seconds"],
            result["config"]["budget_s"],
            "<=",
            unit="s",
        ),
    ]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks gpu", description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=None, help="report directory (default benchmarks/results/<device>)")
    p.add_argument("--budget-s", type=float, default=480.0, help="wall-clock budget of the whole run (default 480)")
    p.add_argument(
        "--cpu-smoke", action="store_true", help="GPU-only steps report no CUDA device; the rest run at tiny sizes"
    )
    p.add_argument("--fast-sampler", default="dpmpp_2m:20", help="the sampler timed beside DDIM-50, NAME:STEPS")
    p.add_argument("--only", default="", help="comma-separated step names (default: all)")
    p.add_argument("--step", help=argparse.SUPPRESS)
    p.add_argument("--params", help=argparse.SUPPRESS)
    p.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--step-out", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.step:
        return run_step(args.step, json.loads(args.params), args.work, args.step_out)

    import torch

    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
        PYTHONUNBUFFERED="1",
    )
    if args.cpu_smoke:
        env["CUDA_VISIBLE_DEVICES"] = ""  # the smoke run is the CPU's, also on a GPU machine
    cuda = torch.cuda.is_available() and not args.cpu_smoke
    if not cuda and not args.cpu_smoke:
        print("error: no CUDA device here; run on a GPU machine, or pass --cpu-smoke", file=sys.stderr)
        return 2
    name, _, steps = args.fast_sampler.partition(":")
    if not name or not steps.isdigit():
        print(f"error: --fast-sampler {args.fast_sampler!r}: expected NAME:STEPS such as dpmpp_2m:20", file=sys.stderr)
        return 2
    params = plan(args.cpu_smoke, (name, int(steps)))
    only = [s for s in args.only.split(",") if s]
    unknown = sorted(set(only) - set(STEPS))
    if unknown:
        print(f"error: --only {','.join(unknown)}: not a step ({', '.join(STEPS)})", file=sys.stderr)
        return 2
    device = common.machine_info()["gpu"] if cuda else "cpu"
    out = args.out or REPO / "benchmarks" / "results" / (
        "cpu" if not cuda else "".join(c if c.isalnum() else "-" for c in device.lower())
    )
    out.mkdir(parents=True, exist_ok=True)
    common.COMMAND = "python -m benchmarks gpu " + " ".join(map(shlex.quote, sys.argv[2:] if argv is None else argv))
    result = common.new_result(
        "gpu",
        quick=args.cpu_smoke,
        device="cpu" if not cuda else "cuda",
        config={
            "budget_s": args.budget_s,
            "cpu_smoke": args.cpu_smoke,
            "fast_sampler": args.fast_sampler,
            "plan": params,
        },
        method=METHOD,
    )
    result["results"]["steps"], result["seconds"] = [], 0.0
    log = out / "gpu.log"
    log.write_text("")
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="ddpm-gpu-") as tmp:
        for step, (kind, gpu_only, box) in STEPS.items():
            if only and step not in only:
                continue
            left = args.budget_s - (time.monotonic() - start)
            began = time.monotonic()
            if gpu_only and not cuda:
                outcome = {"status": "skipped", "reason": "no CUDA device"}
            elif left < MIN_STEP_SECONDS:
                outcome = {"status": "skipped", "reason": f"budget exhausted ({max(left, 0):.0f} s left)"}
            else:
                outcome = spawn(step, kind, params[step], Path(tmp), min(box, left), log, env)
            if "data" in outcome:
                result["results"][step] = outcome.pop("data")
            entry = {"name": step, "seconds": round(time.monotonic() - began, 1), **outcome}
            result["results"]["steps"].append(entry)
            result["seconds"] = time.monotonic() - start
            render(result)
            common.write_result(result, out)
            print(
                f"benchmarks gpu: {step}: {entry['status']} in {entry['seconds']:.0f} s: "
                f"{entry.get('summary') or entry.get('reason', '')}",
                file=sys.stderr,
                flush=True,
            )
    print(f"benchmarks gpu: {result['seconds']:.0f} s in all -> {out / 'gpu.md'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
