"""What every benchmark measures with: the machine, threads, timing with warm-up and interleaved repeats, progress.

Side-by-side timings are interleaved (A B, B A, ...) so that the load of a shared machine drifts over
both sides alike; ratios are then medians of the per-round ratios (record.paired_ratio).
"""

from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Callable

from benchmarks.record import Machine, Result
from export.backends import default_threads
from pipeline.core import progress

COMMAND = ""  # the command line of this run, set by benchmarks.__main__
PACKAGES = "torch deepspeed onnxruntime-gpu onnxruntime onnx diffusers tensorrt numpy webdataset pillow".split()


def _proc_field(path: str, key: str) -> str | None:
    """The value after `key` in a /proc file (None where there is no such file or line)."""
    try:
        line = next((line for line in Path(path).read_text().splitlines() if line.startswith(key)), None)
    except OSError:
        return None
    return line.split(":", 1)[1].strip() if line else None


def machine_info() -> Machine:
    import torch  # heavy: the runs that measure import it anyway

    cpu, mem = _proc_field("/proc/cpuinfo", "model name"), _proc_field("/proc/meminfo", "MemTotal")
    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except OSError:  # not obtainable on this system
        load = None
    machine = Machine(
        cpu=cpu or platform.processor() or platform.machine(),
        cores=default_threads(),
        logical_cpus=os.cpu_count(),
        ram_gib=round(int(mem.split()[0]) / 2**20, 1) if mem else None,
        platform=platform.platform(),
        hostname=platform.node(),
        torch_threads=torch.get_num_threads(),
        cuda_available=torch.cuda.is_available(),
        load_average=load,
    )
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        machine.gpu, machine.cuda = props.name, torch.version.cuda
        machine.gpu_memory_gib = round(props.total_memory / 2**30, 1)
    return machine


def versions() -> dict[str, str | None]:
    """Installed versions of what we measure (None: not installed); read without importing."""
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def new_result(name: str, *, quick: bool, device: str, config: dict[str, Any], method: str) -> Result:
    date = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    command = COMMAND or shlex.join(sys.argv)
    return Result(name, date, command, quick, device, machine_info(), versions(), config, method.strip())


def start(name: str, args, method: str, config: dict[str, Any], device: str = "") -> Result:
    """new_result of a `python -m benchmarks NAME` run; torch's threads are set and recorded in the config."""
    config = {**config, "threads": set_threads(args.threads)}
    return new_result(name, quick=args.quick, device=device or args.device, config=config, method=method)


def size(args) -> str:
    """The key of a benchmark's size tables for this command line: "quick" or "full"."""
    return "quick" if args.quick else "full"


def cases_for(cases: dict[str, dict[str, list]], args) -> list:
    """cases[size][cpu|cuda]: the cases a benchmark runs at this size on this device."""
    return cases[size(args)]["cuda" if args.device.startswith("cuda") else "cpu"]


def set_threads(threads: int | None) -> int:
    """torch intra-op threads = usable cores unless told; returns the number set."""
    import torch  # heavy: the runs that measure import it anyway

    threads = threads or default_threads()
    torch.set_num_threads(threads)
    return threads


def cuda_sync(device: str) -> Callable[[], None]:
    if str(device).startswith("cuda"):
        import torch  # heavy: the runs that measure import it anyway

        return torch.cuda.synchronize
    return lambda: None


def time_call(fn: Callable[[], object], sync: Callable[[], None] = lambda: None) -> float:
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


def interleaved(fns: dict[str, Callable], *, warmup: int, repeats: int, sync=lambda: None, on_round=None):
    """Seconds per call of each fn, rounds alternating forward and reverse order (A B, B A, ...)."""
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    sync()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            times[name].append(time_call(fns[name], sync))
        if on_round:
            on_round()
    return times


def run_progress(total: int, quiet: bool = False) -> progress.Progress:
    """One bar over the whole run: tqdm on a terminal, else a log line at most every 15 s."""
    return progress.Progress(total, _progress_line, interval=15.0, quiet=quiet)


def _progress_line(p: progress.Progress) -> str:
    return f"benchmarks: {p.done}/{p.total} steps, {p.elapsed:.0f} s, {p.text}"


def no_progress() -> progress.Progress:
    return run_progress(0, quiet=True)
