"""GEMMs with a float32 result from 16-bit operands: cuBLAS on CUDA, one code path everywhere.

``torch.mm`` / ``torch.addmm`` with ``out_dtype=torch.float32`` multiply bfloat16 / float16
operands and return (or accumulate into) float32, at the 16-bit tensor-core rate: the logits of a
chunk stay float32 (bf16 logits would cost |z| 2^-9 in a log-prob, too coarse for PPO ratios)
without a float32 copy of the V x D head. In torch 2.13 that overload exists only on CUDA
(``NotImplementedError`` on the CPU), so elsewhere a shim upcasts the operands and makes the same
call in float32: the upcast is exact and the products accumulate in float32 either way, so the
CPU tests exercise the code path the GPU runs. float32 and float64 operands take the plain call.

float32 operands on CUDA always multiply in full float32 (IEEE), whatever the process set through
``torch.backends.cuda.matmul.allow_tf32`` (e.g. a trainer's ``tf32=True``): TF32 would cost
|z| 2^-11 in a logit, as coarse as the bf16 logits the float32 chunk exists to avoid, and the
divergence's shifts W delta would lose their relative accuracy.

Cost: 2mkn FLOPs per product; the shim adds an O(mk + kn) upcast per call on the CPU only.
"""

from __future__ import annotations

import contextlib

import torch

SIXTEEN_BIT = (torch.float16, torch.bfloat16)


def _native(*ts: torch.Tensor) -> bool:
    """cuBLAS's 16-bit-in / float32-out overload applies (CUDA, 16-bit operands)."""
    return all(t.is_cuda for t in ts) and ts[0].dtype in SIXTEEN_BIT


@contextlib.contextmanager
def _ieee_fp32(a: torch.Tensor):
    """Full float32 products for float32 CUDA operands while inside (the TF32 switch restored
    after); nothing for other dtypes or devices."""
    matmul = torch.backends.cuda.matmul
    if not (a.is_cuda and a.dtype == torch.float32 and matmul.allow_tf32):
        yield
        return
    matmul.allow_tf32 = False
    try:
        yield
    finally:
        matmul.allow_tf32 = True


def mm_f32(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``out = a @ b`` ([m, k] x [k, n] -> [m, n]); ``out`` float32 for 16-bit operands (else
    the operands' dtype); ``out`` may be a strided view with unit column stride."""
    if a.dtype in SIXTEEN_BIT:
        if _native(a, b):
            return torch.mm(a, b, out_dtype=torch.float32, out=out)
        a, b = a.float(), b.float()
    with _ieee_fp32(a):
        return torch.mm(a, b, out=out)


def addmm_f32_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``acc += a @ b`` in place, ``acc`` float32 for 16-bit operands (float32 accumulation
    across calls: dW over row chunks)."""
    if a.dtype in SIXTEEN_BIT:
        if _native(a, b):
            return torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
        a, b = a.float(), b.float()
    with _ieee_fp32(a):
        return acc.addmm_(a, b)
