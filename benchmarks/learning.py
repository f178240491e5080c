"""What a fixed budget learns: the tiny config's recipe variants, trained alike and scored alike.

  python -m benchmarks learning [--quick] [--variants NAME,NAME] [--out DIR]

Every variant trains the tiny model (configs/tiny_cpu.yaml, pinned to the recipe it had before this
benchmark, plus the variant's overrides) on the same synthetic faces, from the same seed, for the same
number of images, launched as the demo is (torchrun, 2 processes, fp32). Its EMA checkpoints at
several points are scored with pipeline.evaluation (classifier-FID, precision, recall, coverage) on
samples of one fixed sampler; the last one also with deterministic DDIM (eta 0). A second set of
runs trains on the grayscale faces (R = G = B) and reports the colour the samples have anyway.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks import common, learning_report

REPO = Path(__file__).resolve().parent.parent
CACHE = Path(tempfile.gettempdir()) / "ddpm-benchmarks" / "learning"

# configs/tiny_cpu.yaml as it was when this benchmark was written: the variants' common base, so the
# comparison stays the same when the config file adopts a variant.
BASELINE = [
    "model.ch=32",
    "model.ch_mult=[1,2,2]",
    "model.num_res_blocks=1",
    "model.attn_resolutions=[8]",
    "model.dropout=0.0",
    "diffusion.beta_schedule=linear",
    "diffusion.prediction_type=epsilon",
    "train.lr=1e-3",
    "train.warmup_steps=100",
    "train.loss_weighting=uniform",
    "ema.profile=exponential",
    "ema.decay=0.999",
    "ema.warmup=true",
    "train.precision=fp32",
]

# name -> (overrides, batch size multiplier); steps scale inversely so every variant sees the same images.
# "today" is the baseline; min-SNR uses gamma 5 (train.snr_gamma's default), power EMA sigma_rel 0.10.
VARIANTS = {
    "today": ([], 1.0),
    "min-SNR eps": (["train.loss_weighting=min_snr"], 1.0),
    "v-pred": (["diffusion.prediction_type=v_prediction"], 1.0),
    "v-pred min-SNR": (["diffusion.prediction_type=v_prediction", "train.loss_weighting=min_snr"], 1.0),
    "cosine eps": (["diffusion.beta_schedule=cosine"], 1.0),
    "cosine v-pred": (["diffusion.beta_schedule=cosine", "diffusion.prediction_type=v_prediction"], 1.0),
    "power EMA": (["ema.profile=power", "ema.sigma_rel=0.10"], 1.0),
    "lr 2e-3": (["train.lr=2e-3"], 1.0),
    "batch 16": ([], 0.5),
    "width 48": (["model.ch=48", "model.num_groups=16"], 1.0),
}
# The full run's selection: one factor at a time against "today"; the rest are there for --variants.
# Sized to fit an hour on 2 shared CPU cores: 210 steps x 32 (a fifth of the demo's images).
FULL_VARIANTS = ["today", "min-SNR eps", "v-pred", "v-pred min-SNR", "cosine eps", "power EMA", "lr 2e-3", "batch 16"]
GRAYSCALE_VARIANTS = ["today", "min-SNR eps", "v-pred min-SNR"]

PLAN = {  # images in the set, steps, batch, scoring points, samples scored, sampler steps, processes
    "full": {
        "data": 3000,
        "steps": 210,
        "batch": 32,
        "points": 3,
        "num": 128,
        "sampler_steps": 20,
        "procs": 2,
        "variants": FULL_VARIANTS,
        "grayscale": GRAYSCALE_VARIANTS,
    },
    "quick": {
        "data": 400,
        "steps": 16,
        "batch": 16,
        "points": 2,
        "num": 24,
        "sampler_steps": 8,
        "procs": 1,
        "variants": ["today", "v-pred min-SNR"],
        "grayscale": ["v-pred min-SNR"],
    },
}
FEATURE_NET_STEPS = {"full": 400, "quick": 60}

METHOD = """
Base recipe: `configs/tiny_cpu.yaml` with the overrides in `config.baseline` (its values before this benchmark);
each variant adds its overrides. Same seed (train.seed=0), same shards, same number of images for every variant
(a batch variant runs proportionally more or fewer steps), launched like `make demo`: `torchrun --nproc_per_node P
-m pipeline.train`, OMP_NUM_THREADS=1 per process, fp32, on the machine's cores while nothing else of this
benchmark runs. Wall time is the whole training process (start-up and checkpoints included).

