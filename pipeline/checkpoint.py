"""Checkpoint directories: naming, the COMPLETE marker, the export files, discovery.

    run.dir/checkpoints/step_000010000/
        deepspeed/          DeepSpeed engine state (model, optimizer, loss scaler), per rank
        ema.safetensors     EMA weights, fp32, keys of `pipeline.unet.UNet.state_dict()`
        model.safetensors   the online weights the network trains with (cast to fp32), same keys:
                            the non-EMA comparison
        model.json          model + diffusion config, step, images seen
        COMPLETE            written last, after every rank has finished and fsynced

A directory without COMPLETE does not exist for resume or export.
"""
from __future__ import annotations

import dataclasses
import json
import re
import shutil
from pathlib import Path

import torch

from pipeline.config import Config, ConfigError, DiffusionConfig, ModelConfig, _build
from pipeline.fileio import atomic_write_bytes, atomic_write_json, atomic_write_text

CHECKPOINTS = "checkpoints"
COMPLETE = "COMPLETE"
EMA_FILE = "ema.safetensors"
MODEL_FILE = "model.safetensors"
WEIGHT_FILES = {"ema": EMA_FILE, "model": MODEL_FILE}  # what `--weights` chooses between
MODEL_JSON = "model.json"
_STEP_DIR = re.compile(r"^step_(\d{9})$")


class CheckpointError(RuntimeError):
    """No usable checkpoint where the user pointed; the message names the path."""


def checkpoint_dir(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / CHECKPOINTS / f"step_{step:09d}"


def is_complete(ckpt_dir: str | Path) -> bool:
    return (Path(ckpt_dir) / COMPLETE).is_file()


def complete_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoint directories of a run, oldest first."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), d) for d in root.iterdir() if (m := _STEP_DIR.match(d.name)) and is_complete(d)]
    return [d for _, d in sorted(found)]


def find_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory, or a run directory's newest complete checkpoint."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint or run directory")
    if _STEP_DIR.match(path.name):
        if not is_complete(path):
            raise CheckpointError(f"{path}: checkpoint has no {COMPLETE} marker (interrupted while writing)")
        return path
    found = complete_checkpoints(path)
    if not found:
        raise CheckpointError(f"{path}: no complete checkpoint under {path / CHECKPOINTS}")
    return found[-1]


def mark_complete(ckpt_dir: str | Path) -> None:
    atomic_write_text(Path(ckpt_dir) / COMPLETE, "ok\n")


def prune_checkpoints(run_dir: str | Path, keep: int) -> list[Path]:
    """Delete all but the newest `keep` complete checkpoints (and stale incomplete ones older
    than the newest complete one). Returns what was removed."""
    complete = complete_checkpoints(run_dir)
    removed = complete[:-keep] if keep > 0 else []
    if complete:
        newest = int(complete[-1].name[5:])
        for d in (Path(run_dir) / CHECKPOINTS).iterdir():
            m = _STEP_DIR.match(d.name)
            if m and int(m.group(1)) < newest and not is_complete(d):
                removed.append(d)
    for d in removed:
        shutil.rmtree(d, ignore_errors=True)
    return removed


def save_export_files(ckpt_dir: str | Path, ema_state: dict, cfg: Config, step: int, images_seen: int,
                      model_state: dict | None = None) -> None:
    """Write ema.safetensors (fp32), model.safetensors (fp32, when given) and model.json."""
    from safetensors.torch import save
    ckpt_dir = Path(ckpt_dir)
    for name, state in ((EMA_FILE, ema_state), (MODEL_FILE, model_state)):
        if state is not None:
            tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state.items()}
            atomic_write_bytes(ckpt_dir / name, save(tensors))
    atomic_write_json(ckpt_dir / MODEL_JSON, {
        "model": dataclasses.asdict(cfg.model), "diffusion": dataclasses.asdict(cfg.diffusion),
        "step": step, "images_seen": images_seen})


def load_model_json(ckpt_dir: str | Path) -> tuple[ModelConfig, DiffusionConfig, dict]:
    path = Path(ckpt_dir) / MODEL_JSON
    try:
        meta = json.loads(path.read_text())
        return _build(ModelConfig, meta["model"], "model"), _build(DiffusionConfig, meta["diffusion"], "diffusion"), meta
    except (OSError, ValueError, KeyError, ConfigError) as e:
        raise CheckpointError(f"{path}: unreadable model description ({e})") from None


