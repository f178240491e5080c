"""A training run on disk: every rank saves a checkpoint together, and a run resumes from the
newest complete one that loads.

What goes into a checkpoint directory besides the export files (pipeline.checkpoint): DeepSpeed's
engine state per rank (unpickled with weights_only loading), each rank's RNG streams, and the
data position (`TrainState`). A failure on one rank (a damaged file, a full disk) stops every
rank at the same point with one message (`on_all_ranks`).
"""

from __future__ import annotations

import io
import math
import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from pipeline.checkpoint import (
    EMA_FILE,
    CheckpointError,
    checkpoint_dir,
    complete_checkpoints,
    deepspeed_safe_globals,
    load_tensors,
    mark_complete,
    prune_checkpoints,
    reason_of,
    remove_incomplete,
    save_export_files,
    step_of,
    verify_deepspeed_files,
    verify_export_files,
)
from pipeline.core.config import Config
from pipeline.core.fileio import atomic_write_bytes, atomic_writer, fsync_dir
from pipeline.core.manifest import DataError
from pipeline.train import distributed
from pipeline.train.distributed import DistEnv
from pipeline.train.ema import full_weights

# Test hook: "STEP:SECONDS" makes rank 0 sleep after writing checkpoint STEP and before its
# COMPLETE marker, so a test can SIGKILL the run in the middle of a checkpoint write.
PAUSE_BEFORE_COMPLETE_ENV = "DDPM_TEST_PAUSE_BEFORE_COMPLETE"
RNG_DIR = "rng"


class TrainError(RuntimeError):
    """A problem with the run set-up the user can fix; printed as one line (`quiet`: by rank 0 only)."""

    def __init__(self, message: str, quiet: bool = False):
        super().__init__(message)
        self.quiet = quiet


def on_all_ranks(env: DistEnv, fn):
    """fn() on every rank; if it failed on any rank, every rank raises TrainError with the first message.

    A damaged file or a full disk seen by one rank must stop all of them at the same point, not
    leave the others waiting in the next collective.
    """
    result, error = None, None
    try:
        result = fn()
    except (CheckpointError, DataError, TrainError, OSError) as e:
        error = str(e)
    errors = [None] * env.world_size
    dist.all_gather_object(errors, error)
    first = next((e for e in errors if e), None)
    if first is not None:
        raise TrainError(first, quiet=not env.is_main)
    return result


@dataclass
class TrainState:
    step: int = 0  # optimizer steps taken (skipped fp16 overflow steps included)
    images_seen: int = 0
    stream_start: int = 0  # data position: the step whose seed started the current stream,
    batches_drawn: int = 0  # and the micro-batches this rank has drawn from it since


def save_checkpoint(engine, ema, state: TrainState, cfg: Config, env: DistEnv) -> Path:
    """Every rank writes its DeepSpeed shards and RNG; rank 0 the export files, then COMPLETE.

    A write that fails (a full disk) does not stop a rank on its own: it keeps joining the
    collectives, then all ranks agree, rank 0 removes the unfinished directory, and every rank
    raises TrainError. The earlier checkpoints are untouched (pruning follows COMPLETE).
    """
    ckpt = checkpoint_dir(cfg.run.dir, state.step)
    failed = []  # this rank's first failure

    def attempt(write) -> None:
        if not failed:
            try:
                write()
            except OSError as e:
                failed.append(e)

    if env.is_main:
        shutil.rmtree(ckpt, ignore_errors=True)  # a leftover of an interrupted write
        attempt(lambda: ckpt.mkdir(parents=True))
    distributed.barrier()
    client_state = {
        "step": state.step,
        "images_seen": state.images_seen,
        "stream_start": state.stream_start,
        "batches_drawn": state.batches_drawn,
        "ema_num_updates": ema.num_updates,
        "world_size": env.world_size,
    }
    writer = engine.checkpoint_engine
    writer.save_error = failed[0] if failed else None  # WeightsOnlyCheckpointEngine then writes nothing
    engine.save_checkpoint(str(ckpt), tag="deepspeed", client_state=client_state, save_latest=False)
    if writer.save_error is not None and not failed:
        failed.append(writer.save_error)
    writer.save_error = None
    attempt(lambda: save_rng(ckpt, env.rank))
    online = full_weights(engine.module, keep=env.is_main)  # a collective under ZeRO-3
    distributed.barrier()
    attempt(lambda: fsync_tree(ckpt))  # each rank flushes what it wrote (and, harmlessly, what the others wrote)
    distributed.barrier()
    if env.is_main:
        attempt(
            lambda: save_export_files(ckpt, ema.state_dict(), cfg, state.step, state.images_seen, model_state=online)
        )
    _agree_or_remove(ckpt, failed, env)
    if env.is_main:
        _test_pause_before_complete(state.step)
        attempt(lambda: mark_complete(ckpt))  # the commit point: before this line the checkpoint does not exist
    _agree_or_remove(ckpt, failed, env)
    if env.is_main:
        prune_checkpoints(cfg.run.dir, cfg.train.keep_checkpoints)
    distributed.barrier()
    return ckpt


