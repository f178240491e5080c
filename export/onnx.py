"""Export a checkpoint's EMA denoiser to ONNX, check it, and write `denoiser.onnx` + `denoiser.onnx.json`.

    python -m export.onnx --ckpt runs/demo [--out denoiser.onnx] [--fp16] [--opset 18] [--weights ema|model]

--weights model exports the online (non-EMA) weights instead, to measure what the EMA buys.

Inputs `sample (B,C,H,W)` (float32, or float16 with --fp16) and `timestep (B,)` (always float32,
so respaced and fractional steps need no rounding); output `model_output`; the batch is dynamic.
With --fp16 the graph is the half-precision network, but the timestep sinusoid and the GroupNorm
statistics stay in fp32 (the U-Net upcasts them itself; the exporter keeps those casts).
The graph goes through onnx.checker and onnxruntime before anything is written.
Exit status: 0 written, 2 bad input (a missing or damaged checkpoint file: one line naming it),
1 the graph failed a check or the disk is full (nothing left behind).
"""

from __future__ import annotations

import argparse
import copy
import sys
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

from pipeline.checkpoint import CheckpointError, read_checkpoint
from pipeline.core.fileio import NoSpaceError, atomic_write_bytes
from pipeline.core.sidecar import INPUT_NAMES, OUTPUT_NAMES, Sidecar, sidecar_path, write_sidecar

# Max |ORT - torch fp32| on a random batch; a trained epsilon-model's outputs are ~N(0, 1).
TOLERANCE = {"float32": 1e-4, "float16": 2e-2}
MIN_OPSET = 18
PROTOBUF_LIMIT = 2**31 - 1


class ExportError(RuntimeError):
    """The exported graph failed a check; nothing was written."""


def to_onnx_bytes(model, fp16: bool, opset: int) -> bytes:
    """Serialized ONNX graph of `model` (an fp32 UNet in eval mode) with a dynamic batch."""
    cfg = model.cfg
    net = copy.deepcopy(model).half() if fp16 else model
    x = torch.randn(2, cfg.in_channels, cfg.image_size, cfg.image_size, dtype=torch.float16 if fp16 else torch.float32)
    t = torch.tensor([1.0, 500.0])
    batch = torch.export.Dim("batch", min=1)
    with warnings.catch_warnings():
        # Both inputs share one batch Dim; the exporter notes it keeps only one name for it.
        warnings.filterwarnings("ignore", message=".*axis name.*")
        program = torch.onnx.export(
            net,
            (x, t),
            dynamo=True,
            opset_version=opset,
            verbose=False,
            input_names=list(INPUT_NAMES),
            output_names=list(OUTPUT_NAMES),
            dynamic_shapes={"x": {0: batch}, "timesteps": {0: batch}},
        )
    proto = program.model_proto
    if proto.ByteSize() > PROTOBUF_LIMIT:
        raise ExportError(f"the graph is {proto.ByteSize() / 2**30:.1f} GiB, above protobuf's 2 GiB limit")
    return proto.SerializeToString()


def max_error_vs_torch(onnx_bytes: bytes, model, info: Sidecar, batch: int = 2, seed: int = 0) -> float:
    """max |ORT(CPU) - torch fp32| over a random batch at random (fractional) timesteps."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, info.channels, info.image_size, info.image_size)).astype(np.float32)
    t = (rng.random(batch) * (info.diffusion.num_timesteps - 1)).astype(np.float32)
    session = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    feeds = {INPUT_NAMES[0]: x.astype(np.float16 if info.dtype == "float16" else np.float32), INPUT_NAMES[1]: t}
    got = session.run(None, feeds)[0].astype(np.float32)
    with torch.inference_mode():
        want = model(torch.from_numpy(x), torch.from_numpy(t)).numpy()
    return float(np.abs(got - want).max())


def export_onnx(
    ckpt: str | Path, out: str | Path | None = None, fp16: bool = False, opset: int = MIN_OPSET, weights: str = "ema"
) -> tuple[Path, Sidecar, float]:
    """Export, check, verify, write. Returns (onnx path, sidecar, max error vs torch)."""
    if opset < MIN_OPSET:
        raise ValueError(f"--opset {opset}: the dynamo exporter needs opset >= {MIN_OPSET}")
    checkpoint = read_checkpoint(ckpt)
    model = checkpoint.load_unet(weights=weights)
    suffix = ("" if weights == "ema" else f"_{weights}") + ("_fp16" if fp16 else "")
    out = Path(out) if out else checkpoint.dir / f"denoiser{suffix}.onnx"
    if out.suffix != ".onnx":
        raise ValueError(f"--out {out}: expected a .onnx file name")
    dtype = "float16" if fp16 else "float32"
    info = Sidecar(
        format="onnx",
        dtype=dtype,
        model=checkpoint.model,
        diffusion=checkpoint.diffusion,
        source_checkpoint=str(checkpoint.dir.resolve()),
        step=checkpoint.step,
        weights=weights,
        producer={
            "torch": torch.__version__,
            "onnx": onnx.__version__,
            "opset": opset,
            "exporter": "torch.onnx.export(dynamo=True)",
        },
    )

    data = to_onnx_bytes(model, fp16, opset)
    try:
        onnx.checker.check_model(onnx.load_from_string(data), full_check=True)
    except onnx.checker.ValidationError as e:
        raise ExportError(f"onnx.checker rejected the exported graph: {str(e).splitlines()[0]}") from None
    error = max_error_vs_torch(data, model, info)
    if not error <= TOLERANCE[dtype]:
        raise ExportError(
            f"onnxruntime output differs from torch by {error:.3g} (> {TOLERANCE[dtype]:g} for {dtype}); "
            f"nothing written"
        )
    atomic_write_bytes(out, data)
    write_sidecar(out, info)  # after the model: a sidecar never describes a half-written graph
    return out, info, error


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m export.onnx", description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", required=True, help="checkpoint directory, or run directory (newest complete)")
    parser.add_argument("--out", help="output .onnx (default: <checkpoint>/denoiser[_model][_fp16].onnx)")
    parser.add_argument("--fp16", action="store_true", help="half-precision graph (fp32 timestep and norms)")
    parser.add_argument("--opset", type=int, default=MIN_OPSET)
    parser.add_argument(
        "--weights",
        choices=("ema", "model"),
        default="ema",
        help="ema (default) or model: the online weights, for the non-EMA comparison",
    )
    args = parser.parse_args(argv)
    try:
        out, info, error = export_onnx(args.ckpt, args.out, args.fp16, args.opset, args.weights)
    except (CheckpointError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (ExportError, NoSpaceError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(
        f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB, {args.weights} weights, {info.dtype}, "
        f"{info.image_size}px, opset {args.opset}) "
        f"and {sidecar_path(out).name}; max |onnxruntime - torch| = {error:.2e} "
        f"(tolerance {TOLERANCE[info.dtype]:g})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
