"""What every benchmark shares: the machine, timing with warm-up and repeats, targets, writers.

A benchmark returns one result dict (see `new_result`) holding the machine, the versions, its
config, every repeat, tables, targets and plots; `write_result` turns it into `<name>.json`
(atomic) and `<name>.md`. Side-by-side timings are interleaved (A B B A ...) so that the load of a
shared machine drifts over both sides alike, and ratios are medians of the per-round ratios.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import io
import math
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

from export.backends import default_threads
from pipeline.core import progress
from pipeline.core.fileio import atomic_write_bytes, atomic_write_json, atomic_write_text

COMMAND = ""  # the command line of this run, set by benchmarks.__main__
PACKAGES = (
    "torch",
    "deepspeed",
    "onnxruntime-gpu",
    "onnxruntime",
    "onnx",
    "diffusers",
    "tensorrt",
    "numpy",
    "webdataset",
    "pillow",
)


# --- the machine ----------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


usable_cores = default_threads  # cores this process may run on (taskset, cgroups via affinity, Slurm binding)


def ram_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def versions() -> dict:
    """Installed versions of what we measure (None: not installed); read without importing."""
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def machine_info(device: str = "cpu") -> dict:
    import torch

    info = {
        "cpu": cpu_model(),
        "cores": usable_cores(),
        "logical_cpus": os.cpu_count(),
        "ram_gib": ram_gib(),
        "platform": platform.platform(),
        "hostname": platform.node(),
        "torch_threads": torch.get_num_threads(),
        "cuda_available": torch.cuda.is_available(),
        "gpu": None,
        "load_average": _load_average(),
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1), cuda=torch.version.cuda)
    return info


def _load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def machine_line(machine: dict) -> str:
    gpu = f", GPU {machine['gpu']}" if machine.get("gpu") else ", no GPU"
    return f"{machine['cpu']}, {machine['cores']} cores, {machine['ram_gib']} GiB RAM{gpu}"


# --- timing ---------------------------------------------------------------------------------


def summarize(values: list[float]) -> dict:
    """Median and spread of repeats: interquartile range, min, max, and every value."""
    values = [float(v) for v in values]
    if len(values) >= 2:
        q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    else:
        q1 = q3 = values[0]
    return {
        "median": statistics.median(values),
        "q1": q1,
        "q3": q3,
        "min": min(values),
        "max": max(values),
        "repeats": values,
    }


def cuda_sync(device: str) -> Callable[[], None]:
    if str(device).startswith("cuda"):
        import torch

        return torch.cuda.synchronize
    return lambda: None


def time_call(fn: Callable[[], object], sync: Callable[[], None] = lambda: None) -> float:
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


def interleaved(
    fns: dict[str, Callable[[], object]],
    *,
    warmup: int,
    repeats: int,
    sync: Callable[[], None] = lambda: None,
    on_round: Callable[[], None] | None = None,
) -> dict[str, list[float]]:
    """Seconds per call of each fn, rounds alternating forward and reverse order (A B, B A, ...)."""
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    sync()
    times = {name: [] for name in names}
    for r in range(repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            times[name].append(time_call(fns[name], sync))
        if on_round:
            on_round()
    return times


def paired_ratio(numerator: list[float], denominator: list[float]) -> dict:
    """Median (and spread) of round-by-round ratios: robust to load that drifts between rounds."""
    return summarize([a / b for a, b in zip(numerator, denominator)])


# --- targets ----------------------------------------------------------------------------


def target(
    name: str, description: str, value: float | None, threshold: float, op: str, *, unit: str = "x", detail: str = ""
) -> dict:
    """A target from the issue and whether this run met it; `missed_by` is relative to the threshold."""
    met = missed_by = None
    if value is not None and not (isinstance(value, float) and math.isnan(value)):
        met = value >= threshold if op == ">=" else value <= threshold
        missed_by = 0.0 if met else abs(value - threshold) / threshold
    else:
        value, detail = None, detail or "not measured on this machine"
    return {
        "name": name,
        "target": description,
        "value": value,
        "threshold": threshold,
        "op": op,
        "unit": unit,
        "met": met,
        "missed_by": missed_by,
        "detail": detail,
    }


def target_verdict(t: dict) -> str:
    if t["met"] is None:
        return "n/a"
    return "met" if t["met"] else f"missed by {100 * t['missed_by']:.0f} %"


# --- results --------------------------------------------------------------------------------


def size(args) -> str:
    """The key of a benchmark's size tables for this command line: "quick" or "full"."""
    return "quick" if args.quick else "full"


def device_plan(plan: dict, args) -> list:
    """plan[size][cpu|cuda]: the cases a benchmark runs at this size on this device."""
    return plan[size(args)]["cuda" if args.device.startswith("cuda") else "cpu"]


def start(name: str, args, method: str, config: dict, device: str | None = None) -> dict:
    """new_result of a `python -m benchmarks NAME` run: its size and device (unless given) from the
    command line; torch's threads are set (usable cores unless --threads) and recorded in the config."""
    threads = set_threads(args.threads)
    config = {**config, "threads": threads}
    return new_result(name, quick=args.quick, device=device or args.device, config=config, method=method)


