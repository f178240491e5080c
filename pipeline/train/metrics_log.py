"""Training metrics on rank 0: tqdm on a terminal or a line every log.every steps, metrics.jsonl, TensorBoard.

A resumed run first drops the rows logged after its checkpoint (those steps are trained again).
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from pipeline.core.config import Config
from pipeline.core.fileio import atomic_write_text


class MetricsLog:
    """tqdm on a terminal or a line every log.every steps; metrics.jsonl and TensorBoard events."""

    def __init__(self, cfg: Config, start_step: int, active: bool):
        self.active, self.every, self.total = active, cfg.log.every, cfg.train.max_steps
        self.run_dir = Path(cfg.run.dir)
        self.losses, self.images, self.seconds, self.skipped = [], 0, 0.0, 0
        self.corrupt_samples = 0  # set by the loop: samples skipped as undecodable, all ranks
        self.bar = self.tb = None
        if not active:
            return
        _truncate_metrics(self.run_dir / "metrics.jsonl", start_step)  # steps after the checkpoint are redone
        if sys.stderr.isatty():
            self.bar = tqdm(total=self.total, initial=start_step, unit="step", dynamic_ncols=True)
        if cfg.log.tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # heavy, and only with log.tensorboard

            self.tb = SummaryWriter(str(self.run_dir / "tensorboard"), purge_step=start_step)

    def step(
        self,
        step: int,
        loss: float,
        lr: float,
        grad_norm: float | None,
        images: int,
        seconds: float,
        skipped: bool,
        engine,
    ) -> None:
        if not self.active:
            return
        self.losses.append(loss)
        self.images, self.seconds, self.skipped = self.images + images, self.seconds + seconds, self.skipped + skipped
        if self.bar is not None:
            self.bar.update(1)
        if step % self.every and step != self.total:
            return
        finite = [x for x in self.losses if math.isfinite(x)]
        row = {
            "step": step,
            "loss": sum(finite) / len(finite) if finite else float("nan"),
            "lr": lr,
            "grad_norm": grad_norm,
            "loss_scale": loss_scale(engine),
            "images_per_second": self.images / max(self.seconds, 1e-9),
            "skipped_steps": self.skipped,
            "corrupt_samples": self.corrupt_samples,
            "time": time.time(),
        }
        if torch.cuda.is_available():
            row["gpu_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.tb is not None:
            for key, value in row.items():
                if key not in ("step", "time") and value is not None:
                    self.tb.add_scalar(f"train/{key}", value, step)
        text = " ".join(f"{k} {_fmt(v)}" for k, v in row.items() if k not in ("step", "time") and v is not None)
        if self.bar is not None:
            self.bar.set_postfix_str(text)
        else:
            print(f"step {step}/{self.total} {text}", flush=True)
        self.losses, self.images, self.seconds, self.skipped = [], 0, 0.0, 0

    def message(self, text: str) -> None:
        if self.active:
            (self.bar.write if self.bar is not None else print)(text)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()


def _fmt(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def loss_scale(engine) -> float | None:
    """fp16's dynamic loss scale: `optimizer.loss_scale` exists on every DeepSpeed fp16 wrapper
    (ZeRO 1-3 and the stage-0 ones, which have no `loss_scaler`)."""
    scale = getattr(engine.optimizer, "loss_scale", None) if engine.fp16_enabled() else None
    return float(scale) if scale is not None else None


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop rows after `step` (logged by a run that was interrupted before its next checkpoint)."""
    if path.exists():
        rows = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
        atomic_write_text(path, "".join(row + "\n" for row in rows))
