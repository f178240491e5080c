"""Sample-quality evaluation: Fréchet distance maths, k-NN coverage, and that the classifier-FID ranks
real data above noisy, blurred and collapsed sets. Real shards from data_prep; the feature net is
trained for a few dozen steps so the whole file stays within a minute or two of CPU."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter
from scipy.spatial.distance import cdist

from pipeline.evaluation import evaluate, features, fid_inception, images, metrics
from pipeline.evaluation import feature_net as fnet

torch.set_num_threads(2)


# ---------------------------------------------------------------- Fréchet distance


def _reference_fd(mu1, s1, mu2, s2):
    """Same quantity by the symmetric route: Tr(S1 + S2 - 2 (S1^1/2 S2 S1^1/2)^1/2), via eigh."""
    w, v = np.linalg.eigh(s1)
    r1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    w2 = np.linalg.eigvalsh(r1 @ s2 @ r1)
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.sum(np.sqrt(np.clip(w2, 0, None))))


def _random_cov(rng, d):
    a = rng.normal(size=(d, 2 * d))
    return a @ a.T / (2 * d)


def test_frechet_distance_closed_forms():
    rng = np.random.default_rng(0)
    d = 16
    mu, sigma = rng.normal(size=d), _random_cov(rng, d)
    assert abs(metrics.frechet_distance(mu, sigma, mu, sigma)) < 1e-6
    shift = rng.normal(size=d)
    assert metrics.frechet_distance(mu, sigma, mu + shift, sigma) == pytest.approx(shift @ shift, rel=1e-6)
    a, b = rng.uniform(0.1, 3, d), rng.uniform(0.1, 3, d)  # diagonal: sum of (sqrt(a) - sqrt(b))^2
    assert metrics.frechet_distance(mu, np.diag(a), mu, np.diag(b)) == pytest.approx(
        np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    )
    s2, mu2 = _random_cov(rng, d), rng.normal(size=d)
    assert metrics.frechet_distance(mu, sigma, mu2, s2) == pytest.approx(_reference_fd(mu, sigma, mu2, s2), rel=1e-6)


def test_frechet_distance_from_samples_and_singular_covariances():
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(4000, 8)), rng.normal(size=(4000, 8)) + 2.0
    assert metrics.frechet_distance(*metrics.gaussian_stats(x), *metrics.gaussian_stats(y)) == pytest.approx(
        8 * 4.0, rel=0.05
    )
    few = rng.normal(size=(5, 32))  # fewer samples than dimensions: rank 4 covariance
    collapsed = np.repeat(few[:1], 10, 0)  # zero covariance
    for a, b in [(few, few[::-1] + 0.1), (few, collapsed), (collapsed, collapsed)]:
        fd = metrics.frechet_distance(*metrics.gaussian_stats(a), *metrics.gaussian_stats(b))
        assert np.isfinite(fd) and fd > -1e-6
    # collapsed vs a spread set: the covariance term alone is Tr(S) of the spread set
    mu, s = metrics.gaussian_stats(few)
    fd = metrics.frechet_distance(mu, s, few[0], np.zeros_like(s))
    assert fd == pytest.approx(np.sum((mu - few[0]) ** 2) + np.trace(s), rel=1e-4)


# ---------------------------------------------------------------- k-NN precision / recall / coverage


def test_precision_recall_on_gaussians():
    rng = np.random.default_rng(2)
    real, same = rng.normal(size=(400, 8)), rng.normal(size=(300, 8))
    m = metrics.precision_recall_density_coverage(real, same)
    assert m["precision"] > 0.8 and m["recall"] > 0.8 and m["coverage"] > 0.8 and 0.7 < m["density"] < 1.3
    collapsed = np.repeat(same[:1], 300, 0)
    m = metrics.precision_recall_density_coverage(real, collapsed)
    assert m["recall"] == 0.0 and m["coverage"] < 0.05
    narrow = 0.1 * rng.normal(size=(300, 8))  # mode-dropping: real-looking but covers a fraction
    m = metrics.precision_recall_density_coverage(real, narrow)
    assert m["precision"] > 0.9 and m["recall"] < 0.2 and m["coverage"] < 0.2
    far = same + 10.0
    m = metrics.precision_recall_density_coverage(real, far)
    assert m["precision"] == 0.0 and m["coverage"] == 0.0


def test_knn_metrics_match_brute_force_in_small_blocks(monkeypatch):
    rng = np.random.default_rng(3)
    real, fake = rng.normal(size=(300, 5)), 0.8 * rng.normal(size=(120, 5))
    r_real = np.sort(cdist(real, real), 1)[:, 3]  # k = 3, column 0 is the point itself
    r_fake = np.sort(cdist(fake, fake), 1)[:, 3]
    inside = cdist(real, fake) <= r_real[:, None]
    expected = {
        "precision": inside.any(0).mean(),
        "recall": (cdist(real, fake) <= r_fake[None]).any(1).mean(),
        "density": inside.sum(0).mean() / 3,
        "coverage": inside.any(1).mean(),
    }
    blocks = metrics._distance_blocks
    monkeypatch.setattr(metrics, "_distance_blocks", lambda a, b: blocks(a, b, max_elements=500))
    assert metrics.precision_recall_density_coverage(real, fake) == pytest.approx(expected)


# ---------------------------------------------------------------- on real shards


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("shards")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "data_prep",
            "--synthetic",
            "480",
            "--out",
            str(out),
            "--size",
            "32",
            "--val-fraction",
            "0.3",
            "--shard-size",
            "200",
            "--workers",
            "1",
        ],
        check=True,
        capture_output=True,
    )
    # A short run of the proxy task is enough to rank the cases below; the default is 400 steps.
    net, meta, path = features.get_feature_net(out, train_steps=50)
    assert path == out / features.FEATURE_NET_NAME and fnet.sidecar_path(path).is_file()
    return out


def test_read_split_subsets_are_seeded(shards):
    full = images.read_split(shards, "val")
    manifest = json.loads((shards / "manifest.json").read_text())
    assert full.shape == (manifest["splits"]["val"]["num_samples"], 32, 32, 3) and full.dtype == np.uint8
    a, b = images.read_split(shards, "train", 50), images.read_split(shards, "train", 50)
    assert a.shape[0] == 50 and np.array_equal(a, b)
    with pytest.raises(images.EvaluateError, match="no 'test' split"):
        images.read_split(shards, "test")


def test_proxy_task_batches(shards):
    batch = fnet.to_input(images.read_split(shards, "val", 32), 32)
    g = torch.Generator().manual_seed(0)
    x, rotation, degradation = fnet.make_batch(batch, 64, g)
    assert x.shape == (64, 3, 32, 32) and rotation.max() <= 3 and degradation.max() < len(fnet.DEGRADATIONS)
    assert (degradation == 0).any() and (degradation > 0).any()
    shuffled = fnet._patch_shuffle(batch[:4], batch, g)  # same pixels, different places
    assert torch.equal(shuffled.flatten(1).sort(1).values, batch[:4].flatten(1).sort(1).values)
    assert not torch.equal(shuffled, batch[:4])
    blurred = fnet._blur(batch[:4], batch, g)
    assert blurred.shape == batch[:4].shape and blurred.diff(dim=-1).abs().mean() < batch[:4].diff(dim=-1).abs().mean()


def test_feature_net_is_reused_until_the_shards_change(shards, tmp_path, capsys):
    local = tmp_path / "shards"
    local.mkdir()
    for p in shards.iterdir():
        if p.suffix in (".tar", ".json") and p.name != "feature_net.json":
            (local / p.name).write_bytes(p.read_bytes())
    _, meta, path = features.get_feature_net(local, train_steps=2)
    first = path.stat().st_mtime_ns
    _, again, _ = features.get_feature_net(local, train_steps=2)
    assert path.stat().st_mtime_ns == first and again == meta
    manifest = json.loads((local / "manifest.json").read_text())
    manifest["note"] = "rebuilt"
    (local / "manifest.json").write_text(json.dumps(manifest))
    _, changed, _ = features.get_feature_net(local, train_steps=2)
    assert changed["manifest_sha256"] != meta["manifest_sha256"] and "retraining" in capsys.readouterr().err


def _blur(images, radius):
    return np.stack([np.asarray(Image.fromarray(im).filter(ImageFilter.GaussianBlur(radius))) for im in images])


def test_classifier_fid_ranks_real_above_broken_samples(shards):
    featurizer = features.Featurizer("classifier", shards)
    val = images.read_split(shards, "val")
    rng = np.random.default_rng(0)
    cases = {
        "real (val vs train)": evaluate.reference_floor(shards, featurizer=featurizer),
        "uniform noise": evaluate.evaluate(
            rng.integers(0, 256, val.shape, dtype=np.uint8), shards, featurizer=featurizer
        ),
        "blurred (r=1)": evaluate.evaluate(_blur(val, 1.0), shards, featurizer=featurizer),
        "collapsed (1 image)": evaluate.evaluate(np.repeat(val[:1], len(val), 0), shards, featurizer=featurizer),
    }
    print()
    for name, r in cases.items():
        values = "  ".join(f"{k} {v:.3f}" for k, v in r["metrics"].items())
        print(f"{name:<22} {values} (N real {r['n_real']}, N fake {r['n_fake']})")
    fd = {name: r["metrics"]["classifier-FID"] for name, r in cases.items()}
    floor = fd.pop("real (val vs train)")
    assert all(v > 3 * floor for v in fd.values()), (floor, fd)
    assert "FID" not in cases["uniform noise"]["metrics"]  # never reported under the Inception name
    real = cases["real (val vs train)"]["metrics"]
    assert real["precision"] > 0.6 and real["recall"] > 0.6
    assert cases["collapsed (1 image)"]["metrics"]["recall"] == 0.0
    assert cases["uniform noise"]["metrics"]["precision"] == 0.0


def test_cli_writes_table_and_json_and_reuses_the_net(shards, tmp_path, capsys):
    net_path = shards / features.FEATURE_NET_NAME
    before = net_path.stat().st_mtime_ns
    samples = tmp_path / "samples.npz"
    np.savez(samples, images=images.read_split(shards, "val", 40))
    out = tmp_path / "metrics.json"
    assert (
        evaluate.main(["--samples", str(samples), "--shards", str(shards), "--max-real", "200", "--out", str(out)]) == 0
    )
    table = capsys.readouterr().out
    assert "classifier-FID" in table and "recall (k=3)" in table
    result = json.loads(out.read_text())
    assert result["features"] == "classifier" and result["n_real"] == 200 and result["n_fake"] == 40
    assert set(result["metrics"]) == {"classifier-FID", "precision", "recall", "density", "coverage"}
    assert result["feature_net"]["path"] == str(net_path) and net_path.stat().st_mtime_ns == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left behind


def test_cli_compares_named_sample_sets_with_the_floor(shards, tmp_path, capsys):
    real, noise = tmp_path / "real.npz", tmp_path / "noise.npz"
    val = images.read_split(shards, "val", 40)
    np.savez(real, images=val)
    np.savez(noise, images=np.random.default_rng(0).integers(0, 256, val.shape, dtype=np.uint8))
    out = tmp_path / "scores.json"
    argv = [
        "--shards",
        str(shards),
        "--samples",
        f"real={real}",
        "--samples",
        f"noise={noise}",
        "--floor",
        "--max-real",
        "200",
        "--out",
        str(out),
    ]
    assert evaluate.main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines[1:4]] == ["real", "noise", "val"]
    runs = json.loads(out.read_text())["runs"]
    assert set(runs) == {"real", "noise", "val split (floor)"}
    assert runs["real"]["metrics"]["classifier-FID"] < runs["noise"]["metrics"]["classifier-FID"]
    assert runs["val split (floor)"]["n_fake"] == 40
    assert evaluate.main(argv[:2] + ["--samples", f"a={real}", "--samples", f"a={noise}"]) == 2
    assert "the name 'a' is given twice" in capsys.readouterr().err


def test_bad_samples_file_is_one_clear_line(shards, tmp_path, capsys):
    bad = tmp_path / "bad.npz"
    np.savez(bad, pictures=np.zeros((4, 8, 8, 3), np.uint8))
    assert evaluate.main(["--samples", str(bad), "--shards", str(shards)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no 'images' array" in err and str(bad) in err
    np.savez(bad, images=np.zeros((4, 8, 8, 3), np.float32))
    assert evaluate.main(["--samples", str(bad), "--shards", str(shards)]) == 2
    assert "expected uint8" in capsys.readouterr().err


def test_broken_feature_net_is_one_clear_line(shards, tmp_path, capsys):
    broken = tmp_path / "net.safetensors"
    broken.write_bytes(b"not safetensors")
    fnet.sidecar_path(broken).write_text(
        json.dumps({"format_version": 1, "image_size": 32, "widths": list(fnet.WIDTHS), "feature_dim": 128})
    )
    samples = tmp_path / "s.npz"
    np.savez(samples, images=np.zeros((4, 32, 32, 3), np.uint8))
    assert evaluate.main(["--samples", str(samples), "--shards", str(shards), "--feature-net", str(broken)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "not a usable feature net" in err and str(broken) in err


# ---------------------------------------------------------------- the Inception path (no real weights here)


def test_missing_inception_weights_say_so_plainly(shards, tmp_path, capsys):
    samples = tmp_path / "s.npz"
    np.savez(samples, images=np.zeros((4, 32, 32, 3), np.uint8))
    assert evaluate.main(["--samples", str(samples), "--shards", str(shards), "--features", "inception"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "cannot download" in err and "--inception PATH" in err
    missing = tmp_path / fid_inception.WEIGHTS_NAME
    assert evaluate.main(["--samples", str(samples), "--shards", str(shards), "--inception", str(missing)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no such file" in err and "cannot download" in err


def test_wrong_inception_file_is_refused(shards, tmp_path, capsys):
    samples = tmp_path / "s.npz"
    np.savez(samples, images=np.zeros((4, 32, 32, 3), np.uint8))
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"\x00" * 1000)
    other = tmp_path / "resnet.pth"
    torch.save({"conv1.weight": torch.zeros(8, 3, 3, 3)}, other)
    for path, message in [(garbage, "not a PyTorch state dict"), (other, "not the FID Inception")]:
        assert evaluate.main(["--samples", str(samples), "--shards", str(shards), "--inception", str(path)]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err and str(path) in err


def test_inception_shaped_weights_give_pool3_features_but_not_the_fid_name(tmp_path, capsys):
    # Randomly initialised weights with the right keys: the network runs, but they are not the
    # published file, so the metric must not be called FID.
    path = tmp_path / "random_inception.pth"
    torch.save(fid_inception.fid_inception_v3().state_dict(), path)
    featurizer = features.Featurizer("inception", inception=path)
    assert featurizer.metric == "inception-FID-unverified-weights" and not featurizer.info["sha256_matches"]
    assert "not the published" in capsys.readouterr().err
    feats = featurizer(np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8))
    assert feats.shape == (2, 2048) and np.isfinite(feats).all()
