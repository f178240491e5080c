"""The DDPM U-Net: the paper's parameter count, diffusers equivalence, checkpointing, fp32 norms."""

import json

import pytest
import torch
from diffusers import UNet2DModel

from pipeline.config import load_config
from pipeline.core.config import ModelConfig
from pipeline.model.diffusers_unet import DiffusersConfigError, import_diffusers_unet, model_config_from_diffusers
from pipeline.model.unet import GroupNorm32, UNet, count_parameters

TINY = ModelConfig(image_size=16, ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,), dropout=0.0)


def _randomize(model: torch.nn.Module, seed: int = 0, std: float = 0.05) -> None:
    """Give every parameter (including the zero-initialised ones) a random value."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)


def test_celebahq256_has_the_published_parameter_count(repo_root):
    cfg = load_config(f"{repo_root}/configs/celebahq256.yaml")
    with torch.device("meta"):
        model = UNet(cfg.model)
    # google/ddpm-celebahq-256 (diffusers) has exactly this many parameters.
    assert count_parameters(model) == 113_673_219


def test_shapes_and_timestep_types():
    model = UNet(TINY).eval()
    _randomize(model)
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        out_int = model(x, torch.tensor([0, 10, 999]))
        out_float = model(x, torch.tensor([0.0, 10.0, 999.0]))
    assert out_int.shape == x.shape
    torch.testing.assert_close(out_int, out_float)


def test_zero_initialised_output():
    # conv_out is zero-initialised, so an untrained network predicts zero noise.
    with torch.no_grad():
        out = UNet(TINY)(torch.randn(2, 3, 16, 16), torch.tensor([1, 2]))
    assert torch.count_nonzero(out) == 0


@pytest.mark.parametrize(
    "layers,attn_types",
    [
        (1, (("AttnDownBlock2D", "DownBlock2D"), ("UpBlock2D", "AttnUpBlock2D"))),
        (2, (("DownBlock2D", "AttnDownBlock2D"), ("AttnUpBlock2D", "UpBlock2D"))),
    ],
)
def test_import_diffusers_unet_gives_equal_outputs(layers, attn_types, tmp_path):
    torch.manual_seed(0)
    # attention_head_dim=None: one head as wide as the block, as here (diffusers' default 8 is multi-head)
    theirs = UNet2DModel(
        sample_size=16,
        block_out_channels=(32, 64),
        down_block_types=attn_types[0],
        up_block_types=attn_types[1],
        layers_per_block=layers,
        norm_eps=1e-6,
        downsample_padding=0,
        flip_sin_to_cos=False,
        freq_shift=1,
        attention_head_dim=None,
    ).eval()
    _randomize(theirs, seed=1)
    cfg = model_config_from_diffusers(dict(theirs.config))
    ours = import_diffusers_unet(theirs.state_dict(), cfg).eval()
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([3, 700])
    with torch.no_grad():
        expected = theirs(x, t).sample
        torch.testing.assert_close(ours(x, t), expected, atol=1e-5, rtol=0)
        # The saved-directory form (config.json + safetensors) converts the same way.
        theirs.save_pretrained(tmp_path)
        torch.testing.assert_close(import_diffusers_unet(tmp_path).eval()(x, t), expected, atol=1e-5, rtol=0)


DDPM = dict(
    sample_size=16,
    block_out_channels=(32, 64),
    down_block_types=("DownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    layers_per_block=1,
    norm_eps=1e-6,
    downsample_padding=0,
    flip_sin_to_cos=False,
    freq_shift=1,
    attention_head_dim=None,
)


def _equal_outputs(theirs, folder) -> None:
    """Weights large enough that attention is far from uniform (so head splits and scales show), saved, imported."""
    _randomize(theirs.eval(), seed=1, std=0.3)
    theirs.save_pretrained(folder)
    x, t = (
        torch.randn(2, theirs.config.in_channels, 16, 16, generator=torch.Generator().manual_seed(2)),
        torch.tensor([3, 700]),
    )
    with torch.no_grad():
        expected = theirs(x, t).sample
        torch.testing.assert_close(import_diffusers_unet(folder).eval()(x, t), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "changes",
    [
        {},
        {"norm_num_groups": 16, "dropout": 0.2, "layers_per_block": 2},
        {"act_fn": "swish", "sample_size": [16, 16], "in_channels": 1, "out_channels": 1},
        {"attention_head_dim": 64, "attn_norm_num_groups": 32, "time_embedding_dim": 128},
        {"block_out_channels": (32, 96), "attention_head_dim": 96},
    ],
)
def test_import_honours_the_fields_it_can(changes, tmp_path):
    torch.manual_seed(0)
    _equal_outputs(UNet2DModel(**{**DDPM, **changes}), tmp_path)


@pytest.mark.parametrize(
    "field,value",
    [
        ("attention_head_dim", 8),
        ("flip_sin_to_cos", True),
        ("freq_shift", 0),
        ("downsample_padding", 1),
        ("norm_eps", 1e-5),
        ("act_fn", "mish"),
        ("resnet_time_scale_shift", "scale_shift"),
        ("time_embedding_type", "fourier"),
        ("center_input_sample", True),
        ("mid_block_scale_factor", 2.0),
        ("downsample_type", "resnet"),
        ("upsample_type", "resnet"),
        ("attn_norm_num_groups", 8),
        ("add_attention", False),
        ("mid_block_type", None),
        ("num_class_embeds", 10),
        ("out_channels", 6),
        ("down_block_types", ("DownBlock2D", "AttnSkipDownBlock2D")),
        ("up_block_types", ("UpBlock2D", "AttnUpBlock2D")),
        ("time_embedding_dim", 64),
        ("block_out_channels", (32, 48)),
    ],
)
def test_import_refuses_what_it_would_compute_differently(field, value, tmp_path):
    torch.manual_seed(0)
    changes = {
        field: value,
        **({"up_block_types": ("AttnUpBlock2D", "SkipUpBlock2D")} if field == "down_block_types" else {}),
    }
    changes = {**changes, **({"norm_num_groups": 16} if field == "block_out_channels" else {})}
    theirs = UNet2DModel(**{**DDPM, **changes})
    theirs.save_pretrained(tmp_path)
    with pytest.raises(DiffusersConfigError) as err:
        import_diffusers_unet(tmp_path)
    message = str(err.value)
    assert f"{field}=" in message and str(tmp_path / "config.json") in message and len(message.splitlines()) == 1
    if field == "norm_eps":  # the one that shows: with small weights the outputs differ measurably
        with pytest.raises(AssertionError):
            _equal_outputs_ignoring_config(theirs)


def _equal_outputs_ignoring_config(theirs) -> None:
    cfg = ModelConfig(image_size=16, ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,), dropout=0.0)
    _randomize(theirs.eval(), seed=1, std=0.3)
    ours = import_diffusers_unet(theirs.state_dict(), cfg).eval()
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([3, 700])
    with torch.no_grad():
        torch.testing.assert_close(ours(x, t), theirs(x, t).sample, atol=1e-5, rtol=1e-5)


def test_a_config_json_missing_fields_means_diffusers_defaults(tmp_path):
    torch.manual_seed(0)
    UNet2DModel(**DDPM).save_pretrained(tmp_path)
    dcfg = json.loads((tmp_path / "config.json").read_text())
    del dcfg["downsample_padding"]  # diffusers then pads by 1 on every side
    (tmp_path / "config.json").write_text(json.dumps(dcfg))
    with pytest.raises(DiffusersConfigError, match="downsample_padding=1 is not supported"):
        import_diffusers_unet(tmp_path)


def test_import_rejects_foreign_weights():
    theirs = UNet2DModel(**{**DDPM, "down_block_types": ("DownBlock2D",) * 2, "up_block_types": ("UpBlock2D",) * 2})
    sd = dict(theirs.state_dict(), **{"extra.weight": torch.zeros(1)})
    with pytest.raises(KeyError, match="extra.weight"):
        import_diffusers_unet(sd, model_config_from_diffusers(dict(theirs.config)))


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    model = UNet(ModelConfig(**{**TINY.__dict__, "dropout": 0.1})).train()
    _randomize(model)
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([5, 500])

    def grads(checkpointing: bool):
        model.grad_checkpointing = checkpointing
        model.zero_grad()
        torch.manual_seed(123)  # same dropout masks in both runs
        model(x, t).square().mean().backward()
        return [p.grad.clone() for p in model.parameters()]

    for a, b in zip(grads(False), grads(True)):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_groupnorm_statistics_in_fp32_for_half_inputs():
    norm = GroupNorm32(4, 8).half()
    # Values whose squares overflow fp16 (> 65504): a half-precision variance would be inf.
    x = (torch.randn(1, 8, 4, 4) * 300 + 1000).half()
    out = norm(x)
    assert out.dtype == torch.float16 and torch.isfinite(out).all()
    reference = torch.nn.functional.group_norm(x.float(), 4, eps=1e-5)
    torch.testing.assert_close(out.float(), reference, atol=2e-3, rtol=0)
