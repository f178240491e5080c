"""Sample quality: Fréchet distance and k-NN precision/recall/density/coverage against a shard split.

    python -m pipeline.evaluation --samples runs/demo/samples/samples.npz --shards data/synthetic32

Features come from the standard FID Inception network only when its weights file is given
(--inception PATH; this machine cannot download it). Otherwise they come from a small net
trained here on the shards themselves (pipeline.evaluation.feature_net) and the distance is reported
as `classifier-FID`: same formula, different feature space, never comparable with FID.
Fréchet distance is biased upwards at small N, so compare scores computed at equal N.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import sys
import tarfile
import warnings
import zipfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from scipy import linalg

from pipeline.evaluation import feature_net as fnet
from pipeline.evaluation import fid_inception
from pipeline.fileio import NoSpaceError, atomic_write_json

IMAGE_EXTS = ("png", "jpg", "jpeg", "webp")
K_NEAREST = 3
FEATURE_NET_NAME = "feature_net.safetensors"
FEATURE_NET_TRAIN_IMAGES = 4096
FEATURE_NET_STEPS = 400


class EvaluateError(Exception):
    """A user error (file, split, flag): printed as one line by main, exit code 2."""


# ---------------------------------------------------------------- images in

def load_samples(path) -> np.ndarray:
    """samples.npz -> uint8 (N, H, W, 3) from its `images` array."""
    path = Path(path)
    try:
        loaded = np.load(path)
        if not isinstance(loaded, np.lib.npyio.NpzFile):
            raise ValueError(f"a {type(loaded).__name__}, not an .npz archive")
        with loaded as npz:
            if "images" not in npz:
                raise EvaluateError(f"{path}: no 'images' array (has: {', '.join(npz.files) or 'nothing'})")
            images = npz["images"]
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        reason = getattr(e, "strerror", None) or str(e) or f"{type(e).__name__}: empty or truncated"
        raise EvaluateError(f"{path}: cannot read as .npz ({reason})") from None
    return check_images(images, f"{path}:images")


def check_images(images: np.ndarray, what: str) -> np.ndarray:
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3) or len(images) < 2:
        raise EvaluateError(f"{what}: expected uint8 (N>=2, H, W, 1|3), got {images.dtype} {tuple(images.shape)}")
    return np.repeat(images, 3, axis=-1) if images.shape[-1] == 1 else images


def read_manifest(shards_dir) -> dict:
    from pipeline.data import DataError, read_manifest
    try:
        return read_manifest(shards_dir)
    except DataError as e:
        raise EvaluateError(str(e)) from None


def check_split(shards_dir, split: str) -> None:
    """The split's shards match the manifest (size and sha256, cached as for training)."""
    from pipeline.data import DataError, check_shards
    try:
        check_shards(shards_dir, split, verify_sha256=True)
    except DataError as e:
        raise EvaluateError(str(e)) from None


def read_split(shards_dir, split: str, max_images: int | None = None, seed: int = 0) -> np.ndarray:
    """Decode a split's images straight from its tars -> uint8 (N, H, W, 3).

    With more images than max_images, a seeded random subset (same every call) is taken,
    so the reference is not biased towards the first shards.
    """
    shards_dir = Path(shards_dir)
    splits = read_manifest(shards_dir).get("splits", {})
    if split not in splits or not splits[split].get("shards"):
        raise EvaluateError(f"{shards_dir}/manifest.json: no '{split}' split with shards "
                            f"(has: {', '.join(s for s in splits if splits[s].get('shards')) or 'none'})")
    check_split(shards_dir, split)
    shards = splits[split]["shards"]
    total = sum(s["num_samples"] for s in shards)
    keep = None
    if max_images is not None and total > max_images:
        keep = set(np.random.default_rng(seed).choice(total, max_images, replace=False).tolist())
    images, index = [], 0
    for shard in shards:
        path = shards_dir / shard["name"]
        try:
            with tarfile.open(path) as tar:
                for member in tar:
                    ext = member.name.rpartition("/")[2].partition(".")[2]  # webdataset: key.ext
                    if ext.lower() not in IMAGE_EXTS:
                        continue
                    if keep is None or index in keep:
                        images.append(_decode(tar.extractfile(member).read(), f"{path}:{member.name}"))
                    index += 1
        except (OSError, tarfile.TarError) as e:
            raise EvaluateError(f"{path}: unreadable shard ({e})") from e
    if not images:
        raise EvaluateError(f"{shards_dir}: split '{split}' holds no images")
    if len({im.shape for im in images}) > 1:
        raise EvaluateError(f"{shards_dir}: split '{split}' mixes image sizes {sorted({im.shape for im in images})}")
    return np.stack(images)


