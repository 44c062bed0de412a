"""Triton epilogues over a float32 chunk of raw logits from cuBLAS (issue 18's design).

Every LM-head op of the triton backend that needs logits (the SPEC §1 primitive forward and
backward, the fused policy loss's in-forward gradient) runs the same three steps per fixed-shape
chunk: the raw product ``U = h W^T`` by one cuBLAS GEMM with a float32 result
(:func:`_raw_logits`, ``_gemm.mm_f32``: bf16 / fp16 operands at the tensor-core rate), then one
of two streaming Triton kernels over U, then (for gradients) two more cuBLAS GEMMs. This module
holds the kernels and their launchers; the callers own the chunk loops.

- ``_row_stats_kernel`` — one pass, one read of U per row block: online max m,
  s = sum e^{z-m}, t = sum e^{z-m} (z - m) and the target logit z_y (``_fold_row_stats``), giving
  lse = m + log s and entropy H = log s - t / s (clamped to [0, log V]). Needs the row's whole
  vocabulary in U (a [R, V] chunk).
- ``_logit_grad_kernel`` — elementwise over [BLOCK_N, BLOCK_V] tiles, one read of U and one
  write: g = (s / tau) (g_logp (onehot - p) - g_H p (z - mu)) (1 - (z / c)^2), p = e^{z - lse},
  mu = lse - H, written in place over U (float32) or into a 16-bit copy (the operand of the
  gradient GEMMs). Works on any [R, Vc] column slice of the vocabulary (targets shifted by the
  slice's first column), given each row's lse and H.

z = cap(s (U + b) / tau) is applied on the fly inside both kernels, so U is never written back
transformed. Both kernels are memory-bound (no dot): bytes per chunk element read 4 (+4 or +2 to
write the gradient). Configurations are pinned per architecture, never by N (batch invariance).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .._gemm import mm_f32
from .._logits import LogitParams
from .._workspace import workspace_bytes
from ._utils import TL_DTYPE_NAMES, CompileCase, tanh

_NEG_BIG = tl.constexpr(-1.0e30)  # finite "minus infinity" for running maxima: 0 * _NEG_BIG stays finite


@triton.jit
def _fold_row_stats(z, cols, col_ok, y, m, s, t, zy):
    """Fold a [rows, cols] logit tile into each row's online softmax statistics: running max m,
    s = sum e^(z - m), t = sum e^(z - m) (z - m), and the target logit zy (columns outside
    ``col_ok`` match no target and add nothing). Returns the updated ``(m, s, t, zy)``; the one
    copy of this fold, shared by the SPEC §1 forward and the in-forward loss's row statistics."""
    zy += tl.sum(tl.where((cols[None, :] == y[:, None]) & col_ok[None, :], z, 0.0), axis=1)
    z = tl.where(col_ok[None, :], z, _NEG_BIG)
    m_new = tl.maximum(m, tl.max(z, axis=1))
    alpha = tl.exp(m - m_new)
    zc = z - m_new[:, None]
    e = tl.where(col_ok[None, :], tl.exp(zc), 0.0)
    # t tracks sum e (z - m) for the current m: shifting m by d adds s * d before rescaling
    t = alpha * (t + s * (m - m_new)) + tl.sum(e * zc, axis=1)
    s = alpha * s + tl.sum(e, axis=1)
    return m_new, s, t, zy


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
SLICE_ROWS_MAX = 4096  # rows per chunk of a vocabulary-slice backward, at most (see slice_tile)
MIN_SLICE_COLS = 256
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
def _row_stats_kernel(U, B, Y, LSE, ENT, ZY, n_rows, vocab, stride_u, scale, softcap,
                      log_vocab, HAS_BIAS: tl.constexpr, HAS_CAP: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr):
    """Per row of U [n_rows, vocab] (float32 raw products h W^T): lse, entropy, target logit z_y.

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
    ent = log_s - t / s
    # clamped to [0, log V] (rounding), NaN kept: a non-finite row must not read as a finite 0
    ent = tl.where(ent != ent, ent, tl.minimum(tl.maximum(ent, 0.0), log_vocab))
    tl.store(LSE + rows64, lse, mask=row_ok)
    tl.store(ENT + rows64, ent, mask=row_ok)
    tl.store(ZY + rows64, zy, mask=row_ok)


@triton.jit
def _logit_grad_kernel(U, G, B, Y, LSE, ENT, GL, GE, n_rows, vocab, stride_u, stride_g, scale,
                       softcap, HAS_BIAS: tl.constexpr, HAS_CAP: tl.constexpr,
                       HAS_GE: tl.constexpr, KEEP_F32: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_V: tl.constexpr):
    """d l / d u of a [BLOCK_N, BLOCK_V] tile of U (raw products) into G (U itself, or a 16-bit
    copy): g = s/tau (g_logp (onehot - p) - g_H p (z - mu)) (1 - (z/c)^2). ``KEEP_F32`` (G a
    16-bit copy): g is also written over U in float32, for the bias gradient's column sums (a
    sum of the rounded copy would carry its 2^-9 relative error per term). Grid
    (cdiv(n_rows, BLOCK_N), cdiv(vocab, BLOCK_V)); each element is read once and written once
    (twice with KEEP_F32) by one program (in place is safe)."""
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
    if KEEP_F32:
        tl.store(U + rows64[:, None] * stride_u + cols64[None, :], g, mask=ok)


def chunk_rows(vocab: int, dim: int, dtype: torch.dtype, device: torch.device,
               budget: int | None = None, *, gradient: bool = True) -> int:
    """R, the rows of every full-vocabulary chunk: as many as fit the workspace budget with the
    [R, V] float32 workspace (+ its bf16 gradient copy when ``gradient`` and the head is bf16) and
    the [R, D] staging buffers, at most ROW_CHUNK, rounded down to a power of two from
    ROW_POW2_FROM rows on (GEMM-friendly, and token counts that are powers of two then fill their
    last chunk). Depends on V, D, the dtype, the device and the budget only (batch invariance:
    never on N)."""
    budget = workspace_bytes(device) if budget is None else budget
    elem = torch.finfo(dtype).bits // 8
    copy = elem if gradient and dtype == torch.bfloat16 else 0
    per_row = vocab * (4 + copy) + dim * (elem + 4)
    return pow2_rows(min(ROW_CHUNK, budget // max(1, per_row)))


def pow2_rows(rows: int) -> int:
    """``rows`` rounded down to a power of two from ROW_POW2_FROM rows on; at least 1."""
    if rows >= ROW_POW2_FROM:
        rows = 1 << (rows.bit_length() - 1)
    return max(1, rows)


def slice_tile(vocab: int, dim: int, dtype: torch.dtype, device: torch.device,
               budget: int | None = None) -> tuple[int, int]:
    """(R, Vc): the [R, Vc] chunk of a backward that walks vocabulary slices outside and row
    chunks inside (the SPEC §1 primitive's). Each row chunk reads and writes the float32 [Vc, D]
    d-weight slice once (8 V D bytes per row chunk over the whole vocabulary) and each slice reads
    and writes the float32 d hidden once (8 N D bytes per slice), so R and Vc are balanced: R is
    the largest power of two up to SLICE_ROWS_MAX for which Vc >= min(R, V) columns fit the
    budget with the float32 chunk, its 16-bit gradient copy and the [Vc, D] slice accumulator of
    a 16-bit head (e.g. R = 4096 with Vc = 26112 at the 1 GiB CUDA default, Vc = 6400 at
    256 MiB, V = 152k, D = 4096, bf16); Vc a multiple of MIN_SLICE_COLS, at most V. Under a tiny
    budget: MIN_SLICE_COLS columns and as many rows as fit. Like :func:`chunk_rows`, a function of V, D, the dtype, the device and the budget only
    (never N: batch invariance)."""
    budget = workspace_bytes(device) if budget is None else budget
    elem = torch.finfo(dtype).bits // 8
    copy = elem if dtype != torch.float32 else 0
    acc = 4 * dim if dtype != torch.float32 else 0

    def fit_cols(rows: int) -> int:
        return budget // (rows * (4 + copy) + acc)

    rows = SLICE_ROWS_MAX
    while rows > ROW_POW2_FROM and fit_cols(rows) < min(rows, vocab):
        rows //= 2
    cols = fit_cols(rows)
    if cols < MIN_SLICE_COLS:
        cols = min(vocab, MIN_SLICE_COLS)
        rows = pow2_rows(max(1, (budget - acc * cols) // max(1, cols * (4 + copy))))
    cols = min(vocab, max(MIN_SLICE_COLS, cols // MIN_SLICE_COLS * MIN_SLICE_COLS))
    return rows, cols


def stage_rows(src: torch.Tensor, r0: int, r1: int, staging: torch.Tensor) -> torch.Tensor:
    """Rows r0:r1 of ``src`` copied into the fixed-shape ``staging`` buffer [R, D], its rows past
    r1 - r0 zeroed: every GEMM then runs at the same shape on the same buffer, whatever N is."""
    k = r1 - r0
    staging[:k].copy_(src[r0:r1])
    if k < staging.shape[0]:
        staging[k:].zero_()
    return staging


def _launch(cfg: dict[str, int]) -> dict[str, int]:
    return {"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]}


def row_stats(u: torch.Tensor, bias: torch.Tensor | None, y: torch.Tensor, params: LogitParams,
               lse: torch.Tensor, ent: torch.Tensor, zy: torch.Tensor, cfg: dict[str, int]) -> None:
    """lse, entropy and target logit z_y (written into the first k = len(y) entries of each) of
    the first k rows of the [R, V] workspace u; a target outside [0, V) gives z_y = 0."""
    k, vocab = y.shape[0], u.shape[1]
    _row_stats_kernel[(triton.cdiv(k, cfg["BLOCK_N"]),)](
        u, bias if bias is not None else u, y, lse, ent, zy, k, vocab, u.stride(0),
        params.scale, params.softcap or 1.0, math.log(vocab), HAS_BIAS=bias is not None,
        HAS_CAP=params.softcap is not None, BLOCK_N=cfg["BLOCK_N"], BLOCK_V=cfg["BLOCK_V"],
        **_launch(cfg))


def logit_grad_(u: torch.Tensor, g: torch.Tensor, bias: torch.Tensor | None, y: torch.Tensor,
                 lse: torch.Tensor, ent: torch.Tensor, gl: torch.Tensor, ge: torch.Tensor | None,
                 params: LogitParams, cfg: dict[str, int], keep_f32: bool = False
                 ) -> torch.Tensor:
    """The logit gradient of the first k = len(y) rows of ``u`` written into ``g`` (``u`` itself:
    in place; or its 16-bit copy); rows k: of ``g`` are zeroed (they enter the fixed-shape
    gradient GEMMs). ``keep_f32`` (``g`` a 16-bit copy): the first k rows of ``u`` also receive
    the gradient in float32 (what the bias gradient sums; one more [k, V] float32 write). Returns
    ``g``."""
    k, vocab = y.shape[0], u.shape[1]
    keep_f32 = keep_f32 and g.data_ptr() != u.data_ptr()
    grid = (triton.cdiv(k, cfg["BLOCK_N"]), triton.cdiv(vocab, cfg["BLOCK_V"]))
    _logit_grad_kernel[grid](
        u, g, bias if bias is not None else u, y, lse, ent, gl, ge if ge is not None else gl,
        k, vocab, u.stride(0), g.stride(0), params.scale, params.softcap or 1.0,
        HAS_BIAS=bias is not None, HAS_CAP=params.softcap is not None, HAS_GE=ge is not None,
        KEEP_F32=keep_f32, BLOCK_N=cfg["BLOCK_N"], BLOCK_V=cfg["BLOCK_V"], **_launch(cfg))
    if k < g.shape[0]:
        g[k:].zero_()
    return g


def raw_logits(h: torch.Tensor, w: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """u = h W^T ([R, D] x [D, V] -> float32 [R, V]): one GEMM on CUDA, V_BLOCK-column GEMMs on
    the CPU (always the same blocks: the shapes stay fixed)."""
    vocab = w.shape[0]
    step = max(vocab, 1) if u.is_cuda else V_BLOCK
    for v0 in range(0, vocab, step):
        mm_f32(h, w[v0:v0 + step].T, out=u[:, v0:v0 + step])
    return u


def compile_cases(arch: str) -> list[CompileCase]:
    """Both kernels at the pinned configuration of ``arch``: bias-free / uncapped / no entropy
    term, and every flag on with a bf16, fp16 and fp32 bias; the gradient kernel with a float32
    output and, for 16-bit heads, with the 16-bit copy as its output (with every flag on, also
    keeping the float32 gradient over U: ``KEEP_F32``, what a bias gradient needs)."""
    cases = []
    scfg, gcfg = CONFIGS[arch]["stats"], CONFIGS[arch]["grad"]
    for dtype, full in ((torch.bfloat16, False), (torch.bfloat16, True), (torch.float16, True),
                        (torch.float32, True)):
        t = TL_DTYPE_NAMES[dtype]
        tag = f"{t}{'-all-flags' if full else ''}"
        flags = {"HAS_BIAS": full, "HAS_CAP": full}
        st_const = {**flags, "BLOCK_N": scfg["BLOCK_N"], "BLOCK_V": scfg["BLOCK_V"]}
        st_sig = {"U": "*fp32", "B": f"*{t}", "Y": "*i64", "LSE": "*fp32", "ENT": "*fp32",
                  "ZY": "*fp32", "n_rows": "i32", "vocab": "i32", "stride_u": "i64",
                  "scale": "fp32", "softcap": "fp32", "log_vocab": "fp32",
                  **{k: "constexpr" for k in st_const}}
        cases.append(CompileCase(f"row_stats-{tag}", _row_stats_kernel, st_sig, st_const,
                                 scfg["num_warps"], scfg["num_stages"], uses_dot=False,
                                 divisible_ints=("vocab", "stride_u")))
        # the gradient's output: in place (float32), or the 16-bit copy the GEMMs read (bf16 for
        # the loss and the primitive, fp16 for the primitive), then with its float32 twin kept
        # over U for a bias gradient (every flag on)
        for out in ("fp32", t) if dtype != torch.float32 else ("fp32",):
            gr_const = {**flags, "HAS_GE": full, "KEEP_F32": full and out != "fp32",
                        "BLOCK_N": gcfg["BLOCK_N"], "BLOCK_V": gcfg["BLOCK_V"]}
            gr_sig = {"U": "*fp32", "G": f"*{out}", "B": f"*{t}", "Y": "*i64", "LSE": "*fp32",
                      "ENT": "*fp32", "GL": "*fp32", "GE": "*fp32", "n_rows": "i32",
                      "vocab": "i32", "stride_u": "i64", "stride_g": "i64", "scale": "fp32",
                      "softcap": "fp32", **{k: "constexpr" for k in gr_const}}
            cases.append(CompileCase(f"logit_grad-{tag}-out-{out}", _logit_grad_kernel, gr_sig,
                                     gr_const, gcfg["num_warps"], gcfg["num_stages"],
                                     uses_dot=False,
                                     divisible_ints=("vocab", "stride_u", "stride_g")))
    return cases