def load_unet(path: str | Path, device: str | torch.device = "cpu", weights: str = "ema"):
    """(UNet in eval mode, ModelConfig, DiffusionConfig) from a checkpoint or run dir.

    weights: "ema" (what is exported and served) or "model" (the online weights, for comparison).
    """
    from safetensors.torch import load_file
    from pipeline.unet import UNet
    if weights not in WEIGHT_FILES:
        raise CheckpointError(f"weights {weights!r}: expected one of {', '.join(WEIGHT_FILES)}")
    ckpt = find_checkpoint(path)
    model_cfg, diffusion_cfg, _ = load_model_json(ckpt)
    file = ckpt / WEIGHT_FILES[weights]
    if not file.is_file():
        raise CheckpointError(f"{file}: missing (checkpoints written before the online weights were saved "
                              f"hold only {EMA_FILE}; use the EMA weights)")
    model = UNet(model_cfg)
    try:
        model.load_state_dict(load_file(str(file), device="cpu"), strict=True)
    except (OSError, RuntimeError) as e:
        raise CheckpointError(f"{file}: cannot load {weights} weights ({str(e).splitlines()[0]})") from None
    return model.to(device).eval(), model_cfg, diffusion_cfg


# --- resume state that is not DeepSpeed's: RNG streams, interrupted writes, safe loading --------

RNG_DIR = "rng"


def remove_incomplete(run_dir: str | Path) -> list[Path]:
    """Delete every checkpoint directory without COMPLETE (a write that was interrupted)."""
    root = Path(run_dir) / CHECKPOINTS
    removed = [d for d in root.iterdir() if _STEP_DIR.match(d.name) and not is_complete(d)] if root.is_dir() else []
    for d in removed:
        shutil.rmtree(d, ignore_errors=True)
    return removed


def rng_state() -> dict[str, torch.Tensor]:
    """This process's python, numpy and torch (CPU and CUDA) generator states as plain tensors."""
    import random
    import numpy as np
    version, mt, gauss = random.getstate()
    _, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python_mt": torch.tensor(mt, dtype=torch.int64),
        "python_version_gauss": torch.tensor([version, float("nan") if gauss is None else gauss], dtype=torch.float64),
        "numpy_keys": torch.from_numpy(keys.astype(np.int64)),
        "numpy_pos_gauss": torch.tensor([pos, has_gauss, cached], dtype=torch.float64),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.stack(torch.cuda.get_rng_state_all())
    return state


def set_rng_state(state: dict[str, torch.Tensor]) -> None:
    import math
    import random
    import numpy as np
    version, gauss = state["python_version_gauss"].tolist()
    random.setstate((int(version), tuple(state["python_mt"].tolist()), None if math.isnan(gauss) else gauss))
    pos, has_gauss, cached = state["numpy_pos_gauss"].tolist()
    np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype(np.uint32), int(pos), int(has_gauss), cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(list(state["cuda"]))


def rng_path(ckpt_dir: str | Path, rank: int) -> Path:
    return Path(ckpt_dir) / RNG_DIR / f"rank_{rank:05d}.pt"


def save_rng(ckpt_dir: str | Path, rank: int) -> None:
    import io
    buf = io.BytesIO()
    torch.save(rng_state(), buf)
    atomic_write_bytes(rng_path(ckpt_dir, rank), buf.getvalue())


def load_rng(ckpt_dir: str | Path, rank: int) -> bool:
    """Restore this rank's RNG states; False when the checkpoint has none for this rank."""
    path = rng_path(ckpt_dir, rank)
    if not path.is_file():
        return False
    set_rng_state(torch.load(path, map_location="cpu", weights_only=True))
    return True


def fsync_tree(root: str | Path) -> None:
    """fsync every file and directory under root (files another rank wrote included)."""
    import os
    from pipeline.fileio import fsync_dir
    for folder, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(folder, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(folder)


def deepspeed_safe_globals() -> list:
    """The DeepSpeed classes its checkpoints pickle besides tensors and containers."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address
    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def use_weights_only_loading(engine) -> None:
    """Make engine.load_checkpoint unpickle with weights_only=True (DeepSpeed's own loader does not).

    Only plain containers, tensors and the classes in `deepspeed_safe_globals` are accepted,
    so a tampered checkpoint cannot run code on load.
    """
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
    if type(engine.checkpoint_engine) is not TorchCheckpointEngine:
        return  # a configured alternative engine (nebula, fast, ...) keeps its own loader
    allowed = deepspeed_safe_globals()

    class WeightsOnlyCheckpointEngine(TorchCheckpointEngine):
        def load(self, path: str, map_location=None):
            with torch.serialization.safe_globals(allowed):
                return torch.load(path, map_location=map_location, weights_only=True)

    engine.checkpoint_engine = WeightsOnlyCheckpointEngine(engine._config)
