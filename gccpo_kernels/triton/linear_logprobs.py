"""Triton backend for SPEC §1: fused LM-head log-probs and entropy (issue 18's design: GEMMs on
cuBLAS, everything between them in the Triton epilogues of :mod:`.logit_epilogues`).

Forward, per chunk of R rows (R = :func:`.logit_epilogues.chunk_rows`: a function of V, D, the
dtype and the workspace budget, never of N): the rows are staged into a fixed [R, D] buffer (the
last chunk's missing rows zeroed), ``U = h W^T`` by one GEMM with a float32 result into a [R, V]
float32 workspace, and ``_row_stats_kernel`` reads U once for each row's lse, entropy and target
logit. 2 N_pad V D FLOPs, one write and one read of the workspace per chunk.

Backward: **vocabulary slices outside, row chunks inside** (:func:`.logit_epilogues.slice_tile`:
[R, Vc], R = 1024 rows by default). For each slice W_v of Vc rows of the head, for each row
chunk: recompute ``U = h_c W_v^T`` (cuBLAS), ``_logit_grad_kernel`` turns it into the logit
gradient G (in place, or into a 16-bit copy that the GEMMs read), ``dh_c += G W_v`` (a float32
[N_pad, D] accumulator, O(N D)) and ``dW_v += G^T h_c`` into a float32 [Vc, D] slice accumulator,
which is written once into d weight when the slice is done (a float32 head accumulates straight
into its gradient). d bias sums the float32 G (kept over U beside the 16-bit copy when a bias
gradient is needed), never the rounded copy. With several row chunks, a chunk's rows are staged
again for every slice (one [R, D] copy per three [R, Vc, D] GEMMs: under 0.5 % of the time at
Vc = 26112); a single chunk is staged once. So nothing of size V x D exists in float32 besides
the gradient itself, where the previous design held a V x D float32 accumulator for the whole
call (2.4 GiB of a 2.9 GiB peak at V D = 622M). 6 N_pad V D FLOPs (recompute, d hidden,
d weight): forward + backward 8NVD, the floor for a method that does not store logits.

Deterministic and batch-invariant: every GEMM runs at a fixed shape ([R, D] staging, [R, V] or
[R, Vc] workspace), slices and chunks in a fixed order, no atomics; a row's logp, entropy and
d hidden are bitwise the same whatever rows share its call. The price: a call with fewer than R
rows still runs full-chunk GEMMs (the Triton kernels only visit the real rows).
"""

from __future__ import annotations

import torch

from .._gemm import addmm_f32_
from .._logits import LogitParams
from .._validation import out_dtype_for
from ._utils import arch_key
from .logit_epilogues import (CONFIGS, chunk_rows, logit_grad_, raw_logits, row_stats,
                              slice_tile, stage_rows)