def _decode(data: bytes, what: str) -> np.ndarray:
    try:
        return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    except Exception as e:  # PIL raises many types for a bad image
        raise EvaluateError(f"{what}: cannot decode image ({e})") from e


# ---------------------------------------------------------------- the metrics

def gaussian_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(N, D) -> mean (D,), covariance (D, D) with the N-1 normalisation, as pytorch-fid."""
    return features.mean(0), np.cov(features, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)) between two Gaussians."""
    diff = mu1 - mu2
    with warnings.catch_warnings():  # a singular product is expected and handled just below
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        covmean = linalg.sqrtm(sigma1 @ sigma2)
        if not np.isfinite(covmean).all():
            # singular product (fewer samples than dimensions, or a collapsed set): nudge the diagonals
            offset = np.eye(len(sigma1)) * eps
            covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        # sqrtm of a product of PSD matrices is real in exact arithmetic; small imaginary parts are round-off
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"frechet_distance: imaginary component {np.max(np.abs(covmean.imag)):.3g} in sqrtm")
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def _distance_blocks(a: np.ndarray, b: np.ndarray, max_elements: int = 1 << 24):
    """Yield (row slice, Euclidean distances (rows, len(b)) in float64): 128 MB at most at a time."""
    a_t, b_t = torch.from_numpy(a).double(), torch.from_numpy(b).double()
    rows = max(1, max_elements // len(b))
    for i in range(0, len(a), rows):
        yield slice(i, i + rows), torch.cdist(a_t[i:i + rows], b_t).numpy()


def knn_radii(features: np.ndarray, k: int = K_NEAREST) -> np.ndarray:
    """Distance from each point to its k-th nearest neighbour within the same set (self excluded)."""
    # index k, not k-1: index 0 of each sorted row is the point itself
    return np.concatenate([np.partition(d, k, axis=1)[:, k] for _, d in _distance_blocks(features, features)])


def precision_recall_density_coverage(real: np.ndarray, fake: np.ndarray, k: int = K_NEAREST) -> dict:
    """Improved precision/recall (Kynkäänniemi et al. 2019) and density/coverage (Naeem et al. 2020).

    Each point owns a ball out to its k-th neighbour in its own set. Precision: fakes inside
    some real ball. Recall: reals inside some fake ball (a collapsed set has tiny balls -> ~0).
    Density: real balls per fake, / k. Coverage: real balls that hold at least one fake.
    """
    real_radii, fake_radii = knn_radii(real, k), knn_radii(fake, k)
    fake_in_real, real_balls_per_fake = np.zeros(len(fake), bool), np.zeros(len(fake))
    covered, recalled = np.zeros(len(real), bool), np.zeros(len(real), bool)
    for rows, d in _distance_blocks(real, fake):  # d: (rows of real, N_fake)
        inside_real = d <= real_radii[rows, None]
        fake_in_real |= inside_real.any(0)
        real_balls_per_fake += inside_real.sum(0)
        covered[rows] = inside_real.any(1)
        recalled[rows] = (d <= fake_radii[None, :]).any(1)
    return {"precision": float(fake_in_real.mean()), "recall": float(recalled.mean()),
            "density": float(real_balls_per_fake.mean() / k), "coverage": float(covered.mean())}


# ---------------------------------------------------------------- features

def get_feature_net(shards_dir, path=None, train_steps: int = FEATURE_NET_STEPS, seed: int = 0):
    """(net, sidecar, path) of the classifier feature net; trained on the train split and saved if absent.

    The default file (beside the shards) is a cache of the shards it was trained on: it is
    retrained when the manifest changes. A net given by path is used as it is.
    """
    shards_dir = Path(shards_dir)
    manifest = read_manifest(shards_dir)
    digest = hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()
    target = Path(path) if path is not None else shards_dir / FEATURE_NET_NAME
    if fnet.sidecar_path(target).is_file():
        try:
            net, meta = fnet.load_feature_net(target)
        except fnet.FeatureNetError as e:
            raise EvaluateError(str(e)) from e
        if meta.get("manifest_sha256") == digest:
            return net, meta, target
        if path is not None:
            print(f"evaluate: note: {target} was trained on other shards than {shards_dir}", file=sys.stderr)
            return net, meta, target
        print(f"evaluate: {target} was trained on an older manifest; retraining", file=sys.stderr)
    image_size = 64 if int(manifest.get("resolution", 32)) >= 64 else 32
    images = read_split(shards_dir, "train", FEATURE_NET_TRAIN_IMAGES, seed=seed + 1)
    print(f"evaluate: training the classifier feature net on {len(images)} train images "
          f"({image_size} px, {train_steps} steps) -> {target}", file=sys.stderr)
    net, summary = fnet.train_feature_net(images, image_size=image_size, steps=train_steps, seed=seed)
    try:
        fnet.save_feature_net(net, target, {**summary, "shards": str(shards_dir), "manifest_sha256": digest})
    except OSError as e:
        raise EvaluateError(f"{target}: cannot save the feature net ({e}); pass --feature-net PATH "
                            "somewhere writable") from e
    return (*fnet.load_feature_net(target), target)


class Featurizer:
    """One feature space: the Fréchet metric's name, images -> (N, D) features, and cached real features."""

    def __init__(self, kind: str = "classifier", shards_dir=None, feature_net=None, inception=None,
                 train_steps: int = FEATURE_NET_STEPS):
        if kind not in ("classifier", "inception"):
            raise EvaluateError(f"--features {kind}: must be 'classifier' or 'inception'")
        if kind == "inception":
            if inception is None:
                raise EvaluateError(f"--features inception needs --inception PATH: {fid_inception.NOT_DOWNLOADABLE}")
            try:
                self.net, self.info = fid_inception.load_fid_inception(inception)
            except fid_inception.InceptionWeightsError as e:
                raise EvaluateError(str(e)) from e
            # Only the published weights give FID; any other inception-shaped file gets its own name.
            self.metric = "FID" if self.info["sha256_matches"] else "inception-FID-unverified-weights"
            if not self.info["sha256_matches"]:
                print(f"evaluate: warning: {inception} sha256 {self.info['sha256'][:16]}... is not the published "
                      f"{fid_inception.WEIGHTS_NAME}; reporting '{self.metric}', not FID", file=sys.stderr)
        else:
            self.net, meta, path = get_feature_net(shards_dir, feature_net, train_steps)
            self.info = {"path": str(path), **{k: meta.get(k) for k in (
                "image_size", "feature_dim", "steps", "rotation_accuracy", "degradation_accuracy")}}
            self.metric = "classifier-FID"
        self.kind = kind
        self._real = {}

    def __call__(self, images: np.ndarray) -> np.ndarray:
        if self.kind == "inception":
            device = "cuda" if torch.cuda.is_available() else "cpu"
            return fid_inception.inception_features(self.net, images, device=device)
        return fnet.embed(self.net, images)

    def real(self, shards_dir, split: str, max_real: int | None) -> tuple[np.ndarray, tuple]:
        """(features (N, D), image (H, W)) of a split, computed once per featurizer."""
        key = (str(Path(shards_dir).resolve()), split, max_real)
        if key not in self._real:
            images = read_split(shards_dir, split, max_real)
            self._real[key] = self(images), images.shape[1:3]
        return self._real[key]


# ---------------------------------------------------------------- the API the demo calls

def scores(real: np.ndarray, fake: np.ndarray, fd_name: str, k: int = K_NEAREST) -> dict:
    """Features (N, D), (M, D) -> {fd_name: Fréchet distance, precision, recall, density, coverage}."""
    fd = frechet_distance(*gaussian_stats(real), *gaussian_stats(fake))
    knn = precision_recall_density_coverage(real, fake, k)
    return {fd_name: round(fd, 4), **{m: round(v, 4) for m, v in knn.items()}}


def evaluate(samples: np.ndarray, shards_dir, split: str = "train", max_real: int | None = 10000,
             feature_net=None, features: str = "classifier", inception=None, featurizer=None) -> dict:
    """Score generated uint8 (N, H, W, 3|1) samples against a shard split.

    Pass one `featurizer` to several calls to load the network and embed the real images once.
    """
    samples = check_images(samples, "samples")
    featurizer = featurizer or Featurizer(features, shards_dir, feature_net, inception)
    real, real_hw = featurizer.real(shards_dir, split, max_real)
    if real_hw != samples.shape[1:3]:
        print(f"evaluate: note: samples are {samples.shape[1]}x{samples.shape[2]} px, the '{split}' split "
              f"{real_hw[0]}x{real_hw[1]}; both are resized for the feature network", file=sys.stderr)
    fake = featurizer(samples)
    return {"metrics": scores(real, fake, featurizer.metric), "k": K_NEAREST, "n_real": len(real),
            "n_fake": len(fake), "features": featurizer.kind,
            ("feature_net" if featurizer.kind == "classifier" else "inception"): featurizer.info,
            "split": split, "shards": str(shards_dir),
            "real_size": list(real_hw), "fake_size": list(samples.shape[1:3])}


def reference_floor(shards_dir, n: int | None = None, max_real: int | None = 10000, feature_net=None,
                    features: str = "classifier", inception=None, featurizer=None) -> dict:
    """The val split (or n images of it) scored as if it were samples, against train: the best a model can do.

    Pass n = the number of generated samples, since the Fréchet distance depends on N.
    """
    val = read_split(shards_dir, "val", n, seed=1)
    if n is not None and len(val) < n:
        print(f"evaluate: note: val has only {len(val)} images, fewer than the {n} asked for", file=sys.stderr)
    result = evaluate(val, shards_dir, "train", max_real, feature_net, features, inception, featurizer)
    return {**result, "samples": "val split"}


# ---------------------------------------------------------------- CLI

def format_table(result: dict) -> str:
    fd_name = next(iter(result["metrics"]))
    lines = [f"{'metric':<24}{'value':>10}"]
    for name, value in result["metrics"].items():
        label = name if name == fd_name else f"{name} (k={result['k']})"
        lines.append(f"{label:<24}{value:>10.4f}")
    net = result.get("feature_net") or result.get("inception")
    lines.append(f"N real {result['n_real']} ({result['split']} split), N fake {result['n_fake']}, "
                 f"features: {result['features']} ({net['path']})")
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m pipeline.evaluation", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", required=True, action="append", metavar="[NAME=]PATH",
                   help="npz with `images` uint8 (N, H, W, C); repeat with NAME=PATH to compare several")
    p.add_argument("--shards", required=True, help="shard directory with manifest.json (from data_prep)")
    p.add_argument("--split", default="train", choices=("train", "val"), help="real images to compare with")
    p.add_argument("--features", choices=("classifier", "inception"),
                   help="default: inception if --inception is given, else classifier")
    p.add_argument("--inception", help=f"path to {fid_inception.WEIGHTS_NAME} (pytorch-fid's FID weights; "
                                       "never downloaded here)")
    p.add_argument("--feature-net", help=f"classifier feature net (default: SHARDS/{FEATURE_NET_NAME}; "
                                         "trained and saved there if absent)")
    p.add_argument("--feature-net-steps", type=int, default=FEATURE_NET_STEPS,
                   help="training steps, used only when the feature net is trained")
    p.add_argument("--max-real", type=int, default=10000, help="at most this many real images (seeded subset)")
    p.add_argument("--floor", action="store_true",
                   help="also score the val split against train, at the samples' N: the best a model can do")
    p.add_argument("--out", help="write the result as JSON here (atomically)")
    return p.parse_args(argv)


