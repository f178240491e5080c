"""pipeline.train and its parts: DeepSpeed config, launch environment, EMA, RNG, preview grids,
and real multi-process DeepSpeed runs (torchrun, gloo, CPU) that checkpoint, get killed,
signalled and resumed.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess

import numpy as np
import pytest
import torch
from tiny_model import PYTHON, REPO, TINY_CPU_YAML, finish, kill_job, losses, tiny_config, torchrun, wait_for, workers

from pipeline.checkpoint import complete_checkpoints, step_of
from pipeline.core.config import Config, ConfigError, TrainConfig
from pipeline.train.distributed import LaunchError, read_env
from pipeline.train.ds_config import FP16_LOSS_SCALING, batch_sizes, build_ds_config, load_user_ds_config
from pipeline.train.resume import load_rng, save_rng

# --- DeepSpeed config -----------------------------------------------------------------------------


def test_batch_arithmetic_gives_micro_batch_and_accumulation():
    assert batch_sizes(TrainConfig(batch_size=64), 8) == (8, 1)
    assert batch_sizes(TrainConfig(batch_size=64, micro_batch_size=4), 8) == (4, 2)
    with pytest.raises(ConfigError, match="train.batch_size: 10 is not divisible by the world size 4"):
        batch_sizes(TrainConfig(batch_size=10), 4)
    with pytest.raises(ConfigError, match="train.batch_size: 64 is not a multiple"):
        batch_sizes(TrainConfig(batch_size=64, micro_batch_size=3), 2)


def test_ds_config_blocks():
    cfg = Config()
    cfg.train.batch_size, cfg.train.micro_batch_size, cfg.train.precision = 64, 4, "fp16"
    cfg.zero.stage = 2
    ds = build_ds_config(cfg, world_size=4)
    batch = (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"])
    assert batch == (64, 4, 4)
    assert (
        ds["fp16"]
        == {
            "enabled": True,
            "loss_scale": 0,
            "initial_scale_power": 16,
            "loss_scale_window": 1000,
            "hysteresis": 2,
            "min_loss_scale": 1,
        }
        == {"enabled": True, **FP16_LOSS_SCALING}
    )
    assert ds["zero_optimization"] == {"stage": 2} and ds["gradient_clipping"] == 1.0
    assert "bf16" not in ds and "optimizer" not in ds  # Adam is the torch one, built in pipeline.train.loop
    cfg.train.precision = "bf16"
    assert build_ds_config(cfg, 4)["bf16"] == {"enabled": True} and "fp16" not in build_ds_config(cfg, 4)


def test_user_ds_config_passes_through_but_must_agree_on_batch(tmp_path):
    cfg = Config()
    cfg.train.batch_size = 16
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 1, "reduce_bucket_size": 1000}}))
    ds = load_user_ds_config(str(path), cfg, world_size=2)
    assert ds["zero_optimization"]["reduce_bucket_size"] == 1000 and ds["train_micro_batch_size_per_gpu"] == 8
    path.write_text(json.dumps({"train_batch_size": 32}))
    with pytest.raises(ConfigError, match="sets train_batch_size=32 but the experiment config implies 16"):
        load_user_ds_config(str(path), cfg, world_size=2)


# --- launch environment ----------------------------------------------------------------------------


def test_env_from_torchrun_slurm_or_alone():
    env = read_env(
        {"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4", "MASTER_ADDR": "n1", "MASTER_PORT": "29400"}, cuda=False
    )
    assert (env.rank, env.local_rank, env.world_size, env.master_addr, env.master_port, env.backend) == (
        3,
        1,
        4,
        "n1",
        29400,
        "gloo",
    )
    env = read_env(
        {
            "SLURM_PROCID": "5",
            "SLURM_LOCALID": "1",
            "SLURM_NTASKS": "8",
            "MASTER_ADDR": "gpu07",
            "MASTER_PORT": "12345",
        },
        cuda=True,
    )
    assert (env.rank, env.local_rank, env.world_size, env.backend, str(env.device)) == (5, 1, 8, "nccl", "cuda:1")
    alone = read_env({}, cuda=False)
    assert (alone.rank, alone.world_size, alone.master_addr) == (0, 1, "127.0.0.1")
    with pytest.raises(LaunchError, match="MASTER_ADDR and MASTER_PORT must be set"):
        read_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "2"}, cuda=False)
    with pytest.raises(LaunchError, match="RANK='x' is not an integer"):
        read_env({"RANK": "x", "WORLD_SIZE": "2"}, cuda=False)


# --- EMA, RNG, seeds ----------------------------------------------------------------------------


def test_ema_follows_the_formula_with_warmup():
    from pipeline.train.ema import EMA

    model = torch.nn.Linear(3, 2)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    ema = EMA(model, decay=0.9, warmup=True, chunk_numel=4)  # chunks smaller than the model
    expected = {k: v.clone() for k, v in start.items()}
    for n in range(3):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.0)
        decay = min(0.9, (1 + n) / (10 + n))
        assert ema.current_decay() == pytest.approx(decay)
        ema.update(model)
        for k, v in model.state_dict().items():
            expected[k] = decay * expected[k] + (1 - decay) * v
    for k in expected:
        torch.testing.assert_close(ema.state_dict()[k], expected[k], rtol=0, atol=1e-6)
    assert ema.state_dict()["weight"].dtype == torch.float32 and ema.num_updates == 3
    copy = ema.copy_to(torch.nn.Linear(3, 2))
    torch.testing.assert_close(copy.weight.data, expected["weight"])


def test_rng_states_round_trip_through_weights_only_files(tmp_path):

    save_rng(tmp_path, rank=1)
    before = (random.random(), np.random.rand(), torch.rand(1).item(), np.random.randn())
    assert load_rng(tmp_path, rank=1) and not load_rng(tmp_path, rank=0)
    assert (random.random(), np.random.rand(), torch.rand(1).item(), np.random.randn()) == before


def test_derived_seeds_are_stable_and_distinct():
    from pipeline.train.loop import derived_seed

    assert derived_seed(0, 1, 2) == derived_seed(0, 1, 2)
    assert len({derived_seed(0, r, s) for r in range(4) for s in range(50)}) == 200
    assert 0 <= derived_seed(2**40, 7) < 2**63


def test_preview_grid_is_written_atomically(tmp_path):
    from PIL import Image

    from pipeline.core.config import DiffusionConfig, ModelConfig
    from pipeline.model.unet import UNet
    from pipeline.train.previews import save_preview

    model = UNet(ModelConfig(image_size=16, ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,)))
    path = save_preview(model, DiffusionConfig(), tmp_path, 7, num=6, steps=2)
    assert path == tmp_path / "samples" / "step_000000007.png"
    assert path.read_bytes() == (tmp_path / "samples" / "grid.png").read_bytes()
    assert Image.open(path).size == (3 * 18 + 2, 2 * 18 + 2)  # 3 columns x 2 rows of 16 px, 2 px gaps
    assert not [p for p in (tmp_path / "samples").iterdir() if p.name.endswith(".tmp")]


# --- the training loop, in this process (as the submitit launcher calls it) ------------------------


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA")
def test_fp16_without_cuda_is_refused_in_one_line(tmp_path, shards16, capsys, in_process):
    from pipeline.train.loop import train

    fp16 = ["train.precision=fp16", "zero.stage=2"]
    status = train(tiny_config(tmp_path, shards16, *fp16))
    err = capsys.readouterr().err.strip()
    assert status == 2 and len(err.splitlines()) == 1
    assert "fp16 needs a CUDA GPU" in err and "bf16" in err
    assert not (tmp_path / "run").exists()
    cmd = [PYTHON, "-m", "pipeline.train", "--config", str(TINY_CPU_YAML), f"run.dir={tmp_path / 'cli'}", *fp16]
    cli = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    assert cli.returncode == 2 and cli.stderr.strip().splitlines() == [err], cli.stderr


def test_gradient_checkpointing_gives_the_same_loss_curve(tmp_path, shards16, in_process):
    from pipeline.train.loop import train

    curves = []
    for flag in ("false", "true"):
        cfg = tiny_config(
            tmp_path / flag,
            shards16,
            f"train.grad_checkpointing={flag}",
            "train.max_steps=4",
            "train.checkpoint_every=100",
        )
        assert train(cfg) == 0  # two trainings in one process: the process group is torn down in between
        curves.append(losses(tmp_path / flag / "run"))
    assert len(curves[0]) == 4 and curves[0][-1] < curves[0][0]
    np.testing.assert_allclose(curves[1], curves[0], rtol=0, atol=1e-5)


def test_diverging_run_stops_and_keeps_the_last_good_checkpoint(tmp_path, shards16, capsys, in_process):
    from pipeline.train.loop import EXIT_DIVERGED, train

    cfg = tiny_config(
        tmp_path,
        shards16,
        "train.lr=1e12",
        "train.warmup_steps=0",
        "train.grad_clip=0",
        "train.max_bad_steps=2",
        "train.max_steps=50",
        "train.checkpoint_every=1",
    )  # lr: weights blow up
    assert train(cfg) == EXIT_DIVERGED
    out = capsys.readouterr().out
    assert "consecutive non-finite steps (train.max_bad_steps=2)" in out
    kept = complete_checkpoints(tmp_path / "run")
    assert kept, out
    good = step_of(kept[-1])
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(np.isfinite(r["loss"]) for r in rows if r["step"] <= good)
    assert rows[-1]["step"] == good + 3 and not np.isfinite(rows[-1]["loss"])
    from safetensors.torch import load_file

    assert all(v.isfinite().all() for v in load_file(str(kept[-1] / "ema.safetensors")).values())
    states = torch.load(kept[-1] / "deepspeed" / "mp_rank_00_model_states.pt", weights_only=True)
    assert all(v.isfinite().all() for v in states["module"].values())


# --- real DeepSpeed, 2 processes ------------------------------------------------------------------


@pytest.mark.integration
def test_zero3_signals_exact_resume_and_ema_equal_to_zero0(tmp_path, shards16, launched):
    from safetensors.torch import load_file

    from pipeline.train.loop import REQUEUE_EXIT_CODE

    # adam_eps=1e-3: Adam's update g / (sqrt(v) + eps) then does not blow up the last-bit differences of
    # near-zero gradients between ZeRO-0's all-reduce and ZeRO-3's reduce-scatter.
    # One DataLoader worker per rank: it gets the signals too (they go to whole process groups) and must survive.
    common = ["train.adam_eps=1e-3", "train.checkpoint_every=1000", "data.num_workers=1"]

    def start(run_dir, *overrides):
        return torchrun(shards16, run_dir, *overrides, *common, launched=launched)

    interrupted = tmp_path / "interrupted"
    proc = start(interrupted, "zero.stage=3", "train.max_steps=1000")
    wait_for(lambda: (interrupted / "metrics.jsonl").exists(), proc)
    ranks = workers(proc)
    # Slurm's warning to one rank, torchrun's SIGTERM to the other (each to the rank's process group):
    # both must stop at the same step.
    os.killpg(os.getpgid(ranks[1].pid), signal.SIGUSR1)
    os.killpg(os.getpgid(ranks[0].pid), signal.SIGTERM)
    status, out = finish(proc)
    assert f"exitcode  : {REQUEUE_EXIT_CODE}" in out, out[-3000:]
    stopped = complete_checkpoints(interrupted)
    assert len(stopped) == 1, out[-3000:]
    stop_step = step_of(stopped[0])
    assert f"step {stop_step}: stopped on request" in out and 1 <= stop_step < 1000
    total = stop_step + 2

    status, out = finish(start(interrupted, "zero.stage=3", f"train.max_steps={total}"))
    assert status == 0, out[-3000:]
    assert f"resumed from {stopped[0]}" in out and f"skipping {stop_step} batches" in out
    straight = tmp_path / "straight"
    status, out = finish(start(straight, "zero.stage=3", f"train.max_steps={total}"))
    assert status == 0, out[-3000:]
    zero0 = tmp_path / "zero0"
    status, out = finish(start(zero0, "zero.stage=0", f"train.max_steps={total}"))
    assert status == 0, out[-3000:]

    assert losses(interrupted) == losses(straight)  # bit-equal, step by step
    assert len(losses(straight)) == total
    name = f"checkpoints/step_{total:09d}/ema.safetensors"
    ema_resumed, ema_zero3, ema_zero0 = (load_file(str(d / name)) for d in (interrupted, straight, zero0))
    assert all(torch.equal(ema_resumed[k], ema_zero3[k]) for k in ema_zero3)
    assert max((ema_zero3[k] - ema_zero0[k]).abs().max().item() for k in ema_zero0) <= 1e-6
    assert set(ema_zero3) == set(ema_zero0) and all(v.dtype == torch.float32 for v in ema_zero3.values())
    # The online weights beside the EMA: gathered whole under ZeRO-3, the same as ZeRO-0's, not the EMA.
    online_zero3, online_zero0 = (load_file(str(d / name.replace("ema.", "model."))) for d in (straight, zero0))
    assert set(online_zero3) == set(ema_zero3)
    assert max((online_zero3[k] - online_zero0[k]).abs().max().item() for k in online_zero0) <= 1e-6
    assert max((online_zero3[k] - ema_zero3[k]).abs().max().item() for k in ema_zero3) > 1e-4


@pytest.mark.integration
def test_zero2_bf16_killed_while_checkpointing_resumes_from_the_previous_one(tmp_path, shards16, launched):
    from pipeline.train.resume import PAUSE_BEFORE_COMPLETE_ENV

    run = tmp_path / "run"
    args = [
        "zero.stage=2",
        "train.precision=bf16",
        "train.grad_checkpointing=true",
        "train.max_steps=6",
        "train.checkpoint_every=2",
        "train.keep_checkpoints=2",
        "log.sample_every=6",
        "log.sample_steps=2",
        "log.num_samples=4",
    ]
    proc = torchrun(shards16, run, *args, env={PAUSE_BEFORE_COMPLETE_ENV: "4:60"}, launched=launched)
    step4 = run / "checkpoints" / "step_000000004"
    # rank 0 has written the DeepSpeed state and the export files and now sleeps before COMPLETE
    wait_for(lambda: (step4 / "model.json").exists() and (run / "checkpoints/step_000000002/COMPLETE").exists(), proc)
    kill_job(proc)
    assert (step4 / "deepspeed").is_dir() and not (step4 / "COMPLETE").exists()
    assert [d.name for d in complete_checkpoints(run)] == ["step_000000002"]

    status, out = finish(torchrun(shards16, run, *args, launched=launched))
    assert status == 0, out[-3000:]
    assert f"removed incomplete checkpoint {step4}" in out
    assert f"resumed from {run / 'checkpoints' / 'step_000000002'}" in out
    assert [d.name for d in complete_checkpoints(run)] == ["step_000000004", "step_000000006"]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]  # the killed run's steps 3-4 were redone, not doubled
    assert all(np.isfinite(r["loss"]) and r["grad_norm"] > 0 for r in rows)
    assert (run / "samples" / "step_000000006.png").is_file()
    meta = json.loads((run / "checkpoints" / "step_000000006" / "model.json").read_text())
    assert meta["step"] == 6 and meta["images_seen"] == 48
    ds = json.loads((run / "deepspeed_config.json").read_text())
    assert ds["bf16"] == {"enabled": True} and ds["zero_optimization"]["stage"] == 2
