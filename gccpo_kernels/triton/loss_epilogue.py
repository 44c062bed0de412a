"""Triton backend of the fused policy loss's in-forward gradient (issue 18): GEMMs on cuBLAS,
everything between them fused in two Triton kernels.

The triton twin of :mod:`gccpo_kernels.chunked.loss_grad` (same entry point, same contract:
:func:`forward_with_grad`), used by :mod:`gccpo_kernels.loss_in_forward` on the triton backend.
Per row chunk of R rows (R fixed by V, D, the dtype and the workspace budget, never by N):

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
   backward rounds anyway).
5. ``dh = G W`` (``mm_f32``), ``dW += G^T h`` (``addmm_f32_`` into a float32 accumulator),
   ``db += sum_rows G``.

Costs per row chunk (R rows, V, D): GEMMs 2RVD + 2RVD + 2RVD = 6RVD FLOPs (the composed path
recomputes the logits: 8RVD); the kernels read the [R, V] workspace twice and write it once
(12 RV bytes, 14 RV with the bf16 copy), and touch O(R) row vectors. Extra memory: the [R, V]
float32 workspace (+ its [R, V] bf16 copy for bf16 heads), [R, D] staging buffers, a float32
[V, D] accumulator for d weight (+ a float32 copy of a float16 head).

Deterministic and batch-invariant: every GEMM runs at the same shape on the same buffers
([R, D] staging in, [R, V] workspace, [R, D] staging out; the last chunk's missing rows are
zeros, its gradient rows zeroed), chunks in a fixed order, configurations pinned per
architecture, no atomics. So a row's logp, entropy and d hidden are bitwise the same whatever
other rows share the call (d weight and d bias sum over rows by definition). The price: a call
with fewer than R kept rows still runs full-chunk GEMMs (R = min(8192, workspace / (V bytes))
rows, e.g. 256 at V = 152k and 256 MiB with a bf16 head); the Triton kernels only visit the
kept rows.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import triton
import triton.language as tl

from .._gemm import addmm_f32_, mm_f32
from .._logits import LogitParams
from .._workspace import workspace_bytes
from ._utils import TL_DTYPE_NAMES, CompileCase, arch_key, tanh
from .linear_logprobs import _NEG_BIG, _fold_row_stats

# (row slice start, end, logp [rows], entropy [rows]) -> (d loss / d logp, d loss / d entropy | None)
TokenGrads = Callable[[int, int, torch.Tensor, torch.Tensor],
                      tuple[torch.Tensor, torch.Tensor | None]]


def _cfg(n: int, v: int, warps: int) -> dict[str, int]:
    return dict(BLOCK_N=n, BLOCK_V=v, num_warps=warps, num_stages=1)


# Pinned per architecture (no autotuning, nothing depends on N). Both kernels are streaming
# (memory-bound, no dot): the statistics kernel walks the whole vocabulary of a few rows per
# program (few rows per program: enough programs for every SM at R = 256), the gradient kernel
# is a 2-D elementwise grid. The interpreter's blocks are small to keep the tests fast.
CONFIGS: dict[str, dict[str, dict[str, int]]] = {
    "interpreter": {"stats": _cfg(16, 128, 4), "grad": _cfg(16, 128, 4)},
    "sm90": {"stats": _cfg(2, 2048, 8), "grad": _cfg(16, 256, 8)},
    "sm80": {"stats": _cfg(2, 2048, 8), "grad": _cfg(16, 256, 8)},
}

ROW_CHUNK = 8192  # at most this many rows per chunk (d weight's read-modify-write: once per chunk)
ROW_POW2_FROM = 64  # from this many rows on, chunks are rounded down to a power of two
V_BLOCK = 4096     # CPU only: vocabulary columns per GEMM (MKL keeps large packing buffers)


@triton.jit
def _transform(u, B, cols64, col_ok, scale, softcap, HAS_BIAS: tl.constexpr,
               HAS_CAP: tl.constexpr):
    """z = cap(s (u + b) / tau) of a raw-product tile (float32), as LogitParams.apply_ does."""
    if HAS_BIAS:
        u = u + tl.load(B + cols64, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    z = u * scale
    if HAS_CAP:
        z = softcap * tanh(z / softcap)
    return z


@triton.jit
def _row_stats_kernel(U, B, Y, LSE, ENT, LOGP, n_rows, vocab, stride_u, scale, softcap,
                      log_vocab, HAS_BIAS: tl.constexpr, HAS_CAP: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr):
    """Per row of U [n_rows, vocab] (float32 raw products h W^T): lse, entropy, logp = z_y - lse.

    Grid (cdiv(n_rows, BLOCK_N),); a program walks its rows' whole vocabulary once, BLOCK_V
    columns at a time. Targets Y are int64 in [-1, V]; -1 / V match no column (z_y = 0)."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < n_rows
    rows64 = rows.to(tl.int64)
    y = tl.load(Y + rows64, mask=row_ok, other=-1).to(tl.int32)
    m = tl.full([BLOCK_N], _NEG_BIG, tl.float32)
    s = tl.zeros([BLOCK_N], dtype=tl.float32)
    t = tl.zeros([BLOCK_N], dtype=tl.float32)
    zy = tl.zeros([BLOCK_N], dtype=tl.float32)
    for v0 in range(0, vocab, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_ok = cols < vocab
        cols64 = cols.to(tl.int64)
        ok = row_ok[:, None] & col_ok[None, :]
        u = tl.load(U + rows64[:, None] * stride_u + cols64[None, :], mask=ok, other=0.0)
        z = _transform(u, B, cols64, col_ok, scale, softcap, HAS_BIAS, HAS_CAP)
        m, s, t, zy = _fold_row_stats(z, cols, col_ok, y, m, s, t, zy)
    log_s = tl.log(s)
    lse = m + log_s
    ent = tl.minimum(tl.maximum(log_s - t / s, 0.0), log_vocab)
    tl.store(LSE + rows64, lse, mask=row_ok)
    tl.store(ENT + rows64, ent, mask=row_ok)
    tl.store(LOGP + rows64, zy - lse, mask=row_ok)


@triton.jit
def _logit_grad_kernel(U, G, B, Y, LSE, ENT, GL, GE, n_rows, vocab, stride_u, stride_g, scale,
                       softcap, HAS_BIAS: tl.constexpr, HAS_CAP: tl.constexpr,
                       HAS_GE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr):
    """d l / d u of a [BLOCK_N, BLOCK_V] tile of U (raw products) into G (U itself, or a 16-bit
    copy): g = s/tau (g_logp (onehot - p) - g_H p (z - mu)) (1 - (z/c)^2). Grid
    (cdiv(n_rows, BLOCK_N), cdiv(vocab, BLOCK_V)); each element is read once and written once
    by one program (in place is safe)."""
    pid_n = tl.program_id(0)
    pid_v = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < n_rows
    rows64 = rows.to(tl.int64)
    cols = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    col_ok = cols < vocab
    cols64 = cols.to(tl.int64)
    ok = row_ok[:, None] & col_ok[None, :]
    u = tl.load(U + rows64[:, None] * stride_u + cols64[None, :], mask=ok, other=0.0)
    z = _transform(u, B, cols64, col_ok, scale, softcap, HAS_BIAS, HAS_CAP)
    lse = tl.load(LSE + rows64, mask=row_ok, other=0.0)
    gl = tl.load(GL + rows64, mask=row_ok, other=0.0)
    p = tl.exp(z - lse[:, None])
    coef = gl[:, None]
    if HAS_GE:
        ge = tl.load(GE + rows64, mask=row_ok, other=0.0)
        mu = lse - tl.load(ENT + rows64, mask=row_ok, other=0.0)  # E_p[z] = lse - H
        coef = coef + ge[:, None] * (z - mu[:, None])
    g = -p * coef
    y = tl.load(Y + rows64, mask=row_ok, other=-1).to(tl.int32)
    g += tl.where(cols[None, :] == y[:, None], gl[:, None], 0.0)
    if HAS_CAP:  # d z / d u = 1 - tanh^2 = 1 - (z / c)^2
        zc = z / softcap
        g = g * (1.0 - zc * zc)
    g = g * scale
    tl.store(G + rows64[:, None] * stride_g + cols64[None, :], g.to(G.dtype.element_ty), mask=ok)


def chunk_rows(vocab: int, dim: int, dtype: torch.dtype, device: torch.device,
               budget: int | None = None) -> int:
    """R, the rows of every chunk: as many as fit the workspace budget with the [R, V] float32
    workspace (+ its bf16 copy for bf16) and the [R, D] staging buffers, at most ROW_CHUNK,
    rounded down to a power of two from ROW_POW2_FROM rows on (GEMM-friendly, and token counts
    that are powers of two then fill their last chunk). Depends on V, D, the dtype, the device
    and the budget only (batch invariance: never on N)."""
    budget = workspace_bytes(device) if budget is None else budget
    elem = torch.finfo(dtype).bits // 8
    per_row = vocab * (4 + (elem if dtype == torch.bfloat16 else 0)) + dim * (elem + 4)
    rows = min(ROW_CHUNK, budget // max(1, per_row))
    if rows >= ROW_POW2_FROM:
        rows = 1 << (rows.bit_length() - 1)
    return max(1, rows)


def _launch(cfg: dict[str, int]) -> dict[str, int]:
    return {"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]}


def _row_stats(u: torch.Tensor, bias: torch.Tensor | None, y: torch.Tensor, params: LogitParams,
               lse: torch.Tensor, ent: torch.Tensor, logp: torch.Tensor, cfg: dict[str, int]) -> None:
    """lse, entropy, logp ([k] each, written) of the first k = len(y) rows of the workspace u."""
    k, vocab = y.shape[0], u.shape[1]
    _row_stats_kernel[(triton.cdiv(k, cfg["BLOCK_N"]),)](
        u, bias if bias is not None else u, y, lse, ent, logp, k, vocab, u.stride(0),
        params.scale, params.softcap or 1.0, math.log(vocab), HAS_BIAS=bias is not None,
        HAS_CAP=params.softcap is not None, BLOCK_N=cfg["BLOCK_N"], BLOCK_V=cfg["BLOCK_V"],
        **_launch(cfg))


def _logit_grad_(u: torch.Tensor, g: torch.Tensor, bias: torch.Tensor | None, y: torch.Tensor,
                 lse: torch.Tensor, ent: torch.Tensor, gl: torch.Tensor, ge: torch.Tensor | None,
                 params: LogitParams, cfg: dict[str, int]) -> torch.Tensor:
    """The logit gradient of the first k = len(y) rows of ``u`` written into ``g`` (``u`` itself:
    in place; or its 16-bit copy); rows k: of ``g`` are zeroed (they enter the fixed-shape
    gradient GEMMs). Returns ``g``."""
    k, vocab = y.shape[0], u.shape[1]
    grid = (triton.cdiv(k, cfg["BLOCK_N"]), triton.cdiv(vocab, cfg["BLOCK_V"]))
    _logit_grad_kernel[grid](
        u, g, bias if bias is not None else u, y, lse, ent, gl, ge if ge is not None else gl,
        k, vocab, u.stride(0), g.stride(0), params.scale, params.softcap or 1.0,
        HAS_BIAS=bias is not None, HAS_CAP=params.softcap is not None, HAS_GE=ge is not None,
        BLOCK_N=cfg["BLOCK_N"], BLOCK_V=cfg["BLOCK_V"], **_launch(cfg))
    if k < g.shape[0]:
        g[k:].zero_()
    return g


def _raw_logits(h: torch.Tensor, w: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """u = h W^T ([R, D] x [D, V] -> float32 [R, V]): one GEMM on CUDA, V_BLOCK-column GEMMs on
    the CPU (always the same blocks: the shapes stay fixed)."""
    vocab = w.shape[0]
    step = vocab if u.is_cuda else V_BLOCK
    for v0 in range(0, vocab, step):
        mm_f32(h, w[v0:v0 + step].T, out=u[:, v0:v0 + step])
    return u


def forward_with_grad(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                      targets: torch.Tensor, params: LogitParams, token_grads: TokenGrads,
                      needs: tuple[bool, bool, bool], budget: int | None = None,
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None,
                                 torch.Tensor | None, torch.Tensor | None]:
    """(logp [N], entropy [N], d hidden [N, D] | None, d weight [V, D] | None, d bias [V] | None),
    all float32: the contract of :func:`gccpo_kernels.chunked.loss_grad.forward_with_grad`.

    hidden [N, D] and weight [V, D] (contiguous rows; float16 / bfloat16 / float32, the same
    dtype), bias [V] | None, targets [N] in [0, V), or -1 / V for an out-of-range id (its logit
    reads 0, no one-hot gradient; ignored rows are dropped by the caller). ``token_grads(r0, r1,
    logp, entropy)`` gives the loss's derivatives for rows r0:r1 (the entropy one None when the
    loss does not read the entropy); ``needs`` says which of (hidden, weight, bias) get a
    gradient. ``budget``: workspace bytes (default ``GCCPO_WORKSPACE_MB``).

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
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        k = r1 - r0
        h_in[:k].copy_(hidden[r0:r1])
        if k < rows:
            h_in[k:].zero_()
        y = targets[r0:r1].contiguous()
        _raw_logits(h_in, weight, u)
        _row_stats(u, bias, y, params, lse, ent, logp[r0:r1], scfg)
        entropy[r0:r1] = ent[:k]
        gl, ge = token_grads(r0, r1, logp[r0:r1], entropy[r0:r1])
        gl = gl.to(f32).contiguous()
        ge = None if ge is None else ge.to(f32).contiguous()
        g = _logit_grad_(u, g16 if sixteen else u, bias, y, lse, ent, gl, ge, params, gcfg)
        if need_b:
            db.add_(g.sum(dim=0, dtype=f32))
        if need_h:
            dh[r0:r1] = mm_f32(g, w_grad, out=dh_out)[:k]
        if need_w:
            hg = h_in if w_grad is weight else h_in.float()
            step = vocab if device.type == "cuda" else V_BLOCK
            for v0 in range(0, vocab, step):
                addmm_f32_(dw[v0:v0 + step], g[:, v0:v0 + step].T, hg)
    return logp, entropy, dh, dw, db


def compile_cases(arch: str) -> list[CompileCase]:
    """Both kernels at the pinned configuration of ``arch``: bias-free / uncapped / no entropy
    term, and every flag on with a bf16, fp16 and fp32 bias and (bf16) a 16-bit gradient output."""
    cases = []
    scfg, gcfg = CONFIGS[arch]["stats"], CONFIGS[arch]["grad"]
    for dtype, full in ((torch.bfloat16, False), (torch.bfloat16, True), (torch.float16, True),
                        (torch.float32, True)):
        t = TL_DTYPE_NAMES[dtype]
        tag = f"{t}{'-all-flags' if full else ''}"
        flags = {"HAS_BIAS": full, "HAS_CAP": full}
        st_const = {**flags, "BLOCK_N": scfg["BLOCK_N"], "BLOCK_V": scfg["BLOCK_V"]}
        st_sig = {"U": "*fp32", "B": f"*{t}", "Y": "*i64", "LSE": "*fp32", "ENT": "*fp32",
                  "LOGP": "*fp32", "n_rows": "i32", "vocab": "i32", "stride_u": "i64",
                  "scale": "fp32", "softcap": "fp32", "log_vocab": "fp32",
                  **{k: "constexpr" for k in st_const}}
        cases.append(CompileCase(f"row_stats-{tag}", _row_stats_kernel, st_sig, st_const,
                                 scfg["num_warps"], scfg["num_stages"], uses_dot=False,
                                 divisible_ints=("vocab", "stride_u")))
        out = t if dtype == torch.bfloat16 else "fp32"
        gr_const = {**flags, "HAS_GE": full, "BLOCK_N": gcfg["BLOCK_N"],
                    "BLOCK_V": gcfg["BLOCK_V"]}
        gr_sig = {"U": "*fp32", "G": f"*{out}", "B": f"*{t}", "Y": "*i64", "LSE": "*fp32",
                  "ENT": "*fp32", "GL": "*fp32", "GE": "*fp32", "n_rows": "i32", "vocab": "i32",
                  "stride_u": "i64", "stride_g": "i64", "scale": "fp32", "softcap": "fp32",
                  **{k: "constexpr" for k in gr_const}}
        cases.append(CompileCase(f"logit_grad-{tag}", _logit_grad_kernel, gr_sig, gr_const,
                                 gcfg["num_warps"], gcfg["num_stages"], uses_dot=False,
                                 divisible_ints=("vocab", "stride_u", "stride_g")))
    return cases
