"""Models to time without training one: a random-weight checkpoint per config, its ONNX, its engine.

Timing does not depend on what the weights learned, only on the architecture; the zero-initialised
output layers are given random values too, so no path is all zeros. Exports take a while, so
they are cached under the system temp dir, keyed by config, torch and onnxruntime versions.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
import tempfile
from pathlib import Path

import torch

from benchmarks import common
from export.trt import build_engine
from export.trt_runtime import require_tensorrt
from pipeline.checkpoint import (
    CheckpointError,
    checkpoint_dir,
    is_complete,
    mark_complete,
    save_export_files,
    verify_export_files,
)
from pipeline.config import load_config
from pipeline.core.config import Config, to_dict
from pipeline.core.denoiser import BackendUnavailable
from pipeline.core.fileio import sha256_file
from pipeline.core.sidecar import SidecarError, read_sidecar
from pipeline.model.unet import UNet

REPO = Path(__file__).resolve().parent.parent
CACHE = Path(tempfile.gettempdir()) / "ddpm-benchmarks"


def config(name: str) -> Config:
    return load_config(REPO / "configs" / f"{name}.yaml")


def _key(cfg: Config, seed: int) -> str:
    v = common.versions()
    parts = [to_dict(cfg)["model"], to_dict(cfg)["diffusion"], seed, v["torch"], v["onnx"]]
    text = json.dumps([*parts, v["onnxruntime-gpu"] or v["onnxruntime"]], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def random_checkpoint(cfg: Config, seed: int = 0) -> Path:
    """A complete checkpoint directory (ema.safetensors, model.json, COMPLETE) with random weights."""
    ckpt = checkpoint_dir(CACHE / _key(cfg, seed), 0)
    if is_complete(ckpt) and _whole_checkpoint(ckpt):
        return ckpt
    shutil.rmtree(ckpt, ignore_errors=True)
    ckpt.mkdir(parents=True)
    torch.manual_seed(seed)
    model = UNet(cfg.model)
    for layer in model.modules():  # re-draw the zero-initialised residual outputs with their default init
        if hasattr(layer, "reset_parameters") and all(not p.any() for p in layer.parameters(recurse=False)):
            getattr(layer, "reset_parameters")()
    save_export_files(ckpt, model.state_dict(), cfg, step=0, images_seen=0)
    mark_complete(ckpt)
    return ckpt


def _whole_checkpoint(ckpt: Path) -> bool:
    """A cached checkpoint damaged since it was made is rebuilt, not benchmarked (or crashed on)."""
    try:
        verify_export_files(ckpt)
        return True
    except CheckpointError as e:
        print(f"benchmarks: {e}; rebuilding the cached checkpoint", file=sys.stderr)
        return False


def _whole_model(path: Path) -> bool:
    """A cached .onnx / .plan whose sidecar is missing or stale, or whose bytes changed, is rebuilt."""
    if not path.is_file():
        return False
    try:
        info = read_sidecar(path)
        if info.model_sha256 and sha256_file(path) != info.model_sha256:
            raise SidecarError(f"{path}: sha256 differs from its sidecar")
        return True
    except SidecarError as e:
        print(f"benchmarks: {e}; rebuilding it", file=sys.stderr)
        return False


def onnx_model(cfg: Config, fp16: bool = False, seed: int = 0) -> Path:
    """denoiser[_fp16].onnx (+ sidecar) exported by export.onnx from the random checkpoint."""
    from export.onnx import export_onnx  # optional runtimes: onnx and onnxruntime

    ckpt = random_checkpoint(cfg, seed)
    out = ckpt / ("denoiser_fp16.onnx" if fp16 else "denoiser.onnx")
    if not _whole_model(out):
        export_onnx(ckpt, out, fp16=fp16)
    return out


def tensorrt_engine(cfg: Config, batch: tuple[int, int, int], fp16: bool = True, seed: int = 0) -> Path:
    """denoiser.plan built by export.trt (TensorRT and a CUDA device needed)."""
    import tensorrt  # optional runtime: GPU machines only

    # TensorRT 11 is strongly typed: fp16 comes from an fp16 graph; TensorRT 10 takes the builder flag.
    strongly_typed = int(tensorrt.__version__.split(".")[0]) >= 11
    onnx_path = onnx_model(cfg, fp16=fp16 and strongly_typed, seed=seed)
    out = onnx_path.with_name(f"denoiser_{'fp16' if fp16 else 'fp32'}_{'-'.join(map(str, batch))}.plan")
    if not _whole_model(out):
        build_engine(onnx_path, out, batch=batch, fp16=fp16, timing_cache=onnx_path.parent / "timing.cache")
    return out


def tensorrt_available() -> str | None:
    """None when TensorRT can run here, else the reason it cannot."""
    try:
        require_tensorrt()
        return None
    except BackendUnavailable as e:
        return str(e)
    except Exception as e:  # a broken install is a reason too, not a crash of the whole harness
        return f"{type(e).__name__}: {e}"
