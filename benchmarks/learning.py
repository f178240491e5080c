"""What a fixed budget learns: the tiny config's recipe variants, trained alike and scored alike.

  python -m benchmarks learning [--quick] [--variants NAME,NAME] [--out DIR]

Base recipe: `configs/tiny_cpu.yaml` with the overrides in `config.baseline` (its values before this benchmark);
each variant adds its overrides. Same seed (train.seed=0), same synthetic-face shards, same number of images for
every variant (a batch variant runs proportionally more or fewer steps), launched like `make demo`: `torchrun
--nproc_per_node P -m pipeline.train`, OMP_NUM_THREADS=1 per process, fp32, on the machine's cores while nothing
else of this benchmark runs. Wall time is the whole training process (start-up and checkpoints included).

Scoring: the EMA weights of each checkpoint, `pipeline.core.sampling.generate` with DDIM (eta 1, leading spacing,
`config.sampler_steps` steps, seed 0, the same initial noise for every variant), `config.num` samples,
`pipeline.evaluation.evaluate.evaluate` against the train split (classifier-FID, k-NN precision / recall / coverage,
k = 3). The last checkpoint is also sampled with deterministic DDIM (eta 0). The floor row scores
`config.num` val images the same way. Fréchet distance depends on N: compare only rows of equal N.

Colour cast: the grayscale set (`python -m data_prep --synthetic N --grayscale`, R = G = B) trained and sampled
alike; per image the mean over channel pairs of |mean(c1) - mean(c2)|, in 0-255 units, averaged over images.
The data's own cast is 0.
"""

from __future__ import annotations

import argparse
import functools
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

from benchmarks import common
from benchmarks.record import Plot, Result, table
from benchmarks.render import sample_sheet
from export.backends import default_threads, load_denoiser
from pipeline.checkpoint import complete_checkpoints, read_checkpoint
from pipeline.core.sampling import generate, to_uint8
from pipeline.evaluation.images import read_split

REPO = Path(__file__).resolve().parent.parent
CACHE = Path(tempfile.gettempdir()) / "ddpm-benchmarks" / "learning"
FLAGS = ("quick", "out", "threads")  # CPU only: the recipe's comparison, not a device's speed
CFID, FLOOR = "classifier-FID", "val split (floor)"

# configs/tiny_cpu.yaml as it was when this benchmark was written: the variants' common base, so the
# comparison stays the same when the config file adopts a variant.
BASELINE = [
    *"model.ch=32 model.ch_mult=[1,2,2] model.num_res_blocks=1 model.attn_resolutions=[8] model.dropout=0.0".split(),
    *"diffusion.beta_schedule=linear diffusion.prediction_type=epsilon train.lr=1e-3 train.warmup_steps=100".split(),
    *"train.loss_weighting=uniform ema.profile=exponential ema.decay=0.999 ema.warmup=true train.precision=fp32".split(),
]


class Variant(NamedTuple):
    overrides: list[str]
    batch_scale: float = 1.0  # steps scale inversely, so every variant sees the same images


# "today" is the baseline; min-SNR uses gamma 5 (train.snr_gamma's default), power EMA sigma_rel 0.10.
VARIANTS = {
    "today": Variant([]),
    "min-SNR eps": Variant(["train.loss_weighting=min_snr"]),
    "v-pred": Variant(["diffusion.prediction_type=v_prediction"]),
    "v-pred min-SNR": Variant(["diffusion.prediction_type=v_prediction", "train.loss_weighting=min_snr"]),
    "cosine eps": Variant(["diffusion.beta_schedule=cosine"]),
    "cosine v-pred": Variant(["diffusion.beta_schedule=cosine", "diffusion.prediction_type=v_prediction"]),
    "power EMA": Variant(["ema.profile=power", "ema.sigma_rel=0.10"]),
    "lr 2e-3": Variant(["train.lr=2e-3"]),
    "batch 16": Variant([], 0.5),
    "width 48": Variant(["model.ch=48", "model.num_groups=16"]),
}


class Budget(NamedTuple):
    data: int  # images in the set
    steps: int  # 210 x 32 in the full run: a fifth of the demo's images
    batch: int
    points: int  # checkpoints scored
    num: int  # samples scored
    sampler_steps: int
    procs: int
    feature_net_steps: int
    variants: list[str]  # the rest of VARIANTS are there for --variants
    grayscale: list[str]  # the variants also trained on the grayscale faces


FULL_VARIANTS = ["today", "min-SNR eps", "v-pred", "v-pred min-SNR", "cosine eps", "power EMA", "lr 2e-3", "batch 16"]
BUDGETS = {  # the full run: one factor at a time against "today", sized to fit an hour on 2 shared CPU cores
    "full": Budget(3000, 210, 32, 3, 128, 20, 2, 400, FULL_VARIANTS, ["today", "min-SNR eps", "v-pred min-SNR"]),
    "quick": Budget(400, 16, 16, 2, 24, 8, 1, 60, ["today", "v-pred min-SNR"], ["v-pred min-SNR"]),
}


