"""The one profiler: where the time of a call goes, by operator, and (CPU) what memory a training step adds.

torch calls run under torch.profiler (CPU self time, device time on CUDA); an ONNX Runtime session
reports its own kernel times. Both end in the same `Profile` record, so tables set them side by side.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from export.backends import session_options

BACKWARD = "benchmark::backward"  # a training step marks its backward with record_function(BACKWARD)


@dataclass
class Op:
    op: str
    share: float  # of all operator time
    ms: float  # per call


@dataclass
class Profile:
    top: list[Op]  # the operators that took longest, longest first
    total_ms: float  # all operators, per call
    convolution_share: float | None  # convolutions (and the implicit GEMMs cuDNN runs them as), of all operators
    peak_bytes: int | None = None  # memory=True: the CPU allocator's peak above its total at the start
    held_bytes: int | None = None  # ... and its total when BACKWARD began (what autograd keeps for backward)


def ranked(microseconds: dict[str, float], calls: int, top: int) -> Profile:
    total = sum(microseconds.values()) or 1.0
    conv = sum(us for op, us in microseconds.items() if "conv" in op.lower() or "gemm" in op.lower())
    longest = sorted(microseconds.items(), key=lambda kv: -kv[1])[:top]
    return Profile([Op(op, us / total, us / 1e3 / calls) for op, us in longest], total / 1e3 / calls, conv / total)


def torch_profile(fn: Callable[[], object], device: str = "cpu", calls: int = 1, top: int = 8, memory: bool = False):
    import torch  # heavy: the runs that profile torch import it anyway
    from torch.profiler import ProfilerActivity, profile  # with torch, for the same reason

    cuda = device.startswith("cuda")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities, profile_memory=memory) as prof:
        for _ in range(calls):
            fn()
        if cuda:
            torch.cuda.synchronize()
    times = {e.key: e.self_device_time_total if cuda else e.self_cpu_time_total for e in prof.key_averages()}
    result = ranked(times, calls, top)
    if memory:
        result.peak_bytes, result.held_bytes = _cpu_allocator(prof)
    return result


def _cpu_allocator(prof) -> tuple[int, int]:
    """(peak, held at BACKWARD) bytes above the start, from the CPU allocator's running total (CPU has no peak counter)."""
    from torch._C._profiler import _EventType  # the event tree's kinds (torch is loaded by now)

    allocations, backward_start = [], None
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        event = stack.pop()
        stack.extend(event.children)
        if event.typed[0] == _EventType.Allocation and event.typed[1].device.type == "cpu":
            allocations.append((event.start_time_ns, event.typed[1].total_allocated, event.typed[1].alloc_size))
        elif event.name == BACKWARD:
            backward_start = event.start_time_ns
    if not allocations or backward_start is None:
        raise RuntimeError("torch.profiler recorded no CPU allocations; cannot measure activation memory")
    allocations.sort()
    base = allocations[0][1] - allocations[0][2]
    held = [total for when, total, _ in allocations if when < backward_start] or [base]
    return max(total for _, total, _ in allocations) - base, held[-1] - base


def ort_profile(onnx_path: Path, feeds: dict[str, np.ndarray], threads: int | None, calls: int = 5, top: int = 8):
    """ONNX Runtime's own profiler on the CPU provider: kernel time by operator type over `calls` runs."""
    import onnxruntime as ort  # optional runtime: the CPU runs that compare it

    with tempfile.TemporaryDirectory() as tmp:
        options = session_options(ort, threads)  # the served session's, plus the profiler
        options.enable_profiling, options.profile_file_prefix = True, str(Path(tmp) / "ort")
        session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
        for _ in range(calls):
            session.run(None, feeds)
        events = json.loads(Path(session.end_profiling()).read_text())
    times: dict[str, float] = {}
    for e in events:
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time"):
            op = e.get("args", {}).get("op_name", "?")
            times[op] = times.get(op, 0.0) + e["dur"]
    return ranked(times, calls, top)