def named_samples(specs: list[str]) -> dict[str, str]:
    """['a.npz', 'ema=b.npz'] -> {'a': 'a.npz', 'ema': 'b.npz'}."""
    named = {}
    for spec in specs:
        name, _, path = spec.partition("=") if "=" in spec else (Path(spec).stem, "", spec)
        if name in named:
            raise EvaluateError(f"--samples {spec}: the name {name!r} is given twice")
        named[name] = path
    return named


def format_comparison(results: dict[str, dict]) -> str:
    """One row per sample set: the Fréchet distance and the k-NN metrics side by side."""
    first = next(iter(results.values()))
    columns = list(first["metrics"])
    width = max(12, *(len(n) for n in results)) + 2
    lines = [f"{'samples':<{width}}{'N':>6}" + "".join(f"{c:>16}" for c in columns)]
    for name, result in results.items():
        lines.append(f"{name:<{width}}{result['n_fake']:>6}"
                     + "".join(f"{result['metrics'][c]:>16.4f}" for c in columns))
    net = first.get("feature_net") or first.get("inception")
    lines.append(f"against {first['n_real']} real images ({first['split']} split); features: "
                 f"{first['features']} ({net['path']}); precision/recall/density/coverage at k={first['k']}")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        features = args.features or ("inception" if args.inception else "classifier")
        if features == "classifier" and args.inception:
            raise EvaluateError("--features classifier with --inception: pick one feature space")
        if args.max_real < 2:
            raise EvaluateError(f"--max-real {args.max_real}: need at least 2 real images")
        if args.feature_net_steps < 1:
            raise EvaluateError(f"--feature-net-steps {args.feature_net_steps}: need at least 1")
        paths = named_samples(args.samples)
        named = {name: load_samples(path) for name, path in paths.items()}
        featurizer = Featurizer(features, args.shards, args.feature_net, args.inception, args.feature_net_steps)
        results = {name: {**evaluate(samples, args.shards, args.split, args.max_real, featurizer=featurizer),
                          "samples": str(paths[name])} for name, samples in named.items()}
        if args.floor:
            n = max(len(samples) for samples in named.values())
            results["val split (floor)"] = reference_floor(args.shards, n, args.max_real, featurizer=featurizer)
    except EvaluateError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if len(results) == 1:
        result = next(iter(results.values()))
        print(format_table(result))
    else:
        result = {"runs": results}
        print(format_comparison(results))
    if args.out:
        try:
            atomic_write_json(args.out, result)
        except NoSpaceError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
