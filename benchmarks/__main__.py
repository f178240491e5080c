"""python -m benchmarks NAME [flags]: every benchmark, one way in.

Each writes <out>/<name>.json (machine, versions, config, every repeat) and <out>/<name>.md (targets,
tables, method), plus PNG plots where a curve says more than a table; `all` runs train, data, sampler
and end_to_end and also writes <out>/summary.md and summary.json with every target. --quick finishes
in a few minutes on 2 CPU cores (a smoke run: numbers are not representative).

A benchmark module has FLAGS (the common flags it takes) and run(args, progress) -> Result (None for a
worker that writes its own file), and where it needs them add_arguments(parser), defaults(parser, args)
and steps(args) (its progress units).
"""

from __future__ import annotations

import argparse
import importlib
import shlex
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

from benchmarks import common, render
from pipeline.core.fileio import NoSpaceError

BENCHMARKS = {
    "train": "training step: our U-Net vs diffusers, gradient checkpointing, ZeRO memory",
    "data": "data_prep and the training loader against what a training step consumes",
    "sampler": "per-evaluation time of ONNX Runtime, torch and TensorRT, and the sampling loop's overhead",
    "end_to_end": "images/s of `python -m export.sample` as a user runs it",
    "learning": "what a fixed training budget learns, per recipe variant (an hour on 2 CPU cores)",
    "quality": "sample quality against network calls, on a trained model (--ckpt RUN --shards DIR)",
    "gpu": "every GPU path in one time-boxed run (--budget-s, --cpu-smoke)",
    "all": "train, data, sampler and end_to_end, and a summary of their targets",
}
ALL = ("train", "data", "sampler", "end_to_end")
COMMON_FLAGS: dict[str, dict[str, Any]] = {
    "quick": {"action": "store_true", "help": "smoke-test sizes (minutes on 2 CPU cores)"},
    "device": {"default": None, "choices": ["cpu", "cuda"], "help": "default: cuda when present, else cpu"},
    "out": {"type": Path, "default": None, "help": "results directory (default benchmarks/results/<device>[/<name>])"},
    "threads": {"type": int, "default": None, "help": "torch / onnxruntime threads (default: usable cores)"},
}


def modules(name: str) -> list[ModuleType]:
    # Only the benchmarks asked for are imported: the others may need runtimes this machine lacks.
    return [importlib.import_module(f"benchmarks.{n}") for n in (ALL if name == "all" else (name,))]


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[ModuleType]]:
    top = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[1])
    sub = top.add_subparsers(dest="name", required=True, metavar="NAME")
    parsers = {name: sub.add_parser(name, help=line, description=line) for name, line in BENCHMARKS.items()}
    chosen = modules(argv[0]) if argv and argv[0] in BENCHMARKS else []
    if chosen:
        p = parsers[argv[0]]
        for flag in dict.fromkeys(f for m in chosen for f in m.FLAGS):
            p.add_argument(f"--{flag}", **COMMON_FLAGS[flag])
        for m in chosen:
            getattr(m, "add_arguments", lambda p: None)(p)
    args = top.parse_args(argv)
    p = parsers[args.name]
    if "device" in vars(args):
        import torch  # heavy: only to pick the default device

        if args.device == "cuda" and not torch.cuda.is_available():
            p.error("--device cuda: no CUDA device is visible to torch on this machine")
        args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        args.out = args.out or Path("benchmarks/results") / args.device
    for m in chosen:
        getattr(m, "defaults", lambda p, args: None)(p, args)
    return args, chosen


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args, chosen = parse_args(argv)
    common.COMMAND = "python -m benchmarks " + shlex.join(argv)
    progress = common.run_progress(sum(getattr(m, "steps", lambda args: 0)(args) for m in chosen))
    start, results = time.monotonic(), []
    try:
        for m in chosen:
            progress.describe(m.__name__.rsplit(".", 1)[1])
            began = time.monotonic()
            result = m.run(args, progress)
            if result is None:  # a worker (a ZeRO rank, one gpu step): it wrote its own file
                continue
            result.seconds = result.seconds or time.monotonic() - began
            md = render.write(result, args.out)
            results.append(result)
            print(f"benchmarks: {result.benchmark} done in {result.seconds:.0f} s -> {md}", file=sys.stderr)
    except NoSpaceError as e:
        print(f"benchmarks: error: {e}", file=sys.stderr)
        return 1
    finally:
        progress.close()
    if len(results) > 1:
        render.summary(results, args.out, time.monotonic() - start)
    for t in (t for r in results for t in r.targets):
        print(f"{t.name:45s} {render.fmt(t.value):>8s} (need {t.op} {t.threshold:g}): {t.verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
