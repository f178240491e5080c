"""Build a TensorRT engine (`denoiser.plan` + `denoiser.plan.json`) from the exported ONNX.

    python -m export.trt --ckpt DIR | --onnx F.onnx [--fp16] [--batch 1,8,16]
        [--workspace-gb 4] [--timing-cache F] [--out F.plan]

One optimization profile over the batch (min, opt, max). Precision: TensorRT 11 networks are
strongly typed, so fp16 comes from an fp16 ONNX (`export.onnx --fp16`, done for you with --ckpt);
on TensorRT 10 an fp16 ONNX is built strongly typed too, and `--fp16` with an fp32 ONNX falls
back to the builder's FP16 flag (weak typing: TensorRT picks per-layer precision).
Needs tensorrt and a CUDA device; without them it says which is missing and exits 1.
The engine's sidecar is its own (`denoiser.plan.json`): the ONNX beside it keeps `denoiser.onnx.json`.
Exit status: 0 built, 2 bad input (a damaged .onnx, sidecar or checkpoint: one line naming it),
1 TensorRT missing, the build or check failed, or the disk is full.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import numpy as np

from export.backends import OrtDenoiser
from export.trt_runtime import TrtDenoiser, require_tensorrt
from pipeline.core.denoiser import BackendUnavailable, ModelError
from pipeline.core.fileio import NoSpaceError, atomic_write_bytes
from pipeline.core.sidecar import Sidecar, read_sidecar, write_sidecar

# Max |TensorRT - onnxruntime(CPU)| on a random batch. TensorRT's fp32 uses TF32 matmuls/convs.
TOLERANCE = {"fp32": 1e-2, "fp16": 5e-2}


class BuildError(RuntimeError):
    """TensorRT could not parse or build; the message carries its errors."""


def parse_batch(text: str) -> tuple[int, int, int]:
    """'1,8,16' -> (1, 8, 16); '16' -> (1, 16, 16)."""
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise ValueError(f"--batch {text!r}: expected MIN,OPT,MAX integers such as 1,8,16") from None
    if len(values) == 1:
        values = [1, values[0], values[0]]
    if len(values) != 3 or not 1 <= values[0] <= values[1] <= values[2]:
        raise ValueError(f"--batch {text!r}: need 1 <= MIN <= OPT <= MAX")
    return tuple(values)


def _network_flags(trt, major: int, fp16_graph: bool) -> int:
    if major >= 11:
        return 0  # strongly typed is the only mode
    if fp16_graph:
        return 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    return 0  # EXPLICIT_BATCH is implied (and deprecated) since TensorRT 10


def build_engine(
    onnx_path: str | Path,
    out: str | Path,
    batch=(1, 8, 16),
    fp16: bool = False,
    workspace_gb: float = 4.0,
    timing_cache: str | Path | None = None,
) -> Path:
    """Parse the ONNX, build with one batch profile, write the .plan and its sidecar atomically."""
    trt, _ = require_tensorrt()
    onnx_path, out = Path(onnx_path), Path(out)
    info = read_sidecar(onnx_path)
    major = int(trt.__version__.split(".")[0])
    fp16_graph = info.dtype == "float16"
    if fp16 and not fp16_graph and major >= 11:
        raise ValueError(
            f"--fp16: TensorRT {trt.__version__} takes precision from the graph and {onnx_path} is fp32; "
            f"export an fp16 ONNX (`python -m export.onnx --fp16`, or pass --ckpt with --fp16)"
        )
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(_network_flags(trt, major, fp16_graph))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "\n".join(f"  {parser.get_error(i)}" for i in range(parser.num_errors))
        raise BuildError(f"{onnx_path}: TensorRT's ONNX parser failed with {parser.num_errors} error(s):\n{errors}")

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * 2**30))
    if fp16 and not fp16_graph:
        config.set_flag(trt.BuilderFlag.FP16)  # TensorRT 10 weak typing
    chw = (info.channels, info.image_size, info.image_size)
    profile = builder.create_optimization_profile()
    sample, timestep = info.input_names
    profile.set_shape(sample, *[(b,) + chw for b in batch])
    profile.set_shape(timestep, *[(b,) for b in batch])
    config.add_optimization_profile(profile)
    cache_path = Path(timing_cache) if timing_cache else None
    _attach_timing_cache(config, cache_path)

    precision = "fp16" if fp16 or fp16_graph else "fp32"
    print(
        f"building {out.name} from {onnx_path.name}: TensorRT {trt.__version__}, batch {batch}, "
        f"{precision}{' (strongly typed)' if fp16_graph or major >= 11 else ''}; "
        f"this takes a few minutes",
        file=sys.stderr,
        flush=True,
    )
    start = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise BuildError(f"{onnx_path}: TensorRT failed to build the engine (its log is above)")
    atomic_write_bytes(out, memoryview(serialized).tobytes())
    write_sidecar(
        out, engine_sidecar(info, batch, trt.__version__, onnx_path.name, precision, time.perf_counter() - start)
    )
    if cache_path:  # after the sidecar: a cache that cannot be saved costs the next build time, nothing else
        _save_timing_cache(config, cache_path)
    return out


def engine_sidecar(
    onnx_info: Sidecar,
    batch: tuple[int, int, int],
    trt_version: str,
    onnx_name: str,
    precision: str,
    build_seconds: float,
) -> Sidecar:
    """The engine's sidecar: the ONNX's, with the format, the profile's batch range and the build."""
    producer = {
        **onnx_info.producer,
        "tensorrt": trt_version,
        "onnx_file": onnx_name,
        "precision": precision,
        "build_seconds": round(build_seconds, 1),
    }
    # dtype stays the graph's I/O dtype (weak fp16 keeps fp32 I/O)
    batch_min, batch_opt, batch_max = batch
    return dataclasses.replace(
        onnx_info, format="tensorrt", batch_min=batch_min, batch_opt=batch_opt, batch_max=batch_max, producer=producer
    )


