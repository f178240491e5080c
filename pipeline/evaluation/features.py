"""Feature spaces: the FID Inception network when its weights are given, else a classifier trained on the shards."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import torch

from pipeline.evaluation import feature_net as fnet
from pipeline.evaluation import fid_inception
from pipeline.evaluation.images import EvaluateError, read_manifest, read_split

FEATURE_NET_NAME = "feature_net.safetensors"
FEATURE_NET_TRAIN_IMAGES = 4096
FEATURE_NET_STEPS = 400


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
    print(
        f"evaluate: training the classifier feature net on {len(images)} train images "
        f"({image_size} px, {train_steps} steps) -> {target}",
        file=sys.stderr,
    )
    net, summary = fnet.train_feature_net(images, image_size=image_size, steps=train_steps, seed=seed)
    try:
        fnet.save_feature_net(net, target, {**summary, "shards": str(shards_dir), "manifest_sha256": digest})
    except OSError as e:
        raise EvaluateError(
            f"{target}: cannot save the feature net ({e}); pass --feature-net PATH somewhere writable"
        ) from e
    return (*fnet.load_feature_net(target), target)


class Featurizer:
    """One feature space: the Fréchet metric's name, images -> (N, D) features, and cached real features."""

    def __init__(
        self,
        kind: str = "classifier",
        shards_dir=None,
        feature_net=None,
        inception=None,
        train_steps: int = FEATURE_NET_STEPS,
    ):
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
                print(
                    f"evaluate: warning: {inception} sha256 {self.info['sha256'][:16]}... is not the published "
                    f"{fid_inception.WEIGHTS_NAME}; reporting '{self.metric}', not FID",
                    file=sys.stderr,
                )
        else:
            self.net, meta, path = get_feature_net(shards_dir, feature_net, train_steps)
            self.info = {
                "path": str(path),
                **{
                    k: meta.get(k)
                    for k in ("image_size", "feature_dim", "steps", "rotation_accuracy", "degradation_accuracy")
                },
            }
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
