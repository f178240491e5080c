"""The steps of `python -m benchmarks gpu`, each run in a process of its own by benchmarks.gpu.

A step takes its parameters (a dict) and a scratch directory and returns an `Outcome`, or raises
`Skipped` with the reason it cannot run here ("no CUDA device", "absent: ..."). Sizes come from the
parameters, so the same code runs the GPU sizes and the tiny CPU smoke sizes.
"""

from __future__ import annotations

import argparse
import functools
import importlib.metadata
import importlib.util
import itertools
import json
import math
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from benchmarks import artifacts, common
from benchmarks.record import Table, summarize, table
from benchmarks.render import fmt
from benchmarks.train import compare_with_diffusers
from export.backends import load_denoiser
from pipeline.checkpoint import checkpoint_dir
from pipeline.config import load_config
from pipeline.core.denoiser import BackendUnavailable
from pipeline.core.sampling import SAMPLERS, generate, sampler_timesteps
from pipeline.core.schedule import DiffusionSchedule
from pipeline.train import distributed
from pipeline.train.diffusion import GaussianDiffusion
from pipeline.train.ds_config import build_ds_config
from pipeline.train.resume import TrainState

REPO = Path(__file__).resolve().parent.parent
PAPER_IMAGES_PER_SECOND = 141.0  # DDPM (Ho et al. 2020), CelebA-HQ 256, TPU v3-8, batch 64
ENGINE_COLUMNS = "config | batch | checkpointing | s/step | images/s | peak GiB | paper images/s (TPU v3-8)"
SAMPLING_COLUMNS = "backend | sampler | steps | batch | evaluations/s | images/s | note"
RUNTIMES = {  # module -> the distributions that install it, in the order asked
    **{name: name for name in ("deepspeed", "diffusers", "webdataset", "submitit", "tensorrt")},
    "onnxruntime": "onnxruntime-gpu onnxruntime",
    "cuda.bindings": "cuda-bindings cuda-python",
}


@dataclass
class Outcome:
    """What a step returned, or why it did not run."""

    status: str = "ok"  # ok, skipped, failed, timeout
    reason: str = ""
    summary: str = ""
    rows: list[list] = field(default_factory=list)  # rows of the report's engine or sampling table
    tables: list[Table] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)  # the step's measurements: the driver moves them to the results
    name: str = ""  # set by the driver, with the seconds the step took
    seconds: float = 0.0


class Skipped(Exception):
    """This step cannot run on this machine; the message says why."""


def need_cuda() -> None:
    if not torch.cuda.is_available():
        raise Skipped("no CUDA device")


def installed(module: str, *dists: str) -> str:
    """The version of the first of `dists` installed, 'present' for an undistributed module, or 'absent'."""
    try:
        if importlib.util.find_spec(module) is None:
            return "absent"
    except ImportError:  # a parent package is missing
        return "absent"
    for dist in dists:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            pass
    return "present"


def env(p: dict, work: Path) -> Outcome:
    rows: list[list[Any]] = [["python", sys.version.split()[0]], ["torch", torch.__version__]]
    rows.append(["torch CUDA", torch.version.cuda])
    gpu = "no CUDA device"
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        gpu = props.name
        rows += [["GPU", gpu], ["GPU memory GiB", round(props.total_memory / 2**30, 1)]]
        rows += [["compute capability", f"{props.major}.{props.minor}"]]
    rows += [[module, installed(module, *dists.split())] for module, dists in RUNTIMES.items()]
    try:
        import onnxruntime  # optional runtime: its providers, where it is installed

        rows.append(["onnxruntime providers", ", ".join(onnxruntime.get_available_providers())])
    except ImportError:
        pass
    environment = table("Environment", "what | value", rows)
    return Outcome(summary=f"{gpu}; torch {torch.__version__}", tables=[environment], data={str(k): v for k, v in rows})


