"""Every GPU path in one prepared command, each step time-boxed, the report written as it goes.

  python -m benchmarks gpu [--out DIR] [--budget-s 480] [--cpu-smoke] [--fast-sampler dpmpp_2m:20]

Made for a GPU machine lent for minutes, with no package registry (`make gpu-wheels` carries DeepSpeed, diffusers,
WebDataset, submitit as wheels). The steps (STEPS, in order; sizes in step_params()): the environment; DeepSpeed ZeRO-2
fp16 (dynamic loss scaling, checkpointing) through pipeline.train on synthetic celebahq64 faces, with a resume from
the middle checkpoint compared step by step, then bf16 ZeRO-2 and fp16 ZeRO-3; celebahq256 fp16 ZeRO-2 training
steps at batch 16 and 64 with and without checkpointing, beside the paper's 141 images/s (TPU v3-8); sampling with
DDIM-50 and a faster sampler through torch eager, torch with CUDA graphs, onnxruntime CUDA and TensorRT, and our
U-Net against diffusers' UNet2DModel. Each step runs in a process of its own under a time limit (a hang, an
out-of-memory or a crash costs that step only, recorded with its reason); the whole run stays within --budget-s.
--cpu-smoke runs the same command on a CPU at tiny sizes, GPU-only steps reporting "no CUDA device" (a test runs
it, so the command cannot rot).

On the lent machine, after `make gpu-wheels` here (carry `.whl`), one call:
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl &&
  PYTHONPATH=/tmp/site python3 -m benchmarks gpu --out $OUT/gpu
then commit $OUT/gpu/gpu.{json,md} under benchmarks/results/<device kind>/.
"""

from __future__ import annotations

import argparse
import dataclasses
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
from typing import NamedTuple

import torch

from benchmarks import common, gpu_steps, render
from benchmarks.gpu_steps import ENGINE_COLUMNS, SAMPLING_COLUMNS, Outcome, Skipped
from benchmarks.record import Result, from_json, table, target
from pipeline.train import distributed

REPO = Path(__file__).resolve().parent.parent
FLAGS = ("out",)  # sizes: --cpu-smoke; the device: the lent GPU
MIN_STEP_SECONDS = 5.0  # less is not worth starting a process for

