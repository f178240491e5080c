"""Sampler benchmark: per-evaluation time of ONNX Runtime vs torch eager vs TensorRT, and the loop's overhead.

  python -m benchmarks sampler [--quick] [--device cpu|cuda] [--out DIR]

1. One denoiser evaluation (B images at one timestep) through `export.backends.OrtDenoiser` (the
   backend `export.sample` uses), the U-Net in torch eager (tensors in, tensors out: the baseline is
   not charged for NumPy conversions) and, where TensorRT and a GPU are present, `TrtDenoiser`.
2. The NumPy sampling loop's overhead: a whole `pipeline.core.sampling.generate` run with the network calls
   timed inside it; overhead = (total - sum of network time) / total.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks import artifacts, common, sampler_report

PLAN = {
    "quick": {"cpu": [("tiny_cpu", [1, 8])], "cuda": [("tiny_cpu", [1, 8])]},
    "full": {
        "cpu": [("tiny_cpu", [1, 4, 16, 64]), ("celebahq64", [1, 4])],
        "cuda": [("tiny_cpu", [1, 16, 64]), ("celebahq64", [1, 16, 64]), ("celebahq256", [1, 4, 16])],
    },
}
TARGET_BATCH = 16  # the batch export.sample uses by default
LOOP = {"quick": ("tiny_cpu", 4, 10, 2), "full": ("tiny_cpu", 16, 50, 3)}  # config, batch, steps, runs
SECONDS_PER_CASE = {"quick": 2.0, "full": 20.0}

METHOD = """
**Per evaluation.** x ~ N(0, I) of shape (B, C, H, W) and B timesteps, the same for every backend. ORT is
`export.backends.OrtDenoiser` exactly as `export.sample` builds it (NumPy in, NumPy out, all graph
optimisations, intra-op threads = usable cores). torch eager is `pipeline.model.unet.UNet` in `inference_mode` on
tensors that are already on the device (fp16 weights and inputs on CUDA; fp32 on CPU), with the same number
of threads, both NCHW-contiguous and channels_last; the faster of the two is the baseline. TensorRT is `export.trt_runtime.TrtDenoiser` on an engine from `export.trt` (fp16), host copies
included. On CPU a fourth column is a candidate improvement of ours: an ORT session whose batch dimension is
fixed (`add_free_dimension_override_by_name`), one per batch size. All backends run the same random weights. After one warm-up call each, rounds alternate their order;
the repeat count is chosen so each case takes a few seconds. The speed-up is the median of per-round ratios.

