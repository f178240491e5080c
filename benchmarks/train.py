"""Training-step benchmark: our U-Net vs diffusers' UNet2DModel, gradient checkpointing, ZeRO memory.

  python -m benchmarks train [--quick] [--device cpu|cuda] [--out DIR]

**Training step.** One step = `optimizer.zero_grad()`, `GaussianDiffusion.training_loss` (q_sample, forward, MSE
against the noise), `backward()`, `AdamW.step()`, on a fixed batch already in memory (loading is the `data`
benchmark's). Ours is `pipeline.model.unet.UNet`; the baseline is `diffusers.UNet2DModel` built with the same config
(`train_step.diffusers_twin`); its weights are converted into ours and both outputs checked to agree, so the two
compute the same function with the same parameter count. Both run eager, same threads and precision (autocast for
fp16/bf16 on CUDA, GradScaler for fp16; fp32 on CPU), each NCHW-contiguous and channels_last (model and batch); the
target compares the fastest of ours with the fastest of diffusers. Rounds alternate A B C D / D C B A after a
warm-up; the speed-up is the median of per-round time ratios.

**Activation memory.** Gradients are allocated first, so what a step adds is activations plus transient buffers.
CUDA: `torch.cuda.max_memory_allocated()` minus `memory_allocated()` at the start of forward. CPU: one separate step
under `torch.profiler(profile_memory=True)`; peak = the CPU allocator's running `total_allocated` minus its start
value; "held after forward" = that total just before `backward()` (what autograd keeps).

**ZeRO.** `torchrun --nproc_per_node 2 -m benchmarks train --zero-worker CONFIGS`: each rank builds the engine as pipeline.train
does (`build_ds_config` + `build_engine`), takes one step so Adam's state exists, and counts bytes per distinct
storage: optimizer state = the inner torch optimizer's `state`; fp32 master partition = its own parameters when not
the model's; parameters = the model's (ZeRO-3: the rank's `ds_tensor`); gradients = `.grad` of both plus
DeepSpeed's partitioned gradient buffers. The image is small (the state does not depend on its size).
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

from benchmarks import common, train_step
from benchmarks.profile import Profile, torch_profile
from benchmarks.record import Plot, Result, Spread, Target, from_json, paired_ratio, summarize, table
from benchmarks.train_step import StepMemory, ZeroRank, build_pair, make_batch, make_train_step, step_memory
from pipeline.config import load_config
from pipeline.core.config import Config
from pipeline.core.schedule import DiffusionSchedule
from pipeline.model.unet import UNet, count_parameters
from pipeline.train.diffusion import GaussianDiffusion
from pipeline.train.distributed import free_port

REPO = Path(__file__).resolve().parent.parent
FLAGS = ("quick", "device", "out", "threads")
MiB = 2**20
LABELS = ("ours", "diffusers", "ours+channels_last", "diffusers+channels_last")  # the columns' order


Case = NamedTuple("Case", [("config", str), ("batches", list[int]), ("checkpointing_batch", int)])

CASES = {
    "quick": {"cpu": [Case("tiny_cpu", [8], 8)], "cuda": [Case("tiny_cpu", [8], 8)]},
    "full": {
        "cpu": [Case("tiny_cpu", [8, 16, 32], 32), Case("celebahq64", [2], 2)],
        "cuda": [Case("tiny_cpu", [32, 128], 128), Case("celebahq64", [16, 64], 64), Case("celebahq256", [4, 16], 16)],
    },
}
ZERO_CONFIGS = {"quick": ["tiny_cpu"], "full": ["tiny_cpu", "celebahq64", "celebahq256"]}


@dataclass
class Throughput:
    """One config and batch: seconds per step of ours and diffusers, each NCHW-contiguous and channels_last (the
    labels); the rest is derived from them."""

    config: str
    batch: int
    precision: str
    params: int
    profile: dict[str, Profile] | None  # the fastest of each side, at the config's largest batch
    max_output_difference: float
    seconds: dict[str, Spread]

    @property
    def images_per_second(self) -> dict[str, float]:
        return {label: self.batch / s.median for label, s in self.seconds.items()}

    def best(self, side: str) -> str:
        """The faster memory format of one side ("ours" or "diffusers"): the baseline is never handicapped."""
        return min((label for label in self.seconds if label.startswith(side)), key=lambda k: self.seconds[k].median)

    @property
    def ours_images_per_second(self) -> float:
        return self.images_per_second[self.best("ours")]

    @property
    def speedup(self) -> Spread:
        """Fastest diffusers time / fastest ours, per round."""
        return paired_ratio(self.seconds[self.best("diffusers")].repeats, self.seconds[self.best("ours")].repeats)

    @property
    def speedup_both_contiguous(self) -> Spread:
        return paired_ratio(self.seconds["diffusers"].repeats, self.seconds["ours"].repeats)


@dataclass
class Checkpointing:
    config: str
    batch: int
    precision: str
    memory: dict[str, StepMemory]  # plain, checkpointed
    plain_seconds: Spread
    checkpointed_seconds: Spread

    @property
    def time_ratio(self) -> Spread:
        return paired_ratio(self.checkpointed_seconds.repeats, self.plain_seconds.repeats)

    @property
    def peak_memory_ratio(self) -> float:
        return self.memory["checkpointed"].peak_bytes / self.memory["plain"].peak_bytes

    @property
    def held_memory_ratio(self) -> float:
        held = [self.memory[k].held_after_forward_bytes for k in ("checkpointed", "plain")]
        return held[0] / max(1, held[1])


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
        seconds = time_steps(steps, args, progress)
        row = Throughput(name, b, precision, count_parameters(ours), None, diff, seconds)
        if args.profile and b == batches[-1]:
            row.profile = {row.best(s): torch_profile(steps[row.best(s)], device=device) for s in ("ours", "diffusers")}
        rows.append(row)
    return rows


def time_steps(steps: dict, args, progress) -> dict[str, Spread]:
    """Seconds per call of each step, interleaved after args.warmup rounds, one progress unit per round."""
    sync = common.cuda_sync(args.device)
    times = common.interleaved(steps, warmup=args.warmup, repeats=args.repeats, sync=sync, on_round=progress.update)
    return {label: summarize(v) for label, v in times.items()}


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
    seconds = time_steps(steps, args, progress)
    return Checkpointing(name, b, precision, memory, seconds["plain"], seconds["checkpointed"])


def zero_memory(configs: list[str], args, progress) -> list[ZeroRank]:
    """Per-rank bytes for ZeRO 0/2/3 with 2 ranks, from one torchrun subprocess for all configs."""
    progress.describe(f"train: ZeRO 0/2/3 memory, {', '.join(configs)}, 2 ranks")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "zero.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", f"--master_port={free_port()}"]
        cmd += ["-m", "benchmarks", "train", "--zero-worker", ",".join(configs), "--device", args.device]
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
        if not args.device.startswith("cuda"):
            env["DS_ACCELERATOR"] = "cpu"
        proc = subprocess.run(
            [*cmd, "--out", str(out)], cwd=REPO, env=env, capture_output=True, text=True, timeout=3600
        )
        if proc.returncode != 0 or not out.is_file():
            tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-25:])
            raise RuntimeError(f"ZeRO memory run failed (exit {proc.returncode}):\n{tail}")
        ranks = from_json(list[ZeroRank], json.loads(out.read_text()))
    progress.update(len(configs))
    return ranks


def steps(args) -> int:
    """Progress units this benchmark reports (for the bar over the whole run)."""
    if args.zero_worker:
        return 0
    cases = common.cases_for(CASES, args)
    zero = 0 if args.skip_zero else len(ZERO_CONFIGS[common.size(args)])
    return sum(len(c.batches) + 1 for c in cases) * args.repeats + len(cases) + zero


def run(args, progress) -> Result | None:
    if args.zero_worker:  # one rank of zero_memory's torchrun job
        train_step.zero_worker(args.zero_worker.split(","), args.device, args.out)
        return None
    cases, zero_configs = common.cases_for(CASES, args), ZERO_CONFIGS[common.size(args)]
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
    report(result)
    return result


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--warmup", type=int, default=1, help="train: untimed rounds first (default 1)")
    p.add_argument("--repeats", type=int, default=None, help="train: timed rounds (default 5, quick 3)")
    p.add_argument("--skip-zero", action="store_true", help="train: leave out the 2-rank DeepSpeed ZeRO memory run")
    p.add_argument("--contiguous-only", action="store_true", help="train: time NCHW-contiguous models only")
    p.add_argument("--no-profile", dest="profile", action="store_false", help="train: skip the torch.profiler pass")
    p.add_argument("--zero-worker", metavar="CONFIGS", help=argparse.SUPPRESS)  # one rank of zero_memory()


def defaults(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    args.repeats = (3 if args.quick else 5) if args.repeats is None else args.repeats


def report(result: Result) -> None:
    res = result.results
    result.tables.append(throughput_table(res.throughput))
    result.tables += [profile_table(r) for r in res.throughput if r.profile]
    for name in dict.fromkeys(r.config for r in res.throughput):
        r = max((r for r in res.throughput if r.config == name), key=lambda r: r.batch)
        ours, theirs = r.best("ours"), r.best("diffusers")
        detail = f"fastest of each: {ours} {r.ours_images_per_second:.3g} vs {theirs} "
        detail += f"{r.images_per_second[theirs]:.3g} images/s, per-round ratios {r.speedup.text(3)}; "
        detail += f"both contiguous (NCHW): {r.speedup_both_contiguous.text(3)}"
        what = f"our training step >= 1.25x diffusers ({name}, batch {r.batch})"
        result.add_target(f"train_step_vs_diffusers[{name}]", what, r.speedup.median, 1.25, ">=", detail=detail)
    result.tables.append(checkpointing_table(res.checkpointing))
    for c in res.checkpointing:
        tag, held = f"{c.config}, batch {c.batch}", f"held-after-forward ratio {c.held_memory_ratio:.2f}"
        what = f"checkpointing <= 0.5x peak activation memory ({tag})"
        result.add_target(f"checkpointing_memory[{c.config}]", what, c.peak_memory_ratio, 0.5, "<=", detail=held)
        what, iqr = f"checkpointing <= 1.35x step time ({tag})", f"IQR {c.time_ratio.text(3)}"
        result.add_target(f"checkpointing_time[{c.config}]", what, c.time_ratio.median, 1.35, "<=", detail=iqr)
    if res.zero:
        zero_report(result)
    rates = [(r.config, r.batch, {label: r.images_per_second[label] for label in labels(r)}) for r in res.throughput]
    plot = Plot.by_batch("train_throughput.png", "Training step throughput", "images/s", rates, logy=False)
    result.plots += [plot] if plot else []
    result.notes += limits(res, [t for t in result.targets if t.met is False])


def labels(r) -> list[str]:
    return [label for label in LABELS if label in r.seconds]


def throughput_table(rows: list):
    header = " | ".join(f"{label} images/s" for label in labels(rows[0]))
    return table(
        "Training step images/s: ours vs diffusers UNet2DModel (same architecture, batch, precision)",
        f"config | batch | precision | parameters | {header} | fastest ours / fastest diffusers | "
        "speed-up, fastest vs fastest (median [IQR]) | speed-up, both contiguous | max |output difference|",
        [
            [r.config, r.batch, r.precision, r.params, *[r.images_per_second[label] for label in labels(r)]]
            + [f"{r.best('ours')} / {r.best('diffusers')}", r.speedup.text(3), r.speedup_both_contiguous.text(3)]
            + [r.max_output_difference]
            for r in rows
        ],
    )


def profile_table(r):
    """The top operators of each side's fastest step, side by side, and their convolution share."""
    sides = [label for label in LABELS if label in r.profile]
    tops = [[f"{op.op} ({100 * op.share:.0f} %)" for op in r.profile[side].top] for side in sides]
    rows = [[top[i] if i < len(top) else "" for top in tops] for i in range(max(map(len, tops)))]
    conv = [(100 * r.profile[side].convolution_share, r.profile[side].total_ms) for side in sides]
    rows.append([f"convolution (fwd+bwd) {share:.0f} % of {ms:.0f} ms" for share, ms in conv])
    title = f"Profile of one training step ({r.config}, batch {r.batch}): top operators by self time"
    return table(title, " | ".join(sides), rows)