METHOD = """
Each step is `python -m benchmarks gpu --step KIND --params JSON` in a new process session, killed
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


Step = NamedTuple("Step", [("kind", str), ("gpu_only", bool), ("box_s", int)])  # kind: the gpu_steps function
EngineCase = NamedTuple("EngineCase", [("batch", int), ("grad_checkpointing", bool)])

# The celebahq256 training steps: celebahq256_b16, _b16_ckpt, _b64, _b64_ckpt
CELEBAHQ256 = {f"celebahq256_b{b}{'_ckpt' if c else ''}": EngineCase(b, c) for b in (16, 64) for c in (False, True)}
STEPS = {  # in the order they run
    "env": Step("env", False, 60),
    "ds_fp16_zero2": Step("ds_train", True, 240),
    "ds_bf16_zero2": Step("ds_train", False, 90),
    "ds_fp16_zero3": Step("ds_train", True, 90),
    **dict.fromkeys(CELEBAHQ256, Step("engine_steps", True, 90)),
    "sampling_torch_eager": Step("sampling", False, 120),
    "sampling_torch_graphs": Step("sampling", True, 120),
    "unet_vs_diffusers": Step("unet_vs_diffusers", False, 90),
    "sampling_onnxruntime_cuda": Step("sampling", True, 120),
    "sampling_tensorrt": Step("sampling", True, 240),
}
SAMPLING_BACKENDS = ("torch-eager", "torch-graphs", "onnxruntime-cuda", "tensorrt")  # step sampling_<backend>
TINY_MODEL = "model.image_size=16 model.ch=32 model.ch_mult=[1,2] model.num_res_blocks=1 model.attn_resolutions=[8]"
TINY_MODEL += " data.num_workers=0 data.shuffle_buffer=50 train.batch_size=8"


def step_params(smoke: bool, fast: tuple[str, int]) -> dict[str, dict]:
    """Parameters of every step: the GPU sizes, or tiny ones for --cpu-smoke."""
    train = {"config": "celebahq64", "image_size": 64, "images": 512, "grad_checkpointing": True}
    train |= {"checkpoint_every": 1000, "resume": False, "overrides": ["data.num_workers=6"]}
    if smoke:
        train |= {"config": "tiny_cpu", "image_size": 16, "images": 64, "overrides": TINY_MODEL.split()}
    samplers = [["ddim", 3 if smoke else 50], [fast[0], 3 if smoke else fast[1]]]
    sample: dict = {"config": "tiny_cpu" if smoke else "celebahq256", "batches": [1, 2] if smoke else [1, 16, 64]}
    sample["samplers"] = samplers
    engine = {"config": "celebahq256", "precision": "fp16", "stage": 2, "warmup": 2, "steps": 5}
    bf16 = {"steps": 4, "checkpoint_every": 2, "resume": True} if smoke else {"steps": 10}  # the CPU's resume check
    diffusers = {"config": "celebahq64", "batch": 64, "warmup": 3, "repeats": 10}  # precision: the config's (fp16)
    if smoke:
        diffusers = {"config": "tiny_cpu", "batch": 4, "warmup": 1, "repeats": 2}  # fp32 on CPU
    fp16 = {"precision": "fp16", "stage": 2, "steps": 100, "checkpoint_every": 50, "resume": True}
    return {
        "env": {},
        "ds_fp16_zero2": {**train, **fp16},
        "ds_bf16_zero2": {**train, "precision": "bf16", "stage": 2, **bf16},
        "ds_fp16_zero3": {**train, "precision": "fp16", "stage": 3, "steps": 10},
        "unet_vs_diffusers": diffusers,
        **{name: {**engine, **case._asdict()} for name, case in CELEBAHQ256.items()},
        **{f"sampling_{b.replace('-', '_')}": {**sample, "backend": b} for b in SAMPLING_BACKENDS},
    }


def run_step(kind: str, params: dict, work: Path, out_file: Path) -> None:
    """One step, in the process spawn() started: its Outcome to `out_file`, whatever happens."""
    try:
        outcome = getattr(gpu_steps, kind)(params, work)
    except Skipped as e:
        outcome = Outcome("skipped", str(e))
    except Exception as e:
        traceback.print_exc()
        outcome = Outcome("failed", f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300])
    finally:
        distributed.shutdown()  # NCCL wants its process group destroyed before the process exits
    out_file.write_text(json.dumps(dataclasses.asdict(outcome), default=str))


def spawn(name: str, step: Step, params: dict, work: Path, timeout: float, log: Path, env: dict) -> Outcome:
    """Run one step in a new session; kill the whole session when it overruns."""
    out_file = work / f"{name}.result.json"
    out_file.unlink(missing_ok=True)
    command = [sys.executable, "-m", "benchmarks", "gpu", "--step", step.kind, "--params", json.dumps(params)]
    command += ["--work", str(work), "--step-out", str(out_file)]
    with open(log, "a") as f:
        f.write(f"\n===== {name}: {shlex.join(command[2:6])} (time box {timeout:.0f} s)\n")
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
        return Outcome("timeout", f"timed out after {timeout:.0f} s (its time box or the budget left)")
    if out_file.is_file():
        return from_json(Outcome, json.loads(out_file.read_text()))
    lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()] or ["no output"]
    return Outcome("failed", f"exited {proc.returncode} without a result ({lines[-1][:300]})")


def report(result: Result) -> None:
    """Tables and targets from what the steps returned so far."""
    steps, data = result.results["steps"], result.results
    rows = [[s.name, s.status, s.seconds, s.summary or s.reason] for s in steps]
    result.tables = [table("Steps", "step | status | seconds | result or reason", rows)]
    engine = [r for s in steps if s.name in CELEBAHQ256 for r in s.rows]
    sampling = [r for s in steps if s.name.startswith("sampling") for r in s.rows]
    result.tables += [table("celebahq256, fp16 ZeRO-2 training steps", ENGINE_COLUMNS, engine)] if engine else []
    sampling_title = "Sampling (whole runs of the sampling loop)"
    result.tables += [table(sampling_title, SAMPLING_COLUMNS, sampling)] if sampling else []
    result.tables += [t for s in steps for t in s.tables]
    b64 = [data[n]["images_per_second"] for n in ("celebahq256_b64", "celebahq256_b64_ckpt") if n in data]
    nonfinite = data.get("ds_fp16_zero2", {}).get("nonfinite_applied_steps")
    paper = "celebahq256 fp16 ZeRO-2 batch 64 images/s >= the DDPM paper's 141 on a TPU v3-8"
    finite = "no non-finite loss on an applied fp16 step (celebahq64, ZeRO-2)"
    budget = result.config["budget_s"]
    result.targets = [
        target("celebahq256_fp16_images_per_second", paper, max(b64, default=None), 141.0, ">=", unit="images/s"),
        target("fp16_nonfinite_steps", finite, nonfinite, 0.0, "<=", unit="steps"),
        target(
            "gpu_run_seconds", f"the whole command within its budget ({budget:.0f} s)", result.seconds, budget, "<="
        ),
    ]
    result.targets[-1].unit = "s"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--budget-s", type=float, default=480.0, help="wall-clock budget of the whole run (default 480)")
    p.add_argument("--cpu-smoke", action="store_true", help="GPU-only steps report no CUDA device; the rest run tiny")
    p.add_argument("--fast-sampler", default="dpmpp_2m:20", help="the sampler timed beside DDIM-50, NAME:STEPS")
    p.add_argument("--only", default="", help="comma-separated step names (default: all)")
    for hidden in ("--step", "--params", "--work", "--step-out"):  # one step, in the process spawn() starts
        p.add_argument(hidden, help=argparse.SUPPRESS)


def defaults(p: argparse.ArgumentParser, args) -> None:
    name, _, steps = args.fast_sampler.partition(":")
    if not name or not steps.isdigit():
        p.error(f"--fast-sampler {args.fast_sampler!r}: expected NAME:STEPS such as dpmpp_2m:20")
    unknown = sorted({s for s in args.only.split(",") if s} - set(STEPS))
    if unknown:
        p.error(f"--only {','.join(unknown)}: not a step ({', '.join(STEPS)})")
    if not args.step and not args.cpu_smoke and not torch.cuda.is_available():
        p.error("no CUDA device here; run on a GPU machine, or pass --cpu-smoke")


def run(args, progress) -> Result | None:
    if args.step:
        run_step(args.step, json.loads(args.params), Path(args.work), Path(args.step_out))
        return None
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, PYTHONPATH=path, PYTHONUNBUFFERED="1")
    if args.cpu_smoke:
        env["CUDA_VISIBLE_DEVICES"] = ""  # the smoke run is the CPU's, also on a GPU machine
    name, _, fast_steps = args.fast_sampler.partition(":")
    params, only = step_params(args.cpu_smoke, (name, int(fast_steps))), [s for s in args.only.split(",") if s]
    config = {"budget_s": args.budget_s, "cpu_smoke": args.cpu_smoke, "fast_sampler": args.fast_sampler}
    device, config["step_params"] = "cpu" if args.cpu_smoke else "cuda", params
    result = common.new_result("gpu", quick=args.cpu_smoke, device=device, config=config, method=METHOD)
    kind = "".join(c if c.isalnum() else "-" for c in (result.machine.gpu or "").lower())
    args.out = args.out or REPO / "benchmarks" / "results" / ("cpu" if args.cpu_smoke else kind)
    args.out.mkdir(parents=True, exist_ok=True)
    result.results, log, start = {"steps": []}, args.out / "gpu.log", time.monotonic()
    log.write_text("")
    with tempfile.TemporaryDirectory(prefix="ddpm-gpu-") as tmp:
        for name, step in STEPS.items():
            if only and name not in only:
                continue
            left, began = args.budget_s - (time.monotonic() - start), time.monotonic()
            if step.gpu_only and args.cpu_smoke:
                outcome = Outcome("skipped", "no CUDA device")
            elif left < MIN_STEP_SECONDS:
                outcome = Outcome("skipped", f"budget exhausted ({max(left, 0):.0f} s left)")
            else:
                outcome = spawn(name, step, params[name], Path(tmp), min(step.box_s, left), log, env)
            if outcome.data:
                result.results[name] = outcome.data
            outcome.name, outcome.seconds, outcome.data = name, round(time.monotonic() - began, 1), {}
            result.results["steps"].append(outcome)
            result.seconds = time.monotonic() - start
            report(result)
            render.write(result, args.out)
            said = f"{name}: {outcome.status} in {outcome.seconds:.0f} s: {outcome.summary or outcome.reason}"
            print(f"benchmarks gpu: {said}", file=sys.stderr, flush=True)
    print(f"benchmarks gpu: {result.seconds:.0f} s in all -> {args.out / 'gpu.md'}", file=sys.stderr)
    return result