@dataclass
class Trained:
    """One variant: its training run and the scores of its checkpoints."""

    overrides: list[str]
    steps: int
    batch: int
    wall_seconds: float
    images_per_second: float
    points: list[dict[str, float]]  # per scored checkpoint: step, images_seen and the scores (DDIM eta 1)
    eta0: dict[str, float]  # the last checkpoint's scores with deterministic DDIM


@dataclass
class Floor:
    floor: dict[str, float]  # the val split's own scores at the same N


@dataclass
class LearningResults:
    faces: dict[str, Trained | Floor]
    grayscale: dict[str, Trained | Floor]


def shards(num: int, grayscale: bool) -> Path:
    """Synthetic 32 px faces (val 10 %, as `make demo`), built once into the cache."""
    out = CACHE / f"synthetic32-{num}{'-gray' if grayscale else ''}"
    if not (out / "manifest.json").is_file():
        cmd = [sys.executable, "-m", "data_prep", "--synthetic", str(num), "--out", str(out), "--size", "32"]
        cmd += ["--val-fraction", "0.1", "--workers", str(default_threads()), *(["--grayscale"] if grayscale else [])]
        subprocess.run(cmd, cwd=REPO, check=True, capture_output=True, env=dict(os.environ, PYTHONPATH=str(REPO)))
    return out


def colour_cast(images: np.ndarray) -> float:
    """Mean over images of the mean |difference of channel means| over channel pairs; uint8 (N, H, W, 3)."""
    means = images.reshape(len(images), -1, 3).astype(np.float64).mean(axis=1)  # (N, 3)
    pairs = np.abs(means[:, [0, 1, 0]] - means[:, [1, 2, 2]])
    return float(pairs.mean())


def variant_overrides(name: str, budget: Budget) -> tuple[list[str], int, int]:
    """(overrides, steps, batch) of a variant under a budget: the same images for every variant."""
    batch = max(budget.procs, int(round(budget.batch * VARIANTS[name].batch_scale)))
    steps = int(round(budget.steps * budget.batch / batch))
    every = max(1, steps // budget.points)
    run = [f"train.batch_size={batch}", f"train.max_steps={steps}", f"train.checkpoint_every={every}"]
    run += [
        f"train.keep_checkpoints={budget.points + 1}",
        "train.seed=0",
        "log.sample_every=0",
        "log.tensorboard=false",
    ]
    run += [f"log.every={every}", "data.num_workers=1", "data.shuffle_buffer=500"]
    return [*BASELINE, *VARIANTS[name].overrides, *run], steps, batch


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


def sample(ckpt: Path, budget: Budget, eta: float, threads: int) -> np.ndarray:
    """uint8 samples of a checkpoint directory's EMA weights (the torch backend)."""
    denoiser = load_denoiser(ckpt, threads=threads)
    steps, batch = budget.sampler_steps, min(budget.num, 128)
    return to_uint8(
        generate(denoiser, budget.num, batch=batch, sampler="ddim", steps=steps, eta=eta, spacing="leading", seed=0)
    )


def run_variant(
    name: str, data: Path, budget: Budget, score, threads: int, gray: bool, progress
) -> tuple[Trained, dict]:
    """Train one variant and score its checkpoints: its record, and its last checkpoint's samples by eta."""
    overrides, steps, batch = variant_overrides(name, budget)
    with tempfile.TemporaryDirectory(prefix="learning-") as tmp:
        run_dir = Path(tmp) / "run"
        progress.describe(f"learning: train {'grayscale ' if gray else ''}{name}")
        seconds = train_variant(overrides, data, run_dir, budget.procs)
        progress.update()
        ckpts, points, final = complete_checkpoints(run_dir), [], {}
        for ckpt in map(read_checkpoint, ckpts[-1:] if gray else ckpts):
            progress.describe(f"learning: score {name} {ckpt.dir.name}")
            final["eta1"] = sample(ckpt.dir, budget, 1.0, threads)
            points.append({"step": ckpt.step, "images_seen": ckpt.images_seen, **score(final["eta1"])})
        final["eta0"] = sample(ckpts[-1], budget, 0.0, threads)
        eta0 = score(final["eta0"])
        progress.update()
    trained = Trained(VARIANTS[name].overrides, steps, batch, seconds, steps * batch / seconds, points, eta0)
    return trained, final


def score(images: np.ndarray, data: Path, featurizer, gray: bool) -> dict[str, float]:
    from pipeline.evaluation.evaluate import evaluate  # heavy: torchvision, scipy

    scores = evaluate(images, data, featurizer=featurizer)["metrics"]
    return {**scores, "colour_cast": colour_cast(images)} if gray else scores


def budget_of(args) -> Budget:
    budget = BUDGETS[common.size(args)]
    if not args.variants:
        return budget
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"benchmarks learning: --variants {unknown[0]!r}: not one of {', '.join(VARIANTS)}")
    return budget._replace(variants=names, grayscale=[v for v in budget.grayscale if v in names])


