"""Training-step benchmark: our U-Net vs diffusers' UNet2DModel, gradient checkpointing, ZeRO memory.

  python -m benchmarks train [--quick] [--device cpu|cuda] [--out DIR]

1. images/s of one full training step (q_sample, forward, MSE loss, backward, AdamW step) for
   `pipeline.model.unet.UNet` and the same architecture built as `diffusers.UNet2DModel`, at the same
   config, batch and precision; the two are timed interleaved and shown to compute the same function.
2. Our U-Net with and without gradient checkpointing: time ratio and peak activation memory ratio.
3. ZeRO stage 0 / 2 / 3 per-rank bytes with 2 ranks of real DeepSpeed (benchmarks.zero_memory).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from benchmarks import common, train_report
from benchmarks.train_step import autocast, build_pair, make_batch, make_train_step
from pipeline.config import Config, load_config
from pipeline.train.diffusion import GaussianDiffusion, schedule_from_config
from pipeline.train.distributed import free_port
from pipeline.model.unet import UNet, count_parameters

REPO = Path(__file__).resolve().parent.parent

# (config, batch sizes for the throughput curve, batch for the checkpointing comparison)
PLAN = {
    "quick": {"cpu": [("tiny_cpu", [8], 8)], "cuda": [("tiny_cpu", [8], 8)]},
    "full": {
        "cpu": [("tiny_cpu", [8, 16, 32], 32), ("celebahq64", [2], 2)],
        "cuda": [("tiny_cpu", [32, 128], 128), ("celebahq64", [16, 64], 64), ("celebahq256", [4, 16], 16)],
    },
}
ZERO_CONFIGS = {"quick": ["tiny_cpu"], "full": ["tiny_cpu", "celebahq64", "celebahq256"]}

METHOD = """
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

**ZeRO.** `torchrun --nproc_per_node 2 -m benchmarks.zero_memory`: each rank builds the engine exactly as
pipeline.train does (`pipeline.train.ds_config.build_ds_config` + `pipeline.train.loop.build_engine`), takes one
training step so Adam's state exists, then walks the tensors it holds: optimizer state = the tensors in the
inner torch optimizer's `state` (exp_avg, exp_avg_sq); fp32 master partition = the optimizer's own
parameters when they are not the model's; parameters = the model's (ZeRO-3: the rank's `ds_tensor`
partition); gradients = `.grad` of both plus DeepSpeed's partitioned gradient buffers; bytes are counted
per distinct storage. The ZeRO run feeds a small image (the state does not depend on the image size).
"""


# --- activation memory ------------------------------------------------------------------------


def step_memory(model, diffusion: GaussianDiffusion, batch, device: str, precision: str) -> dict:
    """Bytes a forward+backward adds on top of parameters and their (pre-allocated) gradients."""
    for p in model.parameters():
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    x0, t, noise = batch

    def forward():
        with autocast(device, precision):
            return diffusion.training_loss(model, x0, t, noise)

    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        loss = forward()
        held = torch.cuda.memory_allocated() - base
        loss.backward()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        method = "torch.cuda.max_memory_allocated"
    else:
        peak, held = _cpu_profiled_memory(forward)
        method = "torch.profiler CPU allocator total_allocated"
    model.zero_grad(set_to_none=True)
    return {"peak_bytes": peak, "held_after_forward_bytes": held, "method": method}


def _cpu_profiled_memory(forward) -> tuple[int, int]:
    """(peak, held-after-forward) bytes above the start, from the CPU allocator's running total."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile, record_function

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        loss = forward()
        with record_function("benchmark::backward"):
            loss.backward()
    allocations, backward_start = [], None
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        event = stack.pop()
        stack.extend(event.children)
        if event.typed[0] == _EventType.Allocation and event.typed[1].device.type == "cpu":
            allocations.append((event.start_time_ns, event.typed[1].total_allocated, event.typed[1].alloc_size))
        elif event.name == "benchmark::backward":
            backward_start = event.start_time_ns
    if not allocations or backward_start is None:
        raise RuntimeError("torch.profiler recorded no CPU allocations; cannot measure activation memory")
    allocations.sort()
    base = allocations[0][1] - allocations[0][2]
    peak = max(total for _, total, _ in allocations) - base
    before_backward = [total for when, total, _ in allocations if when < backward_start]
    held = (before_backward[-1] if before_backward else base) - base
    return peak, held