Scoring: the EMA weights of each checkpoint, `pipeline.core.sampling.generate` with DDIM (eta 1, leading spacing,
`config.sampler_steps` steps, seed 0, the same initial noise for every variant), `config.num` samples,
`pipeline.evaluation.evaluate.evaluate` against the train split (classifier-FID, k-NN precision / recall / coverage,
k = 3). The last checkpoint is also sampled with deterministic DDIM (eta 0). The floor row scores
`config.num` val images the same way. Fréchet distance depends on N: compare only rows of equal N.

Colour cast: the grayscale set (`python -m data_prep --synthetic N --grayscale`, R = G = B) trained and sampled
alike; per image the mean over channel pairs of |mean(c1) - mean(c2)|, in 0-255 units, averaged over images.
The data's own cast is 0.
"""


# --- data ----------------------------------------------------------------------------------------


def shards(num: int, grayscale: bool) -> Path:
    """Synthetic 32 px faces (val 10 %, as `make demo`), built once into the cache."""
    out = CACHE / f"synthetic32-{num}{'-gray' if grayscale else ''}"
    if not (out / "manifest.json").is_file():
        cmd = [sys.executable, "-m", "data_prep", "--synthetic", str(num), "--out", str(out), "--size", "32"]
        cmd += ["--val-fraction", "0.1", "--workers", str(common.usable_cores())] + (
            ["--grayscale"] if grayscale else []
        )
        subprocess.run(cmd, cwd=REPO, check=True, capture_output=True, env=dict(os.environ, PYTHONPATH=str(REPO)))
    return out


def colour_cast(images: np.ndarray) -> float:
    """Mean over images of the mean |difference of channel means| over channel pairs; uint8 (N, H, W, 3)."""
    means = images.reshape(len(images), -1, 3).astype(np.float64).mean(axis=1)  # (N, 3)
    pairs = np.abs(means[:, [0, 1, 0]] - means[:, [1, 2, 2]])
    return float(pairs.mean())


# --- one variant -----------------------------------------------------------------------------------


def variant_overrides(name: str, plan: dict) -> tuple[list[str], int, int]:
    """(overrides, steps, batch) of a variant under a plan: the same images for every variant."""
    overrides, batch_scale = VARIANTS[name]
    batch = max(plan["procs"], int(round(plan["batch"] * batch_scale)))
    steps = int(round(plan["steps"] * plan["batch"] / batch))
    every = max(1, steps // plan["points"])
    return (
        [
            *BASELINE,
            *overrides,
            f"train.batch_size={batch}",
            f"train.max_steps={steps}",
            f"train.checkpoint_every={every}",
            f"train.keep_checkpoints={plan['points'] + 1}",
            "train.seed=0",
            "log.sample_every=0",
            "log.tensorboard=false",
            f"log.every={every}",
            "data.num_workers=1",
            "data.shuffle_buffer=500",
        ],
        steps,
        batch,
    )


def train_variant(overrides: list[str], data: Path, run_dir: Path, procs: int) -> float:
    """Train in a fresh torchrun job, as the demo does; returns the wall seconds."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(procs)]
    cmd += ["-m", "pipeline.train", "--config", str(REPO / "configs" / "tiny_cpu.yaml"), *overrides]
    cmd += [f"data.shards={data}", f"run.dir={run_dir}"]
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE")
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=7200)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-15:])
        raise RuntimeError(f"training {run_dir.name} failed (exit {proc.returncode}):\n{tail}")
    return seconds


def sample(ckpt, plan: dict, eta: float, threads: int) -> np.ndarray:
    """uint8 samples of a checkpoint (a directory or a pipeline.checkpoint.Checkpoint record)."""
    from export.backends import TorchDenoiser
    from pipeline.core.sampling import generate, to_uint8

    denoiser = TorchDenoiser(ckpt, threads=threads)
    return to_uint8(
        generate(
            denoiser,
            plan["num"],
            batch=min(plan["num"], 128),
            sampler="ddim",
            steps=plan["sampler_steps"],
            eta=eta,
            spacing="leading",
            seed=0,
        )
    )


def score(images: np.ndarray, data: Path, featurizer) -> dict:
    from pipeline.evaluation.evaluate import evaluate

    return evaluate(images, data, featurizer=featurizer)["metrics"]


