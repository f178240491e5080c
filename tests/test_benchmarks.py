"""The benchmark harness end to end: `python -m benchmarks all --quick` produces every result file.

Only that results were produced, with the keys the README and the demo read, is asserted; never a speed.
"""

import json
import os
import subprocess
import sys

import pytest

from benchmarks import common, record

BENCHMARKS = ("train", "data", "sampler", "end_to_end")


def run_benchmarks(repo_root: str, *args: str, timeout: float, **env: str) -> None:
    """`python -m benchmarks ARGS` from the repository root, `env` added to this one's; it must exit 0."""
    cmd = [sys.executable, "-m", "benchmarks", *args]
    full_env = dict(os.environ, PYTHONPATH=repo_root, **env)
    proc = subprocess.run(cmd, cwd=repo_root, env=full_env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]


def test_summarize_and_target_arithmetic():
    s = record.summarize([3.0, 1.0, 2.0, 10.0])
    assert s.median == 2.5 and s.min == 1.0 and s.max == 10.0 and s.repeats == [3.0, 1.0, 2.0, 10.0]
    assert s.q1 <= s.median <= s.q3
    assert record.paired_ratio([2.0, 4.0, 6.0], [1.0, 2.0, 2.0]).median == 2.0
    met = record.target("a", "a >= 1.25", 1.5, 1.25, ">=")
    missed = record.target("b", "b <= 0.5", 0.6, 0.5, "<=")
    assert met.met is True and met.missed_by == 0.0
    assert missed.met is False and missed.missed_by == pytest.approx(0.2)
    assert record.target("c", "c", None, 1.0, ">=").met is None


def test_interleaved_alternates_order():
    calls = []
    common.interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, warmup=1, repeats=3)
    assert calls == ["a", "b", "a", "b", "b", "a", "a", "b"]


@pytest.mark.integration
def test_quick_run_writes_every_result(tmp_path, repo_root):
    out = tmp_path / "results"
    quick = ["all", "--quick", "--device", "cpu", "--threads", "1", "--out", str(out)]
    run_benchmarks(repo_root, *quick, timeout=1500, OMP_NUM_THREADS="1")

    for name in BENCHMARKS:
        result = json.loads((out / f"{name}.json").read_text())
        for key in (
            "benchmark",
            "date",
            "command",
            "machine",
            "versions",
            "config",
            "method",
            "results",
            "tables",
            "targets",
            "quick",
        ):
            assert key in result, f"{name}.json lacks {key}"
        assert result["benchmark"] == name and result["quick"] is True
        assert result["machine"]["cores"] >= 1 and result["versions"]["torch"]
        for t in result["targets"]:
            assert {"name", "target", "value", "threshold", "op", "met", "missed_by"} <= set(t)
        md = (out / f"{name}.md").read_text()
        assert md.startswith(f"# {name}") and "| " in md

    train = json.loads((out / "train.json").read_text())["results"]
    assert (
        train["throughput"][0]["seconds"]["ours"]["repeats"]
        and train["checkpointing"][0]["memory"]["plain"]["peak_bytes"] > 0
    )
    assert {(r["stage"], r["rank"]) for r in train["zero"]} == {(s, r) for s in (0, 2, 3) for r in (0, 1)}
    sampler = json.loads((out / "sampler.json").read_text())["results"]
    assert sampler["per_evaluation"] and 0 <= sampler["loop"]["overhead_share"]["median"] < 1
    assert json.loads((out / "end_to_end.json").read_text())["results"]["runs"][0]["images_per_second"]["median"] > 0
    summary = json.loads((out / "summary.json").read_text())
    assert {t["name"].split("[")[0] for t in summary["targets"]} >= {
        "train_step_vs_diffusers",
        "checkpointing_memory",
        "checkpointing_time",
        "zero2_optimizer_state",
        "loader_vs_consumption",
        "ort_vs_torch_cpu",
        "loop_overhead",
    }
    assert (out / "summary.md").read_text().startswith("# Benchmark summary")


@pytest.mark.integration
def test_learning_quick_trains_scores_and_plots(tmp_path, repo_root):
    out = tmp_path / "learning"
    run_benchmarks(repo_root, "learning", "--quick", "--out", str(out), timeout=900)
    result = json.loads((out / "learning.json").read_text())
    faces, gray = result["results"]["faces"], result["results"]["grayscale"]
    assert set(faces) == {"val split (floor)", "today", "v-pred min-SNR"}
    for name in ("today", "v-pred min-SNR"):
        points = faces[name]["points"]
        assert [p["step"] for p in points] == [8, 16] and all(p["classifier-FID"] > 0 for p in points)
        assert 0 <= points[-1]["precision"] <= 1 and faces[name]["eta0"]["classifier-FID"] > 0
        assert faces[name]["wall_seconds"] > 0
    # the grayscale data has no colour; a model a few steps old has some
    assert gray["val split (floor)"]["floor"]["colour_cast"] == 0.0
    assert gray["v-pred min-SNR"]["points"][-1]["colour_cast"] >= 0
    md = (out / "learning.md").read_text()
    assert md.startswith("# learning") and "colour cast" in md
    for png in ("learning_cfid.png", "learning_samples.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_colour_cast_is_the_mean_channel_mean_difference():
    import numpy as np

    from benchmarks.learning import colour_cast

    images = np.zeros((2, 4, 4, 3), np.uint8)
    images[0, ..., 0] = 30  # R 30 G 0 B 0: pairs |30|, |0|, |30| -> 20
    images[1] = 77  # grey: 0
    assert colour_cast(images) == pytest.approx(10.0)
