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


def test_float32_cuda_products_ignore_the_process_tf32_switch():
    """A trainer's ``allow_tf32 = True`` must not turn our float32 chunk GEMMs into TF32 (|z|·2^-11
    per logit): inside the guard the switch is off, after it the process's value is back; for
    other dtypes and devices the guard changes nothing. (The guard looks at ``is_cuda`` and
    ``dtype`` only, so a stand-in operand tests it without a GPU.)"""
    from types import SimpleNamespace

    from gccpo_kernels._gemm import _ieee_fp32

    matmul = torch.backends.cuda.matmul
    before = matmul.allow_tf32
    try:
        matmul.allow_tf32 = True
        with _ieee_fp32(SimpleNamespace(is_cuda=True, dtype=torch.float32)):
            assert matmul.allow_tf32 is False
        assert matmul.allow_tf32 is True
        for other in (SimpleNamespace(is_cuda=True, dtype=torch.bfloat16),
                      SimpleNamespace(is_cuda=False, dtype=torch.float32)):
            with _ieee_fp32(other):
                assert matmul.allow_tf32 is True
        with pytest.raises(RuntimeError), _ieee_fp32(SimpleNamespace(is_cuda=True, dtype=torch.float32)):
            raise RuntimeError("a failing GEMM")
        assert matmul.allow_tf32 is True
    finally:
        matmul.allow_tf32 = before
