"""A small conv net that the project trains on its own data, to embed images for classifier-FID.

The standard FID Inception weights cannot be downloaded here, so without them we learn a
feature space from the unlabeled training images with two self-supervised tasks at once:
  - which way is up (0/90/180/270 degrees): needs the face's layout, so collapsed or
    shapeless samples land far from real ones;
  - which degradation, if any, was applied (blur, noise, shuffled patches, colour mixing,
    two faces blended): the typical failures of an undertrained generator.
The 128-d layer before the two linear heads is the feature vector. Scores in this space are
comparable only with scores from the same saved net; they are not FID.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save
from tqdm import tqdm

from pipeline.core.fileio import atomic_write_bytes, atomic_write_json

FORMAT_VERSION = 1
FEATURE_DIM = 128
WIDTHS = (16, 32, 64, 128, 128)
DEGRADATIONS = ("clean", "blur", "noise", "patch_shuffle", "colour_mix", "blend")


class FeatureNetError(Exception):
    """A saved feature net that cannot be used: printed as one line."""


class FeatureNet(torch.nn.Module):
    """One 3x3 conv per scale down to 4x4, flatten, linear to the features; two linear heads on top.

    Tiny on purpose (~0.3 M parameters): it trains in a minute or two on a laptop CPU.
    """

    def __init__(self, image_size: int = 32, widths=WIDTHS, feature_dim: int = FEATURE_DIM):
        super().__init__()
        n_down = int(math.log2(image_size // 4))
        if image_size != 4 * 2**n_down or n_down > len(widths) - 1:
            raise FeatureNetError(f"feature net image_size {image_size} must be 32 or 64")
        layers, c_in = [], 3
        for i in range(n_down + 1):  # the first stage keeps the resolution, the rest halve it
            c_out = widths[i]
            layers += [
                torch.nn.Conv2d(c_in, c_out, 3, stride=1 if i == 0 else 2, padding=1),
                torch.nn.GroupNorm(8, c_out),
                torch.nn.SiLU(),
            ]
            c_in = c_out
        self.trunk = torch.nn.Sequential(*layers)
        self.to_features = torch.nn.Linear(c_in * 16, feature_dim)
        self.rotation_head = torch.nn.Linear(feature_dim, 4)
        self.degradation_head = torch.nn.Linear(feature_dim, len(DEGRADATIONS))
        self.image_size, self.widths, self.feature_dim = image_size, tuple(widths), feature_dim

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, 3, S, S) in [-1, 1] -> (B, feature_dim)."""
        return self.to_features(self.trunk(x).flatten(1))

    def forward(self, x):
        f = self.features(x)
        return self.rotation_head(f), self.degradation_head(f)


def to_input(images: np.ndarray, image_size: int) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float (N, 3, S, S) in [-1, 1], area-resized (antialiased) to S."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1
    if x.shape[-1] != image_size or x.shape[-2] != image_size:
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", antialias=True, align_corners=False)
    return x


# ---------------------------------------------------------------- the proxy task's degradations
# Each takes a batch x (B, 3, S, S) in [-1, 1], the whole training batch `pool`, and a generator.


