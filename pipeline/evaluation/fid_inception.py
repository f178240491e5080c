"""The standard FID feature extractor: TF Inception (2015-12-05) pool3, 2048-d, rebuilt in torchvision.

The weights are pytorch-fid's port, `pt_inception-2015-12-05-6726825d.pth`
(https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/...). This module
never downloads them: the path must be given. The A, C and E blocks differ from
torchvision's (TF's average pool ignores padding; the last block max-pools), as in
pytorch-fid; without those patches the numbers would not be FID.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.models import inception as tv

from pipeline.core.fileio import sha256_file

WEIGHTS_NAME = "pt_inception-2015-12-05-6726825d.pth"
# torch.hub names files <name>-<first digits of sha256>.pth; anything else gives other numbers.
WEIGHTS_SHA256_PREFIX = "6726825d"
NOT_DOWNLOADABLE = (
    f"the FID Inception weights ({WEIGHTS_NAME}, from pytorch-fid's GitHub release) are not "
    "on this machine and it cannot download them: fetch the file elsewhere and pass "
    "--inception PATH, or use --features classifier (reported as classifier-FID, not FID)"
)


class InceptionWeightsError(Exception):
    """The --inception file is missing or is not the FID Inception state dict."""


def _tf_avg_pool(x):
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class FIDInceptionA(tv.InceptionA):
    def forward(self, x):
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch1x1(x), b5, b3, self.branch_pool(_tf_avg_pool(x))], 1)


class FIDInceptionC(tv.InceptionC):
    def forward(self, x):
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        b7d = x
        for conv in (
            self.branch7x7dbl_1,
            self.branch7x7dbl_2,
            self.branch7x7dbl_3,
            self.branch7x7dbl_4,
            self.branch7x7dbl_5,
        ):
            b7d = conv(b7d)
        return torch.cat([self.branch1x1(x), b7, b7d, self.branch_pool(_tf_avg_pool(x))], 1)


class FIDInceptionE(tv.InceptionE):
    def __init__(self, in_channels, max_pool: bool):
        super().__init__(in_channels)
        self.max_pool = max_pool  # the 2015 graph's last block max-pools (a quirk FID keeps)

    def forward(self, x):
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        b3d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        b3d = torch.cat([self.branch3x3dbl_3a(b3d), self.branch3x3dbl_3b(b3d)], 1)
        pooled = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else _tf_avg_pool(x)
        return torch.cat([self.branch1x1(x), b3, b3d, self.branch_pool(pooled)], 1)


def fid_inception_v3() -> tv.Inception3:
    """torchvision's Inception3 with 1008 classes and the FID blocks; weights uninitialised."""
    net = tv.Inception3(num_classes=1008, aux_logits=False, init_weights=False)
    net.Mixed_5b = FIDInceptionA(192, pool_features=32)
    net.Mixed_5c = FIDInceptionA(256, pool_features=64)
    net.Mixed_5d = FIDInceptionA(288, pool_features=64)
    net.Mixed_6b = FIDInceptionC(768, channels_7x7=128)
    net.Mixed_6c = FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6d = FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6e = FIDInceptionC(768, channels_7x7=192)
    net.Mixed_7b = FIDInceptionE(1280, max_pool=False)
    net.Mixed_7c = FIDInceptionE(2048, max_pool=True)
    net.fc = torch.nn.Identity()  # pool3 is what FID uses; the logits are never computed
    return net


def load_fid_inception(path) -> tuple[tv.Inception3, dict]:
    """The FID network with the weights at `path` (strict), plus {path, sha256, sha256_matches}."""
    path = Path(path)
    if not path.is_file():
        raise InceptionWeightsError(f"--inception {path}: no such file; {NOT_DOWNLOADABLE}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle, zip and weights_only errors all mean "not this file"
        raise InceptionWeightsError(
            f"--inception {path}: not a PyTorch state dict ({type(e).__name__}: {str(e).splitlines()[0][:160]})"
        ) from e
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise InceptionWeightsError(f"--inception {path}: holds a {type(state).__name__}, not a state dict of tensors")
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    net = fid_inception_v3()
    expected = net.state_dict()
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    wrong = [k for k in state if k in expected and state[k].shape != expected[k].shape]
    if missing or unexpected or wrong:
        first = (missing or unexpected or wrong)[0]
        raise InceptionWeightsError(
            f"--inception {path}: not the FID Inception ({WEIGHTS_NAME}) state dict: {len(missing)} missing, "
            f"{len(unexpected)} unexpected, {len(wrong)} wrongly shaped tensors (first: {first!r})"
        )
    net.load_state_dict(state, strict=False)  # only num_batches_tracked may be absent (old checkpoints)
    digest = sha256_file(path)
    return net.eval(), {"path": str(path), "sha256": digest, "sha256_matches": digest.startswith(WEIGHTS_SHA256_PREFIX)}


@torch.no_grad()
def inception_features(net, images: np.ndarray, batch_size: int = 50, device: str = "cpu") -> np.ndarray:
    """uint8 (N, H, W, 3) -> float64 (N, 2048) pool3 features; bilinear resize to 299, as pytorch-fid."""
    net = net.to(device)
    out = []
    for i in range(0, len(images), batch_size):
        x = torch.from_numpy(np.ascontiguousarray(images[i : i + batch_size])).to(device)
        x = x.permute(0, 3, 1, 2).float() / 255
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        out.append(net(2 * x - 1).double().cpu())
    return torch.cat(out).numpy()
