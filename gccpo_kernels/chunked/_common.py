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


BLOCK_BYTES = 1 << 20  # CPU: a [rows, cols] column block of the elementwise passes stays in cache


def logit_grad_(z: torch.Tensor, lse: torch.Tensor, ent: torch.Tensor | None,
                zy: torch.Tensor | None, g_onehot: torch.Tensor, gl: torch.Tensor,
                ge: torch.Tensor | None, y: torch.Tensor, params: LogitParams,
                tmp: torch.Tensor | None, tmp2: torch.Tensor | None, cols: int) -> torch.Tensor:
    """d l / d u written over the logits ``z`` [rows, Vc] (returned), one read and one write of z
    a column block at a time: g = s/tau (g_logp (onehot - p) - g_H p (z - mu)), times 1 - (z/c)^2
    under a soft cap c, with p = e^{z - lse} and mu = lse - H.

    ``z`` may be a vocabulary slice of the rows' logits: ``lse`` and ``ent`` [rows, 1] are over the
    whole softmax, ``y`` [rows, 1] is the target's column in the slice (clamped into it) and
    ``g_onehot`` [rows] the one-hot term's weight (g_logp, 0 where the target is outside the
    slice). ``zy`` [rows, 1] (z at the targets, read before the call) is needed under a soft cap
    only, ``ent`` only with ``ge``. ``gl`` [rows] is d l / d logp, ``ge`` [rows] | None d l / d H.

    Work goes a column block of ``cols`` at a time. Scratch: ``tmp`` and ``tmp2``, [rows, >= cols]
    blocks of z's dtype, used when the loss reads the entropy or the logits are capped; without
    either (a log-prob-only loss) the gradient is formed in place, g = -s/tau g_logp e^{z - lse},
    and neither is read (None is fine).
    """
    rows, vocab = z.shape
    scale = params.scale
    gl = gl.to(z.dtype)[:, None]
    cap = params.softcap
    onehot = g_onehot.to(z.dtype)[:, None] * scale  # 0 for a target outside the slice
    if ge is None and cap is None:
        factor = gl * -scale
        for c0 in range(0, vocab, cols):  # the three passes over a block while it is in cache
            z[:, c0:c0 + cols].sub_(lse).exp_().mul_(factor)
        return z.scatter_add_(1, y, onehot)
    if ge is not None:
        # -s p (g_logp + g_H (z - mu)) = p * (z * (-s g_H) + s (g_H mu - g_logp))
        ge = ge.to(z.dtype)[:, None]
        const, slope = (ge * (lse - ent) - gl) * scale, ge * -scale
    else:
        factor = gl * -scale
    for c0 in range(0, vocab, cols):
        zb = z[:, c0:c0 + cols]
        k = zb.shape[1]
        p = torch.sub(zb, lse, out=tmp[:rows, :k]).exp_()
        if cap is not None:  # d z / d u = 1 - tanh^2 = 1 - (z / c)^2, read before z is overwritten
            p.mul_(torch.addcmul(torch.ones((), dtype=z.dtype, device=z.device), zb, zb,
                                 value=-1.0 / cap ** 2, out=tmp2[:rows, :k]))
        if ge is not None:
            p.mul_(torch.addcmul(const, zb, slope, out=tmp2[:rows, :k]))
            zb.copy_(p)
        else:
            torch.mul(p, factor, out=zb)
    if cap is not None:  # the one-hot term carries the cap's derivative at the target too
        onehot = onehot * (1.0 - (zy / cap) ** 2)
    return z.scatter_add_(1, y, onehot)
