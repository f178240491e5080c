"""The metrics on features: Fréchet distance, and k-NN precision / recall / density / coverage."""

from __future__ import annotations

import warnings

import numpy as np
import torch
from scipy import linalg

K_NEAREST = 3


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
        yield slice(i, i + rows), torch.cdist(a_t[i : i + rows], b_t).numpy()


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
    return {
        "precision": float(fake_in_real.mean()),
        "recall": float(recalled.mean()),
        "density": float(real_balls_per_fake.mean() / k),
        "coverage": float(covered.mean()),
    }