def new_result(name: str, *, quick: bool, device: str, config: dict, method: str) -> dict:
    return {
        "benchmark": name,
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": COMMAND or " ".join(map(shlex.quote, sys.argv)),
        "quick": quick,
        "device": device,
        "machine": machine_info(device),
        "versions": versions(),
        "config": config,
        "method": method,
        "results": {},
        "tables": [],
        "targets": [],
        "plots": [],
        "notes": [],
    }


def table(title: str, columns: list[str], rows: list[list]) -> dict:
    return {"title": title, "columns": columns, "rows": rows}


def spread(s: dict, digits: int = 2, percent: bool = False) -> str:
    """A summarize() dict as "median [q1–q3]", in per cent where asked."""
    scale, unit = (100, " %") if percent else (1, "")
    return f"{scale * s['median']:.{digits}f}{unit} [{scale * s['q1']:.{digits}f}–{scale * s['q3']:.{digits}f}]"


def fmt(value, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if value == 0:
            return "0"
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        return f"{value:.{digits}g}"
    return str(value)


def markdown_table(columns: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "| " + " | ".join("---" for _ in columns) + " |"]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def targets_table(targets: list[dict]) -> str:
    rows = [
        [t["name"], t["target"], fmt(t["value"]), f"{t['op']} {fmt(t['threshold'])}", target_verdict(t)]
        for t in targets
    ]
    return markdown_table(["target", "what", "measured", "needed", "verdict"], rows)


def to_markdown(result: dict) -> str:
    m = result["machine"]
    out = [
        f"# {result['benchmark']}",
        "",
        f"`{result['command']}` · {result['date']} · {'quick' if result['quick'] else 'full'} run on {result['device']}",
        "",
        f"Machine: {machine_line(m)}; load average at start {m.get('load_average')}.",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in result["versions"].items() if v),
        "",
    ]
    if result["targets"]:
        out += ["## Targets", "", targets_table(result["targets"]), ""]
        out += [f"- **{t['name']}**: {t['detail']}" for t in result["targets"] if t.get("detail")] + [""]
    for tab in result["tables"]:
        out += [f"## {tab['title']}", "", markdown_table(tab["columns"], tab["rows"]), ""]
    for plot in result["plots"]:
        out += [f"![{plot}]({plot})", ""]
    if result.get("method"):
        out += ["## Method", "", result["method"].strip(), ""]
    if result["notes"]:
        out += ["## Notes", ""] + [f"- {n}" for n in result["notes"]] + [""]
    return "\n".join(out)


def write_result(result: dict, out_dir: str | Path) -> tuple[Path, Path]:
    """<out>/<name>.json (every repeat) and <out>/<name>.md, each written atomically."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / f"{result['benchmark']}.json", out_dir / f"{result['benchmark']}.md"
    atomic_write_json(json_path, result)
    atomic_write_text(md_path, to_markdown(result))
    return json_path, md_path


def plot_curves(
    path: str | Path,
    title: str,
    xlabel: str,
    ylabel: str,
    series: dict[str, tuple[list, list]],
    *,
    logx: int = 0,
    logy: bool = False,
) -> Path:
    """A line plot (one line per series) written atomically as PNG; logx is the x log base (0: linear)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.2), dpi=110)
    for label, (xs, ys) in series.items():
        ax.plot(xs, ys, marker="o", label=label)
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    if logx:
        ax.set_xscale("log", base=logx)
    if logy:
        ax.set_yscale("log")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return Path(path)


def plot_by_batch(
    result: dict, path: Path, rows: list[dict], rates: Callable[[dict], dict], title: str, ylabel: str, logy: bool
) -> None:
    """Images/s against batch size, a line per label and config measured at two batches or more (rates(row):
    {label: images/s}); written as PNG and named in the result's plots."""
    series = {}
    for name in dict.fromkeys(r["config"] for r in rows):
        mine = sorted((r for r in rows if r["config"] == name), key=lambda r: r["batch"])
        if len(mine) < 2:
            continue
        for label in rates(mine[0]):
            series[f"{label} {name}"] = ([r["batch"] for r in mine], [rates(r)[label] for r in mine])
    if series:
        plot_curves(path, title, "batch size", ylabel, series, logx=2, logy=logy)
        result["plots"].append(path.name)


# --- progress -------------------------------------------------------------------------------


def run_progress(total: int, interval: float = 15.0, quiet: bool = False) -> progress.Progress:
    """One bar over the whole run: tqdm on a terminal, else a log line at most every `interval` s."""
    return progress.Progress(
        total,
        lambda p: f"benchmarks: {p.done}/{p.total} steps, {p.elapsed:.0f} s, {p.text}",
        interval=interval,
        quiet=quiet,
    )


def no_progress() -> progress.Progress:
    return run_progress(0, quiet=True)


def set_threads(threads: int | None) -> int:
    """torch intra-op threads = usable cores unless told; returns the number set."""
    import torch

    threads = threads or usable_cores()
    torch.set_num_threads(threads)
    return threads
