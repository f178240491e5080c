"""Config loading: typed values, overrides, and one-line errors that name the file and key."""

import subprocess
import sys

import pytest
import yaml

from pipeline.config import load_config, save_config
from pipeline.core.config import ConfigError, to_dict

CONFIGS = ["configs/celebahq256.yaml", "configs/celebahq64.yaml", "configs/tiny_cpu.yaml"]


@pytest.mark.parametrize("path", CONFIGS)
def test_shipped_configs_load(repo_root, path):
    cfg = load_config(f"{repo_root}/{path}")
    assert cfg.model.image_size % 2 ** (len(cfg.model.ch_mult) - 1) == 0


def test_paper_config_values(repo_root):
    cfg = load_config(f"{repo_root}/configs/celebahq256.yaml")
    assert cfg.model.ch == 128 and cfg.model.ch_mult == (1, 1, 2, 2, 4, 4)
    assert cfg.model.num_res_blocks == 2 and cfg.model.attn_resolutions == (16,) and cfg.model.dropout == 0.0
    assert cfg.diffusion.num_timesteps == 1000 and cfg.diffusion.beta_schedule == "linear"
    assert (cfg.diffusion.beta_start, cfg.diffusion.beta_end) == (1e-4, 0.02)
    assert cfg.train.lr == 2e-5 and cfg.train.warmup_steps == 5000 and cfg.train.batch_size == 64
    assert cfg.train.grad_clip == 1.0 and cfg.ema.decay == 0.9999 and cfg.data.random_flip


def test_overrides_are_typed(repo_root):
    cfg = load_config(
        f"{repo_root}/configs/tiny_cpu.yaml",
        ["train.lr=1e-4", "zero.stage=3", "model.ch_mult=[1,2]", "model.attn_resolutions=[16]", "train.precision=bf16"],
    )
    assert cfg.train.lr == 1e-4 and isinstance(cfg.train.lr, float)
    assert cfg.zero.stage == 3 and cfg.model.ch_mult == (1, 2) and cfg.train.precision == "bf16"


def test_exponent_without_dot_is_a_float(tmp_path):
    # PyYAML reads `2e-5` as a string (YAML 1.1); a user writing it still means a number.
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  lr: 2e-5\n")
    assert load_config(path).train.lr == 2e-5


@pytest.mark.parametrize(
    "override,message",
    [
        ("train.lr=-1", "train.lr: -1.0 must be > 0"),
        ("train.lrr=1", "train.lrr: unknown key"),
        ("bogus.x=1", "bogus: unknown key"),
        ("zero.stage=4", "zero.stage: 4 not in 0..3"),
        ("zero.stage=two", "zero.stage: expected int, got 'two'"),
        ("model.image_size=34", "model.image_size: 34 is not divisible by the down-sampling factor 4"),
        ("model.attn_resolutions=[5]", "model.attn_resolutions: 5 is not a resolution of the network"),
        ("train.precision=fp8", "train.precision: 'fp8' not fp16|bf16|fp32"),
        ("train.grad_checkpointing=maybe", "train.grad_checkpointing: expected bool"),
        ("log.sample_sampler=euler", "log.sample_sampler: 'euler' not ddpm|ddim|dpmpp_2m|unipc"),
        ("train.lr", "expected section.key=value"),
    ],
)
def test_bad_values_name_file_and_key(repo_root, override, message):
    path = f"{repo_root}/configs/tiny_cpu.yaml"
    with pytest.raises(ConfigError) as err:
        load_config(path, [override])
    text = str(err.value)
    assert text.startswith(path) and message in text and "\n" not in text


def test_unreadable_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="missing.yaml: cannot read config"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_config(bad)


def test_saved_config_round_trips(repo_root, tmp_path):
    cfg = load_config(f"{repo_root}/configs/celebahq64.yaml", ["train.lr=3e-4"])
    save_config(cfg, tmp_path / "run" / "config.yaml")
    again = load_config(tmp_path / "run" / "config.yaml")
    assert again == cfg
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text()) == to_dict(cfg)


def test_cli_prints_one_line_error(repo_root):
    out = subprocess.run(
        [sys.executable, "-m", "pipeline.config", "configs/tiny_cpu.yaml", "train.lr=0"],
        cwd=repo_root,
        capture_output=True,
        text=True,
    )
    assert out.returncode != 0
    assert out.stderr.strip() == "error: configs/tiny_cpu.yaml: train.lr: 0.0 must be > 0"