# --- the measurements -------------------------------------------------------------------------


def compare_with_diffusers(cfg: Config, name: str, batches: list[int], args, progress) -> list[dict]:
    """images/s of ours vs diffusers at each batch size, each in both memory formats, interleaved."""
    device, precision = args.device, precision_for(cfg, args.device)
    diffusion = GaussianDiffusion(schedule_from_config(cfg.diffusion))
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
        times = common.interleaved(
            steps, warmup=args.warmup, repeats=args.repeats, sync=common.cuda_sync(device), on_round=progress.update
        )
        seconds = {label: common.summarize(v) for label, v in times.items()}
        best = {
            side: min((label for label in times if label.startswith(side)), key=lambda label: seconds[label]["median"])
            for side in ("ours", "diffusers")
        }
        profile = (
            profile_steps({best[side]: steps[best[side]] for side in ("ours", "diffusers")}, device)
            if args.profile and b == batches[-1]
            else None
        )
        rows.append(
            {
                "config": name,
                "batch": b,
                "precision": precision,
                "params": count_parameters(ours),
                "profile": profile,
                "max_output_difference": diff,
                "seconds": seconds,
                "images_per_second": {label: b / s["median"] for label, s in seconds.items()},
                "best_ours": best["ours"],
                "best_diffusers": best["diffusers"],
                "ours_images_per_second": b / seconds[best["ours"]]["median"],
                "diffusers_images_per_second": b / seconds[best["diffusers"]]["median"],
                "speedup": common.paired_ratio(times[best["diffusers"]], times[best["ours"]]),
                "speedup_both_contiguous": common.paired_ratio(times["diffusers"], times["ours"]),
            }
        )
    return rows


def profile_steps(steps: dict, device: str, top: int = 8) -> dict:
    """Top operators by self time of one training step each (torch.profiler), and the convolution share."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.startswith("cuda")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    out = {}
    for label, step in steps.items():
        with profile(activities=activities) as prof:
            step()
            common.cuda_sync(device)()
        stats = [(e.key, e.self_device_time_total if cuda else e.self_cpu_time_total) for e in prof.key_averages()]
        total = sum(us for _, us in stats) or 1.0
        conv = sum(us for op, us in stats if "conv" in op.lower() or "gemm" in op.lower())
        out[label] = {
            "convolution_share": conv / total,
            "total_ms": total / 1e3,
            "top": [
                {"op": op, "share": us / total, "ms": us / 1e3} for op, us in sorted(stats, key=lambda kv: -kv[1])[:top]
            ],
        }
    return out


def compare_checkpointing(cfg: Config, name: str, b: int, args, progress) -> dict:
    """Our U-Net with and without gradient checkpointing: step time and activation memory."""
    device, precision = args.device, precision_for(cfg, args.device)
    diffusion = GaussianDiffusion(schedule_from_config(cfg.diffusion))
    torch.manual_seed(0)
    plain, ckpt = UNet(cfg.model).to(device), UNet(cfg.model).to(device)
    ckpt.load_state_dict(plain.state_dict())
    ckpt.grad_checkpointing = True
    batch = make_batch(cfg.model, b, device)
    progress.describe(f"train: {name} batch {b} activation memory")
    memory = {
        "plain": step_memory(plain, diffusion, batch, device, precision),
        "checkpointed": step_memory(ckpt, diffusion, batch, device, precision),
    }
    progress.update()
    steps = {
        "plain": make_train_step(plain, diffusion, batch, device, precision),
        "checkpointed": make_train_step(ckpt, diffusion, batch, device, precision),
    }
    progress.describe(f"train: {name} batch {b} checkpointing time")
    times = common.interleaved(
        steps, warmup=args.warmup, repeats=args.repeats, sync=common.cuda_sync(device), on_round=progress.update
    )
    return {
        "config": name,
        "batch": b,
        "precision": precision,
        "memory": memory,
        "plain_seconds": common.summarize(times["plain"]),
        "checkpointed_seconds": common.summarize(times["checkpointed"]),
        "time_ratio": common.paired_ratio(times["checkpointed"], times["plain"]),
        "peak_memory_ratio": memory["checkpointed"]["peak_bytes"] / memory["plain"]["peak_bytes"],
        "held_memory_ratio": memory["checkpointed"]["held_after_forward_bytes"]
        / max(1, memory["plain"]["held_after_forward_bytes"]),
    }


def zero_memory(config_names: list[str], args, progress) -> list[dict]:
    """Per-rank bytes for ZeRO 0/2/3 with 2 ranks, from one torchrun subprocess for all configs."""
    progress.describe(f"train: ZeRO 0/2/3 memory, {', '.join(config_names)}, 2 ranks")
    paths = {str(REPO / "configs" / f"{name}.yaml"): name for name in config_names}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "zero.json"
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_port",
            str(free_port()),
            "-m",
            "benchmarks.zero_memory",
            "--config",
            ",".join(paths),
            "--stages",
            "0,2,3",
            "--device",
            args.device,
            "--out",
            str(out),
        ]
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
        if not args.device.startswith("cuda"):
            env["DS_ACCELERATOR"] = "cpu"
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=3600)
        if proc.returncode != 0 or not out.is_file():
            tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-25:])
            raise RuntimeError(f"ZeRO memory run failed (exit {proc.returncode}):\n{tail}")
        rows = [dict(r, config=paths[r.pop("config_path")]) for r in json.loads(out.read_text())]
    progress.update(len(config_names))
    return rows


def precision_for(cfg: Config, device: str) -> str:
    """The config's precision on CUDA; fp32 on CPU (fp16 is GPU-only, bf16 on CPU is emulated here)."""
    return cfg.train.precision if device.startswith("cuda") else "fp32"


