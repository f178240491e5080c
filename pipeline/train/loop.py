"""Train the DDPM U-Net with DeepSpeed ZeRO: one process, torchrun, or srun under Slurm.

    python -m pipeline.train --config configs/tiny_cpu.yaml [key=value ...]
    torchrun --nproc_per_node 2 -m pipeline.train --config configs/tiny_cpu.yaml
    srun python -m pipeline.train --config configs/celebahq256.yaml       (see slurm/train.sh)

Every source of randomness in a step is a function of (train.seed, rank, step): timesteps,
noise and dropout are drawn from generators seeded per step, and the data stream is re-seeded
every train.checkpoint_every steps. A checkpoint records the stream's seed step and how many
batches were drawn from it; resuming re-creates the stream and skips those batches (none at a
periodic checkpoint). A resumed run therefore replays exactly what the uninterrupted run did:
on CPU in fp32 the losses are bit-equal.

On SIGUSR1 or SIGTERM (Slurm's warning before preemption or the time limit) the current step
finishes, every rank writes the checkpoint, and the process exits with REQUEUE_EXIT_CODE.
Exit status: 0 done, 1 training diverged, 2 user error (bad config, damaged shard or checkpoint,
too many corrupt samples, disk full: one line on stderr), REQUEUE_EXIT_CODE stopped on request.
"""

from __future__ import annotations

import argparse
import math
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from pipeline.checkpoint import CheckpointError
from pipeline.config import load_config_or_report, save_config
from pipeline.core.config import Config, ConfigError
from pipeline.core.fileio import NoSpaceError, atomic_write_json
from pipeline.core.manifest import DataError, check_shards, read_manifest
from pipeline.core.schedule import DiffusionSchedule
from pipeline.model.unet import UNet
from pipeline.train import distributed, resume, stop_signals
from pipeline.train.data import make_loader
from pipeline.train.diffusion import GaussianDiffusion
from pipeline.train.distributed import DistEnv, LaunchError
from pipeline.train.ds_config import batch_sizes, check_offload_build, ds_config_for, precision_of
from pipeline.train.ema import EMA
from pipeline.train.metrics_log import MetricsLog, loss_scale
from pipeline.train.previews import save_preview
from pipeline.train.resume import TrainError, TrainState, on_all_ranks

REQUEUE_EXIT_CODE = 3  # "checkpointed on request, start me again": slurm/train.sh and pipeline.launch requeue on it
EXIT_DIVERGED = 1
EXIT_USER_ERROR = 2


class LossScaleExhausted(RuntimeError):
    """fp16 gradients overflowed again at the minimum loss scale: the run has diverged."""


def is_min_loss_scale_error(error: BaseException) -> bool:
    """DeepSpeed's DynamicLossScaler raises a bare Exception on an overflow at min_loss_scale
    (from 2^16 with hysteresis 2: the 18th overflow in a row), long before train.max_bad_steps."""
    return "loss scale already at minimum" in str(error)  # its only mark: no exception class of its own


# --- randomness that depends on (seed, rank, step) only -------------------------------------


