"""The steps of `python -m benchmarks gpu`, each run in a process of its own by benchmarks.gpu.

A step takes its parameters (a dict) and a scratch directory and returns
{"summary": one line, "tables": [common.table ...], "data": {...}}, or raises `Skipped` with the
reason it cannot run here ("no CUDA device", "absent: ..."). Sizes come from the parameters, so
the same code runs the GPU plan and the tiny CPU smoke plan.
"""

from __future__ import annotations

import importlib
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
from pathlib import Path

from benchmarks import common

REPO = Path(__file__).resolve().parent.parent
PAPER_IMAGES_PER_SECOND = 141.0  # DDPM (Ho et al. 2020), CelebA-HQ 256, TPU v3-8, batch 64


class Skipped(Exception):
    """This step cannot run on this machine; the message says why."""


def need_cuda() -> None:
    import torch

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


# --- environment ----------------------------------------------------------------------------------


def env(p: dict, work: Path) -> dict:
    import torch

    rows = [["python", sys.version.split()[0]], ["torch", torch.__version__], ["torch CUDA", torch.version.cuda]]
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        rows += [
            ["GPU", props.name],
            ["GPU memory GiB", round(props.total_memory / 2**30, 1)],
            ["compute capability", f"{props.major}.{props.minor}"],
        ]
    for module, *dists in (
        ("deepspeed", "deepspeed"),
        ("diffusers", "diffusers"),
        ("webdataset", "webdataset"),
        ("submitit", "submitit"),
        ("onnxruntime", "onnxruntime-gpu", "onnxruntime"),
        ("tensorrt", "tensorrt"),
        ("cuda.bindings", "cuda-bindings", "cuda-python"),
    ):
        rows.append([module, installed(module, *dists)])
    try:
        import onnxruntime

        rows.append(["onnxruntime providers", ", ".join(onnxruntime.get_available_providers())])
    except ImportError:
        pass
    gpu = rows[3][1] if torch.cuda.is_available() else "no CUDA device"
    return {
        "summary": f"{gpu}; torch {torch.__version__}",
        "tables": [common.table("Environment", ["what", "value"], rows)],
        "data": dict((str(k), v) for k, v in rows),
    }


# --- DeepSpeed training through pipeline.train ----------------------------------------------------


def make_shards(work: Path, size: int, count: int) -> Path:
    out = work / f"synthetic{size}"
    if not (out / "manifest.json").is_file():
        subprocess.run(
            [sys.executable, "-m", "data_prep", "--synthetic", str(count), "--out", str(out), "--size", str(size)],
            cwd=REPO,
            check=True,
            capture_output=True,
            text=True,
        )
    return out


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def _train(p: dict, run_dir: Path, shards: Path, max_steps: int) -> int:
    from pipeline.config import load_config
    from pipeline.train.loop import train

    overrides = [
        f"data.shards={shards}",
        f"run.dir={run_dir}",
        f"train.max_steps={max_steps}",
        f"train.precision={p['precision']}",
        f"zero.stage={p['stage']}",
        f"train.grad_checkpointing={str(p['grad_checkpointing']).lower()}",
        f"train.checkpoint_every={p['checkpoint_every']}",
        "log.every=1",
        "log.sample_every=0",
        "log.tensorboard=false",
        "train.warmup_steps=10",
        *p.get("overrides", []),
    ]
    return train(load_config(REPO / "configs" / f"{p['config']}.yaml", overrides))


def ds_train(p: dict, work: Path) -> dict:
    """p: config, precision, stage, steps, grad_checkpointing, checkpoint_every, resume, image_size,
    images, overrides. Trains through pipeline.train (the real loop) and reads its metrics.jsonl."""
    if p["precision"] == "fp16":
        need_cuda()
    shards = make_shards(work, p["image_size"], p["images"])
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
    table_rows = [
        [k, v if not isinstance(v, list) else json.dumps(v)[:120]] for k, v in data.items() if k != "resume"
    ] + [[f"resume {k}", v] for k, v in data.get("resume", {}).items()]
    title = f"{p['config']} {p['precision']} ZeRO-{p['stage']}{' + checkpointing' if p['grad_checkpointing'] else ''}"
    return {
        "summary": f"{data['images_per_second']:.0f} images/s, {data['skipped_steps']} skipped, loss scale "
        f"{trace[-1][1] if trace else '-'}, {data['nonfinite_applied_steps']} non-finite"
        + (f"; resume {data['resume']['verdict']}" if p.get("resume") else ""),
        "tables": [common.table(title, ["metric", "value"], table_rows)],
        "data": data,
    }


