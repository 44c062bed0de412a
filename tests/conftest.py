"""Test setup: run the real Triton kernels in the CPU interpreter when there is no GPU.

TRITON_INTERPRET must be set before any module that defines a kernel is imported, so it is set
here, at collection time, and only when CUDA is absent (on a GPU machine the kernels compile).
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from gccpo_kernels._backend import triton_unavailable_reason  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


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