def derived_seed(*keys: int) -> int:
    """A 63-bit seed mixed from integers (numpy's SeedSequence: independent streams per key)."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1, np.uint64)[0] >> 1)


def check_data(cfg: Config) -> None:
    """The pre-flight check, before the model is built: the manifest, every train shard's size and
    sha256 (cached per (size, mtime, inode), so a damaged shard stops the run before any of its
    bytes reach an optimizer step), and the resolution the model is configured for."""
    manifest = read_manifest(cfg.data.shards)
    check_shards(cfg.data.shards, "train", verify_sha256=True, manifest=manifest)
    if manifest["resolution"] != cfg.model.image_size:
        raise TrainError(
            f"data.shards: {cfg.data.shards} holds {manifest['resolution']} px images "
            f"but model.image_size is {cfg.model.image_size}"
        )


def image_stream(cfg: Config, env: DistEnv, micro_batch: int, start_step: int, skip: int = 0):
    """Endless (micro_batch, C, H, W) batches in [-1, 1] for this rank, seeded by (seed, start_step),
    less the first `skip` (the ones a resumed run had already trained on). The loader checks the
    shards against the manifest again: after `check_data`, a stat per shard."""

    loader = make_loader(
        cfg.data.shards,
        batch_size=micro_batch,
        rank=env.rank,
        world_size=env.world_size,
        num_workers=cfg.data.num_workers,
        seed=derived_seed(cfg.train.seed, start_step, 1),
        shuffle_buffer=cfg.data.shuffle_buffer,
        random_flip=cfg.data.random_flip,
        max_corrupt=cfg.data.max_corrupt,
    )
    loader.max_corrupt = None  # train_loop counts corrupt samples over all ranks and stops them together
    return loader.forever(skip)  # resampled epochs of equal length on every rank


def warmup_lambda(warmup_steps: int):
    """Linear warm-up factor for LambdaLR: (step + 1) / warmup_steps, then 1."""
    return lambda step: min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0


def build_engine(cfg: Config, ds_config: dict, deepspeed):
    """The DeepSpeed engine around a freshly initialised U-Net (same weights on every rank)."""

    torch.manual_seed(cfg.train.seed)
    model = UNet(cfg.model)
    model.grad_checkpointing = cfg.train.grad_checkpointing
    train_cfg = cfg.train
    optimizer = scheduler = None
    if "optimizer" not in ds_config:
        optimizer = torch.optim.AdamW(
            model.parameters(),
            lr=train_cfg.lr,
            betas=tuple(train_cfg.adam_betas),
            eps=train_cfg.adam_eps,
            weight_decay=train_cfg.weight_decay,
        )
    if "scheduler" not in ds_config:

        def scheduler(opt):
            return torch.optim.lr_scheduler.LambdaLR(opt, warmup_lambda(train_cfg.warmup_steps))

    engine, _, _, _ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        lr_scheduler=scheduler,
        model_parameters=model.parameters() if optimizer is None else None,
        config=ds_config,
    )
    resume.use_weights_only_loading(engine)
    return engine


# --- the loop -------------------------------------------------------------------------------------


def train(cfg: Config) -> int:
    """Run (or resume) the training described by cfg in this process; returns the exit status.

    The process group stays up, so a later call in the same process reuses it (DeepSpeed caches
    its groups); `main` tears it down before the process exits.
    """
    stop_signals.reset()
    # Only the main thread may set handlers; elsewhere the caller uses stop_signals.request_stop() itself.
    caught = stop_signals.catch() if threading.current_thread() is threading.main_thread() else None
    try:
        return _train(cfg)
    except (ConfigError, CheckpointError, DataError, LaunchError, TrainError, NoSpaceError) as e:
        if not getattr(e, "quiet", False):
            print(f"error: {e}", file=sys.stderr, flush=True)
        return EXIT_USER_ERROR
    finally:
        if caught is not None:
            stop_signals.release(*caught)


def _train(cfg: Config) -> int:
    """Set up the process group, engine, EMA and data position (resumed if run.dir has a checkpoint)."""
    train_cfg = cfg.train
    env = distributed.read_env()
    micro_batch, accum = batch_sizes(train_cfg, env.world_size)
    ds_config = ds_config_for(cfg, env.world_size)
    precision = precision_of(ds_config)
    if precision == "fp16" and not torch.cuda.is_available():
        raise TrainError(
            "train.precision=fp16 needs a CUDA GPU (DeepSpeed's loss-scaled fp16 does not run "
            "on CPU); use train.precision=bf16 or fp32 here"
        )
    deepspeed = distributed.init(env)
    check_offload_build(ds_config)
    torch.set_float32_matmul_precision("high")  # TF32 on Ampere and later; no effect on CPU
    run_dir = Path(cfg.run.dir)
    if env.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
        atomic_write_json(run_dir / "deepspeed_config.json", ds_config)
    # rank 0 hashes the shards (and caches the result) before the model is built; the others then only stat
    on_all_ranks(env, lambda: check_data(cfg) if env.is_main else None)

    engine = build_engine(cfg, ds_config, deepspeed)
    ema = EMA(
        engine.module,
        cfg.ema.decay,
        warmup=cfg.ema.warmup,
        keep=env.is_main,
        profile=cfg.ema.profile,
        sigma_rel=cfg.ema.sigma_rel,
    )
    state = resume.resume(engine, ema, cfg, env)
    if state.step >= train_cfg.max_steps:
        if env.is_main:
            print(f"{run_dir}: already at step {state.step} >= train.max_steps={train_cfg.max_steps}; nothing to do")
        return 0
    if env.is_main and state.batches_drawn:
        print(f"skipping {state.batches_drawn} batches to restore the data position", flush=True)
    batches = on_all_ranks(
        env, lambda: image_stream(cfg, env, micro_batch, state.stream_start, skip=state.batches_drawn)
    )

    log = MetricsLog(cfg, state.step, env.is_main)
    log.message(
        f"training {run_dir}: {env.world_size} process(es) on {env.device.type}, {precision}, "
        f"ZeRO-{engine.zero_optimization_stage()}, batch {train_cfg.batch_size} = {micro_batch} x {accum} "
        f"accumulation x {env.world_size}, from step {state.step} to {train_cfg.max_steps}"
    )
    try:
        return train_loop(cfg, env, engine, ema, state, batches, log)
    finally:
        log.close()


def _keeps_grad_norm(engine) -> bool:
    """DeepSpeed's optimizer wrappers record the global gradient norm; ZeRO-0 fp32 (bare torch) does not."""
    return bool(engine.zero_optimization() or engine.fp16_enabled() or engine.bfloat16_enabled())