def _resume_check(p: dict, run: Path, shards: Path, rows: list[dict]) -> dict:
    """Resume a copy of the run from its middle checkpoint and compare the steps after it."""
    from pipeline.checkpoint import checkpoint_dir

    middle = p["checkpoint_every"]
    copy = run.with_name(run.name + "-resumed")
    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns(checkpoint_dir(run, p["steps"]).name))
    if _train(p, copy, shards, p["steps"]) != 0:
        raise RuntimeError("the resumed run failed")
    again = {r["step"]: r for r in _metrics(copy)}
    pairs = [(r, again.get(r["step"])) for r in rows if r["step"] > middle]
    losses = [(a["loss"], b["loss"]) for a, b in pairs if b is not None]
    diff = max((abs(a - b) for a, b in losses), default=float("nan"))
    same_scale = all(a.get("loss_scale") == b.get("loss_scale") for a, b in pairs if b is not None)
    verdict = (
        "bit-exact"
        if diff == 0 and len(losses) == len(pairs)
        else (
            f"max |loss difference| {diff:.2e}: expected from cuDNN's non-deterministic backward kernels (atomic "
            f"adds; torch.use_deterministic_algorithms is off); the same check is bit-exact on CPU, where data, "
            f"noise and RNG are the only sources"
            if len(losses) == len(pairs)
            else f"only {len(losses)} of {len(pairs)} steps re-run"
        )
    )
    return {
        "from_step": middle,
        "steps_compared": len(losses),
        "max_loss_difference": diff,
        "loss_scale_trace_equal": same_scale,
        "verdict": verdict,
    }


# --- DeepSpeed engine steps on in-memory batches --------------------------------------------------


def engine_steps(p: dict, work: Path) -> dict:
    """p: config, precision, stage, batch, grad_checkpointing, warmup, steps. pipeline.train's
    engine and train_step on one synthetic batch held in memory (no data loading)."""
    import torch
    from pipeline.train import distributed
    from pipeline.config import load_config
    from pipeline.train.diffusion import GaussianDiffusion, schedule_from_config
    from pipeline.train.ds_config import build_ds_config
    from pipeline.train.loop import TrainState, build_engine, train_step

    if p["precision"] == "fp16":
        need_cuda()
    cfg = load_config(
        REPO / "configs" / f"{p['config']}.yaml",
        [
            f"train.batch_size={p['batch']}",
            "train.micro_batch_size=0",
            f"train.precision={p['precision']}",
            f"zero.stage={p['stage']}",
            f"train.grad_checkpointing={str(p['grad_checkpointing']).lower()}",
        ],
    )
    env = distributed.read_env({})
    deepspeed = distributed.init(env)
    engine = build_engine(cfg, build_ds_config(cfg, 1), deepspeed)
    diffusion = GaussianDiffusion(schedule_from_config(cfg.diffusion))
    x0 = torch.rand(p["batch"], cfg.model.in_channels, cfg.model.image_size, cfg.model.image_size) * 2 - 1
    batches = itertools.repeat(x0)
    state, sync = TrainState(), common.cuda_sync(str(env.device))
    for _ in range(p["warmup"]):
        train_step(engine, diffusion, batches, state, 0, env)
    sync()
    if env.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(p["steps"]):
        times.append(common.time_call(lambda: train_step(engine, diffusion, batches, state, 0, env), sync))
    seconds = statistics.median(times)
    peak = torch.cuda.max_memory_allocated() / 2**30 if env.device.type == "cuda" else None
    data = {
        "batch": p["batch"],
        "grad_checkpointing": p["grad_checkpointing"],
        "seconds_per_step": seconds,
        "images_per_second": p["batch"] / seconds,
        "peak_gpu_mem_gib": peak,
        "paper_tpu_v3_8_images_per_second": PAPER_IMAGES_PER_SECOND,
        "step_seconds": common.summarize(times),
        "skipped_steps": int(engine.skipped_steps) if hasattr(engine, "skipped_steps") else None,
    }
    row = [
        p["config"],
        p["batch"],
        p["grad_checkpointing"],
        seconds,
        data["images_per_second"],
        peak,
        PAPER_IMAGES_PER_SECOND,
    ]
    return {
        "summary": f"batch {p['batch']}{' ckpt' if p['grad_checkpointing'] else ''}: "
        f"{data['images_per_second']:.0f} images/s, peak {common.fmt(peak)} GiB",
        "rows": [row],
        "data": data,
    }


