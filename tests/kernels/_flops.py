"""Count the GEMM FLOPs an op runs: a TorchDispatchMode that sees every aten matrix product,
``out=`` and in-place forms included (what ``torch.mm(..., out=buf)`` or ``dw.addmm_(...)``
dispatch to), and adds 2*m*k*n per product. Elementwise work is not counted."""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten
# (op packet, index of the first matrix operand)
_PRODUCTS = {aten.mm: 0, aten.addmm: 1, aten.addmm_: 1, aten.bmm: 0, aten.baddbmm: 1,
             aten.baddbmm_: 1}


class GemmFlops(TorchDispatchMode):
    """``with GemmFlops() as f: ...; f.flops`` -> GEMM FLOPs; ``f.calls`` -> number of products."""

    def __init__(self) -> None:
        super().__init__()
        self.flops = 0
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        packet = func.overloadpacket
        if packet in _PRODUCTS:
            a, b = args[_PRODUCTS[packet]], args[_PRODUCTS[packet] + 1]
            batch = a.shape[0] if a.dim() == 3 else 1
            m, k = a.shape[-2], a.shape[-1]
            self.flops += 2 * batch * m * k * b.shape[-1]
            self.calls += 1
        if func.namespace == "gccpo":
            # one of our custom ops: the dispatcher pops this mode while it handles the op, so run
            # the op's Python body with the mode pushed again, and count the GEMMs inside it
            from torch._library.custom_ops import OPDEFS

            with self:
                return OPDEFS[f"gccpo::{func._opname}"]._init_fn(*args, **(kwargs or {}))
        return func(*args, **(kwargs or {}))
