"""Exponential moving average of the weights, in fp32, correct under ZeRO-3.

    ema <- decay * ema + (1 - decay) * w        after every applied optimizer step

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
        import deepspeed
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


class EMA:
    """fp32 shadow weights keyed like `model.state_dict()`; held only where keep=True."""

    def __init__(self, model: nn.Module, decay: float, warmup: bool = False, keep: bool = True,
                 chunk_numel: int = GATHER_CHUNK_NUMEL):
        self.decay, self.warmup, self.keep, self.chunk_numel = decay, warmup, keep, chunk_numel
        self.num_updates = 0
        self.shadow = full_weights(model, keep, chunk_numel)

    def current_decay(self) -> float:
        """The decay of the next update; with warm-up (1 + n) / (10 + n), capped at `decay`."""
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
                raise KeyError(f"EMA weights do not match the model: missing {sorted(missing)[:3]}, "
                               f"unexpected {sorted(unexpected)[:3]}")
            for name, value in state.items():
                self.shadow[name].copy_(value)
        self.num_updates = num_updates

    def copy_to(self, model: nn.Module) -> nn.Module:
        """Load the EMA into a plain (unpartitioned) model of the same architecture."""
        model.load_state_dict(self.state_dict(), strict=True)
        return model
