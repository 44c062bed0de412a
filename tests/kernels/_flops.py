"""Watch what an op runs, inside our custom ops too: ``GemmFlops`` counts the GEMM FLOPs (a
TorchDispatchMode that sees every aten matrix product, ``out=`` and in-place forms included, what
``torch.mm(..., out=buf)`` or ``dw.addmm_(...)`` dispatch to, and adds 2*m*k*n per product;
elementwise work is not counted); ``Creations`` records every tensor an aten op creates (its
shape and bytes), the test of what workspace an op allocates."""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten
# (op packet, index of the first matrix operand)
_PRODUCTS = {aten.mm: 0, aten.addmm: 1, aten.addmm_: 1, aten.bmm: 0, aten.baddbmm: 1,
             aten.baddbmm_: 1}


class _Watch(TorchDispatchMode):
    """A dispatch mode that also sees the aten ops inside our custom ops; subclasses ``see``."""

    def see(self, func, args, out) -> None:
        raise NotImplementedError

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "gccpo":
            # one of our custom ops: the dispatcher pops this mode while it handles the op, so run
            # the op's Python body with the mode pushed again, and count the GEMMs inside it
            from torch._library.custom_ops import OPDEFS

            with self:
                return OPDEFS[f"gccpo::{func._opname}"]._init_fn(*args, **(kwargs or {}))
        out = func(*args, **(kwargs or {}))
        self.see(func, args, out)
        return out


class GemmFlops(_Watch):
    """``with GemmFlops() as f: ...; f.flops`` -> GEMM FLOPs; ``f.calls`` -> number of products."""

    def __init__(self) -> None:
        super().__init__()
        self.flops = 0
        self.calls = 0

    def see(self, func, args, out) -> None:
        packet = func.overloadpacket
        if packet in _PRODUCTS:
            a, b = args[_PRODUCTS[packet]], args[_PRODUCTS[packet] + 1]
            batch = a.shape[0] if a.dim() == 3 else 1
            m, k = a.shape[-2], a.shape[-1]
            self.flops += 2 * batch * m * k * b.shape[-1]
            self.calls += 1


class Creations(_Watch):
    """``with Creations() as c: ...; c.tensors`` -> [(shape, bytes)] of every tensor an aten op
    created (a new storage: views, in-place and ``out=`` results are not creations, nor an output
    sharing an input's storage; an ``out=`` buffer an op grows is not seen)."""

    def __init__(self) -> None:
        super().__init__()
        self.tensors: list[tuple[tuple[int, ...], int]] = []

    def see(self, func, args, out) -> None:
        schema = func._schema
        if schema.is_mutable or any(a.alias_info is not None for a in schema.returns):
            return  # in place, out= or a view: no new storage
        inputs = {a.untyped_storage().data_ptr() for a in args if isinstance(a, torch.Tensor)}
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(t, torch.Tensor):
                ptr = t.untyped_storage().data_ptr()
                if ptr in inputs:  # an unannotated alias of an input (_unsafe_view, ...)
                    continue
                self.tensors.append((tuple(t.shape), t.untyped_storage().nbytes()))