def _agree_or_remove(ckpt: Path, failed: list, env: DistEnv) -> None:
    try:
        on_all_ranks(env, lambda: _reraise(failed))
    except TrainError as e:
        if env.is_main:
            shutil.rmtree(ckpt, ignore_errors=True)
        raise TrainError(
            f"{e}; removed the unfinished checkpoint {ckpt}, the earlier ones are intact", quiet=e.quiet
        ) from None


def _reraise(failed: list) -> None:
    if failed:
        raise failed[0]


def _test_pause_before_complete(step: int) -> None:
    spec = os.environ.get(PAUSE_BEFORE_COMPLETE_ENV)
    if spec:
        at, seconds = spec.split(":")
        if int(at) == step:
            time.sleep(float(seconds))


def resume(engine, ema, cfg: Config, env: DistEnv) -> TrainState:
    """Load the newest complete checkpoint of run.dir, if any; interrupted writes are deleted.

    One that cannot be loaded (a damaged file: the message names it) stops the run, or with
    train.resume_fallback=true the next older complete checkpoint is tried, and the log says so.
    """
    if env.is_main:
        for d in remove_incomplete(cfg.run.dir):
            print(f"removed incomplete checkpoint {d} (interrupted while writing)", flush=True)
    distributed.barrier()
    # All ranks must load the same one: rank 0 decides.
    steps = [[step_of(d) for d in complete_checkpoints(cfg.run.dir)]]
    dist.broadcast_object_list(steps, src=0)
    candidates = [checkpoint_dir(cfg.run.dir, step) for step in reversed(steps[0])]
    for i, ckpt in enumerate(candidates):
        try:
            return load_checkpoint(engine, ema, ckpt, env)
        except TrainError as e:
            if not cfg.train.resume_fallback or i + 1 == len(candidates):
                hint = "" if cfg.train.resume_fallback else "; train.resume_fallback=true resumes from the one before"
                raise TrainError(f"{e}{hint if i + 1 < len(candidates) else ''}", quiet=e.quiet) from None
            if env.is_main:
                print(
                    f"warning: {e}; falling back to the next older complete checkpoint {candidates[i + 1]} "
                    f"(train.resume_fallback=true)",
                    flush=True,
                )
    return TrainState()


