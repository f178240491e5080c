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
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks import common

SOLVERS = ("unipc", "dpmpp_2m", "ddim")
STEPS = {"full": (5, 10, 15, 25, 50), "quick": (5, 10)}
# DDIM with eta 0, the deterministic baseline (and the old default, 50 steps): at the solvers' count and its own.
DDIM_STEPS = {"full": (10, 50), "quick": (10,)}
REFERENCES = {"full": (("ddpm", 250, 0.0), ("ddim", 50, 1.0)), "quick": (("ddpm", 25, 0.0), ("ddim", 10, 1.0))}
TARGET_CALLS = 10  # the issue: a solver at <= 10 evaluations ...
TARGET_MARGIN = 1.10  # ... within 10 % of the best reference
STRIP_SEEDS = 8  # images per row of the strip


LABELS = {"unipc": "UniPC", "dpmpp_2m": "DPM++(2M)", "ddim": "DDIM", "ddpm": "DDPM"}


def set_name(sampler: str, steps: int, eta: float) -> str:
    return f"{LABELS[sampler]}-{steps}" + (f" eta {eta:g}" if sampler == "ddim" else "")


def export_denoiser(ckpt: str, workdir: Path, threads: int):
    """The newest EMA weights of a run (or a checkpoint dir) as an onnxruntime denoiser."""
    from export.backends import OrtDenoiser
    from export.onnx import main as export_onnx

    onnx = workdir / "denoiser.onnx"
    if export_onnx(["--ckpt", ckpt, "--out", str(onnx)]) != 0:
        raise SystemExit(2)  # export.onnx printed the one-line reason
    return OrtDenoiser(onnx, provider="cpu", threads=threads)


def sample_set(denoiser, num: int, sampler: str, steps: int, eta: float, spacing: str) -> tuple[np.ndarray, float]:
    from pipeline.core.sampling import generate, to_uint8

    start = time.perf_counter()
    images = to_uint8(
        generate(denoiser, num, batch=min(num, 64), sampler=sampler, steps=steps, eta=eta, spacing=spacing, seed=0)
    )
    return images, time.perf_counter() - start


