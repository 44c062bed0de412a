"""Triton backend of the fused policy loss's in-forward gradient (issue 18): GEMMs on cuBLAS,
everything between them fused in two Triton kernels.

The triton twin of :mod:`gccpo_kernels.chunked.loss_grad` (same entry point, same contract:
:func:`forward_with_grad`), used by :mod:`gccpo_kernels.loss_in_forward` on the triton backend.
Per row chunk of R rows (R fixed by V, D, the dtype and the workspace budget, never by N):

Steps 1, 2 and 4 are the shared epilogues of :mod:`.logit_epilogues`.

1. ``U = h_chunk W^T`` — one GEMM (``_gemm.mm_f32``: bf16 / fp16 operands, float32 result on
   cuBLAS) into a float32 [R, V] workspace. U is the raw product: bias, scale s / tau and the
   soft cap are applied inside the kernels, on the fly (z = cap(s (U + b) / tau)), so the logits
   are never written back transformed.
2. ``_row_stats_kernel`` — one pass, one read of U per row block: online max m, s = sum e^{z-m},
   t = sum e^{z-m} (z - m) and the target logit z_y, giving lse = m + log s, entropy
   H = log s - t / s (clamped to [0, log V] as the torch path does) and logp = z_y - lse. One
   pass suffices: the entropy needs only these running sums, so no second pass is made.
3. ``token_grads`` — the loss's d l / d logp and d l / d H on [rows] vectors, from the one copy
   of the loss math (:func:`gccpo_kernels.policy_loss.policy_loss` through autograd, in
   :mod:`gccpo_kernels.loss_in_forward`); nothing of the loss is re-implemented here.
4. ``_logit_grad_kernel`` — elementwise over a 2-D grid of [BLOCK_N, BLOCK_V] tiles, one read of
   U and one write: g = (s / tau) (g_logp (onehot - p) - g_H p (z - mu)) (1 - (z / c)^2) with
   p = e^{z - lse}, mu = lse - H, written in place over U (float32; float16 heads too, whose
   gradient GEMMs run in float32 so small gradients are not flushed before the loss scale
   arrives), or into a bfloat16 copy for bfloat16 heads (the operand cuBLAS reads; what a bf16
   backward rounds anyway). With a bias gradient the float32 G is also kept over U.
5. ``dh = G W`` (``mm_f32``), ``dW += G^T h`` (``addmm_f32_`` into a float32 accumulator),
   ``db += sum_rows G`` (of the float32 G: a sum of the rounded copy would carry 2^-9 relative
   error per row, which cancelling rows do not average away).

Costs per row chunk (R rows, V, D): GEMMs 2RVD + 2RVD + 2RVD = 6RVD FLOPs (the composed path
recomputes the logits: 8RVD); the kernels read the [R, V] workspace twice and write the gradient
once: 12 RV bytes in place (float32), 10 RV into the bf16 copy, 14 RV with the copy and a bias
gradient (the float32 G also kept over U; its column sums then read 4 RV more); plus O(R) row
vectors. Extra memory: the [R, V] float32 workspace (+ its [R, V] bf16 copy for bf16 heads),
[R, D] staging buffers, a float32 [V, D] accumulator for d weight (+ a float32 copy of a float16
head).

Deterministic and batch-invariant: every GEMM runs at the same shape on the same buffers
([R, D] staging in, [R, V] workspace, [R, D] staging out; the last chunk's missing rows are
zeros, its gradient rows zeroed), chunks in a fixed order, configurations pinned per
architecture, no atomics. So a row's logp, entropy and d hidden are bitwise the same whatever
other rows share the call (d weight and d bias sum over rows by definition). The price: a call
with fewer than R kept rows still runs full-chunk GEMMs (R = min(8192, workspace / (V bytes))
rows, e.g. 1024 at V = 152k and the 1 GiB CUDA default with a bf16 head); the Triton kernels only visit the
kept rows.
"""

from __future__ import annotations

from typing import Callable

import torch

from .._gemm import addmm_f32_, mm_f32
from .._logits import LogitParams
from ._utils import CompileCase, arch_key
from .logit_epilogues import (CONFIGS, V_BLOCK, chunk_rows, logit_grad_, raw_logits, row_stats,
                              stage_rows)

# (row slice start, end, logp [rows], entropy [rows]) -> (d loss / d logp, d loss / d entropy | None)
TokenGrads = Callable[[int, int, torch.Tensor, torch.Tensor],
                      tuple[torch.Tensor, torch.Tensor | None]]


