"""Training-step benchmark: our U-Net vs diffusers' UNet2DModel, gradient checkpointing, ZeRO memory.

  python -m benchmarks train [--quick] [--device cpu|cuda] [--out DIR]

1. images/s of one full training step (q_sample, forward, MSE loss, backward, AdamW step) for
   `pipeline.model.unet.UNet` and the same architecture built as `diffusers.UNet2DModel`, at the same
   config, batch and precision; the two are timed interleaved and shown to compute the same function.
2. Our U-Net with and without gradient checkpointing: time ratio and peak activation memory ratio.
3. ZeRO stage 0 / 2 / 3 per-rank bytes with 2 ranks of real DeepSpeed (benchmarks.zero_memory).

**Training step.** One step = `optimizer.zero_grad()`, `GaussianDiffusion.training_loss` (q_sample, forward,
MSE against the noise), `backward()`, `AdamW.step()` (the optimizer pipeline.train builds). The batch is
fixed and already in memory: data loading is the `data` benchmark's business. Ours is `pipeline.model.unet.UNet`;
the baseline is `diffusers.UNet2DModel` with the same config (block_out_channels = ch x ch_mult,
Attn*Block2D at the attention resolution, single-head attention, layers_per_block, norm_eps=1e-6,
downsample_padding=0, flip_sin_to_cos=False, freq_shift=1); before timing, the diffusers weights are
converted into ours and both outputs are checked to agree, so the two compute the same function with the
same parameter count. Both run eager, same threads, same precision (autocast for fp16/bf16 on CUDA, with a
GradScaler for fp16; fp32 on CPU). Each model runs twice: NCHW-contiguous (as shipped) and channels_last
(model and batch converted with `memory_format=torch.channels_last`), and the target compares the fastest
of ours with the fastest of diffusers, so the baseline gets the same optimisation we use. Rounds alternate
A B C D / D C B A after a warm-up; the speed-up is the median of per-round time ratios (robust to the load
of a shared machine drifting between rounds).

**Activation memory.** Parameter gradients are allocated before the measurement, so what a step adds on top
is activations (tensors saved for backward) plus transient buffers. On CUDA: `torch.cuda.max_memory_allocated()`
minus `memory_allocated()` at the start of forward. On CPU there is no allocator peak counter, so the step
runs once under `torch.profiler` with `profile_memory=True` and the peak is read from the CPU allocator's own
running total (`total_allocated` of every allocation event) minus its value at the start; "held after forward"
is that total just before `backward()` starts (what autograd keeps for backward). The profiled pass is
separate from the timed ones.

**ZeRO.** `torchrun --nproc_per_node 2 -m benchmarks zero_memory`: each rank builds the engine exactly as
pipeline.train does (`pipeline.train.ds_config.build_ds_config` + `pipeline.train.loop.build_engine`), takes one
training step so Adam's state exists, then walks the tensors it holds: optimizer state = the tensors in the
inner torch optimizer's `state` (exp_avg, exp_avg_sq); fp32 master partition = the optimizer's own
parameters when they are not the model's; parameters = the model's (ZeRO-3: the rank's `ds_tensor`
partition); gradients = `.grad` of both plus DeepSpeed's partitioned gradient buffers; bytes are counted
per distinct storage. The ZeRO run feeds a small image (the state does not depend on the image size).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch

from benchmarks import common, train_tables
from benchmarks.profile import Profile, torch_profile
from benchmarks.record import Result, Spread, from_json, paired_ratio, summarize
from benchmarks.train_step import StepMemory, build_pair, make_batch, make_train_step, step_memory
from benchmarks.zero_memory import ZeroRank
from pipeline.config import load_config
from pipeline.core.config import Config
from pipeline.core.schedule import DiffusionSchedule
from pipeline.model.unet import UNet, count_parameters
from pipeline.train.diffusion import GaussianDiffusion
from pipeline.train.distributed import free_port

REPO = Path(__file__).resolve().parent.parent
FLAGS = ("quick", "device", "out", "threads")


Case = NamedTuple("Case", [("config", str), ("batches", list[int]), ("checkpointing_batch", int)])

PLAN = {
    "quick": {"cpu": [Case("tiny_cpu", [8], 8)], "cuda": [Case("tiny_cpu", [8], 8)]},
    "full": {
        "cpu": [Case("tiny_cpu", [8, 16, 32], 32), Case("celebahq64", [2], 2)],
        "cuda": [Case("tiny_cpu", [32, 128], 128), Case("celebahq64", [16, 64], 64), Case("celebahq256", [4, 16], 16)],
    },
}
ZERO_CONFIGS = {"quick": ["tiny_cpu"], "full": ["tiny_cpu", "celebahq64", "celebahq256"]}


@dataclass
class Throughput:
    """One config and batch: ours and diffusers, each NCHW-contiguous and channels_last (the labels)."""

    config: str
    batch: int
    precision: str
    params: int
    profile: dict[str, Profile] | None  # the fastest of each side, at the config's largest batch
    max_output_difference: float
    seconds: dict[str, Spread]
    images_per_second: dict[str, float]
    best_ours: str
    best_diffusers: str
    ours_images_per_second: float
    diffusers_images_per_second: float
    speedup: Spread  # fastest diffusers time / fastest ours, per round
    speedup_both_contiguous: Spread


@dataclass
class Checkpointing:
    config: str
    batch: int
    precision: str
    memory: dict[str, StepMemory]  # plain, checkpointed
    plain_seconds: Spread
    checkpointed_seconds: Spread
    time_ratio: Spread
    peak_memory_ratio: float
    held_memory_ratio: float


@dataclass
class TrainResults:
    throughput: list[Throughput]
    checkpointing: list[Checkpointing]
    zero: list[ZeroRank]


def precision_for(cfg: Config, device: str) -> str:
    """The config's precision on CUDA; fp32 on CPU (fp16 is GPU-only, bf16 on CPU is emulated here)."""
    return cfg.train.precision if device.startswith("cuda") else "fp32"