# --- the benchmark ----------------------------------------------------------------------------


def plan(args) -> tuple[list, list[str]]:
    return common.device_plan(PLAN, args), ZERO_CONFIGS[common.size(args)]


def steps(args) -> int:
    """Progress units this benchmark reports (for the bar over the whole run)."""
    cases, zero_configs = plan(args)
    return sum(len(batches) + 1 for _, batches, _ in cases) * args.repeats + len(cases) + len(zero_configs)


def run(args, progress=None) -> dict:
    progress = progress or common.no_progress()
    cases, zero_configs = plan(args)
    config = {
        "cases": [{"config": c, "batches": b, "checkpointing_batch": cb} for c, b, cb in cases],
        "zero_configs": zero_configs,
        "zero_ranks": 2,
        "warmup": args.warmup,
        "repeats": args.repeats,
    }
    result = common.start("train", args, METHOD, config)
    throughput, checkpointing = [], []
    for name, batches, ckpt_batch in cases:
        cfg = load_config(REPO / "configs" / f"{name}.yaml")
        throughput += compare_with_diffusers(cfg, name, batches, args, progress)
        checkpointing.append(compare_checkpointing(cfg, name, ckpt_batch, args, progress))
    zero = zero_memory(zero_configs, args, progress) if not args.skip_zero else []
    result["results"] = {"throughput": throughput, "checkpointing": checkpointing, "zero": zero}
    train_report.report(result, Path(args.out))
    return result


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--warmup", type=int, default=None, help="untimed rounds first (default 1, quick 1)")
    p.add_argument("--repeats", type=int, default=None, help="timed rounds (default 7, quick 3)")
    p.add_argument("--skip-zero", action="store_true", help="leave out the 2-rank DeepSpeed ZeRO memory run")
    p.add_argument("--contiguous-only", action="store_true", help="train: time NCHW-contiguous models only")
    p.add_argument("--no-profile", dest="profile", action="store_false", help="train: skip the torch.profiler pass")


def defaults(args) -> None:
    args.warmup = 1 if args.warmup is None else args.warmup
    args.repeats = (3 if args.quick else 5) if args.repeats is None else args.repeats


if __name__ == "__main__":
    from benchmarks.__main__ import main

    sys.exit(main(["train", *sys.argv[1:]]))
