"""Chunked torch backend for SPEC §1: log-probs and entropy from hidden states, tile by tile.

Work is tiled [rows, Vc] (``gccpo_kernels._workspace.recompute_tile``): on a GPU as many rows
(up to 8192) and vocabulary columns as the workspace budget allows; on the CPU at most 512 rows
and 1 MiB per tile buffer (512 x 512 in float32; the budget stays an upper bound): ~5 % slower
there than 16 MiB tiles, and memory below PyTorch's chunked linear_cross_entropy. The forward
folds each tile into per-row online log-sum-exp statistics (2NVD FLOPs in all); the backward
recomputes each tile, forms the logit gradient over it in place (``_common.logit_grad_``, shared
with the in-forward loss gradient) and does the two gradient GEMMs (6NVD), so forward + backward
is 8NVD, the floor for a method that does not store logits. Arithmetic runs in float32 for
16/32-bit inputs (the weight is upcast once, O(V*D)) and float64 for float64 inputs.
"""

from __future__ import annotations

import torch

from .._logits import LogitParams
from .._workspace import recompute_tile
from ._common import compute_operands, logit_grad_, tile_logits


def forward(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
            targets: torch.Tensor, params: LogitParams,
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """hidden [N, D], weight [V, D], bias [V] | None, targets [N] in [0, V) (no ignored rows).

    Returns (logp, entropy, lse), each [N] in float32 (float64 for float64 inputs). Tiles of
    [rows, Vc] are folded into per-row running statistics (max m, s = sum e^{z-m},
    t = sum e^{z-m} (z-m), target logit). Extra memory: two tiles plus the upcast weight for
    16-bit inputs.
    """
    z_target, entropy, lse = forward_stats(hidden, weight, bias, targets, params)
    return z_target.sub_(lse), entropy, lse


def forward_stats(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                  targets: torch.Tensor, params: LogitParams,
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`forward`'s statistics before the last subtraction: (target logit z_y, entropy,
    lse), each [N]. A target outside [0, V) (e.g. -1: another vocabulary shard's token) matches
    no column and gives z_y = 0. The vocabulary-parallel path combines these across shards."""
    n, vocab = hidden.shape[0], weight.shape[0]
    cd, w, b = compute_operands(hidden, weight, bias)
    z_target = torch.empty(n, dtype=cd, device=hidden.device)
    entropy = torch.empty_like(z_target)
    lse = torch.empty_like(z_target)
    if n == 0:
        return z_target, entropy, lse
    rows, cols = recompute_tile(n, vocab, torch.finfo(cd).bits // 8, hidden.device, buffers=2)
    zbuf = torch.empty(rows, cols, dtype=cd, device=hidden.device)
    ebuf = torch.empty_like(zbuf)
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        h = hidden[r0:r1].to(cd)
        y = targets[r0:r1].long()
        m = torch.full((r1 - r0,), torch.finfo(cd).min, dtype=cd, device=hidden.device)
        s = torch.zeros_like(m)
        t = torch.zeros_like(m)
        zy = torch.zeros_like(m)
        for v0 in range(0, vocab, cols):
            v1 = min(vocab, v0 + cols)
            z = tile_logits(h, w[v0:v1], None if b is None else b[v0:v1], params,
                             zbuf[: r1 - r0, : v1 - v0])
            local = y - v0
            inside = (local >= 0) & (local < v1 - v0)
            picked = z.gather(1, local.clamp(0, v1 - v0 - 1)[:, None]).squeeze(1)
            zy += torch.where(inside, picked, 0)
            m_new = torch.maximum(m, z.amax(dim=1))
            zc = z.sub_(m_new[:, None])  # <= 0: exp cannot overflow, no cancellation in E[z - m]
            e = torch.exp(zc, out=ebuf[: r1 - r0, : v1 - v0])
            alpha = torch.exp(m - m_new)
            t = alpha * (t + s * (m - m_new)) + torch.linalg.vecdot(e, zc)
            s = alpha * s + e.sum(dim=1)
            m = m_new
        log_s = torch.log(s)
        lse[r0:r1] = m + log_s
        entropy[r0:r1] = log_s - t / s
        z_target[r0:r1] = zy
    return z_target, entropy, lse


def backward(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
             targets: torch.Tensor, lse: torch.Tensor, entropy: torch.Tensor,
             grad_logp: torch.Tensor | None, grad_entropy: torch.Tensor | None,
             params: LogitParams, needs: tuple[bool, bool, bool],
             dh_dtype: torch.dtype | None = None,
             ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Gradients (d hidden, d weight, d bias) of sum(g_logp*logp + g_ent*entropy).

    ``lse`` and ``entropy`` are the rows' values over the whole softmax: with a vocabulary shard
    as ``weight`` (targets relative to it, -1 for another shard's token) and the global lse and
    entropy, the result is this shard's share of d hidden and its slice of d weight / d bias.
    ``dh_dtype``: dtype of the returned d hidden (None: hidden's; the vocabulary-parallel path
    keeps the float32 accumulator for its all-reduce).

    g_z = g_logp (onehot - p) - g_ent p (z - (lse - H)); with a cap g_u = g_z (1 - (z/c)^2);
    dh = (s/tau) g_u W, dW = (s/tau) g_u^T h, db = (s/tau) sum_n g_u. Per tile: one GEMM to
    recompute z, the gradient written over z (in place for a log-prob-only gradient: one tile of
    workspace; with an entropy gradient or a soft cap two more tile-sized scratch buffers), two
    GEMMs. dW and db accumulate in float32 (float64 for float64 inputs) and are returned in the
    weight's dtype.
    """
    need_h, need_w, need_b = needs
    n, vocab = hidden.shape[0], weight.shape[0]
    cd, w, b = compute_operands(hidden, weight, bias)
    device = hidden.device
    dh = torch.zeros(n, hidden.shape[1], dtype=cd, device=device) if need_h else None
    dw = torch.zeros(vocab, weight.shape[1], dtype=cd, device=device) if need_w else None
    db = torch.zeros(vocab, dtype=cd, device=device) if need_b else None
    if n == 0 or not (need_h or need_w or need_b) or (grad_logp is None and grad_entropy is None):
        return _finish(dh, dw, db, hidden, weight, bias, dh_dtype)
    elem = torch.finfo(cd).bits // 8
    # the gradient is formed over the tile's logits, in place for a log-prob-only gradient; an
    # entropy gradient or a soft cap needs two tile-sized scratch buffers
    scratch = grad_entropy is not None or params.softcap is not None
    rows, cols = recompute_tile(n, vocab, elem, device, buffers=3 if scratch else 1)
    zbuf = torch.empty(rows, cols, dtype=cd, device=device)
    tmp = torch.empty_like(zbuf) if scratch else None
    tmp2 = torch.empty_like(tmp) if scratch else None
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        h = hidden[r0:r1].to(cd)
        y = targets[r0:r1].long()
        gl = (grad_logp[r0:r1] if grad_logp is not None
              else torch.zeros(r1 - r0, dtype=cd, device=device))
        ge = grad_entropy[r0:r1] if grad_entropy is not None else None
        row_lse = lse[r0:r1, None]
        row_ent = entropy[r0:r1, None] if ge is not None else None
        for v0 in range(0, vocab, cols):
            v1 = min(vocab, v0 + cols)
            z = tile_logits(h, w[v0:v1], None if b is None else b[v0:v1], params,
                            zbuf[: r1 - r0, : v1 - v0])
            local = y - v0
            inside = (local >= 0) & (local < v1 - v0)
            local = local.clamp(0, v1 - v0 - 1)[:, None]
            zy = z.gather(1, local) if params.softcap is not None else None
            g = logit_grad_(z, row_lse, row_ent, zy, torch.where(inside, gl, 0), gl, ge, local,
                            params, tmp, tmp2, cols)
            if need_h:
                dh[r0:r1].addmm_(g, w[v0:v1])
            if need_w:
                dw[v0:v1].addmm_(g.T, h)
            if need_b:
                db[v0:v1].add_(g.sum(dim=0))
    return _finish(dh, dw, db, hidden, weight, bias, dh_dtype)


def _finish(dh, dw, db, hidden, weight, bias, dh_dtype=None):
    return (
        None if dh is None else dh.to(dh_dtype or hidden.dtype),
        None if dw is None else dw.to(weight.dtype),
        None if db is None else db.to(bias.dtype),
    )