def compare_with_diffusers(cfg: Config, name: str, batches: list[int], args, progress) -> list[Throughput]:
    """images/s of ours vs diffusers at each batch size, each in both memory formats, interleaved."""
    device, precision = args.device, precision_for(cfg, args.device)
    diffusion = GaussianDiffusion(DiffusionSchedule.from_config(cfg.diffusion))
    ours, theirs, diff = build_pair(cfg.model, device)
    models = {"ours": ours, "diffusers": theirs}
    if not args.contiguous_only:
        for side in ("ours", "diffusers"):
            models[f"{side}+channels_last"] = copy.deepcopy(models[side]).to(memory_format=torch.channels_last)
    rows = []
    for b in batches:
        batch = make_batch(cfg.model, b, device)
        cl_batch = tuple(x.contiguous(memory_format=torch.channels_last) if x.ndim == 4 else x for x in batch)
        steps = {
            label: make_train_step(m, diffusion, cl_batch if "channels_last" in label else batch, device, precision)
            for label, m in models.items()
        }
        progress.describe(f"train: {name} batch {b} ours vs diffusers")
        sync = common.cuda_sync(device)
        times = common.interleaved(steps, warmup=args.warmup, repeats=args.repeats, sync=sync, on_round=progress.update)
        seconds = {label: summarize(v) for label, v in times.items()}
        best = {
            side: min((label for label in times if label.startswith(side)), key=lambda label: seconds[label].median)
            for side in ("ours", "diffusers")
        }
        profile = None
        if args.profile and b == batches[-1]:
            profile = {best[s]: torch_profile(steps[best[s]], device=device) for s in ("ours", "diffusers")}
        ours_s, theirs_s = seconds[best["ours"]].median, seconds[best["diffusers"]].median
        rows.append(
            Throughput(
                config=name,
                batch=b,
                precision=precision,
                params=count_parameters(ours),
                profile=profile,
                max_output_difference=diff,
                seconds=seconds,
                images_per_second={label: b / s.median for label, s in seconds.items()},
                best_ours=best["ours"],
                best_diffusers=best["diffusers"],
                ours_images_per_second=b / ours_s,
                diffusers_images_per_second=b / theirs_s,
                speedup=paired_ratio(times[best["diffusers"]], times[best["ours"]]),
                speedup_both_contiguous=paired_ratio(times["diffusers"], times["ours"]),
            )
        )
    return rows


