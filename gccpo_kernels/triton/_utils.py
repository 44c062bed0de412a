"""Shared Triton helpers: the interpreter switch, pinned per-architecture configurations,
math the interpreter can run, and the description of a kernel for the ahead-of-time compile check.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import triton
import triton.language as tl

from .._backend import triton_interpreting

INTERPRET: bool = triton_interpreting()

TL_DTYPE_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32",
                  torch.float64: "fp64", torch.int32: "i32", torch.int64: "i64"}


def arch_key(device: torch.device) -> str:
    """Which pinned configuration table applies: 'interpreter', 'sm90', 'sm80' (Ampere and others).

    Configurations are pinned per architecture (no run-time autotuning), and never depend on the
    problem size N, so that a row's result does not depend on the batch around it.
    """
    if device.type != "cuda":
        return "interpreter"
    major, _ = torch.cuda.get_device_capability(device)
    return "sm90" if major >= 9 else "sm80"


def dot_precision(dtype: torch.dtype) -> str:
    """input_precision for tl.dot: 'tf32x3' keeps float32 inputs near float32 accuracy on tensor
    cores (plain tf32 loses about three decimal digits in the logits); 16-bit inputs ignore it."""
    return "tf32x3" if dtype == torch.float32 else "tf32"


def upcast_dots(dtype: torch.dtype) -> bool:
    """The interpreter returns garbage for tl.dot on bf16 operands: cast them to fp32 there."""
    return INTERPRET and dtype in (torch.bfloat16, torch.float16)


def fold_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum over dim 0 as a left fold, ((x_0 + x_1) + x_2) + ..., one elementwise add per slice.

    Used to merge vocabulary-split partials ([S, rows, ...]) on the host side. torch's reductions
    pick their summation order from the tensor's shape (on the CPU a lone column is summed with
    vectorized partial sums, a wide [S, N] block column by column; CUDA picks a reduction config
    by the number of outputs), so ``x.sum(0)`` of a row differs in the last bits with the batch
    around it. Elementwise adds do not: each output element sees the same S additions in the same
    order whatever the other rows. Cost: S - 1 elementwise launches (S = ceil(V / V_SPLIT)).
    """
    acc = x[0].clone()
    for i in range(1, x.shape[0]):
        acc.add_(x[i])
    return acc


@triton.jit
def tanh(x):
    """tanh through exp (libdevice is unavailable in the interpreter); exact to float32 rounding
    in absolute terms, never overflows: e = exp(-2|x|) in (0, 1]."""
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)


@dataclass
class CompileCase:
    """One kernel at one configuration, for triton.compile(ASTSource(...)) ahead of time."""

    name: str
    kernel: Any
    signature: dict[str, str]
    constexprs: dict[str, Any]
    num_warps: int
    num_stages: int
    uses_dot: bool = True
    large_shape_config: bool = False  # used at large N*V: its 16-bit dots must lower to wgmma on sm_90
    # Integer arguments that are multiples of 16 at the shapes this case stands for; like the JIT,
    # the compile check marks them (and every pointer) 16-divisible, which enables wide loads.
    divisible_ints: tuple[str, ...] = ()
    options: dict[str, Any] = field(default_factory=dict)
