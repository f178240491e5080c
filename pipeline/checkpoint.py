"""Checkpoint directories: naming, the COMPLETE marker, the export files, discovery.

    run.dir/checkpoints/step_000010000/
        deepspeed/          DeepSpeed engine state (model, optimizer, loss scaler), per rank
        ema.safetensors     EMA weights, fp32, keys of `pipeline.unet.UNet.state_dict()`
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


def save_export_files(ckpt_dir: str | Path, ema_state: dict, cfg: Config, step: int, images_seen: int) -> None:
    """Write ema.safetensors (fp32) and model.json: everything export needs."""
    from safetensors.torch import save
    ckpt_dir = Path(ckpt_dir)
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in ema_state.items()}
    atomic_write_bytes(ckpt_dir / EMA_FILE, save(tensors))
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


def load_ema_unet(path: str | Path, device: str | torch.device = "cpu"):
    """(UNet in eval mode with EMA weights, ModelConfig, DiffusionConfig) from a checkpoint or run dir."""
    from safetensors.torch import load_file
    from pipeline.unet import UNet
    ckpt = find_checkpoint(path)
    model_cfg, diffusion_cfg, _ = load_model_json(ckpt)
    model = UNet(model_cfg)
    try:
        model.load_state_dict(load_file(str(ckpt / EMA_FILE), device="cpu"), strict=True)
    except (OSError, RuntimeError) as e:
        raise CheckpointError(f"{ckpt / EMA_FILE}: cannot load EMA weights ({str(e).splitlines()[0]})") from None
    return model.to(device).eval(), model_cfg, diffusion_cfg
