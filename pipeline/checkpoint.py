"""Checkpoint directories: naming, the COMPLETE marker, the export files, discovery.

    run.dir/checkpoints/step_000010000/
        deepspeed/          DeepSpeed engine state (model, optimizer, loss scaler), per rank
        ema.safetensors     EMA weights, fp32, keys of `pipeline.model.unet.UNet.state_dict()`
        model.safetensors   the online weights the network trains with (cast to fp32), same keys:
                            the non-EMA comparison
        model.json          model + diffusion config, step, images seen
        COMPLETE            written last, after every rank has finished and fsynced

A directory without COMPLETE does not exist for resume or export. Every file read here that is
truncated, garbled, empty or of the wrong type raises CheckpointError("<file>: <what is wrong>").
`read_checkpoint` finds one and reads its model.json once into a `Checkpoint`, which
export, the torch backend and the sample tools are handed; the weights are read only when asked for.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save

from pipeline.core.config import Config, ConfigError, DiffusionConfig, ModelConfig, from_dict, to_dict
from pipeline.core.fileio import atomic_write_bytes, atomic_write_json, atomic_write_text
from pipeline.model.unet import UNet

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


def step_of(ckpt_dir: str | Path) -> int | None:
    """The step a checkpoint directory is named for (`step_000010000` -> 10000); None for other names."""
    m = _STEP_DIR.match(Path(ckpt_dir).name)
    return int(m.group(1)) if m else None


def is_complete(ckpt_dir: str | Path) -> bool:
    """COMPLETE exists. Whether it is whole is `check_marker`'s question: a damaged marker must stop
    a resume with its name, not make the checkpoint look interrupted (and get it deleted)."""
    return (Path(ckpt_dir) / COMPLETE).exists()


def complete_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoint directories of a run, oldest first."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [(step, d) for d in root.iterdir() if (step := step_of(d)) is not None and is_complete(d)]
    return [d for _, d in sorted(found)]


def find_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory, or a run directory's newest complete checkpoint."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint or run directory")
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a directory (expected a checkpoint or run directory)")
    if step_of(path) is not None:
        if not is_complete(path):
            raise CheckpointError(f"{path}: checkpoint has no {COMPLETE} marker (interrupted while writing)")
        check_marker(path)
        return path
    found = complete_checkpoints(path)
    if not found:
        raise CheckpointError(f"{path}: no complete checkpoint under {path / CHECKPOINTS}")
    check_marker(found[-1])
    return found[-1]


def check_marker(ckpt_dir: str | Path) -> None:
    """COMPLETE is written atomically as "ok\\n": anything else there means the directory was damaged."""
    marker = Path(ckpt_dir) / COMPLETE
    try:
        text = marker.read_bytes()
    except OSError as e:
        raise CheckpointError(f"{marker}: unreadable marker ({e.strerror or e})") from None
    if text != b"ok\n":
        raise CheckpointError(
            f"{marker}: damaged marker (holds {text[:20]!r}, pipeline.train writes b'ok\\n'); "
            f"the checkpoint directory was modified after it was written"
        )


def mark_complete(ckpt_dir: str | Path) -> None:
    atomic_write_text(Path(ckpt_dir) / COMPLETE, "ok\n")


def prune_checkpoints(run_dir: str | Path, keep: int) -> list[Path]:
    """Delete all but the newest `keep` complete checkpoints (and stale incomplete ones older
    than the newest complete one). Returns what was removed."""
    complete = complete_checkpoints(run_dir)
    removed = complete[:-keep] if keep > 0 else []
    if complete:
        newest = step_of(complete[-1])
        for d in (Path(run_dir) / CHECKPOINTS).iterdir():
            step = step_of(d)
            if step is not None and step < newest and not is_complete(d):
                removed.append(d)
    for d in removed:
        shutil.rmtree(d, ignore_errors=True)
    return removed


def save_export_files(
    ckpt_dir: str | Path, ema_state: dict, cfg: Config, step: int, images_seen: int, model_state: dict | None = None
) -> None:
    """Write ema.safetensors (fp32), model.safetensors (fp32, when given) and model.json."""
    ckpt_dir = Path(ckpt_dir)
    for name, state in ((EMA_FILE, ema_state), (MODEL_FILE, model_state)):
        if state is not None:
            tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state.items()}
            atomic_write_bytes(ckpt_dir / name, save(tensors))
    atomic_write_json(
        ckpt_dir / MODEL_JSON,
        {"model": to_dict(cfg.model), "diffusion": to_dict(cfg.diffusion), "step": step, "images_seen": images_seen},
    )


def load_model_json(ckpt_dir: str | Path) -> tuple[ModelConfig, DiffusionConfig, dict]:
    path = Path(ckpt_dir) / MODEL_JSON
    try:
        meta = json.loads(path.read_text())
        if not isinstance(meta, dict):
            raise ValueError(f"expected a JSON object, got {type(meta).__name__}")
        return (
            from_dict(ModelConfig, meta["model"], "model"),
            from_dict(DiffusionConfig, meta["diffusion"], "diffusion"),
            meta,
        )
    except (OSError, ValueError, KeyError, TypeError, AttributeError, ConfigError) as e:
        reason = f"missing key {e}" if isinstance(e, KeyError) else getattr(e, "strerror", None) or e
        raise CheckpointError(f"{path}: unreadable model description ({reason})") from None


def load_tensors(file: str | Path, device: str = "cpu") -> dict[str, torch.Tensor]:
    """A checkpoint's .safetensors file; CheckpointError naming it when it is missing or damaged."""
    file = Path(file)
    if not file.is_file():
        raise CheckpointError(f"{file}: missing" + (" (not a file)" if file.exists() else ""))
    try:
        return load_file(str(file), device=device)
    except Exception as e:  # SafetensorError is a bare Exception subclass; OSError for unreadable files
        raise CheckpointError(f"{file}: damaged safetensors file ({reason_of(e)})") from None