def _blur(x, pool, g):
    sigma = float(torch.empty(1).uniform_(0.6, 2.0, generator=g))
    radius = min(int(math.ceil(2.5 * sigma)), x.shape[-1] // 2 - 1)
    t = torch.arange(-radius, radius + 1, dtype=x.dtype)
    k = torch.exp(-(t**2) / (2 * sigma**2))
    k = (k / k.sum()).repeat(3, 1)
    x = F.pad(x, (radius, radius, radius, radius), mode="reflect")
    x = F.conv2d(x, k[:, None, None, :], groups=3)  # separable: rows, then columns
    return F.conv2d(x, k[:, None, :, None], groups=3)


def _noise(x, pool, g):
    sigma = torch.empty(len(x), 1, 1, 1).uniform_(0.08, 0.6, generator=g)
    return (x + sigma * torch.randn(x.shape, generator=g)).clamp(-1, 1)


def _patch_shuffle(x, pool, g):
    b, c, s, _ = x.shape
    p = s // 4  # a 4x4 grid of patches: local texture survives, the face's layout does not
    patches = F.unfold(x, p, stride=p)  # (B, C*p*p, 16)
    order = torch.rand(b, 16, generator=g).argsort(1)
    patches = patches.gather(2, order[:, None, :].expand_as(patches))
    return F.fold(patches, (s, s), p, stride=p)


def _colour_mix(x, pool, g):
    m = torch.eye(3) + 0.45 * torch.randn(len(x), 3, 3, generator=g)
    return torch.einsum("bij,bjhw->bihw", m, x).clamp(-1, 1)


def _blend(x, pool, g):
    other = pool[torch.randint(len(pool), (len(x),), generator=g)]
    alpha = torch.empty(len(x), 1, 1, 1).uniform_(0.3, 0.7, generator=g)
    return alpha * x + (1 - alpha) * other


_DEGRADE = (None, _blur, _noise, _patch_shuffle, _colour_mix, _blend)


def make_batch(images: torch.Tensor, batch_size: int, g: torch.Generator):
    """Random real images, flipped, rotated and (half of them) degraded, with both labels."""
    x = images[torch.randint(len(images), (batch_size,), generator=g)]
    flip = torch.rand(batch_size, generator=g) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    n_deg = len(DEGRADATIONS) - 1
    degradation = torch.where(
        torch.rand(batch_size, generator=g) < 0.5, 0, torch.randint(1, n_deg + 1, (batch_size,), generator=g)
    )
    out = x.clone()
    for d in range(1, n_deg + 1):
        idx = (degradation == d).nonzero().squeeze(1)
        if len(idx):
            out[idx] = _DEGRADE[d](x[idx], x, g)
    rotation = torch.randint(4, (batch_size,), generator=g)
    for r in range(1, 4):
        idx = (rotation == r).nonzero().squeeze(1)
        out[idx] = out[idx].rot90(r, dims=(-2, -1))
    return out, rotation, degradation


# ---------------------------------------------------------------- training, saving, loading


def train_feature_net(
    images: np.ndarray,
    image_size: int = 32,
    steps: int = 400,
    batch_size: int = 64,
    lr: float = 2e-3,
    seed: int = 0,
    log_every: float = 10.0,
) -> tuple[FeatureNet, dict]:
    """images: uint8 (N, H, W, 3) real training images -> (trained net, summary with accuracies)."""
    threads = torch.get_num_threads()
    # The net is so small that intra-op threads cost more than they give (5x the CPU time on a busy 2-core box).
    torch.set_num_threads(1)
    try:
        return _train(images, image_size, steps, batch_size, lr, seed, log_every)
    finally:
        torch.set_num_threads(threads)


def _train(images, image_size, steps, batch_size, lr, seed, log_every):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    data = to_input(images, image_size)
    net = FeatureNet(image_size)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.15)
    bar = _progress(steps)
    acc_rot = acc_deg = 0.0
    start = last = time.monotonic()
    for step in range(steps):
        x, rot, deg = make_batch(data, batch_size, g)
        logits_rot, logits_deg = net(x)
        loss = F.cross_entropy(logits_rot, rot) + F.cross_entropy(logits_deg, deg)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        # running accuracies: the record of how well the proxy task was learned
        acc_rot = 0.95 * acc_rot + 0.05 * (logits_rot.argmax(1) == rot).float().mean().item()
        acc_deg = 0.95 * acc_deg + 0.05 * (logits_deg.argmax(1) == deg).float().mean().item()
        if bar is not None:
            bar.update(1)
        elif time.monotonic() - last >= log_every:
            last = time.monotonic()
            print(
                f"feature net: step {step + 1}/{steps} loss {loss.item():.3f} rotation acc {acc_rot:.2f} "
                f"degradation acc {acc_deg:.2f}",
                file=sys.stderr,
                flush=True,
            )
    if bar is not None:
        bar.close()
    net.eval()
    summary = {
        "steps": steps,
        "batch_size": batch_size,
        "lr": lr,
        "seed": seed,
        "train_images": len(images),
        "final_loss": round(loss.item(), 4),
        "rotation_accuracy": round(acc_rot, 3),
        "degradation_accuracy": round(acc_deg, 3),
        "seconds": round(time.monotonic() - start, 1),
    }
    return net, summary


def _progress(total: int):
    if not sys.stderr.isatty():
        return None
    return tqdm(total=total, desc="feature net", unit="step", dynamic_ncols=True)


def sidecar_path(weights: Path) -> Path:
    return weights.with_suffix(".json")


def save_feature_net(net: FeatureNet, path: Path, info: dict) -> None:
    """Weights then sidecar, each atomically: the sidecar's presence means the pair is whole."""
    path = Path(path)
    state = {k: v.detach().contiguous() for k, v in net.state_dict().items()}
    atomic_write_bytes(path, save(state))
    meta = {
        "format_version": FORMAT_VERSION,
        "image_size": net.image_size,
        "widths": list(net.widths),
        "feature_dim": net.feature_dim,
        "tasks": ["rotation", "degradation"],
        "degradations": list(DEGRADATIONS),
        **info,
    }
    atomic_write_json(sidecar_path(path), meta)


def load_feature_net(path: Path) -> tuple[FeatureNet, dict]:
    """The net saved at `path` and its sidecar; FeatureNetError names what is wrong."""
    path, meta_path = Path(path), sidecar_path(Path(path))
    if not path.is_file() or not meta_path.is_file():
        raise FeatureNetError(f"{path}: feature net weights or its sidecar {meta_path.name} is missing")
    try:
        meta = json.loads(meta_path.read_text())
        net = FeatureNet(meta["image_size"], meta["widths"], meta["feature_dim"])
        net.load_state_dict(load_file(str(path)))
    except Exception as e:  # json, safetensors and shape errors all mean: not a usable net
        raise FeatureNetError(
            f"{path}: not a usable feature net ({type(e).__name__}: "
            f"{str(e).splitlines()[0][:200]}); delete it to retrain"
        ) from e
    if meta.get("format_version") != FORMAT_VERSION:
        raise FeatureNetError(f"{meta_path}: format_version {meta.get('format_version')}, expected {FORMAT_VERSION}")
    return net.eval(), meta


@torch.no_grad()
def embed(net: FeatureNet, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """uint8 (N, H, W, 3) -> float64 (N, feature_dim)."""
    out = [
        net.features(to_input(images[i : i + batch_size], net.image_size)).double()
        for i in range(0, len(images), batch_size)
    ]
    return torch.cat(out).numpy()