def run_variant(
    name: str, data: Path, plan: dict, featurizer, threads: int, grayscale: bool, keep: Path | None, progress
) -> dict:
    """Train one variant and score its checkpoints; returns its row (and keeps its final samples)."""
    from pipeline.checkpoint import complete_checkpoints, read_checkpoint

    overrides, steps, batch = variant_overrides(name, plan)
    with tempfile.TemporaryDirectory(prefix="learning-") as tmp:
        run_dir = Path(tmp) / "run"
        progress.describe(f"learning: train {'grayscale ' if grayscale else ''}{name}")
        seconds = train_variant(overrides, data, run_dir, plan["procs"])
        progress.update()
        ckpts = complete_checkpoints(run_dir)
        points, final = [], {}
        for ckpt in map(read_checkpoint, ckpts[-1:] if grayscale else ckpts):
            progress.describe(f"learning: score {name} {ckpt.dir.name}")
            images = sample(ckpt, plan, 1.0, threads)
            row = {"step": ckpt.step, "images_seen": ckpt.images_seen, **score(images, data, featurizer)}
            if grayscale:
                row["colour_cast"] = colour_cast(images)
            points.append(row)
            final = {"eta1": images}
        images0 = sample(ckpts[-1], plan, 0.0, threads)
        final["eta0"] = images0
        last = {"eta0": score(images0, data, featurizer)}
        if grayscale:
            last["eta0"]["colour_cast"] = colour_cast(images0)
        progress.update()
    if keep is not None:
        np.savez_compressed(keep, **final)
    return {
        "overrides": VARIANTS[name][0],
        "steps": steps,
        "batch": batch,
        "wall_seconds": seconds,
        "images_per_second": steps * batch / seconds,
        "points": points,
        **last,
    }


# --- the benchmark ------------------------------------------------------------------------------


def plan_of(args) -> dict:
    plan = dict(PLAN[common.size(args)])
    if args.variants:
        names = [v.strip() for v in args.variants.split(",") if v.strip()]
        unknown = [v for v in names if v not in VARIANTS]
        if unknown:
            raise SystemExit(f"benchmarks learning: --variants {unknown[0]!r}: not one of {', '.join(VARIANTS)}")
        plan["variants"] = names
        plan["grayscale"] = [v for v in plan["grayscale"] if v in names]
    return plan


def steps(args) -> int:
    plan = plan_of(args)
    return 2 * (len(plan["variants"]) + len(plan["grayscale"]))


def run(args, progress=None) -> dict:
    from pipeline.evaluation.evaluate import reference_floor
    from pipeline.evaluation.features import Featurizer
    from pipeline.evaluation.images import read_split

    progress = progress or common.no_progress()
    plan = plan_of(args)
    config = {
        **plan,
        "baseline": BASELINE,
        "variants": {v: VARIANTS[v][0] for v in plan["variants"]},
        "batch_scale": {v: VARIANTS[v][1] for v in plan["variants"]},
        "sampler": "ddim",
        "eta": 1.0,
        "feature_net_steps": FEATURE_NET_STEPS[common.size(args)],
    }
    result = common.start("learning", args, METHOD, config, device="cpu")
    threads = result["config"]["threads"]
    samples_dir = Path(tempfile.mkdtemp(prefix="learning-samples-"))
    out: dict = {"faces": {}, "grayscale": {}}
    try:
        for set_name, names in (("faces", plan["variants"]), ("grayscale", plan["grayscale"])):
            if not names:
                continue
            gray = set_name == "grayscale"
            data = shards(plan["data"], gray)
            featurizer = Featurizer("classifier", data, train_steps=FEATURE_NET_STEPS[common.size(args)])
            floor = reference_floor(data, plan["num"], featurizer=featurizer)["metrics"]
            if gray:
                floor["colour_cast"] = colour_cast(read_split(data, "val", plan["num"], seed=1))
            out[set_name]["val split (floor)"] = {"floor": floor}
            for name in names:
                out[set_name][name] = run_variant(
                    name,
                    data,
                    plan,
                    featurizer,
                    threads,
                    gray,
                    samples_dir / f"{set_name}-{len(out[set_name])}.npz",
                    progress,
                )
        result["results"] = out
        learning_report.report(result, plan, samples_dir, Path(args.out))
    finally:
        shutil.rmtree(samples_dir, ignore_errors=True)
    return result


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--variants", default=None, metavar="A,B", help="learning: only these variants (names as listed)")


def defaults(args) -> None:
    pass


if __name__ == "__main__":
    from benchmarks.__main__ import main

    sys.exit(main(["learning", *sys.argv[1:]]))