def load_checkpoint(engine, ema, ckpt: Path, env: DistEnv) -> TrainState:
    """Check every file of `ckpt` this rank reads, then load them; a failure on any rank raises on all."""
    on_all_ranks(env, lambda: (verify_export_files(ckpt), verify_deepspeed_files(ckpt / "deepspeed")))

    def load_engine():
        try:
            _, client = engine.load_checkpoint(
                str(ckpt), tag="deepspeed", load_optimizer_states=True, load_lr_scheduler_states=True
            )
        except (RuntimeError, KeyError, ValueError, OSError) as e:
            if isinstance(e, CheckpointError):
                raise
            raise CheckpointError(
                f"{ckpt}: cannot resume from it ({str(e).splitlines()[0][:300]}); "
                f"was it written by a different config or world size?"
            ) from None
        if client is None:
            raise CheckpointError(f"{ckpt / 'deepspeed'}: DeepSpeed found no state there")
        return client

    client = on_all_ranks(env, load_engine)

    def load_ema_and_rng() -> bool:
        ema_state = load_tensors(ckpt / EMA_FILE, device=str(env.device)) if env.is_main else {}
        try:
            ema.load_state_dict(ema_state, client["ema_num_updates"])
        except (KeyError, RuntimeError, ValueError) as e:
            raise CheckpointError(
                f"{ckpt / EMA_FILE}: does not fit this model ({str(e).splitlines()[0][:200]})"
            ) from None
        return load_rng(ckpt, env.rank)

    if not on_all_ranks(env, load_ema_and_rng) and env.is_main:
        print(f"warning: {ckpt} has no RNG state for rank {env.rank}; continuing with fresh generators")
    if env.is_main:
        print(f"resumed from {ckpt} (step {client['step']}, {client['images_seen']} images seen)", flush=True)
    return TrainState(
        step=client["step"],
        images_seen=client["images_seen"],
        stream_start=client["stream_start"],
        batches_drawn=client["batches_drawn"],
    )


# --- RNG streams, durable writes, weights-only loading ---------------------------------------


def rng_state() -> dict[str, torch.Tensor]:
    """This process's python, numpy and torch (CPU and CUDA) generator states as plain tensors."""
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
    buf = io.BytesIO()
    torch.save(rng_state(), buf)
    atomic_write_bytes(rng_path(ckpt_dir, rank), buf.getvalue())


def load_rng(ckpt_dir: str | Path, rank: int) -> bool:
    """Restore this rank's RNG states; False when the checkpoint has none for this rank."""
    path = rng_path(ckpt_dir, rank)
    if not path.exists():
        return False
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        set_rng_state(state)
    except Exception as e:  # truncated, garbled, a pickle of something else, a directory
        raise CheckpointError(f"{path}: damaged RNG state ({reason_of(e)})") from None
    return True


def fsync_tree(root: str | Path) -> None:
    """fsync every file and directory under root (files another rank wrote included)."""
    for folder, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(folder, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(folder)


def use_weights_only_loading(engine) -> None:
    """Make engine.load_checkpoint unpickle with weights_only=True (DeepSpeed's own loader does not).

    Only plain containers, tensors and the classes in `deepspeed_safe_globals` are accepted,
    so a tampered checkpoint cannot run code on load.
    """
    # deepspeed: imported only after DS_ACCELERATOR is set
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine  # see above

    if type(engine.checkpoint_engine) is not TorchCheckpointEngine:
        return  # a configured alternative engine (nebula, fast, ...) keeps its own loader
    allowed = deepspeed_safe_globals()

    class WeightsOnlyCheckpointEngine(TorchCheckpointEngine):
        """Loads name the damaged file; saves go through atomic_writer, and a failed save (a full
        disk) is kept in `save_error` instead of raised, so this rank still joins DeepSpeed's
        collectives and the caller can stop every rank together."""

        save_error: Exception | None = None

        def load(self, path: str, map_location=None):
            try:
                with torch.serialization.safe_globals(allowed):
                    return torch.load(path, map_location=map_location, weights_only=True)
            except Exception as e:
                raise CheckpointError(f"{path}: damaged DeepSpeed state ({reason_of(e)})") from None

        def save(self, state_dict, path: str):
            if self.save_error is not None:
                return  # the checkpoint is lost already; write nothing more into it
            try:
                with atomic_writer(path) as f:
                    torch.save(state_dict, f, _use_new_zipfile_serialization=self.zipfile_serialization)
            except Exception as e:
                self.save_error = e

    engine.checkpoint_engine = WeightsOnlyCheckpointEngine(engine._config)
