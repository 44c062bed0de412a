"""Chunked torch backend: log-probs, entropy AND the parameter gradients of a per-token loss in one
pass over the logits (the fused policy loss's gradient computed in its forward, issue 18).

For a loss that is a sum of per-token terms, l = sum_i w_i f_i(logp_i, H_i), the gradient of the
logits of row i needs only that row's own logp_i and H_i: so each row chunk's logits, once
computed, give logp and H, then (through ``token_grads``, the loss's per-token derivative) the
logit gradient, then d hidden and d weight, and are never computed again. GEMM FLOPs: 2NVD for
the logits, 2NVD for d hidden, 2NVD for d weight, 6NVD in all, where the composed path
(forward, then a backward that recomputes the logits) does 8NVD.

Work is tiled [rows, V]: a row chunk holds its whole vocabulary (the row's log-sum-exp must be final
before its gradient exists) in ONE [rows, V] buffer of the compute dtype, as many rows as the
workspace budget allows (``gccpo_kernels._workspace``). The elementwise work goes a cache-sized
column block at a time (two small [rows, cols] scratch blocks): the row statistics in one pass
(each block's own max and sums, combined once at the end), then the logit gradient written over
the logits (a read and a write). For a loss that does not read the entropy (and no soft cap) the
statistics pass also writes e^{z - m_block} over the logits and the gradient is one multiply per
logit (one scratch block). d weight accumulates in float32 (float64 for float64 inputs) with one
read-modify-write per row chunk (one GEMM over the whole vocabulary).
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from .. import _native
from .._gemm import addmm_f32_, mm_f32
from .._logits import LogitParams
from .._validation import out_dtype_for
from .._workspace import workspace_bytes
from ._common import BLOCK_BYTES, logit_grad_

# (row slice start, end, logp [rows], entropy [rows]) -> (d loss / d logp, d loss / d entropy | None)
TokenGrads = Callable[[int, int, torch.Tensor, torch.Tensor],
                      tuple[torch.Tensor, torch.Tensor | None]]


def rows_per_tile(n: int, vocab: int, elem: int, device: torch.device, buffers: int,
                  budget: int | None = None) -> int:
    """Rows of a [rows, V] tile such that ``buffers`` of them fit the workspace (at least 1)."""
    budget = workspace_bytes(device) if budget is None else budget
    return max(1, min(n, budget // max(1, vocab * elem * buffers)))


def forward_with_grad(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                      targets: torch.Tensor, params: LogitParams, token_grads: TokenGrads,
                      needs: tuple[bool, bool, bool], budget: int | None = None,
                      reads_entropy: bool = True,
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None,
                                 torch.Tensor | None, torch.Tensor | None]:
    """(logp [N], entropy [N], d hidden [N, D] | None, d weight [V, D] | None, d bias [V] | None).

    hidden [N, D], weight [V, D], bias [V] | None, targets [N] in [0, V), or -1 / V for an
    out-of-range id (its logit reads 0 and it gets no one-hot gradient; no ignored rows: the caller
    drops them). ``token_grads(r0, r1, logp, entropy)`` returns the loss's derivatives for rows
    r0:r1 (float tensors of [r1 - r0]; the entropy one None when the loss does not read the
    entropy). ``needs`` says which of (hidden, weight, bias) get a gradient. ``reads_entropy`` False
    promises that token_grads gives no entropy gradient: the statistics pass then leaves e^{z - m}
    in the buffer and the gradient costs one multiply per logit instead of a second exp (without a
    soft cap). Everything is returned in float32 (float64 for float64 inputs): the caller scales the
    gradients by the upstream gradient before casting them to the parameters' dtypes.

    Per row chunk: z = transform(h W^T + b) (one GEMM), m = max z, p = exp(z - lse), H = lse -
    sum p z, logp = z_y - lse, then g = d l / d z = g_logp (onehot - p) - g_H p (z - mu) with
    mu = lse - H (times 1 - (z / c)^2 under a soft cap c, times s / tau), dh = g W, dW += g^T h,
    db += sum_rows g.
    """
    need_h, need_w, need_b = needs
    n, vocab = hidden.shape[0], weight.shape[0]
    # operands stay in their dtype (no float32 copy of a 16-bit head): GEMMs give float32
    cd = out_dtype_for(hidden.dtype)
    w = weight
    b = None if bias is None else bias.to(cd)
    # the gradient GEMMs take a 16-bit copy of the logit gradient for bfloat16 (float32's
    # exponent range); float16 would flush small gradients to zero, so it multiplies in float32
    sixteen = w.dtype == torch.bfloat16
    device = hidden.device
    w_grad = w.float() if w.dtype == torch.float16 else w  # float16: an O(V*D) float32 copy
    logp = torch.empty(n, dtype=cd, device=device)
    entropy = torch.empty_like(logp)
    dh = torch.empty(n, hidden.shape[1], dtype=cd, device=device) if need_h else None
    dw = torch.zeros(vocab, weight.shape[1], dtype=cd, device=device) if need_w else None
    db = torch.zeros(vocab, dtype=cd, device=device) if need_b else None
    if n == 0:
        return logp, entropy, dh, dw, db
    elem = torch.finfo(cd).bits // 8
    # bytes per [rows, V] element: the logits / gradient buffer, plus its 16-bit copy (the
    # gradient GEMMs' operand) for 16-bit inputs
    per_elem = elem + (torch.finfo(w.dtype).bits // 8 if sixteen else 0)
    # a loss that does not read the entropy (and no soft cap): the statistics pass leaves
    # e^{z - m_block} in the buffer and the gradient is one multiply per logit (no second exp),
    # with one scratch block instead of two
    from_exp = not reads_entropy and params.softcap is None
    if device.type == "cuda":  # whole-row scratch blocks (below): one or two more [rows, V]
        per_elem += (1 if from_exp else 2) * elem
    rows = rows_per_tile(n, vocab, per_elem, device, 1, budget)
    # column blocks: cache-sized on the CPU; the whole row on a GPU (streaming passes, where
    # every block would cost a launch per op)
    cols = vocab if device.type == "cuda" else min(vocab, max(256, BLOCK_BYTES // (rows * elem)))
    zbuf = torch.empty(rows, vocab, dtype=cd, device=device)  # logits, then their gradient
    gbuf = torch.empty(rows, vocab, dtype=w.dtype, device=device) if sixteen else None
    # the compiled row statistics (csrc/row_stats.c; the CPU's float32 buffer, so for 16- and
    # 32-bit inputs): one call per chunk with a whole-row max, in place of the torch passes per
    # column block
    native = _native.usable_for(zbuf)
    # ... and then, for a log-prob-only loss, G = diag(f) E + onehot terms with E = e^{z - m}
    # left unscaled in the buffer: f goes onto the [rows, D] side of the GEMMs and the one-hot
    # terms are rank-1 row updates, so no pass over [rows, V] forms G (float32 / float16 heads;
    # a bfloat16 head's GEMMs take a bfloat16 copy of G, formed by _grad_from_exp_)
    deferred = native and from_exp and not sixteen and w_grad.dtype == cd
    tmp = None if native and from_exp else torch.empty(rows, cols, dtype=cd, device=device)
    tmp2 = None if from_exp else torch.empty_like(tmp)
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        h = hidden[r0:r1]
        y = targets[r0:r1].long()[:, None]
        inside = (y >= 0) & (y < vocab)     # -1 / V: an out-of-range target (validate=False)
        y = y.clamp(0, vocab - 1)
        z = _logits(h, w, b, params, zbuf)
        zy = torch.where(inside, z.gather(1, y), 0.0)
        if native:
            lse, ent, maxima = _native.row_stats(z, write_exp=from_exp)
        else:
            lse, ent, maxima = _row_stats(z, tmp, tmp2, cols, keep_exp=from_exp)
        logp[r0:r1] = (zy - lse).squeeze(1)
        entropy[r0:r1] = ent.squeeze(1)
        gl, ge = token_grads(r0, r1, logp[r0:r1], entropy[r0:r1])
        onehot_w = torch.where(inside[:, 0], gl, 0.0)
        if ge is not None and not reads_entropy:
            raise RuntimeError("token_grads gave an entropy gradient with reads_entropy=False")
        if deferred:
            _deferred_grads_(z, lse, maxima[0], onehot_w, gl, y[:, 0], params.scale, h, w_grad,
                             dh[r0:r1] if need_h else None, dw, db)
            continue
        if from_exp:
            # native statistics: one whole-row max, so one block of the whole vocabulary
            g = _grad_from_exp_(z, lse, maxima, onehot_w, gl, y, params.scale,
                                vocab if native else cols)
        else:
            # cache-sized blocks of the scratch whatever made the statistics (logit_grad_
            # reads only lse and H, not the blocks' maxima)
            g = logit_grad_(z, lse, ent, zy, onehot_w, gl, ge, y, params, tmp, tmp2, cols)
        if need_b:
            db.add_(g.sum(dim=0))
        if sixteen:  # the GEMM operand in the head's dtype (what a bf16 backward rounds anyway)
            g = gbuf[: r1 - r0].copy_(g)
        if need_h:
            mm_f32(g, w_grad, out=dh[r0:r1])
        if need_w:
            hg = h if w_grad is w else h.float()
            # one GEMM over the whole vocabulary (~2 % faster than 4096-row blocks on the CPU,
            # the same bits, the same peak memory); by blocks for a 16-bit G on the CPU, whose
            # GEMM shim upcasts its operand (_gemm): a block's copy, not the [V, rows] one's
            step = V_BLOCK if sixteen and device.type == "cpu" else vocab
            for v0 in range(0, vocab, step):
                addmm_f32_(dw[v0:v0 + step], g[:, v0:v0 + step].T, hg)
    return logp, entropy, dh, dw, db


V_BLOCK = 4096  # vocabulary columns per logits GEMM (and per d weight GEMM of a CPU 16-bit G)


def _logits(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, params: LogitParams,
            zbuf: torch.Tensor) -> torch.Tensor:
    """transform(h W^T + b) into ``zbuf[:rows]`` (float32 for 16-bit operands: cuBLAS's
    16-bit-in / float32-out GEMM, ``gccpo_kernels._gemm``) by vocabulary blocks: GEMMs writing
    strided column blocks of the buffer (one [rows, D] x [D, V] product makes MKL keep ~20 MB of
    packing buffers for the rest of the process)."""
    z = zbuf[: h.shape[0]]
    for v0 in range(0, w.shape[0], V_BLOCK):
        zb = mm_f32(h, w[v0:v0 + V_BLOCK].T, out=z[:, v0:v0 + V_BLOCK])
        if b is not None:
            zb.add_(b[v0:v0 + V_BLOCK])
    return params.apply_(z)


def _row_stats(z: torch.Tensor, tmp: torch.Tensor, tmp2: torch.Tensor | None, cols: int,
               keep_exp: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(lse, entropy, maxima): lse and entropy [rows, 1] of the softmax over the rows of ``z``
    [rows, V], in one read of z, a column block at a time. Each block j keeps its own max m_j
    and the sums s_j = sum e^{z-m_j}, t_j = sum e^{z-m_j} (z - m_j) (six ops on the block, all
    writing into preallocated [blocks, rows] rows); the blocks are combined once at the end
    (m = max_j m_j, s = sum_j e^{m_j-m} s_j, t = sum_j e^{m_j-m} (t_j + s_j (m_j - m))), where
    an online running max would cost nine more small ops per block. ``maxima`` [blocks, rows]
    holds the m_j. ``keep_exp``: write e^{z - m_j} over each block of z (then p = z exp(m_j -
    lse), see _grad_from_exp_; ``tmp2`` is then not read)."""
    rows, vocab = z.shape
    blocks = -(-vocab // cols)
    maxima, sums, tsums = torch.empty(3, blocks, rows, dtype=z.dtype, device=z.device).unbind(0)
    for j, c0 in enumerate(range(0, vocab, cols)):
        zb = z[:, c0:c0 + cols]
        k = zb.shape[1]
        m_j = torch.amax(zb, dim=1, out=maxima[j])[:, None]
        zc = torch.sub(zb, m_j, out=tmp[:rows, :k])              # <= 0: no overflow
        e = torch.exp(zc, out=zb if keep_exp else tmp2[:rows, :k])
        torch.sum(e, dim=1, out=sums[j])
        torch.sum(zc.mul_(e), dim=1, out=tsums[j])               # zc is spent
    m = maxima.amax(dim=0)
    shift = maxima - m                                           # <= 0
    alpha = torch.exp(shift)
    s = (sums * alpha).sum(dim=0)
    t = ((tsums + sums * shift) * alpha).sum(dim=0)
    log_s = torch.log(s)
    ent = (log_s - t / s).clamp_(min=0.0, max=math.log(vocab))
    return (m + log_s)[:, None], ent[:, None], maxima


def _exp_factor(maxima: torch.Tensor, lse: torch.Tensor, gl: torch.Tensor,
                scale: float) -> torch.Tensor:
    """-s/tau g_logp e^{m - lse}: what turns e^{z - m} into the softmax part of a log-prob-only
    loss's logit gradient (g = factor e + the one-hot term); ``maxima`` [blocks, rows] or [rows],
    ``lse`` [rows, 1], ``gl`` [rows]."""
    return torch.exp(maxima - lse[:, 0]).mul_(gl.to(lse.dtype) * -scale)


def _grad_from_exp_(e: torch.Tensor, lse: torch.Tensor, maxima: torch.Tensor,
                    g_onehot: torch.Tensor, gl: torch.Tensor, y: torch.Tensor, scale: float,
                    cols: int) -> torch.Tensor:
    """The logit gradient of a log-prob-only loss, written over ``e`` [rows, V] (returned), whose
    column block j holds e^{z - m_j} (``_row_stats(keep_exp=True)``, ``maxima`` [blocks, rows]):
    p = e exp(m_j - lse) <= 1, so g = s/tau g_logp (onehot - p) is one multiply per logit, by a
    factor per (block, row) formed for all blocks at once; ``g_onehot`` [rows] is g_logp where
    the target is in [0, V), else 0."""
    factor = _exp_factor(maxima, lse, gl, scale)  # [blocks, rows]
    for j, c0 in enumerate(range(0, e.shape[1], cols)):
        e[:, c0:c0 + cols].mul_(factor[j][:, None])
    return e.scatter_add_(1, y, g_onehot.to(e.dtype)[:, None] * scale)


def _deferred_grads_(e: torch.Tensor, lse: torch.Tensor, maxima: torch.Tensor,
                     g_onehot: torch.Tensor, gl: torch.Tensor, y: torch.Tensor, scale: float,
                     h: torch.Tensor, w: torch.Tensor, dh: torch.Tensor | None,
                     dw: torch.Tensor | None, db: torch.Tensor | None) -> None:
    """The gradients of a log-prob-only loss from ``e`` [rows, V] = e^{z - m} (a whole-row max
    ``maxima`` [rows]: ``_native.row_stats(write_exp=True)``), without forming the logit
    gradient. G = diag(f) E + C with f = -s/tau g_logp e^{m - lse} [rows] and C the one-hot
    terms c_r = s/tau g_onehot_r at (r, y_r), so

        dh = f * (E W) + c * W[y]        dW += E^T (f * h) + (c * h) scattered to rows y
        db += E^T f + c scattered to y

    the same 2NVD + 2NVD GEMM FLOPs as with G, plus O(rows D) work, and no [rows, V] pass (the
    scaling and the one-hot scatter it replaces). ``dh`` [rows, D] is written, ``dw`` [V, D] and
    ``db`` [V] accumulate (each None when not needed); ``y`` [rows] is clamped into [0, V) and
    ``g_onehot`` is 0 where the target was out of range."""
    f = _exp_factor(maxima, lse, gl, scale)
    c = g_onehot.to(e.dtype) * scale
    if dh is not None:
        mm_f32(e, w, out=dh)
        dh.mul_(f[:, None]).add_(w.index_select(0, y).mul_(c[:, None]))
    if dw is not None:
        addmm_f32_(dw, e.T, h * f[:, None])
        dw.index_add_(0, y, h * c[:, None])
    if db is not None:
        db.addmv_(e.T, f)
        db.index_add_(0, y, c)
