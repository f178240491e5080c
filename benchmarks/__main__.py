"""python -m benchmarks <name>|all [--quick] [--device cpu|cuda] [--out DIR]

Benchmarks: train, data, sampler, end_to_end (`all` runs these) and learning (what a fixed training budget
learns; an hour on 2 CPU cores, so not part of `all`). Each writes <out>/<name>.json (machine, versions,
config, every repeat) and <out>/<name>.md (tables, targets, method), plus PNG plots where a curve
says more than a table; `all` also writes <out>/summary.md and summary.json with every target.
--quick finishes in a few minutes on 2 CPU cores (a smoke run: numbers are not representative).
`python -m benchmarks gpu [--out DIR] [--budget-s 480] [--cpu-smoke]` checks every GPU path in one
time-boxed run (see benchmarks/gpu.py). `python -m benchmarks quality --ckpt RUN --shards DIR` scores
every sampler against its network calls on a trained model (see benchmarks/quality.py).
"""

from __future__ import annotations

import argparse
import importlib
import shlex
import sys
import time
from pathlib import Path

from benchmarks import common

NAMES = ("train", "data", "sampler", "end_to_end")
EXTRA = ("learning",)


def module(name: str):
    """The benchmark's module: run(args, progress) and steps(args); add_arguments(parser) and
    defaults(args) where it has flags of its own."""
    return importlib.import_module(f"benchmarks.{name}")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    p.add_argument("name", choices=NAMES + EXTRA + ("all",), help="which benchmark, or all of them")
    p.add_argument("--quick", action="store_true", help="smoke-test sizes (minutes on 2 CPU cores)")
    p.add_argument("--device", default=None, choices=["cpu", "cuda"], help="default: cuda when present, else cpu")
    p.add_argument("--out", type=Path, default=None, help="results directory (default benchmarks/results/<device>)")
    p.add_argument("--threads", type=int, default=None, help="torch / onnxruntime threads (default: usable cores)")
    for name in NAMES + EXTRA:
        getattr(module(name), "add_arguments", lambda parser: None)(p)
    args = p.parse_args(argv)
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    elif args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            p.error("--device cuda: no CUDA device is visible to torch on this machine")
    args.out = args.out or Path("benchmarks/results") / args.device
    for name in NAMES + EXTRA:
        getattr(module(name), "defaults", lambda args: None)(args)
    return args


def summary(results: dict[str, dict], out_dir: Path, seconds: float) -> None:
    targets = [t for r in results.values() for t in r["targets"]]
    first = next(iter(results.values()))
    md = [
        "# Benchmark summary",
        "",
        f"`{first['command']}` · {first['date']} · {seconds / 60:.1f} min",
        "",
        f"Machine: {common.machine_line(first['machine'])}",
        "",
        common.targets_table(targets),
        "",
        "Details: " + ", ".join(f"[{n}]({n}.md)" for n in results),
        "",
    ]
    common.atomic_write_text(out_dir / "summary.md", "\n".join(md))
    common.atomic_write_json(
        out_dir / "summary.json",
        {
            "command": first["command"],
            "date": first["date"],
            "seconds": seconds,
            "machine": first["machine"],
            "versions": first["versions"],
            "benchmarks": list(results),
            "targets": targets,
        },
    )


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["gpu"]:  # every GPU path in one time-boxed run: a command of its own (benchmarks.gpu)
        from benchmarks import gpu

        return gpu.main(argv[1:])
    if argv[:1] == ["quality"]:  # needs a trained model and its shards: a command of its own
        from benchmarks import quality

        return quality.main(argv[1:])
    args = parse_args(argv)
    common.COMMAND = "python -m benchmarks " + " ".join(shlex.quote(a) for a in argv)
    names = NAMES if args.name == "all" else (args.name,)
    args.out.mkdir(parents=True, exist_ok=True)
    progress = common.run_progress(sum(module(n).steps(args) for n in names))
    start, results = time.monotonic(), {}
    from pipeline.core.fileio import NoSpaceError

    try:
        for name in names:
            progress.describe(name)
            result = module(name).run(args, progress)
            result["seconds"] = time.monotonic() - start - sum(r["seconds"] for r in results.values())
            json_path, md_path = common.write_result(result, args.out)
            results[name] = result
            print(f"benchmarks: {name} done in {result['seconds']:.0f} s -> {md_path}", file=sys.stderr)
    except NoSpaceError as e:
        print(f"benchmarks: error: {e}", file=sys.stderr)
        return 1
    finally:
        progress.close()
    if len(names) > 1:
        summary(results, args.out, time.monotonic() - start)
    for result in results.values():
        for t in result["targets"]:
            print(
                f"{t['name']:45s} {common.fmt(t['value']):>8s} (need {t['op']} {t['threshold']:g}): "
                f"{common.target_verdict(t)}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
