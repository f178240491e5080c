"""The old name of `pipeline.evaluation`: `python -m pipeline.evaluate ...` and `from pipeline.evaluate
import evaluate, Featurizer, ...` keep working. New code imports from pipeline.evaluation's modules."""

import sys

from pipeline.evaluation.evaluate import evaluate, format_comparison, format_table, main, reference_floor, scores
from pipeline.evaluation.features import FEATURE_NET_NAME, FEATURE_NET_STEPS, Featurizer, get_feature_net
from pipeline.evaluation.images import EvaluateError, check_images, check_split, load_samples, read_manifest, read_split
from pipeline.evaluation.metrics import (
    K_NEAREST,
    frechet_distance,
    gaussian_stats,
    knn_radii,
    precision_recall_density_coverage,
)

__all__ = [
    "EvaluateError",
    "FEATURE_NET_NAME",
    "FEATURE_NET_STEPS",
    "Featurizer",
    "K_NEAREST",
    "check_images",
    "check_split",
    "evaluate",
    "format_comparison",
    "format_table",
    "frechet_distance",
    "gaussian_stats",
    "get_feature_net",
    "knn_radii",
    "load_samples",
    "main",
    "precision_recall_density_coverage",
    "read_manifest",
    "read_split",
    "reference_floor",
    "scores",
]

if __name__ == "__main__":
    sys.exit(main())