def _attach_timing_cache(config, path: Path | None) -> None:
    """Seed the build with `path`'s tactic timings. TensorRT refuses a cache from another GPU model
    or TensorRT version (set_timing_cache returns False): then the build starts from an empty one."""
    data = path.read_bytes() if path and path.is_file() else b""
    if data:
        cache = config.create_timing_cache(data)
        if cache is not None and config.set_timing_cache(cache, ignore_mismatch=False):
            return
        print(
            f"warning: timing cache {path} does not fit this GPU / TensorRT version; building without it "
            f"(it is replaced after the build)",
            file=sys.stderr,
            flush=True,
        )
    cache = config.create_timing_cache(b"")
    if cache is None or not config.set_timing_cache(cache, ignore_mismatch=False):
        raise BuildError("TensorRT could not attach an empty timing cache to the builder config")


def _save_timing_cache(config, path: Path) -> None:
    cache = config.get_timing_cache()
    if cache is None:
        print(f"warning: TensorRT returned no timing cache; {path} not written", file=sys.stderr)
        return
    atomic_write_bytes(path, memoryview(cache.serialize()).tobytes())


def default_plan_path(onnx_path: Path, out: str | None) -> Path:
    """--out, else the ONNX's name with .plan; only .plan / .engine names."""
    plan = Path(out) if out else Path(onnx_path).with_suffix(".plan")
    if plan.suffix not in (".plan", ".engine"):
        raise ValueError(f"--out {plan}: expected a .plan or .engine file name")
    return plan


def max_error_vs_onnx(plan: Path, onnx_path: Path, batch: int, seed: int = 0) -> float:
    """max |TensorRT - onnxruntime(CPU)| on a random batch at random timesteps."""

    engine, reference = TrtDenoiser(plan), OrtDenoiser(onnx_path, provider="cpu")
    info = engine.info
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, info.channels, info.image_size, info.image_size)).astype(np.float32)
    t = (rng.random(batch) * (info.diffusion.num_timesteps - 1)).astype(np.float32)
    return float(np.abs(engine(x, t) - reference(x, t)).max())


def _export_first(ckpt: str, onnx_out: Path | None, fp16: bool) -> Path:
    """--ckpt: export the ONNX (fp16 graph with --fp16) and return its path."""
    from export.onnx import ExportError, export_onnx  # torch and onnx: only for --ckpt
    from pipeline.checkpoint import CheckpointError  # torch, as above

    try:
        return export_onnx(ckpt, onnx_out, fp16=fp16)[0]
    except CheckpointError as e:
        raise ModelError(str(e)) from None
    except ExportError as e:
        raise BuildError(str(e)) from None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m export.trt", description=__doc__.splitlines()[0])
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--ckpt", help="checkpoint or run directory (exports the ONNX first)")
    source.add_argument("--onnx", help="an exported .onnx with its .json sidecar")
    p.add_argument("--fp16", action="store_true")
    p.add_argument("--batch", default="1,8,16", help="profile MIN,OPT,MAX (default 1,8,16)")
    p.add_argument("--workspace-gb", type=float, default=4.0)
    p.add_argument("--timing-cache", help="file to load tactic timings from and save them to")
    p.add_argument("--out", help="output .plan (default: beside the ONNX)")
    p.add_argument("--no-verify", action="store_true", help="skip the TensorRT vs onnxruntime check")
    args = p.parse_args(argv)
    try:
        batch = parse_batch(args.batch)
        require_tensorrt()  # before minutes of ONNX export
        if args.ckpt:
            onnx_path = _export_first(args.ckpt, Path(args.out).with_suffix(".onnx") if args.out else None, args.fp16)
        else:
            onnx_path = Path(args.onnx)
            if not onnx_path.is_file():
                raise ModelError(f"--onnx {onnx_path}: no such file")
        out = default_plan_path(onnx_path, args.out)
        build_engine(onnx_path, out, batch, args.fp16, args.workspace_gb, args.timing_cache)
        info = read_sidecar(out)
        precision = info.producer["precision"]
        message = f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB, {precision}, batch {info.batch_range()})"
        if not args.no_verify:
            error = max_error_vs_onnx(out, onnx_path, batch[1])
            message += f"; max |tensorrt - onnxruntime| = {error:.2e}"
            if not error <= TOLERANCE[precision]:
                print(f"error: {message}, above the {precision} tolerance {TOLERANCE[precision]:g}", file=sys.stderr)
                return 1
        print(message)
        return 0
    except (ValueError, BackendUnavailable, BuildError, NoSpaceError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2 if isinstance(e, ValueError) else 1  # ModelError, SidecarError: ValueErrors, the input is wrong


if __name__ == "__main__":
    sys.exit(main())