def _train(p: dict, run_dir: Path, shards: Path, max_steps: int) -> int:
    from pipeline.train.loop import train  # webdataset, deepspeed: wheels on the lent machine (env reports them)

    ckpt = str(p["grad_checkpointing"]).lower()
    overrides = [f"data.shards={shards}", f"run.dir={run_dir}", f"train.max_steps={max_steps}", "train.warmup_steps=10"]
    overrides += [f"zero.stage={p['stage']}", f"train.precision={p['precision']}", f"train.grad_checkpointing={ckpt}"]
    overrides += [f"train.checkpoint_every={p['checkpoint_every']}", "log.every=1", "log.sample_every=0"]
    overrides += ["log.tensorboard=false", *p.get("overrides", [])]
    return train(load_config(REPO / "configs" / f"{p['config']}.yaml", overrides))


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def ds_train(p: dict, work: Path) -> Outcome:
    """p: config, precision, stage, steps, grad_checkpointing, checkpoint_every, resume, image_size,
    images, overrides. Trains through pipeline.train (the real loop) and reads its metrics.jsonl."""
    if p["precision"] == "fp16":
        need_cuda()
    shards = work / f"synthetic{p['image_size']}"
    if not (shards / "manifest.json").is_file():
        cmd = [sys.executable, "-m", "data_prep", "--synthetic", str(p["images"]), "--out", str(shards)]
        subprocess.run([*cmd, "--size", str(p["image_size"])], cwd=REPO, check=True, capture_output=True, text=True)
    run = work / f"run-{p['precision']}-zero{p['stage']}"
    shutil.rmtree(run, ignore_errors=True)
    start = time.perf_counter()
    status = _train(p, run, shards, p["steps"])
    seconds = time.perf_counter() - start
    rows = _metrics(run) if (run / "metrics.jsonl").is_file() else []
    if status != 0:
        raise RuntimeError(f"pipeline.train exited {status} after {len(rows)} logged steps")
    timed = rows[min(5, len(rows) - 1) :]  # the first steps include cuDNN autotuning and allocator growth
    scales = [(r["step"], r["loss_scale"]) for r in rows if r.get("loss_scale") is not None]
    trace = [s for i, s in enumerate(scales) if i == 0 or s[1] != scales[i - 1][1]]
    applied = [r for r in rows if not r["skipped_steps"]]
    data = {
        "steps": len(rows),
        "seconds": seconds,
        "images_per_second": statistics.median(r["images_per_second"] for r in timed),
        "peak_gpu_mem_gb": max((r["gpu_mem_gb"] for r in rows if "gpu_mem_gb" in r), default=None),
        "skipped_steps": sum(r["skipped_steps"] for r in rows),
        "nonfinite_applied_steps": sum(not math.isfinite(r["loss"]) for r in applied),
        "loss_first": rows[0]["loss"],
        "loss_last": rows[-1]["loss"],
        "loss_scale_trace": trace,
        "grad_norm_on_skipped_steps": [r["grad_norm"] for r in rows if r["skipped_steps"]][:5],
    }
    if p.get("resume"):
        data["resume"] = _resume_check(p, run, shards, rows)
    table_rows = [[k, json.dumps(v)[:120] if isinstance(v, list) else v] for k, v in data.items() if k != "resume"]
    table_rows += [[f"resume {k}", v] for k, v in data.get("resume", {}).items()]
    title = f"{p['config']} {p['precision']} ZeRO-{p['stage']}{' + checkpointing' if p['grad_checkpointing'] else ''}"
    summary = f"{data['images_per_second']:.0f} images/s, {data['skipped_steps']} skipped, loss scale "
    summary += f"{trace[-1][1] if trace else '-'}, {data['nonfinite_applied_steps']} non-finite"
    summary += f"; resume {data['resume']['verdict']}" if p.get("resume") else ""
    return Outcome(summary=summary, tables=[table(title, "metric | value", table_rows)], data=data)