ENGINE_COLUMNS = ["config", "batch", "checkpointing", "s/step", "images/s", "peak GiB", "paper images/s (TPU v3-8)"]


# --- our U-Net against diffusers' ---------------------------------------------------------------


def unet_vs_diffusers(p: dict, work: Path) -> dict:
    """p: config, batch, precision, warmup, repeats. One training step each, interleaved."""
    if importlib.util.find_spec("diffusers") is None:
        raise Skipped("absent: diffusers is not installed (make gpu-wheels carries it)")
    import torch
    from benchmarks.train_step import build_pair, make_batch, make_train_step
    from pipeline.config import load_config
    from pipeline.train.diffusion import GaussianDiffusion, schedule_from_config

    device = "cuda" if torch.cuda.is_available() else "cpu"
    cfg = load_config(REPO / "configs" / f"{p['config']}.yaml")
    ours, theirs, difference = build_pair(cfg.model, device)
    diffusion = GaussianDiffusion(schedule_from_config(cfg.diffusion))
    batch = make_batch(cfg.model, p["batch"], device)
    steps = {
        "ours": make_train_step(ours, diffusion, batch, device, p["precision"]),
        "diffusers": make_train_step(theirs, diffusion, batch, device, p["precision"]),
    }
    times = common.interleaved(steps, warmup=p["warmup"], repeats=p["repeats"], sync=common.cuda_sync(device))
    ratio = common.paired_ratio(times["diffusers"], times["ours"])
    rows = [
        [name, p["batch"], p["precision"], statistics.median(t), p["batch"] / statistics.median(t)]
        for name, t in times.items()
    ]
    return {
        "summary": f"ours {ratio['median']:.2f}x diffusers' speed ({p['precision']}, batch {p['batch']})",
        "tables": [
            common.table(
                f"Training step, {p['config']}: ours vs diffusers UNet2DModel",
                ["model", "batch", "precision", "s/step", "images/s"],
                rows,
            )
        ],
        "data": {
            "speedup": ratio,
            "seconds": {k: common.summarize(v) for k, v in times.items()},
            "max_output_difference": difference,
        },
    }


# --- sampling -----------------------------------------------------------------------------------


def sampling(p: dict, work: Path) -> dict:
    """p: backend, config, batches, samplers [[name, steps], ...]. Whole sampling runs through the
    one sampling loop: network evaluations per second and images per second."""
    from benchmarks import artifacts
    from benchmarks.gpu_backends import denoiser_for  # it imports Skipped from here

    core = importlib.import_module("pipeline.core.sampling")
    cfg = artifacts.config(p["config"])
    denoiser, batches = denoiser_for(p["backend"], artifacts.random_checkpoint(cfg), cfg, p)
    rows, data = [], []
    for sampler, steps in p["samplers"]:
        if sampler not in core.SAMPLERS:
            rows.append([denoiser.name, sampler, steps, None, None, None, f"not in {core.__name__}.SAMPLERS"])
            continue
        for batch in batches:
            core.generate(denoiser, batch, batch=batch, sampler=sampler, steps=2, seed=1)  # warm-up / capture
            seconds = common.time_call(
                lambda: core.generate(denoiser, batch, batch=batch, sampler=sampler, steps=steps, seed=0)
            )
            nfe = len(core.sampler_timesteps(denoiser.info.schedule(), sampler, steps)) / seconds
            rows.append([denoiser.name, sampler, steps, batch, nfe, batch / seconds, ""])
            data.append(
                {
                    "sampler": sampler,
                    "steps": steps,
                    "batch": batch,
                    "seconds": seconds,
                    "evaluations_per_second": nfe,
                    "images_per_second": batch / seconds,
                }
            )
    best = max(data, key=lambda r: r["images_per_second"], default=None)
    summary = (
        f"{denoiser.name}: best {best['images_per_second']:.1f} images/s ({best['sampler']}-{best['steps']}, "
        f"batch {best['batch']})"
        if best
        else f"{denoiser.name}: nothing timed"
    )
    return {"summary": summary, "rows": rows, "data": {"backend": denoiser.name, "runs": data}}


SAMPLING_COLUMNS = ["backend", "sampler", "steps", "batch", "evaluations/s", "images/s", "note"]