def check_tensors_header(file: str | Path) -> None:
    """Cheap check of a .safetensors file: its header parses and covers exactly the file's bytes."""
    try:
        with safe_open(str(file), framework="pt"):
            pass
    except Exception as e:
        raise CheckpointError(f"{file}: damaged safetensors file ({reason_of(e)})") from None


def verify_export_files(ckpt_dir: str | Path) -> None:
    """The marker, model.json and the weight files' headers of a checkpoint about to be resumed."""
    ckpt_dir = Path(ckpt_dir)
    check_marker(ckpt_dir)
    load_model_json(ckpt_dir)
    for name in (EMA_FILE, MODEL_FILE):
        if name == EMA_FILE or (ckpt_dir / name).exists():  # older checkpoints have no model.safetensors
            if not (ckpt_dir / name).is_file():
                raise CheckpointError(
                    f"{ckpt_dir / name}: missing" + (" (not a file)" if (ckpt_dir / name).exists() else "")
                )
            check_tensors_header(ckpt_dir / name)


def verify_deepspeed_files(ds_dir: str | Path) -> None:
    """Every DeepSpeed file of a checkpoint unpickles with weights_only loading (memory-mapped, so the
    tensors are not read): a truncated, garbled or tampered file is named before DeepSpeed starts a
    load that other ranks would wait on."""
    ds_dir = Path(ds_dir)
    files = sorted(ds_dir.glob("*.pt")) if ds_dir.is_dir() else []
    if not files:
        raise CheckpointError(f"{ds_dir}: no DeepSpeed state (*.pt files) there")
    allowed = deepspeed_safe_globals()
    for path in files:
        try:
            with torch.serialization.safe_globals(allowed):
                try:
                    torch.load(path, map_location="cpu", weights_only=True, mmap=True)
                except RuntimeError as e:
                    if "mmap can only be used" not in str(e):
                        raise
                    torch.load(path, map_location="cpu", weights_only=True)  # checkpoint_serialization=false
        except Exception as e:
            raise CheckpointError(f"{path}: damaged DeepSpeed state ({reason_of(e)})") from None


def reason_of(e: BaseException) -> str:
    """One line of what a loader said: weights_only refusals keep their "Unsupported global" part."""
    text = str(e)
    for line in text.splitlines():
        if "WeightsUnpickler error:" in line and line.split("WeightsUnpickler error:", 1)[1].strip():
            detail = line.split("WeightsUnpickler error:", 1)[1].strip().split(" Please use")[0]
            return f"refused by weights_only loading: {detail}"
    if isinstance(e, EOFError) or not text.strip():
        return f"{type(e).__name__}: empty or truncated"
    if "central directory" in text or "zip archive" in text:
        return "truncated or not a torch.save file (no zip central directory)"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return f"{type(e).__name__}: {lines[0][:200]}"


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """One complete checkpoint, read once: its directory and its model.json. Weights load on demand."""

    dir: Path
    step: int
    images_seen: int
    model: ModelConfig
    diffusion: DiffusionConfig

    def weights_file(self, weights: str = "ema") -> Path:
        """ema.safetensors ("ema": what is exported and served) or model.safetensors ("model": online)."""
        if weights not in WEIGHT_FILES:
            raise CheckpointError(f"weights {weights!r}: expected one of {', '.join(WEIGHT_FILES)}")
        file = self.dir / WEIGHT_FILES[weights]
        if not file.is_file():
            raise CheckpointError(
                f"{file}: missing (checkpoints written before the online weights were saved "
                f"hold only {EMA_FILE}; use the EMA weights)"
            )
        return file

    def load_unet(self, device: str | torch.device = "cpu", weights: str = "ema"):
        """The U-Net in eval mode on `device`, with the chosen weights."""

        file = self.weights_file(weights)
        model = UNet(self.model)
        state = load_tensors(file)
        try:
            model.load_state_dict(state, strict=True)
        except (RuntimeError, ValueError) as e:
            raise CheckpointError(f"{file}: cannot load {weights} weights ({str(e).splitlines()[0]})") from None
        return model.to(device).eval()


def read_checkpoint(path: str | Path | Checkpoint) -> Checkpoint:
    """The checkpoint at `path` (a checkpoint directory, or a run directory: its newest complete one)."""
    if isinstance(path, Checkpoint):
        return path
    ckpt_dir = find_checkpoint(path)
    model_cfg, diffusion_cfg, meta = load_model_json(ckpt_dir)
    return Checkpoint(
        dir=ckpt_dir,
        step=int(meta.get("step", 0)),
        images_seen=int(meta.get("images_seen", 0)),
        model=model_cfg,
        diffusion=diffusion_cfg,
    )


# --- interrupted writes; what DeepSpeed's files may hold ---------------------------------------


def remove_incomplete(run_dir: str | Path) -> list[Path]:
    """Delete every checkpoint directory without COMPLETE (a write that was interrupted)."""
    root = Path(run_dir) / CHECKPOINTS
    removed = [d for d in root.iterdir() if step_of(d) is not None and not is_complete(d)] if root.is_dir() else []
    for d in removed:
        shutil.rmtree(d, ignore_errors=True)
    return removed


def deepspeed_safe_globals() -> list:
    """The DeepSpeed classes its checkpoints pickle besides tensors and containers."""
    # deepspeed is imported only after DS_ACCELERATOR is set (pipeline.train.distributed)
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler  # see above
    from deepspeed.runtime.zero.config import ZeroStageEnum  # deepspeed, as above
    from deepspeed.utils.tensor_fragment import fragment_address  # deepspeed, as above

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]
