"""Moving average of the weights, in fp32, correct under ZeRO-3.

    ema <- decay * ema + (1 - decay) * w        after every applied optimizer step

Two profiles set the decay of update n (counting from 0):
- exponential: a constant `decay`, with the optional warm-up min(decay, (1 + n) / (10 + n));
- power (Karras et al. 2024, EDM2): decay (1 - 1 / (n + 1)) ** (gamma + 1), which weighs the
  weights of step i by i ** gamma. Its width relative to the run's length, sigma_rel, is the
  same at every step, so one setting suits a 1,000-step demo and a 100,000-step run alike.
Both depend on the update count only, which a checkpoint stores: a resumed run continues exactly.

Under ZeRO-3 each rank holds only a shard of every parameter; the EMA is taken of the whole
parameters, gathered chunk by chunk, so no rank ever averages a partial shard. Gathering is a
collective: every rank calls `update`, only the rank built with `keep=True` (rank 0) stores
the average. The EMA follows the working weights, the ones the network runs with.

Under fp16 those are DeepSpeed's fp16 copies, not its fp32 master weights. A design choice, kept:
the masters are partitioned under ZeRO-1/2/3, and `deepspeed.utils.safe_get_full_fp32_param`
gathers each one with a collective per parameter, an fp32 all-reduce of the whole model every
step (twice the fp16 gradient traffic). The working copy is the master rounded afresh each step,
so it sits within half an fp16 step (2^-12 of the weight) of it and the error never accumulates;
under bf16 that bound is 2^-9. If a run ever shows the difference, average the masters instead.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch
from torch import nn

GATHER_CHUNK_NUMEL = 1 << 26  # elements gathered at once under ZeRO-3 (256 MB of fp32)


def _numel(p: nn.Parameter) -> int:
    return getattr(p, "ds_numel", None) or p.numel()  # ZeRO-3 empties p.data; ds_numel is the full size


def _chunks(named: list[tuple[str, nn.Parameter]], max_numel: int):
    """Consecutive groups of (name, param) with at most max_numel elements (or one param)."""
    chunk, size = [], 0
    for name, p in named:
        if chunk and size + _numel(p) > max_numel:
            yield chunk
            chunk, size = [], 0
        chunk.append((name, p))
        size += _numel(p)
    if chunk:
        yield chunk


def _gathered(params: list[nn.Parameter]):
    """Full parameters for reading inside the block (ZeRO-3); a no-op for whole ones."""
    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed  # deepspeed: after DS_ACCELERATOR is set (ZeRO-3 only)

        return deepspeed.zero.GatheredParameters(params, modifier_rank=None)
    return contextlib.nullcontext()


def full_weights(model: nn.Module, keep: bool = True, chunk_numel: int = GATHER_CHUNK_NUMEL) -> dict[str, torch.Tensor]:
    """fp32 copies of the whole parameters, keyed by name; a collective under ZeRO-3 (call on
    every rank), filled only where keep=True (elsewhere {})."""
    weights: dict[str, torch.Tensor] = {}
    for chunk in _chunks(list(model.named_parameters()), chunk_numel):
        with _gathered([p for _, p in chunk]):
            if keep:
                for name, p in chunk:
                    weights[name] = p.detach().to(torch.float32, copy=True)
    return weights


def power_exponent(sigma_rel: float) -> float:
    """gamma of the power-function EMA whose relative standard deviation is sigma_rel (EDM2 eq. 3:
    sigma_rel^2 = (gamma + 1) / ((gamma + 2)^2 (gamma + 3)), the largest real root)."""
    s = sigma_rel**-2
    return float(max(r.real for r in np.roots([1.0, 7.0, 16.0 - s, 12.0 - s]) if abs(r.imag) < 1e-9))


def power_sigma_rel(gamma: float) -> float:
    """The inverse of power_exponent."""
    return float(np.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3))))


PROFILES = ("exponential", "power")


class EMA:
    """fp32 shadow weights keyed like `model.state_dict()`; held only where keep=True."""

    def __init__(
        self,
        model: nn.Module,
        decay: float,
        warmup: bool = False,
        keep: bool = True,
        chunk_numel: int = GATHER_CHUNK_NUMEL,
        profile: str = "exponential",
        sigma_rel: float = 0.05,
    ):
        if profile not in PROFILES:
            raise ValueError(f"unknown EMA profile {profile!r}; expected one of {PROFILES}")
        self.decay, self.warmup, self.keep, self.chunk_numel = decay, warmup, keep, chunk_numel
        self.profile = profile
        self.gamma = power_exponent(sigma_rel) if profile == "power" else None
        self.num_updates = 0
        self.shadow = full_weights(model, keep, chunk_numel)

    def current_decay(self) -> float:
        """The decay of the next update: power (n / (n + 1)) ** (gamma + 1); exponential `decay`,
        with warm-up (1 + n) / (10 + n) capped at `decay`."""
        if self.profile == "power":
            n = self.num_updates
            return (n / (n + 1)) ** (self.gamma + 1)
        if self.warmup:
            return min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))
        return self.decay

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """One EMA step from the model's current weights; call on every rank."""
        weight = 1.0 - self.current_decay()
        for chunk in _chunks(list(model.named_parameters()), self.chunk_numel):
            with _gathered([p for _, p in chunk]):
                if self.keep:
                    shadow = [self.shadow[name] for name, _ in chunk]
                    current = [p.detach().to(torch.float32) for _, p in chunk]
                    torch._foreach_lerp_(shadow, current, weight)
        self.num_updates += 1

    def state_dict(self) -> dict[str, torch.Tensor]:
        """name -> fp32 tensor, the keys of the model's state dict (what ema.safetensors holds)."""
        if not self.keep:
            raise RuntimeError("this rank does not hold the EMA (keep=False)")
        return self.shadow

    def load_state_dict(self, state: dict[str, torch.Tensor], num_updates: int) -> None:
        if self.keep:
            missing, unexpected = set(self.shadow) - set(state), set(state) - set(self.shadow)
            if missing or unexpected:
                raise KeyError(
                    f"EMA weights do not match the model: missing {sorted(missing)[:3]}, "
                    f"unexpected {sorted(unexpected)[:3]}"
                )
            for name, value in state.items():
                self.shadow[name].copy_(value)
        self.num_updates = num_updates

    def copy_to(self, model: nn.Module) -> nn.Module:
        """Load the EMA into a plain (unpartitioned) model of the same architecture."""
        model.load_state_dict(self.state_dict(), strict=True)
        return model
