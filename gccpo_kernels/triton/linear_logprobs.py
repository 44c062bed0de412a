"""Triton backend for SPEC §1: fused LM-head log-probs and entropy, forward and backward.

Forward (``_logprob_forward_kernel``): a program owns BLOCK_N rows and one vocabulary split of
V_SPLIT columns. For each [BLOCK_N, BLOCK_V] tile it computes the logits with tl.dot over D
(wgmma on Hopper for 16-bit inputs), applies bias, scale and soft cap, and folds the tile into
per-row running statistics: max m, s = sum exp(z - m), t = sum exp(z - m) (z - m), and the target
logit. Splits are combined on the device in a fixed order (no atomics; left folds, see
``_utils.fold_sum``), so the result is
deterministic and a row's result does not depend on the other rows of the batch: configurations
are pinned per architecture and never depend on N. Nothing of size N x V is ever written.

Backward (``_grad_logits_kernel``): recomputes the logits of an [R, Vc] tile (R up to 8192 rows,
Vc set by the workspace budget, SPEC §0: independent of N) and writes the logit gradient
g_u = (s/tau) * (g_logp (onehot - p) - g_ent p (z - mu)) * cap' into the workspace; two GEMMs then
give dh += g W_v and dW_v += g^T h, accumulated in float32. Wide row chunks make the dW
read-modify-write happen once per 8192 rows; the backward has no atomics (deterministic) and runs
the gradient GEMMs on the vendor BLAS.

Cost: forward 2NVD FLOPs; backward 2NVD (recompute) + 4NVD (GEMMs) plus one write and two reads of
the workspace per chunk.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._logits import LogitParams
from .._validation import out_dtype_for
from .._workspace import tile_shape, workspace_bytes
from ._utils import (TL_DTYPE_NAMES, CompileCase, arch_key, dot_precision, fold_sum, tanh,
                     upcast_dots)

# Pinned configurations (no run-time autotuning; independent of N for batch invariance), per
# architecture, kernel and input width. Chosen from the sm_90 / sm_80 compile reports
# (benchmarks/RESULTS.md): the largest tiles that keep every variant free of spills.
def _cfg(n: int, v: int, d: int, warps: int, stages: int, split: int = 8192) -> dict[str, int]:
    return dict(BLOCK_N=n, BLOCK_V=v, BLOCK_D=d, V_SPLIT=split, num_warps=warps, num_stages=stages)


CONFIGS: dict[str, dict[str, dict[str, int]]] = {
    "interpreter": {k: _cfg(64, 64, 64, 4, 1, split=512) for k in ("fwd16", "bwd16", "fwd32", "bwd32")},
    "sm90": {"fwd16": _cfg(128, 128, 64, 8, 4), "bwd16": _cfg(128, 128, 64, 8, 3),
             "fwd32": _cfg(128, 64, 32, 8, 3), "bwd32": _cfg(128, 64, 32, 8, 3)},
    "sm80": {"fwd16": _cfg(128, 128, 32, 8, 3), "bwd16": _cfg(128, 64, 32, 8, 3),
             "fwd32": _cfg(128, 64, 32, 8, 3), "bwd32": _cfg(128, 64, 32, 8, 3)},
}
_NEG_BIG = tl.constexpr(-1.0e30)  # finite "minus infinity" for running maxima: 0 * _NEG_BIG stays finite


@triton.jit
def _logit_tile(H, W, B, rows, n_rows, cols, col_ok, vocab, dim, stride_h, stride_w, scale,
                softcap, HAS_BIAS: tl.constexpr, HAS_CAP: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr,
                UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """z for a [BLOCK_N, BLOCK_V] tile (float32). Out-of-range rows and columns are clamped to the
    last valid one, so the inner loop needs no row/column masks (callers mask what they store);
    the D tail is masked only when D is not a multiple of BLOCK_D."""
    r64 = tl.minimum(rows, n_rows - 1).to(tl.int64)
    c64 = tl.minimum(cols, vocab - 1).to(tl.int64)
    dd = tl.arange(0, BLOCK_D)
    h_ptr = H + r64[:, None] * stride_h + dd[None, :]
    w_ptr = W + c64[:, None] * stride_w + dd[None, :]
    acc = tl.zeros([BLOCK_N, BLOCK_V], dtype=tl.float32)
    for d0 in range(0, dim, BLOCK_D):
        if EVEN_D:
            h = tl.load(h_ptr)
            w = tl.load(w_ptr)
        else:
            h = tl.load(h_ptr, mask=dd[None, :] < dim - d0, other=0.0)
            w = tl.load(w_ptr, mask=dd[None, :] < dim - d0, other=0.0)
        if UPCAST:
            h = h.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(h, tl.trans(w), acc, input_precision=PRECISION)
        h_ptr += BLOCK_D
        w_ptr += BLOCK_D
    if HAS_BIAS:
        b = tl.load(B + c64).to(tl.float32)
        acc = acc + b[None, :]
    z = acc * scale
    if HAS_CAP:
        z = softcap * tanh(z / softcap)
    return z


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


@triton.jit
def _logprob_forward_kernel(H, W, B, Y, PM, PS, PT, PZ, n_rows, vocab, dim, stride_h, stride_w,
                            scale, softcap, HAS_BIAS: tl.constexpr, HAS_CAP: tl.constexpr,
                            BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
                            V_SPLIT: tl.constexpr, EVEN_D: tl.constexpr, UPCAST: tl.constexpr,
                            PRECISION: tl.constexpr):
    """SPEC §1 forward, one (BLOCK_N rows, V_SPLIT columns) program: logit tiles z = (H W^T [+ B])
    * scale [capped], folded into per-row running statistics written per split: max PM, sum
    e^(z - m) PS, sum e^(z - m) (z - m) PT and the target logit PZ (0 when Y is outside the split).
    The host folds the splits in a fixed order into lse, logp and entropy."""
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < n_rows
    rows64 = rows.to(tl.int64)
    y = tl.load(Y + rows64, mask=row_ok, other=-1).to(tl.int32)
    m = tl.full([BLOCK_N], _NEG_BIG, tl.float32)
    s = tl.zeros([BLOCK_N], dtype=tl.float32)
    t = tl.zeros([BLOCK_N], dtype=tl.float32)
    zy = tl.zeros([BLOCK_N], dtype=tl.float32)
    v_begin = pid_s * V_SPLIT
    v_end = tl.minimum(v_begin + V_SPLIT, vocab)
    for v0 in range(v_begin, v_end, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_ok = cols < v_end
        z = _logit_tile(H, W, B, rows, n_rows, cols, col_ok, vocab, dim, stride_h, stride_w, scale,
                        softcap, HAS_BIAS, HAS_CAP, BLOCK_N, BLOCK_V, BLOCK_D, EVEN_D, UPCAST,
                        PRECISION)
        m, s, t, zy = _fold_row_stats(z, cols, col_ok, y, m, s, t, zy)
    out = pid_s.to(tl.int64) * n_rows + rows64
    tl.store(PM + out, m, mask=row_ok)
    tl.store(PS + out, s, mask=row_ok)
    tl.store(PT + out, t, mask=row_ok)
    tl.store(PZ + out, zy, mask=row_ok)


@triton.jit
def _grad_logits_kernel(H, W, B, Y, LSE, ENT, GL, GE, G, n_rows, vocab, dim, stride_h, stride_w,
                        stride_g, col_offset, scale, softcap, HAS_BIAS: tl.constexpr, HAS_CAP: tl.constexpr,
                        HAS_GL: tl.constexpr, HAS_GE: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr,
                        UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """SPEC §1 backward, one (BLOCK_N rows, BLOCK_V columns) tile of the workspace chunk starting
    at column col_offset: recomputes z, p = e^(z - LSE), and writes
    G = scale * (GL (onehot(Y) - p) - GE p (z - (LSE - ENT))) * (1 - (z / cap)^2 when capped), the
    gradient of sum(GL logp + GE H) with respect to the pre-scale logits. The host's two GEMMs
    turn G into d hidden and d weight."""
    pid_n = tl.program_id(0)
    pid_v = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < n_rows
    rows64 = rows.to(tl.int64)
    cols = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    col_ok = cols < vocab
    cols64 = cols.to(tl.int64)
    z = _logit_tile(H, W, B, rows, n_rows, cols, col_ok, vocab, dim, stride_h, stride_w, scale,
                    softcap, HAS_BIAS, HAS_CAP, BLOCK_N, BLOCK_V, BLOCK_D, EVEN_D, UPCAST,
                    PRECISION)
    lse = tl.load(LSE + rows64, mask=row_ok, other=0.0)
    p = tl.where(col_ok[None, :], tl.exp(z - lse[:, None]), 0.0)
    coef = tl.zeros([BLOCK_N, BLOCK_V], dtype=tl.float32)
    if HAS_GL:
        gl = tl.load(GL + rows64, mask=row_ok, other=0.0)
        coef += gl[:, None]
    if HAS_GE:
        ge = tl.load(GE + rows64, mask=row_ok, other=0.0)
        mu = lse - tl.load(ENT + rows64, mask=row_ok, other=0.0)  # E_p[z] = lse - H
        coef += ge[:, None] * (z - mu[:, None])
    g = -p * coef
    if HAS_GL:
        y = tl.load(Y + rows64, mask=row_ok, other=-1) - col_offset  # W, B start at col_offset
        g += tl.where(cols[None, :] == y.to(tl.int32)[:, None], gl[:, None], 0.0)
    if HAS_CAP:
        zc = z / softcap
        g = g * (1.0 - zc * zc)
    g = g * scale
    tl.store(G + rows64[:, None] * stride_g + cols64[None, :], g.to(G.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


def _config(device: torch.device, kernel: str, dtype: torch.dtype) -> dict[str, int]:
    width = "32" if dtype == torch.float32 else "16"
    return CONFIGS[arch_key(device)][kernel + width]


def _launch_opts(cfg: dict[str, int]) -> dict[str, int]:
    return {"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]}


def _combine_splits(pm: torch.Tensor, ps: torch.Tensor, pt: torch.Tensor, pz: torch.Tensor,
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Merge per-split (m, s, t, z_target) [S, N] into (z_target, entropy, lse) [N] in a fixed
    order that does not depend on N (the max is exact in any order; the sums are left folds)."""
    m = pm.amax(dim=0)
    w = torch.exp(pm - m)
    s = fold_sum(w * ps)
    t = fold_sum(w * (pt + ps * (pm - m)))
    log_s = torch.log(s)
    lse = m + log_s
    entropy = log_s - t / s
    return fold_sum(pz), entropy, lse