def compare_checkpointing(cfg: Config, name: str, b: int, args, progress) -> Checkpointing:
    """Our U-Net with and without gradient checkpointing: step time and activation memory."""
    device, precision = args.device, precision_for(cfg, args.device)
    diffusion = GaussianDiffusion(DiffusionSchedule.from_config(cfg.diffusion))
    torch.manual_seed(0)
    plain, ckpt = UNet(cfg.model).to(device), UNet(cfg.model).to(device)
    ckpt.load_state_dict(plain.state_dict())
    ckpt.grad_checkpointing = True
    models = {"plain": plain, "checkpointed": ckpt}
    batch = make_batch(cfg.model, b, device)
    progress.describe(f"train: {name} batch {b} activation memory")
    memory = {label: step_memory(m, diffusion, batch, device, precision) for label, m in models.items()}
    progress.update()
    steps = {label: make_train_step(m, diffusion, batch, device, precision) for label, m in models.items()}
    progress.describe(f"train: {name} batch {b} checkpointing time")
    sync = common.cuda_sync(device)
    times = common.interleaved(steps, warmup=args.warmup, repeats=args.repeats, sync=sync, on_round=progress.update)
    plain_mem, ckpt_mem = memory["plain"], memory["checkpointed"]
    held_ratio = ckpt_mem.held_after_forward_bytes / max(1, plain_mem.held_after_forward_bytes)
    time_ratio = paired_ratio(times["checkpointed"], times["plain"])
    spreads = summarize(times["plain"]), summarize(times["checkpointed"]), time_ratio
    return Checkpointing(name, b, precision, memory, *spreads, ckpt_mem.peak_bytes / plain_mem.peak_bytes, held_ratio)


def zero_memory(config_names: list[str], args, progress) -> list[ZeroRank]:
    """Per-rank bytes for ZeRO 0/2/3 with 2 ranks, from one torchrun subprocess for all configs."""
    progress.describe(f"train: ZeRO 0/2/3 memory, {', '.join(config_names)}, 2 ranks")
    paths = {str(REPO / "configs" / f"{name}.yaml"): name for name in config_names}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "zero.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", f"--master_port={free_port()}"]
        cmd += ["-m", "benchmarks", "zero_memory", "--config", ",".join(paths), "--stages", "0,2,3"]
        cmd += ["--device", args.device, "--out", str(out)]
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
        if not args.device.startswith("cuda"):
            env["DS_ACCELERATOR"] = "cpu"
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=3600)
        if proc.returncode != 0 or not out.is_file():
            tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-25:])
            raise RuntimeError(f"ZeRO memory run failed (exit {proc.returncode}):\n{tail}")
        ranks = from_json(list[ZeroRank], json.loads(out.read_text()))
    progress.update(len(config_names))
    for r in ranks:
        r.config = paths[r.config]
    return ranks


def steps(args) -> int:
    """Progress units this benchmark reports (for the bar over the whole run)."""
    cases = common.device_plan(PLAN, args)
    zero = 0 if args.skip_zero else len(ZERO_CONFIGS[common.size(args)])
    return sum(len(c.batches) + 1 for c in cases) * args.repeats + len(cases) + zero


def run(args, progress) -> Result:
    cases, zero_configs = common.device_plan(PLAN, args), ZERO_CONFIGS[common.size(args)]
    config = {"cases": [c._asdict() for c in cases], "zero_configs": zero_configs, "zero_ranks": 2}
    result = common.start(
        "train", args, __doc__.split("\n\n", 2)[2], {**config, "warmup": args.warmup, "repeats": args.repeats}
    )
    throughput, checkpointing = [], []
    for case in cases:
        cfg = load_config(REPO / "configs" / f"{case.config}.yaml")
        throughput += compare_with_diffusers(cfg, case.config, case.batches, args, progress)
        checkpointing.append(compare_checkpointing(cfg, case.config, case.checkpointing_batch, args, progress))
    zero = zero_memory(zero_configs, args, progress) if not args.skip_zero else []
    result.results = TrainResults(throughput, checkpointing, zero)
    train_tables.report(result)
    return result


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--warmup", type=int, default=1, help="train: untimed rounds first (default 1)")
    p.add_argument("--repeats", type=int, default=None, help="train: timed rounds (default 5, quick 3)")
    p.add_argument("--skip-zero", action="store_true", help="train: leave out the 2-rank DeepSpeed ZeRO memory run")
    p.add_argument("--contiguous-only", action="store_true", help="train: time NCHW-contiguous models only")
    p.add_argument("--no-profile", dest="profile", action="store_false", help="train: skip the torch.profiler pass")


def defaults(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    args.repeats = (3 if args.quick else 5) if args.repeats is None else args.repeats
