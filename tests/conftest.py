"""Shared pytest set-up: GPU tests skip with their reason where there is no CUDA device."""

import os

import pytest

# OpenMP threads that spin-wait for a busy core make torch many times slower on a shared
# 2-core machine; passive waiting costs nothing measurable when cores are free.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cuda_reason() -> str | None:
    try:
        import torch
    except ImportError:
        return "torch is not installed"
    if not torch.cuda.is_available():
        return "no CUDA device on this machine"
    return None


def pytest_collection_modifyitems(config, items):
    reason = None
    for item in items:
        if "gpu" in item.keywords:
            reason = reason or _cuda_reason()
            if reason:
                item.add_marker(pytest.mark.skip(reason=f"gpu test: {reason}"))


@pytest.fixture
def repo_root() -> str:
    return REPO