def strip(rows: list[tuple[str, np.ndarray]], path: Path) -> None:
    """One row per set (its first STRIP_SEEDS images), a label column on the left; written atomically."""
    from PIL import Image, ImageDraw
    from pipeline.core.fileio import atomic_write_bytes
    from pipeline.train.previews import png_bytes

    h, w = rows[0][1].shape[1:3]
    scale = max(1, 64 // h)
    label_w, pad = 120, 2
    canvas = Image.new("RGB", (label_w + STRIP_SEEDS * (w * scale + pad), len(rows) * (h * scale + pad)), "white")
    draw = ImageDraw.Draw(canvas)
    for r, (name, images) in enumerate(rows):
        y = r * (h * scale + pad)
        draw.text((4, y + h * scale // 2 - 6), name, fill="black")
        for c, image in enumerate(images[:STRIP_SEEDS]):
            tile = Image.fromarray(image.squeeze(-1) if image.shape[-1] == 1 else image).resize(
                (w * scale, h * scale), Image.NEAREST
            )
            canvas.paste(tile, (label_w + c * (w * scale + pad), y))
    atomic_write_bytes(path, png_bytes(canvas))


def run(args) -> dict:
    from pipeline.evaluation.evaluate import evaluate, reference_floor
    from pipeline.evaluation.features import Featurizer
    from pipeline.core.sampling import DEFAULT_SPACING

    size = common.size(args)
    num = args.num or (64 if args.quick else 256)
    threads = common.set_threads(args.threads)
    plan = [(s, n, 0.0) for s in SOLVERS for n in (DDIM_STEPS if s == "ddim" else STEPS)[size]]
    plan += list(REFERENCES[size])
    result = common.new_result(
        "quality",
        quick=args.quick,
        device="cpu",
        config={
            "ckpt": args.ckpt,
            "shards": args.shards,
            "num": num,
            "seed": 0,
            "spacing": DEFAULT_SPACING,
            "threads": threads,
            "sets": [set_name(*p) for p in plan],
        },
        method=__doc__.split("\n\n", 2)[2],
    )
    progress = common.run_progress(len(plan) + 1)
    featurizer = Featurizer("classifier", args.shards, None, None)
    rows, sets, strip_rows = [], {}, []
    with tempfile.TemporaryDirectory() as workdir:
        denoiser = export_denoiser(args.ckpt, Path(workdir), threads)
        for sampler, steps, eta in plan:
            name = set_name(sampler, steps, eta)
            progress.describe(f"quality: {name}")
            images, seconds = sample_set(denoiser, num, sampler, steps, eta, DEFAULT_SPACING)
            scored = evaluate(images, args.shards, featurizer=featurizer)["metrics"]
            sets[name] = {
                "sampler": sampler,
                "steps": steps,
                "eta": eta,
                "seconds": seconds,
                "images_per_second": num / seconds,
                **scored,
            }
            rows.append([name, steps, scored["classifier-FID"], scored["precision"], scored["recall"], seconds])
            strip_rows.append((name, images))
            progress.update()
    floor = reference_floor(args.shards, n=num, featurizer=featurizer)["metrics"]
    progress.update()
    progress.close()
    result["results"] = {"sets": sets, "floor": floor, "steps": list(STEPS[size])}
    rows.append(["val split (floor)", 0, floor["classifier-FID"], floor["precision"], floor["recall"], None])
    result["tables"].append(
        common.table(
            f"{num} images per set, against the train split",
            ["set", "network calls", "classifier-FID", "precision", "recall", "wall s"],
            rows,
        )
    )
    judge(result, sets, size)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    curves = {}
    for s in SOLVERS:
        steps = (DDIM_STEPS if s == "ddim" else STEPS)[size]
        curves[LABELS[s] + (" eta 0" if s == "ddim" else "")] = (
            list(steps),
            [sets[set_name(s, n, 0.0)]["classifier-FID"] for n in steps],
        )
    for sampler, steps, eta in REFERENCES[size]:
        curves[set_name(sampler, steps, eta)] = ([steps], [sets[set_name(sampler, steps, eta)]["classifier-FID"]])
    span = [min(STEPS[size]), max(n for _, n, _ in plan)]
    curves["val split (floor)"] = (span, [floor["classifier-FID"]] * 2)
    common.plot_curves(
        out / "quality.png",
        f"classifier-FID against network calls ({num} images per set)",
        "network evaluations per image",
        "classifier-FID (lower is better)",
        curves,
        logx=2,
        logy=True,
    )
    strip(strip_rows, out / "quality_strip.png")
    result["plots"] += ["quality.png", "quality_strip.png"]
    return result


def judge(result: dict, sets: dict, size: str) -> None:
    """The issue's target, and the default it implies: the fewest calls within the margin of the references."""
    refs = [sets[set_name(*r)]["classifier-FID"] for r in REFERENCES[size]]
    best_ref = min(refs)
    solvers = {k: v for k, v in sets.items() if v["sampler"] in ("unipc", "dpmpp_2m")}
    at_target = [v["classifier-FID"] for v in solvers.values() if v["steps"] <= TARGET_CALLS]
    best = min(at_target) if at_target else None
    ref_calls = max(r[1] for r in REFERENCES[size] if sets[set_name(*r)]["classifier-FID"] == best_ref)
    result["targets"].append(
        common.target(
            "solver_at_10_calls_vs_best_reference",
            f"best of dpmpp_2m / unipc at <= {TARGET_CALLS} calls, relative to the best reference "
            f"(needs <= {TARGET_MARGIN:g}x, i.e. within 10 %)",
            None if best is None else best / best_ref,
            TARGET_MARGIN,
            "<=",
            detail=f"best reference cFID {best_ref:.2f} at {ref_calls} calls; best solver at <= {TARGET_CALLS} calls "
            f"{best if best is None else round(best, 2)}",
        )
    )
    within = sorted(
        (v["steps"], v["classifier-FID"], k) for k, v in sets.items() if v["classifier-FID"] <= TARGET_MARGIN * best_ref
    )
    if within:
        steps, cfid, name = within[0]
        result["results"]["recommended"] = name
        result["notes"].append(
            f"Fewest network calls within 10 % of the best reference: {name} "
            f"(cFID {cfid:.2f}, {steps} calls against {ref_calls}: {ref_calls / steps:.0f}x fewer)."
        )
    else:
        result["notes"].append("No set came within 10 % of the best reference.")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks quality", description=__doc__.splitlines()[0])
    p.add_argument("--ckpt", required=True, help="a run directory (newest complete checkpoint) or a checkpoint")
    p.add_argument("--shards", required=True, help="the shards the model was trained on (train and val splits)")
    p.add_argument("--num", type=int, help="images per set (default 256; quick 64)")
    p.add_argument("--quick", action="store_true", help="5 and 10 steps, short references: a smoke run for CI")
    p.add_argument("--out", default="benchmarks/results/cpu/quality", help="results directory")
    p.add_argument("--threads", type=int, help="onnxruntime / torch threads (default: usable cores)")
    args = p.parse_args(argv)
    if args.num is not None and args.num < 2:
        p.error(f"--num {args.num}: must be >= 2 (a Fréchet distance needs a covariance)")
    return args


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    common.COMMAND = "python -m benchmarks quality " + " ".join(shlex.quote(a) for a in argv)
    start = time.monotonic()
    result = run(args)
    result["seconds"] = time.monotonic() - start
    json_path, md_path = common.write_result(result, args.out)
    print(f"benchmarks: quality done in {result['seconds']:.0f} s -> {md_path}", file=sys.stderr)
    for t in result["targets"]:
        print(f"{t['name']}: {common.fmt(t['value'])} (need {t['op']} {t['threshold']:g}): {common.target_verdict(t)}")
    for note in result["notes"]:
        print(note)
    return 0
