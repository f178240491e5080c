"""The fault suite, damaged files: README's "What survives what" is built from it and from
test_faults_interrupted.py (kill -9, a full disk).

Each damaged file is cut in half (truncated), overwritten with random bytes of the same size
(garbled), emptied, or replaced by something of another type (a non-tensor pickle, JSON where
safetensors belong, a directory), and then read through every entry point that reads it: one
line naming the file, the documented exit status, no traceback. Entry points run in this process
as their CLIs call them (main() / train()), or as subprocesses where the process boundary matters.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_model import PYTHON, REPO, TINY_CPU_YAML, losses, tiny_config

from pipeline.checkpoint import complete_checkpoints
from pipeline.core.sidecar import sidecar_path

pytestmark = pytest.mark.integration
SEED = 14
DAMAGES = ("truncated", "garbled", "empty", "wrong_type")
EVERY_2 = ["train.checkpoint_every=2", "train.keep_checkpoints=3"]  # checkpoints at steps 2, 4, 6


def damage(path: Path, kind: str) -> None:
    """Replace `path` by a damaged copy (never writing through it: fixtures share files by hard link)."""
    data = path.read_bytes() if path.is_file() else b""
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink()
    if kind == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif kind == "garbled":
        path.write_bytes(np.random.default_rng(SEED).bytes(len(data)))
    elif kind == "empty":
        path.write_bytes(b"")
    elif path.suffix == ".pt":  # what weights_only loading must refuse: a pickled object, not tensors
        torch.save({"module": argparse.Namespace(lr=1.0)}, path)
    elif path.suffix == ".safetensors":
        path.write_text('{"not": "safetensors"}\n')
    elif path.suffix in (".json", ".yaml"):
        path.write_text("[1, 2, 3]\n")
    elif path.suffix in (".onnx", ".npz"):
        buf = io.BytesIO()
        np.save(buf, np.zeros(3))
        path.write_bytes(buf.getvalue())
    else:  # COMPLETE, a shard, an image: a directory where the file should be
        path.mkdir()


def linked_copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, copy_function=os.link)
    return dst


def one_line(err: str, *must_contain: str) -> str:
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    for text in must_contain:
        assert text in lines[0], lines[0]
    return lines[0]


# --- a trained run: checkpoints at steps 2 and 4 --------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory, shards16, in_process) -> Path:
    from pipeline.train.loop import train

    root = tmp_path_factory.mktemp("trained")
    cfg = tiny_config(root, shards16, "train.max_steps=4", *EVERY_2)
    assert train(cfg) == 0
    assert [d.name for d in complete_checkpoints(root / "run")] == ["step_000000002", "step_000000004"]
    return root / "run"


def resume_from(run: Path, shards: Path, capsys, *overrides: str) -> tuple[int, str, str]:
    from pipeline.train.loop import train

    cfg = tiny_config(run.parent, shards, "train.max_steps=6", *EVERY_2, f"run.dir={run}", *overrides)
    capsys.readouterr()
    status = train(cfg)
    out = capsys.readouterr()
    return status, out.out, out.err


CKPT_FILES = (
    "COMPLETE",
    "model.json",
    "ema.safetensors",
    "model.safetensors",
    "deepspeed/mp_rank_00_model_states.pt",
    "rng/rank_00000.pt",
)


@pytest.mark.parametrize("kind", DAMAGES)
@pytest.mark.parametrize("name", CKPT_FILES)
def test_damaged_checkpoint_file_stops_the_resume_naming_it(
    name, kind, trained, shards16, tmp_path, capsys, in_process
):
    run = linked_copy(trained, tmp_path / "run")
    newest = run / "checkpoints" / "step_000000004"
    damage(newest / name, kind)
    status, out, err = resume_from(run, shards16, capsys)
    assert status == 2, out + err
    one_line(err, str(newest / name), "resume_fallback=true")
    assert newest.is_dir() and not (run / "checkpoints" / "step_000000006").exists()  # nothing deleted or written


def test_resume_fallback_takes_the_older_checkpoint_and_says_so(trained, shards16, tmp_path, capsys, in_process):
    run = linked_copy(trained, tmp_path / "run")
    damage(run / "checkpoints" / "step_000000004" / "ema.safetensors", "truncated")
    status, out, err = resume_from(run, shards16, capsys, "train.resume_fallback=true")
    assert status == 0, out + err
    older = run / "checkpoints" / "step_000000002"
    assert f"falling back to the next older complete checkpoint {older}" in out
    assert f"resumed from {older}" in out
    assert losses(run)[:4] == losses(trained)  # steps 3-4 redone from step 2: bit-equal
    assert len(losses(run)) == 6


@pytest.mark.parametrize("kind", DAMAGES)
@pytest.mark.parametrize("name", ("COMPLETE", "model.json", "ema.safetensors", "model.safetensors"))
def test_damaged_checkpoint_file_through_export_and_sample(name, kind, trained, tmp_path, capsys):
    from export.onnx import main as export_onnx
    from export.sample import main as sample

    ckpt = linked_copy(trained / "checkpoints" / "step_000000004", tmp_path / "step_000000004")
    damage(ckpt / name, kind)
    weights = ["--weights", "model"] if name == "model.safetensors" else []
    capsys.readouterr()
    assert export_onnx(["--ckpt", str(ckpt), "--out", str(tmp_path / "d.onnx"), *weights]) == 2
    one_line(capsys.readouterr().err, str(ckpt / name))
    assert not list(tmp_path.glob("d.*"))
    if name != "model.safetensors":  # the sampler serves the EMA weights only
        assert sample(["--model", str(ckpt), "--out", str(tmp_path / "s.npz"), "--num", "2", "--steps", "2"]) == 2
        one_line(capsys.readouterr().err, str(ckpt / name))


def test_benchmarks_rebuild_a_damaged_cached_checkpoint(trained, tmp_path, monkeypatch, capsys):
    from benchmarks import artifacts
    from pipeline.checkpoint import read_checkpoint
    from pipeline.config import load_config

    monkeypatch.setattr(artifacts, "CACHE", tmp_path)
    cfg = load_config(TINY_CPU_YAML, ["model.image_size=16", "model.ch_mult=[1,2]"])
    ckpt = artifacts.random_checkpoint(cfg)
    damage(ckpt / "ema.safetensors", "garbled")
    assert artifacts.random_checkpoint(cfg) == ckpt
    assert f"{ckpt / 'ema.safetensors'}: damaged safetensors file" in capsys.readouterr().err
    read_checkpoint(ckpt).load_unet()


# --- shards, manifest, config ---------------------------------------------------------------------


def test_a_flipped_byte_in_a_shard_never_reaches_an_optimizer_step(shards16, tmp_path, capsys, in_process):
    from pipeline.train.loop import train

    shards = linked_copy(shards16, tmp_path / "shards")
    (shards / ".verified.json").unlink(missing_ok=True)
    shard = shards / "train-000000.tar"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01  # size unchanged: only the sha256 can tell
    shard.unlink()
    shard.write_bytes(bytes(data))
    capsys.readouterr()
    assert train(tiny_config(tmp_path, shards, "train.max_steps=2")) == 2
    one_line(capsys.readouterr().err, f"{shard}: sha256 does not match", "re-run the same data_prep command")
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # not one step taken


def test_verified_shards_are_not_hashed_again(shards16, tmp_path, monkeypatch):
    from pipeline.core import manifest

    shards = linked_copy(shards16, tmp_path / "shards")
    (shards / ".verified.json").unlink(missing_ok=True)
    manifest.check_shards(shards, verify_sha256=True)
    cached = json.loads((shards / ".verified.json").read_text())
    assert set(cached) == {p.name for p in shards.glob("train-*.tar")}
    monkeypatch.setattr(manifest, "sha256_file", lambda path: pytest.fail(f"hashed {path} again"))
    manifest.check_shards(shards, verify_sha256=True)  # (size, mtime, inode) unchanged: only a stat


@pytest.mark.parametrize("kind", DAMAGES)
@pytest.mark.parametrize("name", ("manifest.json", "train-000000.tar"))
def test_damaged_manifest_or_shard_stops_training_in_one_line(name, kind, shards16, tmp_path, capsys, in_process):
    from pipeline.train.loop import train

    shards = linked_copy(shards16, tmp_path / "shards")
    damage(shards / name, kind)
    capsys.readouterr()
    assert train(tiny_config(tmp_path, shards, "train.max_steps=2")) == 2
    one_line(capsys.readouterr().err, str(shards / name))


def test_rejected_samples_are_counted_and_stop_the_run_past_max_corrupt(tmp_path, capsys, caplog, in_process):
    from test_data_loader import write_corrupt_shards

    from pipeline.train.loop import train

    write_corrupt_shards(tmp_path / "shards", good=40, corrupt=4)
    assert train(tiny_config(tmp_path / "a", tmp_path / "shards", "train.max_steps=6", "data.max_corrupt=100")) == 0
    rows = [json.loads(line) for line in (tmp_path / "a" / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["corrupt_samples"] >= 4 and all(r["corrupt_samples"] >= 0 for r in rows)
    assert "train-000000.tar: sample 0000" in caplog.text  # each one logged with shard and key
    capsys.readouterr()
    assert train(tiny_config(tmp_path / "b", tmp_path / "shards", "train.max_steps=6", "data.max_corrupt=0")) == 2
    one_line(capsys.readouterr().err, "more than data.max_corrupt=0", "train-000000.tar: sample 0000")


@pytest.mark.parametrize("kind", DAMAGES)
def test_damaged_config_is_one_line_exit_2(kind, tmp_path):
    config = tmp_path / "config.yaml"
    shutil.copy(TINY_CPU_YAML, config)
    damage(config, kind)
    env = {
        k: v
        for k, v in os.environ.items()  # not the process group of the in-process trainings
        if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    }
    cli = subprocess.run(
        [PYTHON, "-m", "pipeline.train", "--config", str(config), f"run.dir={tmp_path / 'run'}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert cli.returncode == 2, cli.stderr
    one_line(cli.stderr, str(config))


@pytest.mark.parametrize("kind", DAMAGES)
@pytest.mark.parametrize("name", ("samples.npz", "manifest.json"))
def test_damaged_input_through_evaluate(name, kind, shards16, tmp_path, capsys):
    from pipeline.evaluation.evaluate import main as evaluate

    shards = linked_copy(shards16, tmp_path / "shards")
    samples = tmp_path / "samples.npz"
    np.savez(samples, images=np.zeros((4, 16, 16, 3), np.uint8))
    target = samples if name == "samples.npz" else shards / name
    damage(target, kind)
    capsys.readouterr()
    assert evaluate(["--samples", str(samples), "--shards", str(shards), "--feature-net-steps", "1"]) == 2
    one_line(capsys.readouterr().err, str(target))


# --- exported models and uploads ----------------------------------------------------------------


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory) -> Path:
    from export.onnx import main as export_onnx

    out = tmp_path_factory.mktemp("onnx") / "denoiser.onnx"
    assert export_onnx(["--ckpt", str(trained), "--out", str(out)]) == 0
    return out


@pytest.mark.parametrize("kind", DAMAGES)
@pytest.mark.parametrize("which", ("onnx", "sidecar"))
def test_damaged_onnx_or_sidecar_through_sample_app_and_trt(which, kind, exported, tmp_path, capsys):
    from export.app import main as app
    from export.sample import main as sample
    from export.trt import main as trt

    model = tmp_path / "denoiser.onnx"
    os.link(exported, model)
    os.link(sidecar_path(exported), sidecar_path(model))
    target = model if which == "onnx" else sidecar_path(model)
    damage(target, kind)
    capsys.readouterr()
    assert sample(["--model", str(model), "--out", str(tmp_path / "s.npz"), "--num", "2", "--steps", "2"]) == 2
    one_line(capsys.readouterr().err, str(target))
    with pytest.raises(SystemExit) as exit_info:
        app(["--model", str(model)])
    one_line(str(exit_info.value.code), "export.app: ", str(target))  # SystemExit(str): status 1
    status = trt(["--onnx", str(model), "--out", str(tmp_path / "d.plan")])
    err = capsys.readouterr().err
    if "TensorRT is not installed" in err or "no CUDA device" in err or "CUDA Python bindings" in err:
        assert status == 1  # this machine cannot build engines: said before reading the model
        return
    assert status in (1, 2) and str(target) in err.splitlines()[0] and "Traceback" not in err, err


@pytest.mark.parametrize("kind", DAMAGES)
def test_damaged_upload_to_the_app_is_a_message(kind, tmp_path):
    from PIL import Image

    from export.uploads import UserInputError, open_upload

    upload = tmp_path / "face.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), np.uint8)).save(upload)
    damage(upload, kind)
    with pytest.raises(UserInputError) as info:
        open_upload(str(upload))
    assert "\n" not in str(info.value) and str(info.value)