def checkpointing_table(rows: list):
    return table(
        "Gradient checkpointing (our U-Net): step time and activation memory",
        "config | batch | plain s/step | checkpointed s/step | time ratio | peak MiB plain | peak MiB checkpointed | "
        "peak ratio | held after fwd MiB plain | held MiB checkpointed | held ratio",
        [
            [c.config, c.batch, c.plain_seconds.median, c.checkpointed_seconds.median, c.time_ratio.text(3)]
            + [c.memory[k].peak_bytes / MiB for k in ("plain", "checkpointed")]
            + [c.peak_memory_ratio]
            + [c.memory[k].held_after_forward_bytes / MiB for k in ("plain", "checkpointed")]
            + [c.held_memory_ratio]
            for c in rows
        ],
    )


def zero_report(result: Result) -> None:
    """The per-rank table, the ZeRO-2 target per config, and per-rank memory against model size."""
    zero = result.results.zero
    state0 = {(z.config, z.rank): z.after_step.optimizer_state for z in zero if z.stage == 0}
    rows = []
    for r in zero:
        b, s = r.after_backward, r.after_step
        total = s.parameters + s.optimizer_state + s.fp32_master_partition + b.gradients
        rows.append(
            [r.config, r.model_parameters, r.stage, r.rank, s.optimizer_state / MiB, s.fp32_master_partition / MiB]
            + [s.parameters / MiB, b.gradients / MiB, total / MiB, s.optimizer_state / state0[r.config, r.rank]]
        )
    columns = "config | parameters | stage | rank | optimizer state MiB | fp32 master partition MiB | parameters MiB | "
    columns += "gradients MiB (after backward) | total MiB | optimizer state vs stage 0"
    result.tables.append(table("ZeRO per-rank memory, 2 ranks (real DeepSpeed, one training step)", columns, rows))
    total = {}  # (config, stage) -> the largest rank's total MiB
    for row in rows:
        total[row[0], row[2]] = max(total.get((row[0], row[2]), 0.0), row[8])
    for name in dict.fromkeys(r.config for r in zero):
        state = [max(z.after_step.optimizer_state for z in zero if (z.config, z.stage) == (name, s)) for s in (0, 2)]
        detail = (
            f"with the fp32 master partition and gradients, per-rank total is {total[name, 2] / total[name, 0]:.2f}x "
        )
        detail += f"stage 0 (ZeRO-3: {total[name, 3] / total[name, 0]:.2f}x)"
        what = f"ZeRO-2 per-rank optimizer state <= 0.55x stage 0 ({name}, 2 ranks)"
        result.add_target(f"zero2_optimizer_state[{name}]", what, state[1] / state[0], 0.55, "<=", detail=detail)
    configs = {r.model_parameters: r.config for r in zero}  # by size, for the plot's x axis
    if len(configs) > 1:
        params = sorted(configs)
        series = {
            f"ZeRO-{s}": [params, [total[configs[p], s] for p in params]] for s in sorted({r.stage for r in zero})
        }
        title = "Per-rank memory, 2 ranks (params+grads+optimizer)"
        result.plots.append(Plot("train_zero_memory.png", title, "model parameters", "MiB per rank", series, 10, True))


