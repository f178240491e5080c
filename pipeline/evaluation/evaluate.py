"""Sample quality: Fréchet distance and k-NN precision/recall/density/coverage against a shard split.

    python -m pipeline.evaluation --samples runs/demo/samples/samples.npz --shards data/synthetic32

Features come from the standard FID Inception network only when its weights file is given
(--inception PATH; this machine cannot download it). Otherwise they come from a small net
trained here on the shards themselves (pipeline.evaluation.feature_net) and the distance is reported
as `classifier-FID`: same formula, different feature space, never comparable with FID.
Fréchet distance is biased upwards at small N, so compare scores computed at equal N.
The parts: images.py (samples and shard splits in), features.py, metrics.py; this module the
API the demo and benchmarks call, and the CLI.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from pipeline.core.fileio import NoSpaceError, atomic_write_json
from pipeline.evaluation import fid_inception
from pipeline.evaluation.features import FEATURE_NET_NAME, FEATURE_NET_STEPS, Featurizer
from pipeline.evaluation.images import EvaluateError, check_images, load_samples, read_split
from pipeline.evaluation.metrics import K_NEAREST, frechet_distance, gaussian_stats, precision_recall_density_coverage

# ---------------------------------------------------------------- the API the demo calls


def scores(real: np.ndarray, fake: np.ndarray, fd_name: str, k: int = K_NEAREST) -> dict:
    """Features (N, D), (M, D) -> {fd_name: Fréchet distance, precision, recall, density, coverage}."""
    fd = frechet_distance(*gaussian_stats(real), *gaussian_stats(fake))
    knn = precision_recall_density_coverage(real, fake, k)
    return {fd_name: round(fd, 4), **{m: round(v, 4) for m, v in knn.items()}}


def evaluate(
    samples: np.ndarray,
    shards_dir,
    split: str = "train",
    max_real: int | None = 10000,
    feature_net=None,
    features: str = "classifier",
    inception=None,
    featurizer=None,
) -> dict:
    """Score generated uint8 (N, H, W, 3|1) samples against a shard split.

    Pass one `featurizer` to several calls to load the network and embed the real images once.
    """
    samples = check_images(samples, "samples")
    featurizer = featurizer or Featurizer(features, shards_dir, feature_net, inception)
    real, real_hw = featurizer.real(shards_dir, split, max_real)
    if real_hw != samples.shape[1:3]:
        print(
            f"evaluate: note: samples are {samples.shape[1]}x{samples.shape[2]} px, the '{split}' split "
            f"{real_hw[0]}x{real_hw[1]}; both are resized for the feature network",
            file=sys.stderr,
        )
    fake = featurizer(samples)
    return {
        "metrics": scores(real, fake, featurizer.metric),
        "k": K_NEAREST,
        "n_real": len(real),
        "n_fake": len(fake),
        "features": featurizer.kind,
        ("feature_net" if featurizer.kind == "classifier" else "inception"): featurizer.info,
        "split": split,
        "shards": str(shards_dir),
        "real_size": list(real_hw),
        "fake_size": list(samples.shape[1:3]),
    }


def reference_floor(shards_dir, n: int | None = None, max_real: int | None = 10000, **options) -> dict:
    """The val split (or n images of it) scored as if it were samples, against train: the best a model can do.

    Pass n = the number of generated samples, since the Fréchet distance depends on N; `options` are
    evaluate()'s (feature_net, features, inception, featurizer).
    """
    val = read_split(shards_dir, "val", n, seed=1)
    if n is not None and len(val) < n:
        print(f"evaluate: note: val has only {len(val)} images, fewer than the {n} asked for", file=sys.stderr)
    result = evaluate(val, shards_dir, "train", max_real, **options)
    return {**result, "samples": "val split"}


def format_table(result: dict) -> str:
    fd_name = next(iter(result["metrics"]))
    lines = [f"{'metric':<24}{'value':>10}"]
    for name, value in result["metrics"].items():
        label = name if name == fd_name else f"{name} (k={result['k']})"
        lines.append(f"{label:<24}{value:>10.4f}")
    net = result.get("feature_net") or result.get("inception")
    lines.append(
        f"N real {result['n_real']} ({result['split']} split), N fake {result['n_fake']}, "
        f"features: {result['features']} ({net['path']})"
    )
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m pipeline.evaluation", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--samples",
        required=True,
        action="append",
        metavar="[NAME=]PATH",
        help="npz with `images` uint8 (N, H, W, C); repeat with NAME=PATH to compare several",
    )
    p.add_argument("--shards", required=True, help="shard directory with manifest.json (from data_prep)")
    p.add_argument("--split", default="train", choices=("train", "val"), help="real images to compare with")
    p.add_argument(
        "--features",
        choices=("classifier", "inception"),
        help="default: inception if --inception is given, else classifier",
    )
    p.add_argument(
        "--inception", help=f"path to {fid_inception.WEIGHTS_NAME} (pytorch-fid's FID weights; never downloaded here)"
    )
    p.add_argument(
        "--feature-net",
        help=f"classifier feature net (default: SHARDS/{FEATURE_NET_NAME}; trained and saved there if absent)",
    )
    p.add_argument(
        "--feature-net-steps",
        type=int,
        default=FEATURE_NET_STEPS,
        help="training steps, used only when the feature net is trained",
    )
    p.add_argument("--max-real", type=int, default=10000, help="at most this many real images (seeded subset)")
    p.add_argument(
        "--floor",
        action="store_true",
        help="also score the val split against train, at the samples' N: the best a model can do",
    )
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
        lines.append(
            f"{name:<{width}}{result['n_fake']:>6}" + "".join(f"{result['metrics'][c]:>16.4f}" for c in columns)
        )
    net = first.get("feature_net") or first.get("inception")
    lines.append(
        f"against {first['n_real']} real images ({first['split']} split); features: "
        f"{first['features']} ({net['path']}); precision/recall/density/coverage at k={first['k']}"
    )
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
        results = {
            name: {
                **evaluate(samples, args.shards, args.split, args.max_real, featurizer=featurizer),
                "samples": str(paths[name]),
            }
            for name, samples in named.items()
        }
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
