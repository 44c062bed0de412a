"""gccpo_kernels._gemm: 16-bit operands, float32 result, one code path (cuBLAS's out_dtype
overload on CUDA, an exact upcast shim elsewhere)."""

from __future__ import annotations

import pytest
import torch

from gccpo_kernels._gemm import addmm_f32_, mm_f32
from tests.conftest import DEVICE


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_products_accumulate_in_float32_or_wider(dtype):
    g = torch.Generator().manual_seed(0)
    a = torch.randn(17, 40, generator=g, dtype=torch.float64).to(dtype).to(DEVICE)
    b = torch.randn(40, 9, generator=g, dtype=torch.float64).to(dtype).to(DEVICE)
    wide = torch.float64 if dtype == torch.float64 else torch.float32
    want = a.double() @ b.double()  # the operands' exact values, multiplied in float64
    out = torch.empty(17, 9, dtype=wide, device=DEVICE)
    assert mm_f32(a, b, out=out) is out
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(out.double(), want, rtol=tol, atol=tol)
    acc = torch.ones(17, 9, dtype=wide, device=DEVICE)
    addmm_f32_(acc, a, b)
    addmm_f32_(acc, a, b)
    torch.testing.assert_close(acc.double(), 1 + 2 * want, rtol=tol, atol=tol)


def test_writes_a_strided_column_block():
    """The in-forward kernel writes each vocabulary block's logits into a column slice."""
    a = torch.randn(5, 8, dtype=torch.bfloat16, device=DEVICE)
    b = torch.randn(8, 30, dtype=torch.bfloat16, device=DEVICE)
    buf = torch.zeros(5, 50, device=DEVICE)
    mm_f32(a, b, out=buf[:, 10:40])
    torch.testing.assert_close(buf[:, 10:40], a.float() @ b.float())
    assert not buf[:, :10].any() and not buf[:, 40:].any()