def forward_with_grad(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                      targets: torch.Tensor, params: LogitParams, token_grads: TokenGrads,
                      needs: tuple[bool, bool, bool], budget: int | None = None,
                      reads_entropy: bool = True,
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None,
                                 torch.Tensor | None, torch.Tensor | None]:
    """(logp [N], entropy [N], d hidden [N, D] | None, d weight [V, D] | None, d bias [V] | None),
    all float32: the contract of :func:`gccpo_kernels.chunked.loss_grad.forward_with_grad`.

    hidden [N, D] and weight [V, D] (contiguous rows; float16 / bfloat16 / float32, the same
    dtype), bias [V] | None, targets [N] in [0, V), or -1 / V for an out-of-range id (its logit
    reads 0, no one-hot gradient; ignored rows are dropped by the caller). ``token_grads(r0, r1,
    logp, entropy)`` gives the loss's derivatives for rows r0:r1 (the entropy one None when the
    loss does not read the entropy); ``needs`` says which of (hidden, weight, bias) get a
    gradient. ``budget``: workspace bytes (default ``GCCPO_WORKSPACE_MB``). ``reads_entropy``: part
    of the contract, unused here (the Triton gradient kernel reads the logits once either way).

    Never materialized: anything of N x V; the workspace is [R, V] with R from
    :func:`chunk_rows`. GEMM FLOPs: 2 N_pad V D (logits) + 2 N_pad V D (d hidden, when needed) +
    2 N_pad V D (d weight, when needed), N_pad = N rounded up to a multiple of R.
    """
    need_h, need_w, need_b = needs
    n, dim = hidden.shape
    vocab = weight.shape[0]
    device, dtype = hidden.device, hidden.dtype
    f32 = torch.float32
    logp = torch.empty(n, dtype=f32, device=device)
    entropy = torch.empty_like(logp)
    dh = torch.empty(n, dim, dtype=f32, device=device) if need_h else None
    dw = torch.zeros(vocab, dim, dtype=f32, device=device) if need_w else None
    db = torch.zeros(vocab, dtype=f32, device=device) if need_b else None
    if n == 0:
        return logp, entropy, dh, dw, db
    arch = arch_key(device)
    scfg, gcfg = CONFIGS[arch]["stats"], CONFIGS[arch]["grad"]
    rows = chunk_rows(vocab, dim, dtype, device, budget)
    # bf16: the gradient GEMMs read a bf16 copy of G (written by the kernel, no extra pass);
    # fp16 would flush small gradients to zero before the loss scale arrives, so its gradient
    # GEMMs run in float32 (an O(V D) float32 copy of the head), as on the torch backend
    sixteen = dtype == torch.bfloat16
    w_grad = weight.float() if dtype == torch.float16 else weight
    u = torch.empty(rows, vocab, dtype=f32, device=device)       # raw logits, then G in place
    g16 = torch.empty(rows, vocab, dtype=dtype, device=device) if sixteen else None
    h_in = torch.zeros(rows, dim, dtype=dtype, device=device)    # zeroed staging: fixed shapes
    dh_out = torch.empty(rows, dim, dtype=f32, device=device) if need_h else None
    lse = torch.empty(rows, dtype=f32, device=device)
    ent = torch.empty_like(lse)
    zy = torch.empty_like(lse)
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        k = r1 - r0
        stage_rows(hidden, r0, r1, h_in)
        y = targets[r0:r1].contiguous()
        raw_logits(h_in, weight, u)
        row_stats(u, bias, y, params, lse, ent, zy, scfg)
        torch.sub(zy[:k], lse[:k], out=logp[r0:r1])
        entropy[r0:r1] = ent[:k]
        gl, ge = token_grads(r0, r1, logp[r0:r1], entropy[r0:r1])
        gl = gl.to(f32).contiguous()
        ge = None if ge is None else ge.to(f32).contiguous()
        g = logit_grad_(u, g16 if sixteen else u, bias, y, lse, ent, gl, ge, params, gcfg,
                        keep_f32=need_b)
        if need_b:  # from the float32 gradient (kept over u), not its rounded 16-bit copy
            db.add_(u[:k].sum(dim=0))
        if need_h:
            dh[r0:r1] = mm_f32(g, w_grad, out=dh_out)[:k]
        if need_w:
            hg = h_in if w_grad is weight else h_in.float()
            step = vocab if device.type == "cuda" else V_BLOCK
            for v0 in range(0, vocab, step):
                addmm_f32_(dw[v0:v0 + step], g[:, v0:v0 + step].T, hg)
    return logp, entropy, dh, dw, db