def forward(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
            targets: torch.Tensor, params: LogitParams,
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """hidden [N, D], weight [V, D] (contiguous rows), targets [N] in [0, V) -> (logp, entropy, lse).

    Outputs float32 [N]. Extra memory: the [R, V] float32 workspace and an [R, D] staging buffer.
    """
    z_target, entropy, lse = forward_stats(hidden, weight, bias, targets, params)
    return z_target.sub_(lse), entropy, lse


def forward_stats(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                  targets: torch.Tensor, params: LogitParams,
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`forward`'s statistics before the last subtraction: (target logit z_y, entropy,
    lse), each float32 [N]. A target outside [0, V) (e.g. -1: another vocabulary shard's token)
    matches no column and gives z_y = 0. The vocabulary-parallel path combines these across
    shards; the kernels are the same."""
    n, dim = hidden.shape
    vocab = weight.shape[0]
    device, f32 = hidden.device, torch.float32
    z_target = torch.empty(n, dtype=f32, device=device)
    entropy, lse = torch.empty_like(z_target), torch.empty_like(z_target)
    if n == 0:
        return z_target, entropy, lse
    cfg = CONFIGS[arch_key(device)]["stats"]
    rows = chunk_rows(vocab, dim, hidden.dtype, device, gradient=False)
    u = torch.empty(rows, vocab, dtype=f32, device=device)
    h_in = torch.empty(rows, dim, dtype=hidden.dtype, device=device)
    stats = torch.empty(3, rows, dtype=f32, device=device)  # lse, entropy, z_y of one chunk
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        k = r1 - r0
        raw_logits(stage_rows(hidden, r0, r1, h_in), weight, u)
        row_stats(u, bias, targets[r0:r1].contiguous(), params, stats[0], stats[1], stats[2], cfg)
        lse[r0:r1], entropy[r0:r1], z_target[r0:r1] = stats[0, :k], stats[1, :k], stats[2, :k]
    return z_target, entropy, lse


def backward(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
             targets: torch.Tensor, lse: torch.Tensor, entropy: torch.Tensor,
             grad_logp: torch.Tensor | None, grad_entropy: torch.Tensor | None,
             params: LogitParams, needs: tuple[bool, bool, bool],
             dh_dtype: torch.dtype | None = None,
             ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """(d hidden, d weight, d bias) of sum(g_logp * logp + g_ent * entropy); see module docstring.

    ``lse`` and ``entropy`` are the rows' values over the whole softmax: given a vocabulary
    shard as ``weight`` (targets relative to it, -1 for another shard's token) and the global
    lse and entropy, the same kernels give this shard's share of d hidden and its slice of
    d weight / d bias. ``dh_dtype``: dtype of the returned d hidden (None: hidden's; the
    vocabulary-parallel path keeps the float32 accumulator for its all-reduce). The workspace
    budget is ``GCCPO_WORKSPACE_MB``'s (:mod:`gccpo_kernels._workspace`).

    Memory besides the outputs: the [R, Vc] float32 chunk (+ its 16-bit copy), an [R, D] staging
    buffer, a float32 [Vc, D] slice accumulator (16-bit heads only) and the float32 [N_pad, D]
    d hidden accumulator. GEMM FLOPs: 2 N_pad V D per needed gradient plus 2 N_pad V D for the
    recompute.
    """
    need_h, need_w, need_b = needs
    n, dim = hidden.shape
    vocab = weight.shape[0]
    device, dtype, f32 = hidden.device, hidden.dtype, torch.float32
    db = torch.zeros(vocab, dtype=f32, device=device) if need_b else None
    dh_type = dh_dtype or dtype
    if n == 0 or not (need_h or need_w or need_b) or (grad_logp is None and grad_entropy is None):
        dh = torch.zeros(n, dim, dtype=dh_type, device=device) if need_h else None
        dw = torch.zeros(vocab, dim, dtype=weight.dtype, device=device) if need_w else None
        return dh, dw, None if db is None else db.to(bias.dtype)
    sixteen = dtype != f32
    # a 16-bit d weight is written slice by slice (copied from the float32 slice accumulator);
    # a float32 one accumulates in place
    dw = (torch.empty if sixteen else torch.zeros)(vocab, dim, dtype=weight.dtype,
                                                    device=device) if need_w else None
    cfg = CONFIGS[arch_key(device)]["grad"]
    rows, cols = slice_tile(vocab, dim, dtype, device)
    n_pad = -(-n // rows) * rows
    u = torch.empty(rows, cols, dtype=f32, device=device)             # recomputed logits, then G
    g16 = torch.empty(rows, cols, dtype=dtype, device=device) if sixteen else None
    h_in = torch.empty(rows, dim, dtype=dtype, device=device)
    acc_type = out_dtype_for(dtype)
    dh = torch.zeros(n_pad, dim, dtype=acc_type, device=device) if need_h else None
    dw_acc = torch.empty(cols, dim, dtype=acc_type, device=device) if need_w and sixteen else None
    gl_all = (grad_logp if grad_logp is not None else torch.zeros_like(lse)).to(f32).contiguous()
    ge_all = None if grad_entropy is None else grad_entropy.to(f32).contiguous()
    lse, entropy = lse.to(f32).contiguous(), entropy.to(f32).contiguous()
    y_all = targets.long()
    single = n <= rows
    for v0 in range(0, vocab, cols):
        v1 = min(vocab, v0 + cols)
        w_v = weight[v0:v1]
        b_v = None if bias is None else bias[v0:v1]
        acc_w = None
        if need_w:
            acc_w = dw_acc[: v1 - v0].zero_() if sixteen else dw[v0:v1]
        for r0 in range(0, n, rows):
            r1 = min(n, r0 + rows)
            # one chunk: staged once for every slice; several: restaged (the buffer is shared)
            h_c = h_in if single and v0 > 0 else stage_rows(hidden, r0, r1, h_in)
            u_v = raw_logits(h_c, w_v, u[:, : v1 - v0])
            g = logit_grad_(u_v, g16[:, : v1 - v0] if sixteen else u_v, b_v,
                            (y_all[r0:r1] - v0).contiguous(), lse[r0:r1], entropy[r0:r1],
                            gl_all[r0:r1], None if ge_all is None else ge_all[r0:r1], params, cfg,
                            keep_f32=need_b)
            if need_h:
                addmm_f32_(dh[r0:r0 + rows], g, w_v)
            if need_w:
                addmm_f32_(acc_w, g.T, h_c)
            if need_b:  # from the float32 gradient (kept over u_v), not its rounded copy
                db[v0:v1].add_(u_v[: r1 - r0].sum(dim=0))
        if need_w and sixteen:
            dw[v0:v1].copy_(acc_w)
    return (None if dh is None else dh[:n].to(dh_type),
            dw,
            None if db is None else db.to(bias.dtype))