def limits(res, missed: list[Target]) -> list[str]:
    """What limits each missed target, in numbers from this run (profiles, memory split)."""
    missed_names, notes = {t.name for t in missed}, []
    for r in res.throughput:
        if r.profile and f"train_step_vs_diffusers[{r.config}]" in missed_names:
            sides = [label for label in LABELS if label in r.profile]
            shares = " / ".join(f"{100 * r.profile[k].convolution_share:.0f} % ({k})" for k in sides)
            notes.append(
                f"train step vs diffusers ({r.config}, batch {r.batch}): the two networks are the same "
                f"architecture with the same parameter count, and convolutions (forward and backward, the same oneDNN "
                f"kernels on the same shapes) take {shares} of the step. Eager PyTorch cannot make those faster for "
                "one model and not the other; what is ours to save is the glue around them (fused qkv projection, "
                "fewer copies/divisions), worth a few per cent here. channels_last helps both sides alike. "
                "torch.compile (inductor), tried once on tiny_cpu while this benchmark was built, gave no further "
                "gain on this CPU after a 6-minute compile. On a GPU in fp16 the glue is a larger share of the step."
            )
    for c in res.checkpointing:
        if f"checkpointing_memory[{c.config}]" in missed_names:
            plain, ck = c.memory["plain"], c.memory["checkpointed"]
            notes.append(
                f"checkpointing memory ({c.config}, batch {c.batch}): what autograd holds after forward drops to "
                f"{c.held_memory_ratio:.2f}x ({plain.held_after_forward_bytes / MiB:.0f} -> "
                f"{ck.held_after_forward_bytes / MiB:.0f} MiB), but the peak adds the recomputation of one block "
                f"during backward plus its gradients ({(ck.peak_bytes - ck.held_after_forward_bytes) / MiB:.0f} MiB). "
                f"With one residual block per level (tiny_cpu) one full-resolution block is a large share of the "
                f"whole network; configs with more blocks per level reach a lower ratio (see the other rows). Moving "
                f"the skip concat inside the checkpoint was tried: it lowers the held bytes but raises the peak (the "
                f"concat is recomputed too)."
            )
    return notes