def steps(args) -> int:
    budget = budget_of(args)
    return 2 * (len(budget.variants) + len(budget.grayscale))


def run(args, progress) -> Result:
    from pipeline.evaluation.evaluate import reference_floor  # heavy: torchvision, scipy
    from pipeline.evaluation.features import Featurizer  # heavy: torchvision

    budget = budget_of(args)
    config = {**budget._asdict(), "baseline": BASELINE, "variants": {v: VARIANTS[v].overrides for v in budget.variants}}
    config |= {"batch_scale": {v: VARIANTS[v].batch_scale for v in budget.variants}, "sampler": "ddim", "eta": 1.0}
    result = common.start("learning", args, __doc__.split("\n\n", 2)[2], config, device="cpu")
    results, rows = LearningResults({}, {}), []  # rows: the sample sheet's, one per variant trained
    for set_name, names in (("faces", budget.variants), ("grayscale", budget.grayscale)):
        if not names:
            continue
        gray, runs = set_name == "grayscale", getattr(results, set_name)
        data = shards(budget.data, gray)
        featurizer = Featurizer("classifier", data, train_steps=budget.feature_net_steps)
        floor = reference_floor(data, budget.num, featurizer=featurizer)["metrics"]
        if gray:
            floor["colour_cast"] = colour_cast(read_split(data, "val", budget.num, seed=1))
        runs[FLOOR] = Floor(floor)
        for name in names:
            scorer = functools.partial(score, data=data, featurizer=featurizer, gray=gray)
            runs[name], final = run_variant(name, data, budget, scorer, result.config["threads"], gray, progress)
            rows.append(((f"gray: {name}" if gray else name), [*final["eta1"][:12], None, *final["eta0"][:12]]))
    result.results = results
    report(result, budget)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    sample_sheet(rows, Path(args.out) / "learning_samples.png")
    result.images.append("learning_samples.png")
    result.notes.append(
        "learning_samples.png: the first 12 samples of each variant's last checkpoint, DDIM eta 1 "
        "then eta 0 on each row; the face runs first, then the grayscale runs."
    )
    return result


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--variants", default=None, metavar="A,B", help="only these variants (names as listed)")


def defaults(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    args.out = args.out or Path("benchmarks/results/cpu/learning")


def report(result: Result, budget: Budget) -> None:
    """The faces table, cFID against images seen (table and plot), and the grayscale set's colour cast."""
    faces, gray, floor = result.results.faces, result.results.grayscale, result.results.faces[FLOOR].floor
    runs = {k: v for k, v in faces.items() if k != FLOOR}
    scores = ("precision", "recall", "coverage")
    rows = [
        [name, r.steps, r.batch, r.wall_seconds, r.images_per_second, min(p[CFID] for p in r.points)]
        + [r.points[-1][CFID], r.eta0[CFID], r.eta0[CFID] / r.points[-1][CFID], *[r.points[-1][k] for k in scores]]
        for name, r in runs.items()
    ]
    rows.append([FLOOR, *[None] * 5, floor[CFID], None, None, *[floor[k] for k in scores]])
    title = (
        f"Faces: {budget.steps * budget.batch:,} images per variant, {budget.num} samples, DDIM-{budget.sampler_steps}"
    )
    columns = f"variant | steps | batch | train s | images/s | best {CFID} | last {CFID} (eta 1) | {CFID} eta 0 | "
    result.tables.append(table(title, columns + "eta 0 / eta 1 | precision | recall | coverage", rows))
    seen = sorted({p["images_seen"] for r in runs.values() for p in r.points})
    rows = [
        [n, *[next((p[CFID] for p in r.points if p["images_seen"] == i), None) for i in seen]] for n, r in runs.items()
    ]
    columns = " | ".join(["variant", *[f"{n:,}" for n in seen]])
    result.tables.append(table(f"Faces: {CFID} (eta 1) against images seen", columns, rows))
    if gray_runs := {k: v for k, v in gray.items() if k != FLOOR}:
        last = [(n, r.points[-1], r.eta0) for n, r in gray_runs.items()]
        rows = [[n, p["colour_cast"], e["colour_cast"], p[CFID], e[CFID], p["precision"]] for n, p, e in last]
        g = gray[FLOOR].floor
        rows.append(["val split (data)", g["colour_cast"], None, g[CFID], None, g["precision"]])
        columns = f"variant | colour cast eta 1 | colour cast eta 0 | {CFID} eta 1 | {CFID} eta 0 | precision"
        title = "Grayscale faces: colour cast (0-255) and scores of the last checkpoint"
        result.tables.append(table(title, columns, rows))
    series = {name: [[p["images_seen"] for p in r.points], [p[CFID] for p in r.points]] for name, r in runs.items()}
    title = f"Tiny model: {CFID} (DDIM-{budget.sampler_steps} eta 1, N={budget.num}) against images seen"
    result.plots.append(Plot("learning_cfid.png", title, "images seen", CFID, series, logy=True))
