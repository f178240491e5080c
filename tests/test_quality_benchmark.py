"""`python -m benchmarks quality --quick` on a real (tiny, random-weight) checkpoint and real shards."""

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from benchmarks.__main__ import main
from pipeline.evaluation import features


@pytest.mark.integration
def test_quick_quality_run_scores_every_set_and_draws_both_pictures(tmp_path):
    from test_editing import SIZE
    from tiny_model import make_checkpoint

    shards = tmp_path / "shards"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "data_prep",
            "--synthetic",
            "200",
            "--out",
            str(shards),
            "--size",
            str(SIZE),
            "--val-fraction",
            "0.2",
        ],
        check=True,
        capture_output=True,
    )
    features.get_feature_net(shards, train_steps=20)  # trained once here; the benchmark reuses it
    ckpt = make_checkpoint(tmp_path / "run")
    out = tmp_path / "out"
    assert (
        main(
            [
                "quality",
                "--ckpt",
                str(ckpt),
                "--shards",
                str(shards),
                "--quick",
                "--num",
                "16",
                "--out",
                str(out),
                "--threads",
                "2",
            ]
        )
        == 0
    )

    result = json.loads((out / "quality.json").read_text())
    sets = result["results"]["sets"]
    assert sorted(sets) == sorted(
        ["UniPC-5", "UniPC-10", "DPM++(2M)-5", "DPM++(2M)-10", "DDIM-10 eta 0", "DDPM-25", "DDIM-10 eta 1"]
    )
    for name, s in sets.items():
        assert np.isfinite(s["classifier-FID"]) and 0 <= s["precision"] <= 1 and s["seconds"] > 0, name
    assert result["results"]["floor"]["classifier-FID"] >= 0
    (target,) = result["targets"]
    assert target["name"] == "solver_at_10_calls_vs_best_reference" and target["value"] > 0
    assert "| UniPC-10 | 10 |" in (out / "quality.md").read_text()
    assert Image.open(out / "quality.png").size[0] > 400
    strip = Image.open(out / "quality_strip.png")
    assert strip.size[1] == len(sets) * (64 + 2)  # one row per set, 16 px tiles shown at 64 px