def forward(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
            targets: torch.Tensor, params: LogitParams,
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """hidden [N, D], weight [V, D] (contiguous rows), targets [N] in [0, V) -> (logp, entropy, lse).

    Outputs float32 [N]. Extra memory: split statistics of 4 * ceil(V / V_SPLIT) floats per row, for
    at most as many rows at once as the workspace budget allows (launches go by row chunks).
    """
    z_target, entropy, lse = forward_stats(hidden, weight, bias, targets, params)
    return z_target.sub_(lse), entropy, lse


def forward_stats(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                  targets: torch.Tensor, params: LogitParams,
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`forward`'s statistics before the last subtraction: (target logit z_y, entropy,
    lse), each float32 [N]. A target outside [0, V) (e.g. -1: another vocabulary shard's token)
    matches no column and gives z_y = 0. The vocabulary-parallel path combines these across
    shards; the kernel is the same."""
    n, dim = hidden.shape
    vocab = weight.shape[0]
    cfg = _config(hidden.device, "fwd", hidden.dtype)
    splits = triton.cdiv(vocab, cfg["V_SPLIT"])
    z_target = torch.empty(n, dtype=torch.float32, device=hidden.device)
    entropy, lse = torch.empty_like(z_target), torch.empty_like(z_target)
    # Split statistics are [4, splits, rows] floats, plus about as much again while merging; rows
    # per launch are bounded by the workspace budget so nothing here grows with N * V.
    per_row = 4 * splits * 4 * 2
    rows = max(cfg["BLOCK_N"], workspace_bytes(hidden.device) // per_row // cfg["BLOCK_N"] * cfg["BLOCK_N"])
    part = torch.empty(4, splits, min(n, rows), dtype=torch.float32, device=hidden.device)
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        p = part[:, :, : r1 - r0]
        _logprob_forward_kernel[(triton.cdiv(r1 - r0, cfg["BLOCK_N"]), splits)](
            hidden[r0:r1], weight, bias if bias is not None else hidden, targets[r0:r1], p[0], p[1],
            p[2], p[3], r1 - r0, vocab, dim, hidden.stride(0), weight.stride(0), params.scale,
            params.softcap or 1.0, HAS_BIAS=bias is not None, HAS_CAP=params.softcap is not None,
            BLOCK_N=cfg["BLOCK_N"], BLOCK_V=cfg["BLOCK_V"], BLOCK_D=cfg["BLOCK_D"],
            V_SPLIT=cfg["V_SPLIT"], EVEN_D=dim % cfg["BLOCK_D"] == 0,
            UPCAST=upcast_dots(hidden.dtype), PRECISION=dot_precision(hidden.dtype),
            **_launch_opts(cfg))
        z_target[r0:r1], entropy[r0:r1], lse[r0:r1] = _combine_splits(p[0], p[1], p[2], p[3])
    return z_target, entropy, lse


_OUT_DTYPE_MM: dict[str, bool] = {}


def _accumulate_mm(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc += a @ b with acc in float32 whatever a's dtype (fp32 output of a 16-bit GEMM where the
    installed torch offers it for this device, else one rounding of the product per call)."""
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
        return
    key = acc.device.type
    if _OUT_DTYPE_MM.get(key, True):
        try:
            torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)
            _OUT_DTYPE_MM[key] = True
            return
        except (TypeError, RuntimeError, NotImplementedError):
            _OUT_DTYPE_MM[key] = False
    acc.add_(torch.mm(a, b).to(acc.dtype))


def backward(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
             targets: torch.Tensor, lse: torch.Tensor, entropy: torch.Tensor,
             grad_logp: torch.Tensor | None, grad_entropy: torch.Tensor | None,
             params: LogitParams, needs: tuple[bool, bool, bool],
             dh_dtype: torch.dtype | None = None,
             ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """(d hidden, d weight, d bias) of sum(g_logp * logp + g_ent * entropy); see module docstring.

    ``lse`` and ``entropy`` are the rows' values over the whole softmax: given a vocabulary
    shard as ``weight`` (targets relative to it, -1 for another shard's token) and the global
    lse and entropy, the same kernel gives this shard's share of d hidden and its slice of
    d weight / d bias. ``dh_dtype``: dtype of the returned d hidden (None: hidden's; the
    vocabulary-parallel path keeps the float32 accumulator for its all-reduce).

    Tiles of [R, Vc] (R up to 8192 rows, Vc from the workspace budget): the kernel writes the
    tile's logit gradient into the workspace, then dh += g W_v (float32 accumulator) and
    dW_v += g^T h (float32), so each dW slice is read and written once per row chunk.
    """
    need_h, need_w, need_b = needs
    n, dim = hidden.shape
    vocab = weight.shape[0]
    device = hidden.device
    acc_dtype = out_dtype_for(hidden.dtype)
    dh = torch.zeros(n, dim, dtype=acc_dtype, device=device) if need_h else None
    dw = torch.zeros(vocab, dim, dtype=acc_dtype, device=device) if need_w else None
    db = torch.zeros(vocab, dtype=acc_dtype, device=device) if need_b else None
    if n > 0 and (grad_logp is not None or grad_entropy is not None):
        cfg = _config(device, "bwd", hidden.dtype)
        rows, cols = tile_shape(n, vocab, hidden.element_size(), device, buffers=1,
                                multiple=cfg["BLOCK_V"])
        ws = torch.empty(rows, cols, dtype=hidden.dtype, device=device)
        dummy = lse
        for r0 in range(0, n, rows):
            r1 = min(n, r0 + rows)
            h = hidden[r0:r1]
            for v0 in range(0, vocab, cols):
                v1 = min(vocab, v0 + cols)
                g = ws[: r1 - r0, : v1 - v0]
                grid = (triton.cdiv(r1 - r0, cfg["BLOCK_N"]), triton.cdiv(v1 - v0, cfg["BLOCK_V"]))
                _grad_logits_kernel[grid](
                    h, weight[v0:v1], bias[v0:v1] if bias is not None else h, targets[r0:r1],
                    lse[r0:r1], entropy[r0:r1],
                    grad_logp[r0:r1] if grad_logp is not None else dummy,
                    grad_entropy[r0:r1] if grad_entropy is not None else dummy,
                    g, r1 - r0, v1 - v0, dim, h.stride(0), weight.stride(0), g.stride(0), v0,
                    params.scale, params.softcap or 1.0, HAS_BIAS=bias is not None,
                    HAS_CAP=params.softcap is not None, HAS_GL=grad_logp is not None,
                    HAS_GE=grad_entropy is not None, BLOCK_N=cfg["BLOCK_N"],
                    BLOCK_V=cfg["BLOCK_V"], BLOCK_D=cfg["BLOCK_D"],
                    EVEN_D=dim % cfg["BLOCK_D"] == 0, UPCAST=upcast_dots(hidden.dtype),
                    PRECISION=dot_precision(hidden.dtype), **_launch_opts(cfg))
                if need_h:
                    _accumulate_mm(dh[r0:r1], g, weight[v0:v1])
                if need_w:
                    _accumulate_mm(dw[v0:v1], g.T, h)
                if need_b:
                    db[v0:v1].add_(g.sum(dim=0, dtype=acc_dtype))
    return (None if dh is None else dh.to(dh_dtype or hidden.dtype),
            None if dw is None else dw.to(weight.dtype),
            None if db is None else db.to(bias.dtype))


def compile_cases(arch: str) -> list[CompileCase]:
    """Both kernels at the pinned configuration of ``arch``, for bf16 / fp16 / fp32 inputs, with
    the plain flags (no bias, no cap, logp gradient only) and with every flag on."""
    cases = []
    variants = [(torch.bfloat16, False), (torch.bfloat16, True), (torch.float16, True),
                (torch.float32, True)]
    for dtype, full in variants:
        t = TL_DTYPE_NAMES[dtype]
        width = "32" if dtype == torch.float32 else "16"
        fcfg, bcfg = CONFIGS[arch]["fwd" + width], CONFIGS[arch]["bwd" + width]
        common = {"H": f"*{t}", "W": f"*{t}", "B": f"*{t}", "Y": "*i64"}
        scalars = {"n_rows": "i32", "vocab": "i32", "dim": "i32", "stride_h": "i64",
                   "stride_w": "i64"}
        flags = {"HAS_BIAS": full, "HAS_CAP": full, "UPCAST": False, "EVEN_D": not full,
                 "PRECISION": dot_precision(dtype)}
        fwd_sig = {**common, "PM": "*fp32", "PS": "*fp32", "PT": "*fp32", "PZ": "*fp32", **scalars,
                   "scale": "fp32", "softcap": "fp32"}
        fwd_const = {**flags, "V_SPLIT": fcfg["V_SPLIT"],
                     **{k: fcfg[k] for k in ("BLOCK_N", "BLOCK_V", "BLOCK_D")}}
        fwd_sig.update({k: "constexpr" for k in fwd_const})
        bwd_sig = {**common, "LSE": "*fp32", "ENT": "*fp32", "GL": "*fp32", "GE": "*fp32",
                   "G": f"*{t}", **scalars, "stride_g": "i64", "col_offset": "i32", "scale": "fp32",
                   "softcap": "fp32"}
        bwd_const = {**flags, "HAS_GL": True, "HAS_GE": full,
                     **{k: bcfg[k] for k in ("BLOCK_N", "BLOCK_V", "BLOCK_D")}}
        bwd_sig.update({k: "constexpr" for k in bwd_const})
        tag = f"{t}{'-all-flags' if full else ''}"
        large = dtype == torch.bfloat16
        for name, kern, sig, const, cfg in (
                ("forward", _logprob_forward_kernel, fwd_sig, fwd_const, fcfg),
                ("grad_logits", _grad_logits_kernel, bwd_sig, bwd_const, bcfg)):
            cases.append(CompileCase(f"{name}-{tag}", kern, sig, const, cfg["num_warps"],
                                     cfg["num_stages"], large_shape_config=large,
                                     divisible_ints=("vocab", "dim", "stride_h", "stride_w",
                                                     "stride_g")))
    return cases