def _resume_check(p: dict, run: Path, shards: Path, rows: list[dict]) -> dict:
    """Resume a copy of the run from its middle checkpoint and compare the steps after it."""
    middle = p["checkpoint_every"]
    copy = run.with_name(run.name + "-resumed")
    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns(checkpoint_dir(run, p["steps"]).name))
    if _train(p, copy, shards, p["steps"]) != 0:
        raise RuntimeError("the resumed run failed")
    again = {r["step"]: r for r in _metrics(copy)}
    pairs = [(r, again[r["step"]]) for r in rows if r["step"] > middle and r["step"] in again]
    expected = sum(r["step"] > middle for r in rows)
    diff = max((abs(a["loss"] - b["loss"]) for a, b in pairs), default=float("nan"))
    if len(pairs) < expected:
        verdict = f"only {len(pairs)} of {expected} steps re-run"
    elif diff == 0:
        verdict = "bit-exact"
    else:
        verdict = (
            f"max |loss difference| {diff:.2e}: expected from cuDNN's non-deterministic backward kernels (atomic "
            f"adds; torch.use_deterministic_algorithms is off); the same check is bit-exact on CPU, where data, "
            f"noise and RNG are the only sources"
        )
    same_scale = all(a.get("loss_scale") == b.get("loss_scale") for a, b in pairs)
    result = {"from_step": middle, "steps_compared": len(pairs), "max_loss_difference": diff}
    return result | {"loss_scale_trace_equal": same_scale, "verdict": verdict}


def engine_steps(p: dict, work: Path) -> Outcome:
    """p: config, precision, stage, batch, grad_checkpointing, warmup, steps. pipeline.train's
    engine and train_step on one synthetic batch held in memory (no data loading)."""
    from pipeline.train.loop import build_engine, train_step  # webdataset: a wheel on the lent machine

    if p["precision"] == "fp16":
        need_cuda()
    overrides = [f"train.batch_size={p['batch']}", "train.micro_batch_size=0", f"train.precision={p['precision']}"]
    overrides += [f"zero.stage={p['stage']}", f"train.grad_checkpointing={str(p['grad_checkpointing']).lower()}"]
    cfg = load_config(REPO / "configs" / f"{p['config']}.yaml", overrides)
    env = distributed.read_env({})
    engine = build_engine(cfg, build_ds_config(cfg, 1), distributed.init(env))
    diffusion = GaussianDiffusion(DiffusionSchedule.from_config(cfg.diffusion))
    x0 = torch.rand(p["batch"], cfg.model.in_channels, cfg.model.image_size, cfg.model.image_size) * 2 - 1
    batches, state, sync = itertools.repeat(x0), TrainState(), common.cuda_sync(str(env.device))
    for _ in range(p["warmup"]):
        train_step(engine, diffusion, batches, state, 0, env)
    sync()
    if env.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    step = functools.partial(train_step, engine, diffusion, batches, state, 0, env)
    times = [common.time_call(step, sync) for _ in range(p["steps"])]
    seconds = statistics.median(times)
    peak = torch.cuda.max_memory_allocated() / 2**30 if env.device.type == "cuda" else None
    data = {
        "batch": p["batch"],
        "grad_checkpointing": p["grad_checkpointing"],
        "seconds_per_step": seconds,
        "images_per_second": p["batch"] / seconds,
        "peak_gpu_mem_gib": peak,
        "paper_tpu_v3_8_images_per_second": PAPER_IMAGES_PER_SECOND,
        "step_seconds": summarize(times),
        "skipped_steps": int(engine.skipped_steps) if hasattr(engine, "skipped_steps") else None,
    }
    row = [p["config"], p["batch"], p["grad_checkpointing"], seconds, data["images_per_second"], peak]
    ckpt = " ckpt" if p["grad_checkpointing"] else ""
    summary = f"batch {p['batch']}{ckpt}: {data['images_per_second']:.0f} images/s, peak {fmt(peak)} GiB"
    return Outcome(summary=summary, rows=[row + [PAPER_IMAGES_PER_SECOND]], data=data)