**Loop overhead.** `pipeline.core.sampling.generate` (the default sampler `export.sample` runs) over an ORT
denoiser wrapped in a timer; overhead = (wall time of the whole run - time inside the network calls) / wall
time. It includes the initial noise, the per-step schedule arithmetic, and the uint8 conversion.
"""


# --- backends ---------------------------------------------------------------------------------


class TorchEager:
    """The U-Net in torch eager, called on device tensors (the baseline people would use)."""

    def __init__(self, ckpt: Path, device: str, half: bool, channels_last: bool = False):
        import torch
        from pipeline.checkpoint import load_unet

        self.torch, self.device = torch, device
        self.model = load_unet(ckpt, device=device)[0]
        self.dtype = torch.float16 if half else torch.float32
        self.format = torch.channels_last if channels_last else torch.contiguous_format
        self.model.to(self.dtype, memory_format=self.format)
        self.name = (
            f"torch {torch.__version__} eager {device}{' fp16' if half else ''}"
            f"{' channels_last' if channels_last else ''}"
        )

    def prepare(self, x: np.ndarray, t: np.ndarray):
        torch = self.torch
        xs = torch.from_numpy(x).to(self.device, self.dtype).contiguous(memory_format=self.format)
        ts = torch.from_numpy(t).to(self.device)
        return lambda: self._call(xs, ts)

    def _call(self, xs, ts):
        with self.torch.inference_mode():
            return self.model(xs, ts)


class NumpyBackend:
    """An export.backends denoiser (ORT, TensorRT): NumPy in, NumPy out."""

    def __init__(self, denoiser):
        self.denoiser, self.name = denoiser, denoiser.name

    def prepare(self, x: np.ndarray, t: np.ndarray):
        return lambda: self.denoiser(x, t)


class StaticBatchOrt:
    """ORT with the graph's batch dimension fixed to the batch in use (ORT plans memory and kernels for
    static shapes); a candidate for OrtDenoiser, measured beside it. One session per batch size."""

    def __init__(self, onnx_path: Path, threads: int | None):
        self.path, self.threads, self.sessions = onnx_path, threads, {}
        self.name = "onnxruntime CPU, batch-specialised session"

    def session(self, batch: int):
        import onnxruntime as ort
        from export.backends import default_threads

        if batch not in self.sessions:
            options = ort.SessionOptions()
            options.intra_op_num_threads = self.threads or default_threads()
            options.inter_op_num_threads = 1
            options.log_severity_level = 3
            probe = ort.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])
            dim = probe.get_inputs()[0].shape[0]
            if isinstance(dim, str):
                options.add_free_dimension_override_by_name(dim, batch)
            self.sessions[batch] = ort.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])
        return self.sessions[batch]

    def prepare(self, x: np.ndarray, t: np.ndarray):
        session = self.session(len(x))
        names = [i.name for i in session.get_inputs()]
        return lambda: session.run(None, {names[0]: x, names[1]: t})


class TimedDenoiser:
    """Wraps a denoiser and adds up the seconds spent inside its calls."""

    def __init__(self, inner):
        self.inner, self.info, self.name = inner, inner.info, inner.name
        self.seconds, self.calls = 0.0, 0

    def __call__(self, x, t):
        start = time.perf_counter()
        out = self.inner(x, t)
        self.seconds += time.perf_counter() - start
        self.calls += 1
        return out


def backends_for(name: str, args) -> tuple[dict, list[str]]:
    """{label: backend} for one config, and notes on what could not run."""
    from export.backends import OrtDenoiser
    from export.trt_runtime import TrtDenoiser

    cfg, notes = artifacts.config(name), []
    ckpt = artifacts.random_checkpoint(cfg)
    cuda = args.device.startswith("cuda")
    ort = OrtDenoiser(artifacts.onnx_model(cfg, fp16=cuda), provider="cuda" if cuda else "cpu", threads=args.threads)
    found = {
        "torch": TorchEager(ckpt, args.device, half=cuda),
        "torch+channels_last": TorchEager(ckpt, args.device, half=cuda, channels_last=True),
        "ort": NumpyBackend(ort),
    }
    if not cuda:
        found["ort+static_batch"] = StaticBatchOrt(artifacts.onnx_model(cfg), args.threads)
    reason = artifacts.tensorrt_available() if cuda else "TensorRT needs a CUDA device (this run is on CPU)"
    if reason is None:
        batches = dict(PLAN[common.size(args)]["cuda"])[name]
        plan = artifacts.tensorrt_engine(cfg, (1, min(batches[-1], TARGET_BATCH), batches[-1]), fp16=True)
        found["tensorrt"] = NumpyBackend(TrtDenoiser(plan))
    else:
        notes.append(f"TensorRT not measured: {reason}")
    return found, notes


# --- measurements -----------------------------------------------------------------------------


def per_evaluation(name: str, batches: list[int], args, progress) -> tuple[list[dict], list[str]]:
    backends, notes = backends_for(name, args)
    cfg = artifacts.config(name).model
    sync = common.cuda_sync(args.device)
    rows = []
    for b in batches:
        rng = np.random.default_rng(b)
        x = rng.standard_normal((b, cfg.in_channels, cfg.image_size, cfg.image_size), dtype=np.float32)
        t = np.full(b, 500.0, np.float32)
        calls = {label: backend.prepare(x, t) for label, backend in backends.items()}
        first = {label: common.time_call(call, sync) for label, call in calls.items()}  # also the warm-up
        repeats = auto_repeats(sum(first.values()), SECONDS_PER_CASE[common.size(args)])
        progress.describe(f"sampler: {name} batch {b} ({repeats} rounds)")
        times = common.interleaved(calls, warmup=0, repeats=repeats, sync=sync)
        row = {
            "config": name,
            "batch": b,
            "backends": {label: backends[label].name for label in backends},
            "seconds": {label: common.summarize(v) for label, v in times.items()},
        }
        # The baseline is the faster of the two torch memory formats: it is never handicapped.
        row["torch_baseline"] = min(("torch", "torch+channels_last"), key=lambda label: row["seconds"][label]["median"])
        row["ort_speedup_vs_torch"] = common.paired_ratio(times[row["torch_baseline"]], times["ort"])
        if "ort+static_batch" in times:
            row["ort_static_speedup_vs_torch"] = common.paired_ratio(
                times[row["torch_baseline"]], times["ort+static_batch"]
            )
        if "tensorrt" in times:
            row["tensorrt_speedup_vs_torch"] = common.paired_ratio(times[row["torch_baseline"]], times["tensorrt"])
        rows.append(row)
        progress.update()
    return rows, notes


def auto_repeats(seconds_per_round: float, budget: float, lo: int = 3, hi: int = 200) -> int:
    return int(min(hi, max(lo, budget / max(seconds_per_round, 1e-6))))


def loop_overhead(args, progress) -> dict:
    """Share of a whole run of the default sampler spent outside the network calls (ORT backend)."""
    from export.backends import OrtDenoiser
    from pipeline.core.sampling import DEFAULT_SAMPLER as sampler
    from pipeline.core.sampling import generate

    name, batch, steps, runs = LOOP[common.size(args)]
    cfg = artifacts.config(name)
    cuda = args.device.startswith("cuda")
    denoiser = OrtDenoiser(
        artifacts.onnx_model(cfg, fp16=cuda), provider="cuda" if cuda else "cpu", threads=args.threads
    )
    generate(denoiser, batch, batch=batch, sampler=sampler, steps=2, seed=0)  # warm-up
    progress.describe(f"sampler: loop overhead, {name} {sampler}-{steps} batch {batch}")
    totals, networks = [], []
    for _ in range(runs):
        timed = TimedDenoiser(denoiser)
        start = time.perf_counter()
        generate(timed, batch, batch=batch, sampler=sampler, steps=steps, seed=0)
        totals.append(time.perf_counter() - start)
        networks.append(timed.seconds)
        progress.update()
    shares = [(total - net) / total for total, net in zip(totals, networks)]
    return {
        "config": name,
        "batch": batch,
        "sampler": sampler,
        "steps": steps,
        "backend": denoiser.name,
        "total_seconds": common.summarize(totals),
        "network_seconds": common.summarize(networks),
        "overhead_share": common.summarize(shares),
        "overhead_ms_per_step": common.summarize([1e3 * (t - n) / steps for t, n in zip(totals, networks)]),
    }


# --- profiles (where a target is missed, say what limits it) ------------------------------------


def ort_profile(onnx_path: Path, batch: int, threads: int | None, calls: int = 5, top: int = 8) -> list[dict]:
    """Share of ORT node time by operator type, from onnxruntime's own profiler."""
    import onnxruntime as ort
    from export.backends import default_threads
    from pipeline.core.sidecar import read_sidecar

    info = read_sidecar(onnx_path)
    with tempfile.TemporaryDirectory() as tmp:
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or default_threads()
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(tmp) / "ort")
        session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
        x = np.random.default_rng(0).standard_normal(
            (batch, info.channels, info.image_size, info.image_size), dtype=np.float32
        )
        for _ in range(calls):
            session.run(None, {info.input_names[0]: x, info.input_names[1]: np.full(batch, 500.0, np.float32)})
        events = json.loads(Path(session.end_profiling()).read_text())
    by_op: dict[str, float] = {}
    for e in events:
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time"):
            op = e.get("args", {}).get("op_name", "?")
            by_op[op] = by_op.get(op, 0.0) + e["dur"]
    total = sum(by_op.values()) or 1.0
    return [
        {"op": op, "share": us / total, "ms_per_call": us / 1e3 / calls}
        for op, us in sorted(by_op.items(), key=lambda kv: -kv[1])[:top]
    ]