def _grad_norm(module) -> float:
    """Norm of the (already all-reduced) gradients, before clipping: ZeRO-0 fp32 only."""
    norms = [torch.linalg.vector_norm(p.grad) for p in module.parameters() if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack(norms))) if norms else 0.0


def train_step(engine, diffusion, batches, state: TrainState, seed: int, env: DistEnv):
    """One optimizer step over gradient_accumulation_steps micro-batches -> (summed loss, grad norm)."""
    model_dtype = next(engine.module.parameters()).dtype
    accum = engine.gradient_accumulation_steps()
    loss_sum, grad_norm = torch.zeros((), device=env.device), None
    for micro in range(accum):
        x0 = next(batches).to(env.device, non_blocking=True)
        state.batches_drawn += 1
        # timesteps, noise and dropout from (seed, rank, step, micro): independent of history
        generator = torch.Generator(env.device).manual_seed(derived_seed(seed, env.rank, state.step, micro, 2))
        timesteps = diffusion.sample_timesteps(x0.shape[0], generator=generator, device=env.device)
        noise = torch.randn(x0.shape, generator=generator, device=env.device)
        torch.manual_seed(derived_seed(seed, env.rank, state.step, micro, 3))
        loss = diffusion.training_loss(lambda x_t, t: engine(x_t.to(model_dtype), t), x0, timesteps, noise)
        engine.backward(loss)
        if micro == accum - 1 and not _keeps_grad_norm(engine):
            grad_norm = _grad_norm(engine.module)  # before step() clips and zeroes the gradients
        try:
            engine.step()  # applies the optimizer at the accumulation boundary only
        except Exception as e:
            if is_min_loss_scale_error(e):
                raise LossScaleExhausted(str(e)) from None
            raise
        loss_sum += loss.detach().float()
    if _keeps_grad_norm(engine) and engine.get_global_grad_norm() is not None:
        grad_norm = float(engine.get_global_grad_norm())
    return loss_sum, grad_norm


