"""Pieces every chunked op shares: compute operands and the logits of one tile."""

from __future__ import annotations

import torch

from .._logits import LogitParams
from .._validation import out_dtype_for
from .._workspace import rows_per_chunk


def compute_operands(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
    """(compute dtype, weight, bias): float32 for 16/32-bit inputs, float64 for float64 ones; the
    weight and bias are cast once per call (O(V*D)), hidden rows per tile."""
    cd = out_dtype_for(hidden.dtype)
    w = weight if weight.dtype == cd else weight.to(cd)
    b = None if bias is None else (bias if bias.dtype == cd else bias.to(cd))
    return cd, w, b


def tile_logits(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, params: LogitParams,
                out: torch.Tensor) -> torch.Tensor:
    """z = transform(h @ w.T + b) for a tile, written into ``out[:rows]`` (returned)."""
    z = out[: h.shape[0]]
    if b is None:
        torch.mm(h, w.T, out=z)
    else:
        torch.addmm(b, h, w.T, out=z)
    return params.apply_(z)


def chunk_rows(vocab: int, per_row_buffers: int, dtype: torch.dtype, device: torch.device,
               multiple: int = 8) -> int:
    """Rows per chunk when ``per_row_buffers`` [V]-sized buffers are alive per row."""
    elem = torch.finfo(dtype).bits // 8
    return rows_per_chunk(vocab, elem * per_row_buffers, device, multiple=multiple)