def unet_vs_diffusers(p: dict, work: Path) -> Outcome:
    """p: config, batch, warmup, repeats. The train benchmark's comparison, NCHW-contiguous, the config's precision."""
    if importlib.util.find_spec("diffusers") is None:
        raise Skipped("absent: diffusers is not installed (make gpu-wheels carries it)")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    timing = argparse.Namespace(**p, device=device, contiguous_only=True, profile=False)  # as train's flags
    cfg = load_config(REPO / "configs" / f"{p['config']}.yaml")
    (r,) = compare_with_diffusers(cfg, p["config"], [p["batch"]], timing, common.no_progress())
    rows = [[name, r.batch, r.precision, s.median, r.images_per_second[name]] for name, s in r.seconds.items()]
    title = f"Training step, {p['config']}: ours vs diffusers UNet2DModel"
    return Outcome(
        summary=f"ours {r.speedup.median:.2f}x diffusers' speed ({r.precision}, batch {r.batch})",
        tables=[table(title, "model | batch | precision | s/step | images/s", rows)],
        data={"speedup": r.speedup, "seconds": r.seconds, "max_output_difference": r.max_output_difference},
    )


def denoiser_for(backend: str, cfg, batches: list[int]):
    """The denoiser a backend name stands for; Skipped where it cannot run here."""
    if backend == "torch-eager":
        device = "cuda" if torch.cuda.is_available() else "cpu"
        return load_denoiser(artifacts.random_checkpoint(cfg), device=device, half=device == "cuda")
    need_cuda()
    if backend == "torch-graphs":  # a candidate of ours: fp16, channels_last, one CUDA graph per batch size
        ckpt = artifacts.random_checkpoint(cfg)
        return load_denoiser(ckpt, device="cuda", half=True, channels_last=True, cuda_graphs=True)
    if backend == "onnxruntime-cuda":
        import onnxruntime  # optional runtime: onnxruntime-gpu is not carried to the lent machine

        if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
            version = onnxruntime.__version__
            raise Skipped(
                f"absent: onnxruntime {version} has no CUDAExecutionProvider (onnxruntime-gpu is not installed)"
            )
        try:
            return load_denoiser(artifacts.onnx_model(cfg, fp16=True), provider="cuda")
        except BackendUnavailable as e:
            raise Skipped(f"absent: {e}") from None
    if backend == "tensorrt":
        reason = artifacts.tensorrt_available()
        if reason:
            raise Skipped(f"absent: {reason}")
        return load_denoiser(artifacts.tensorrt_engine(cfg, (min(batches), max(batches), max(batches)), fp16=True))
    raise ValueError(f"unknown backend {backend!r}")


def sampling(p: dict, work: Path) -> Outcome:
    """p: backend, config, batches, samplers [[name, steps], ...]. Whole sampling runs through the
    one sampling loop: network evaluations per second and images per second."""
    denoiser = denoiser_for(p["backend"], artifacts.config(p["config"]), p["batches"])
    rows, runs = [], []
    for sampler, steps in p["samplers"]:
        if sampler not in SAMPLERS:
            rows.append([denoiser.name, sampler, steps, None, None, None, "not in pipeline.core.sampling.SAMPLERS"])
            continue
        for batch in p["batches"]:
            generate(denoiser, batch, batch=batch, sampler=sampler, steps=2, seed=1)  # warm-up / capture
            run = functools.partial(generate, denoiser, batch, batch=batch, sampler=sampler, steps=steps, seed=0)
            seconds = common.time_call(run)
            nfe = len(sampler_timesteps(denoiser.info.schedule(), sampler, steps)) / seconds
            rows.append([denoiser.name, sampler, steps, batch, nfe, batch / seconds, ""])
            runs.append({"sampler": sampler, "steps": steps, "batch": batch, "seconds": seconds})
            runs[-1] |= {"evaluations_per_second": nfe, "images_per_second": batch / seconds}
    best = max(runs, key=lambda r: r["images_per_second"], default=None)
    summary = f"{denoiser.name}: nothing timed"
    if best:
        at = f"({best['sampler']}-{best['steps']}, batch {best['batch']})"
        summary = f"{denoiser.name}: best {best['images_per_second']:.1f} images/s {at}"
    return Outcome(summary=summary, rows=rows, data={"backend": denoiser.name, "runs": runs})