def train_loop(cfg: Config, env: DistEnv, engine, ema, state: TrainState, batches, log: MetricsLog) -> int:

    train_cfg = cfg.train
    diffusion = GaussianDiffusion(
        DiffusionSchedule.from_config(cfg.diffusion), train_cfg.loss_weighting, train_cfg.snr_gamma
    )
    fp16 = engine.fp16_enabled()
    bad_steps = 0
    corrupt = 0  # samples the data loaders of all ranks skipped since this process started
    engine.train()
    while state.step < train_cfg.max_steps:
        started, lr = time.perf_counter(), engine.get_lr()[0]
        try:
            loss_sum, grad_norm = train_step(engine, diffusion, batches, state, train_cfg.seed, env)
        except LossScaleExhausted:  # every rank sees the same (all-reduced) overflow and stops here
            return _diverged(
                log,
                cfg,
                f"step {state.step + 1}: fp16 gradients overflow even at the minimum loss scale {loss_scale(engine)}",
            )
        # One small collective per step: the loss summed over ranks, and whether any rank was signalled.
        stop_signals.poll()
        flags = torch.stack(
            [
                loss_sum,
                torch.tensor(float(stop_signals.requested()), device=env.device),
                torch.tensor(float(batches.loader.take_rejected()), device=env.device),
            ]
        )
        dist.all_reduce(flags)
        loss = flags[0].item() / (engine.gradient_accumulation_steps() * env.world_size)
        stop = flags[1].item() > 0
        corrupt += int(flags[2].item())
        log.corrupt_samples = corrupt
        if corrupt > cfg.data.max_corrupt:
            raise too_many_corrupt(cfg, env, batches.loader.last_rejected, corrupt)
        state.step += 1
        state.images_seen += train_cfg.batch_size

        # fp16: DeepSpeed skipped the step on overflow. bf16/fp32 have no scaler: after a non-finite
        # loss or gradient the weights may be damaged, so neither the EMA nor a checkpoint takes them.
        if not engine.was_step_applied():
            grad_norm = None  # skipped (fp16 overflow): DeepSpeed reports inf or the previous step's norm
        applied = engine.was_step_applied() and math.isfinite(loss) and math.isfinite(grad_norm or 0.0)
        bad_steps = 0 if applied else bad_steps + 1
        if applied:
            ema.update(engine.module)
        else:
            log.message(
                f"step {state.step}: loss {loss:.4g}, grad norm {grad_norm}, "
                + (f"fp16 overflow, step skipped, loss scale now {loss_scale(engine):g}" if fp16 else "non-finite")
            )
        log.step(
            state.step, loss, lr, grad_norm, train_cfg.batch_size, time.perf_counter() - started, not applied, engine
        )
        if bad_steps > train_cfg.max_bad_steps:
            return _diverged(
                log, cfg, f"{bad_steps} consecutive non-finite steps (train.max_bad_steps={train_cfg.max_bad_steps})"
            )

        if state.step % train_cfg.checkpoint_every == 0:  # a fresh stream, so a resume from here skips nothing
            batches = on_all_ranks(
                env, lambda: image_stream(cfg, env, engine.train_micro_batch_size_per_gpu(), state.step)
            )
            state.stream_start, state.batches_drawn = state.step, 0
        weights_ok = fp16 or bad_steps == 0
        last = state.step == train_cfg.max_steps
        if env.is_main and weights_ok and cfg.log.sample_every and (state.step % cfg.log.sample_every == 0 or last):
            try:
                log.message(f"step {state.step}: EMA samples in {preview(cfg, ema, state.step, env)}")
            except NoSpaceError as e:  # a preview is not worth stopping for; the checkpoint below decides
                log.message(f"warning: no preview grid: {e}")
        if weights_ok and (state.step % train_cfg.checkpoint_every == 0 or last or stop):
            log.message(f"step {state.step}: checkpoint {resume.save_checkpoint(engine, ema, state, cfg, env)}")
        if stop:
            log.message(f"step {state.step}: stopped on request; exit {REQUEUE_EXIT_CODE} so the job is requeued")
            return REQUEUE_EXIT_CODE
    return 0


def _diverged(log: MetricsLog, cfg: Config, reason: str) -> int:
    log.message(
        f"error: {reason}; stopping. The last complete checkpoint under {Path(cfg.run.dir) / 'checkpoints'} is intact."
    )
    return EXIT_DIVERGED


def too_many_corrupt(cfg: Config, env: DistEnv, last: str, count: int) -> TrainError:
    """The stop past data.max_corrupt, naming the last rejected sample any rank saw."""
    lasts = [None] * env.world_size
    dist.all_gather_object(lasts, last)
    last = next((x for x in reversed(lasts) if x), "")
    return TrainError(
        f"{count} corrupt samples skipped, more than data.max_corrupt={cfg.data.max_corrupt} "
        f"(last: {last}); check the shards with `python -m data_prep --verify {cfg.data.shards}`",
        quiet=not env.is_main,
    )


def preview(cfg: Config, ema, step: int, env: DistEnv) -> Path:
    """EMA samples drawn with the sampling core into run.dir/samples/ (rank 0)."""
    model = ema.copy_to(UNet(cfg.model).to(env.device))
    return save_preview(
        model,
        cfg.diffusion,
        cfg.run.dir,
        step,
        cfg.log.num_samples,
        cfg.log.sample_steps,
        cfg.log.sample_sampler,
        device=env.device,
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m pipeline.train", description=__doc__.split("\n")[0])
    p.add_argument("--config", required=True, help="experiment YAML, e.g. configs/tiny_cpu.yaml")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.lr=1e-4")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cfg = load_config_or_report(args.config, args.overrides)
    if cfg is None:
        return EXIT_USER_ERROR
    try:
        return train(cfg)
    finally:
        distributed.shutdown()


if __name__ == "__main__":
    sys.exit(main())
