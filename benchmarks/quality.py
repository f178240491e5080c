"""Sample quality against network calls: which sampler and step count to run by default.

    python -m benchmarks quality --ckpt RUN --shards DIR [--num 256] [--quick] [--out DIR]

For one trained model (exported to ONNX on the spot, run by onnxruntime on the CPU), N images per
sampler at 5, 10, 15, 25 and 50 network evaluations, plus DDPM-250 and DDIM-50 with eta 1 as the
references, all from the same seeds; each set scored by `pipeline.evaluation` against the train
split (classifier-FID, precision, recall), the val split at equal N as the floor. Writes
quality.json, quality.md, quality.png (cFID against evaluations) and quality_strip.png (the same
seeds across samplers and step counts).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from benchmarks import common
from benchmarks.record import Plot, Result, table
from benchmarks.render import sample_sheet
from export.backends import load_denoiser
from export.onnx import main as export_onnx
from pipeline.core.sampling import DEFAULT_SPACING, generate, to_uint8

FLAGS = ("quick", "out", "threads")  # onnxruntime on the CPU: the scores do not depend on the device


class Sampling(NamedTuple):
    sampler: str
    steps: int
    eta: float = 0.0


SOLVERS = ("unipc", "dpmpp_2m", "ddim")
STEPS = {"full": (5, 10, 15, 25, 50), "quick": (5, 10)}
# DDIM with eta 0, the deterministic baseline (and the old default, 50 steps): at the solvers' count and its own.
DDIM_STEPS = {"full": (10, 50), "quick": (10,)}
REFERENCES = {
    "full": (Sampling("ddpm", 250), Sampling("ddim", 50, eta=1.0)),
    "quick": (Sampling("ddpm", 25), Sampling("ddim", 10, eta=1.0)),
}
TARGET_CALLS = 10  # the issue: a solver at <= 10 evaluations ...
TARGET_MARGIN = 1.10  # ... within 10 % of the best reference
STRIP_SEEDS = 8  # images per row of the strip
LABELS = {"unipc": "UniPC", "dpmpp_2m": "DPM++(2M)", "ddim": "DDIM", "ddpm": "DDPM"}


@dataclass
class QualityResults:
    # by set name: its sampling (sampler, steps, eta), seconds, images/s and pipeline.evaluation's scores by name
    sets: dict[str, dict[str, Any]]
    floor: dict[str, float]  # the val split's scores at the same N
    steps: list[int]
    recommended: str | None = None  # the fewest calls within TARGET_MARGIN of the best reference


def set_name(s: Sampling) -> str:
    return f"{LABELS[s.sampler]}-{s.steps}" + (f" eta {s.eta:g}" if s.sampler == "ddim" else "")


def sampling_sets(size: str) -> list[Sampling]:
    solvers = [Sampling(s, n) for s in SOLVERS for n in (DDIM_STEPS if s == "ddim" else STEPS)[size]]
    return solvers + list(REFERENCES[size])


def steps(args) -> int:
    return len(sampling_sets(common.size(args))) + 1


def run(args, progress) -> Result:
    from pipeline.evaluation.evaluate import evaluate, reference_floor  # heavy: torchvision, scipy
    from pipeline.evaluation.features import Featurizer  # heavy: torchvision

    size, num = common.size(args), args.num or (64 if args.quick else 256)
    samplings, method = sampling_sets(size), __doc__.split("\n\n", 2)[2]
    config = {"ckpt": args.ckpt, "shards": args.shards, "num": num, "seed": 0, "spacing": DEFAULT_SPACING}
    result = common.start("quality", args, method, {**config, "sets": [set_name(s) for s in samplings]}, "cpu")
    featurizer = Featurizer("classifier", args.shards, None, None)
    sets, rows, strip = {}, [], []
    with tempfile.TemporaryDirectory() as workdir:
        onnx = Path(workdir) / "denoiser.onnx"
        if export_onnx(["--ckpt", args.ckpt, "--out", str(onnx)]) != 0:
            raise SystemExit(2)  # export.onnx printed the one-line reason
        denoiser = load_denoiser(onnx, provider="cpu", threads=result.config["threads"])
        for s in samplings:
            name = set_name(s)
            progress.describe(f"quality: {name}")
            start = time.perf_counter()
            samples = generate(denoiser, num, batch=min(num, 64), **s._asdict(), spacing=DEFAULT_SPACING, seed=0)
            images = to_uint8(samples)
            seconds = time.perf_counter() - start
            scored = evaluate(images, args.shards, featurizer=featurizer)["metrics"]
            sets[name] = {**s._asdict(), "seconds": seconds, "images_per_second": num / seconds, **scored}
            rows.append([name, s.steps, scored["classifier-FID"], scored["precision"], scored["recall"], seconds])
            strip.append((name, list(images[:STRIP_SEEDS])))
            progress.update()
    floor = reference_floor(args.shards, n=num, featurizer=featurizer)["metrics"]
    progress.update()
    result.results = QualityResults(sets, floor, list(STEPS[size]))
    rows.append(["val split (floor)", 0, floor["classifier-FID"], floor["precision"], floor["recall"], None])
    columns = "set | network calls | classifier-FID | precision | recall | wall s"
    result.tables.append(table(f"{num} images per set, against the train split", columns, rows))
    judge(result, size)
    result.plots.append(cfid_plot(result.results, size, num))
    Path(args.out).mkdir(parents=True, exist_ok=True)
    sample_sheet(strip, Path(args.out) / "quality_strip.png")
    result.images.append("quality_strip.png")
    return result


def cfid_plot(res: QualityResults, size: str, num: int) -> Plot:
    """cFID against network calls: a line per solver, a point per reference, the floor across."""
    curves = {}
    for s in SOLVERS:
        steps = (DDIM_STEPS if s == "ddim" else STEPS)[size]
        label = LABELS[s] + (" eta 0" if s == "ddim" else "")
        curves[label] = [list(steps), [res.sets[set_name(Sampling(s, n))]["classifier-FID"] for n in steps]]
    for ref in REFERENCES[size]:
        curves[set_name(ref)] = [[ref.steps], [res.sets[set_name(ref)]["classifier-FID"]]]
    span = [min(STEPS[size]), max(s["steps"] for s in res.sets.values())]
    curves["val split (floor)"] = [span, [res.floor["classifier-FID"]] * 2]
    title, xlabel = f"classifier-FID against network calls ({num} images per set)", "network evaluations per image"
    return Plot("quality.png", title, xlabel, "classifier-FID (lower is better)", curves, logx=2, logy=True)


def judge(result: Result, size: str) -> None:
    """The issue's target, and the default it implies: the fewest calls within the margin of the references."""
    sets = result.results.sets
    best_ref = min(sets[set_name(r)]["classifier-FID"] for r in REFERENCES[size])
    ref_calls = max(r.steps for r in REFERENCES[size] if sets[set_name(r)]["classifier-FID"] == best_ref)
    solvers = [v for v in sets.values() if v["sampler"] in ("unipc", "dpmpp_2m") and v["steps"] <= TARGET_CALLS]
    best = min((v["classifier-FID"] for v in solvers), default=None)
    what = f"best of dpmpp_2m / unipc at <= {TARGET_CALLS} calls, relative to the best reference "
    what += f"(needs <= {TARGET_MARGIN:g}x, i.e. within 10 %)"
    detail = f"best reference cFID {best_ref:.2f} at {ref_calls} calls; best solver at <= {TARGET_CALLS} calls "
    detail += f"{best if best is None else round(best, 2)}"
    value = None if best is None else best / best_ref
    result.add_target("solver_at_10_calls_vs_best_reference", what, value, TARGET_MARGIN, "<=", detail=detail)
    scored = [(v["steps"], v["classifier-FID"], k) for k, v in sets.items()]
    within = sorted(s for s in scored if s[1] <= TARGET_MARGIN * best_ref)
    if not within:
        result.notes.append("No set came within 10 % of the best reference.")
        return
    steps, cfid, name = within[0]
    result.results.recommended = name
    result.notes.append(
        f"Fewest network calls within 10 % of the best reference: {name} "
        f"(cFID {cfid:.2f}, {steps} calls against {ref_calls}: {ref_calls / steps:.0f}x fewer)."
    )


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ckpt", required=True, help="a run directory (newest complete checkpoint) or a checkpoint")
    p.add_argument("--shards", required=True, help="the shards the model was trained on (train and val splits)")
    p.add_argument("--num", type=int, help="images per set (default 256; quick 64)")


def defaults(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    args.out = args.out or Path("benchmarks/results/cpu/quality")
    if args.num is not None and args.num < 2:
        p.error(f"--num {args.num}: must be >= 2 (a Fréchet distance needs a covariance)")