def torch_profile(ckpt: Path, batch: int, calls: int = 5, top: int = 8) -> list[dict]:
    """Share of torch eager CPU self time by aten op."""
    import torch
    from torch.profiler import ProfilerActivity, profile
    from pipeline.checkpoint import load_unet

    model, cfg, _ = load_unet(ckpt)
    x = torch.randn(batch, cfg.in_channels, cfg.image_size, cfg.image_size)
    t = torch.full((batch,), 500.0)
    with torch.inference_mode():
        model(x, t)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(calls):
                model(x, t)
    stats = [(e.key, e.self_cpu_time_total) for e in prof.key_averages()]
    total = sum(us for _, us in stats) or 1.0
    return [
        {"op": op, "share": us / total, "ms_per_call": us / 1e3 / calls}
        for op, us in sorted(stats, key=lambda kv: -kv[1])[:top]
    ]


# --- the benchmark ----------------------------------------------------------------------------


def steps(args) -> int:
    return sum(len(b) for _, b in common.device_plan(PLAN, args)) + LOOP[common.size(args)][3] + 1


def run(args, progress=None) -> dict:
    progress = progress or common.no_progress()
    plan = common.device_plan(PLAN, args)
    config = {
        "cases": [{"config": c, "batches": b} for c, b in plan],
        "target_batch": TARGET_BATCH,
        "loop": dict(zip(("config", "batch", "steps", "runs"), LOOP[common.size(args)])),
    }
    result = common.start("sampler", args, METHOD, config)
    evals = []
    for name, batches in plan:
        rows, notes = per_evaluation(name, batches, args, progress)
        evals += rows
        result["notes"] += [n for n in notes if n not in result["notes"]]
    result["results"] = {"per_evaluation": evals, "loop": loop_overhead(args, progress)}
    if not args.device.startswith("cuda"):
        progress.describe("sampler: profiles (ORT and torch)")
        name = "celebahq64" if any(c == "celebahq64" for c, _ in plan) else plan[0][0]
        batch = min(4, max(plan[-1][1]))
        cfg = artifacts.config(name)
        result["results"]["profiles"] = {
            "config": name,
            "batch": batch,
            "ort": ort_profile(artifacts.onnx_model(cfg), batch, args.threads),
            "torch": torch_profile(artifacts.random_checkpoint(cfg), batch),
        }
    progress.update()
    sampler_report.report(result, Path(args.out))
    return result


if __name__ == "__main__":
    from benchmarks.__main__ import main

    sys.exit(main(["sampler", *sys.argv[1:]]))
