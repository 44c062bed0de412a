"""Test setup: run the real Triton kernels in the CPU interpreter when there is no GPU.

TRITON_INTERPRET must be set before any module that defines a kernel is imported, so it is set
here, at collection time, and only when CUDA is absent (on a GPU machine the kernels compile).
"""

from __future__ import annotations

import math
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from gccpo_kernels._backend import triton_unavailable_reason  # noqa: E402
from tests._strict import pytest_make_collect_report, pytest_runtest_makereport  # noqa: E402,F401

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def lm_head(n: int, d: int, v: int, *, seed: int = 0, dtype: torch.dtype = torch.float32,
            wscale: float = 2.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Hidden rows [n, d], an LM head [v, d] with O(1..10) logits (scaled by ``wscale``) and a bias
    [v], drawn in float64 in that order from ``seed``, then cast to ``dtype`` on DEVICE."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=g, dtype=torch.float64)
    w = torch.randn(v, d, generator=g, dtype=torch.float64) * wscale / math.sqrt(d)
    b = 0.3 * torch.randn(v, generator=g, dtype=torch.float64)
    return h.to(dtype).to(DEVICE), w.to(dtype).to(DEVICE), b.to(dtype).to(DEVICE)


def available_backends() -> list[str]:
    """Backends that can run on DEVICE here: triton only when importable (interpreter on CPU)."""
    names = ["torch", "reference"]
    if triton_unavailable_reason() is None:
        names.insert(0, "triton")
    return names


@pytest.fixture
def device() -> torch.device:
    return DEVICE


def pytest_report_header(config):
    return (f"gccpo: device={DEVICE}, TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '')!r}, "
            f"backends={available_backends()}")
