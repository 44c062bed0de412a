"""Triton backend for SPEC §3: counterfactual divergence D(q(.|h) || q(.|h + delta_m)).

Issue 18's design: one GEMM per chunk, Triton over the chunk. A chunk of C rows (C from the
workspace budget, V, M, D and the dtype, never from R) stages its C latents and their C M
perturbations into one [C (M + 1), D] buffer and multiplies it by W^T once (cuBLAS, float32
result: ``logit_epilogues.raw_logits``), so W is read once per chunk for the base rows and all
perturbed rows, and the perturbation products ``delta W^T`` stay separate from ``h W^T`` (the
shift is never a difference of two rounded logit rows). Two Triton kernels then read that float32
chunk; a program owns BLOCK_R rows, their M perturbations (padded to MP, a power of two, at most
MAX_MP per launch) and one vocabulary split of V_SPLIT columns. The perturbed logits are never
formed:

    Delta = z(h + delta) - z(h) = s * (W delta) / tau            (no cap: exact)
    Delta = c * (tanh(a + dd) - tanh(a)), a = u/c, dd = s (W delta)/(tau c), through
          = 4c sinh(dd) e^(-|a+dd|-|a|) / ((1 + e^-2|a+dd|)(1 + e^-2|a|))   (soft cap: no cancellation)

Two passes over the chunk (not over W):
  1. ``_cf_stats_kernel``: per (row, split) online softmax statistics of z (max m, S = sum e^(z-m)),
     C = sum e^(z-m) Delta_m, the max k_m of the perturbed logits z~_m = z + Delta_m with
     T = sum e^(z~_m - k_m), and (JS, TV) E = sum e^(z-m) expm1(Delta_m - sh_m) around the running
     mean sh_m = C/S. The host merges the splits: lse, c_m = E_q[Delta_m] and
     L_m = lse(z~_m) - lse(z) = c_m + log1p(E/S) (E re-centred on c_m; relative accuracy), or
     k_m + log T - lse(z) when E/S > 1 or the two disagree beyond the latter's rounding (large
     shifts, where a token of underflowing base probability can dominate q~).
  2. ``_cf_integrand_kernel``: per (row, split) sum_v q_v f(x_v), with q = e^(z - lse) and
     KL: f = phi(Delta - c), phi(t) = e^t - 1 - t  -> KL = log1p(sum)   (sum > 1: L_T - c)
     TV: f = |expm1(Delta - L)|                   -> TV = sum / 2
     JS: f = psi(Delta - L) (series below |x| = 1/4, mixture form above) -> JS = sum
  Every integrand is a smooth function evaluated with relative accuracy (Taylor series where the
  closed form would cancel; q f written through e^(log q + x) where e^x alone could overflow), so
  the float32 KL error stays ~1e-6 relative (SPEC §3 asks 2e-3 KL + 2e-8).

Cost: 2(M+1) R_pad V D GEMM FLOPs (R_pad = R rounded up to whole chunks: one pass over W), and
per element of the [C (M+1), V] float32 chunk 12 bytes of memory traffic (written by the GEMM,
read by each kernel); split statistics of O(C M V / V_SPLIT) floats; nothing of size R x V. Splits
are combined on the device in a fixed order: deterministic, and a row's result does not depend on
the other rows (fixed GEMM shapes through zero-padded staging; configurations pinned per
architecture and perturbation count, never by R).

Vocabulary parallelism (:func:`forward_sharded`, W a slice of the head's rows): the other ranks'
vocabulary splits are merged like more splits (a MAX all-reduce for the maxima, rank-ordered sums
of the per-rank folds), and the integrand kernel takes the global lse and shift as arguments; the
kernels are unchanged.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .._logits import LogitParams
from .._vocab_parallel import rank_sum
from ..divergences import Divergence, divergence_entry, triton_codes
from .._workspace import workspace_bytes
from ._utils import TL_DTYPE_NAMES, CompileCase, arch_key, fold_sum, tanh
from .logit_epilogues import ROW_CHUNK, pow2_rows, raw_logits, stage_rows

_NEG_BIG = tl.constexpr(-1.0e30)  # finite "minus infinity": exp(_NEG_BIG - x) = 0, 0 * it finite
#: name -> the integrand kernel's KIND code, from the divergence registry (the entries' triton_code)
KIND_CODES = triton_codes()
# the codes the integrand kernel branches on (a kernel cannot look an entry up: one branch each)
_KL = tl.constexpr(KIND_CODES["kl"])
_TV = tl.constexpr(KIND_CODES["tv"])
_JS = tl.constexpr(KIND_CODES["js"])


def _cfg(r: int, v: int, warps: int, stages: int, r_js: int | None = None,
         split: int = 8192) -> dict[str, int]:
    return dict(BLOCK_R=r, BLOCK_R_JS=r if r_js is None else r_js, BLOCK_V=v,
                V_SPLIT=split, num_warps=warps, num_stages=stages)


# Pinned per architecture and padded perturbation count MP, never by R; at most MAX_MP
# perturbations per launch. The kernels stream the float32 chunk (no dot), so one table serves
# every input width ("16" and "32" keys kept for the callers): the epilogue holds several
# [BLOCK_R, MP, BLOCK_V] float32 temporaries, so BLOCK_R * MP * BLOCK_V is at most 2048 (1024 for
# MP = 1 and for the JS integrand, whose integrand needs the most registers), with no software
# pipelining: the largest tiles that compile without spills on sm_90 and sm_80
# (python -m gccpo_kernels.triton._aot).
MAX_MP = 4


def _gpu_table() -> dict[tuple[str, int], dict[str, int]]:
    per_mp = {1: _cfg(8, 128, 4, 1, r_js=8), 2: _cfg(8, 128, 4, 1, r_js=4),
              4: _cfg(4, 128, 4, 1, r_js=2)}
    return {(w, mp): cfg for w in ("16", "32") for mp, cfg in per_mp.items()}


CONFIGS: dict[str, dict[tuple[str, int], dict[str, int]]] = {
    "interpreter": {(w, mp): _cfg(16, 64, 4, 1, split=128) for w in ("16", "32") for mp in (1, 2, 4)},
    "sm90": _gpu_table(),
    "sm80": _gpu_table(),
}


# ---------------------------------------------------------------------------------------------
# elementwise math (no libdevice: the interpreter cannot run it)
# ---------------------------------------------------------------------------------------------


@triton.jit
def _expm1_series(xs):
    """e^x - 1 for |x| < 1/2 (Taylor series to x^9, relative error < 1e-9)."""
    t = 1.0 + xs * (1.0 / 9.0)
    t = 1.0 + xs * (1.0 / 8.0) * t
    t = 1.0 + xs * (1.0 / 7.0) * t
    t = 1.0 + xs * (1.0 / 6.0) * t
    t = 1.0 + xs * (1.0 / 5.0) * t
    t = 1.0 + xs * (1.0 / 4.0) * t
    t = 1.0 + xs * (1.0 / 3.0) * t
    t = 1.0 + xs * (1.0 / 2.0) * t
    return xs * t


@triton.jit
def _expm1(x):
    """e^x - 1 with relative accuracy: the series below |x| = 1/2, else exp(x) - 1."""
    small = tl.abs(x) < 0.5
    return tl.where(small, _expm1_series(tl.where(small, x, 0.0)), tl.exp(x) - 1.0)


@triton.jit
def _kl_term(x, lq, q):
    """q phi(x), phi(x) = e^x - 1 - x >= 0, q = e^lq: the series x^2/2! + ... + x^11/11! below
    |x| = 1/2, else e^(lq + x) - q (1 + x) (no overflow of e^x where q underflows)."""
    small = tl.abs(x) < 0.5
    xs = tl.where(small, x, 0.0)
    t = 1.0 + xs * (1.0 / 11.0)
    t = 1.0 + xs * (1.0 / 10.0) * t
    t = 1.0 + xs * (1.0 / 9.0) * t
    t = 1.0 + xs * (1.0 / 8.0) * t
    t = 1.0 + xs * (1.0 / 7.0) * t
    t = 1.0 + xs * (1.0 / 6.0) * t
    t = 1.0 + xs * (1.0 / 5.0) * t
    t = 1.0 + xs * (1.0 / 4.0) * t
    t = 1.0 + xs * (1.0 / 3.0) * t
    return tl.where(small, 0.5 * xs * xs * t * q, tl.exp(lq + x) - q * (1.0 + x))


@triton.jit
def _tv_term(x, lq, q):
    """|q~ - q| = q |expm1(x)|: the series below |x| = 1/2, else |e^(lq + x) - q| (cancels by at
    most a factor 2.6 there)."""
    small = tl.abs(x) < 0.5
    return tl.where(small, q * tl.abs(_expm1_series(tl.where(small, x, 0.0))),
                    tl.abs(tl.exp(lq + x) - q))


@triton.jit
def _softplus(x):
    """log(1 + e^x), without overflow for large |x|."""
    return tl.maximum(x, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(x)))


@triton.jit
def _js_term(x, lq, q):
    """q psi(x), q = e^lq, x = log q~ - log q, psi(x) = (x e^x - (1+e^x) log((1+e^x)/2)) / 2.

    Below |x| = 1/4: psi = x^2/8 (1 + x/2 + x^2/8 + x^3/48 + x^4/288 + x^5/1440 + x^6/11520
    - x^7/483840 - x^8/4838400). Above: the mixture form 0.5 [q A + q~ (A + x)] with
    A = ln2 - softplus(x) (softplus(-x) = softplus(x) - x) and q~ = e^(lq + x) (never overflows).
    """
    small = tl.abs(x) < 0.25
    xs = tl.where(small, x, 0.0)
    t = (1.0 / 11520.0) + xs * (-1.0 / 483840.0 + xs * (-1.0 / 4838400.0))
    t = (1.0 / 1440.0) + xs * t
    t = (1.0 / 288.0) + xs * t
    t = (1.0 / 48.0) + xs * t
    t = 0.125 + xs * t
    t = 0.5 + xs * t
    t = 1.0 + xs * t
    big = 0.6931471805599453 - _softplus(x)
    big = 0.5 * (q * big + tl.exp(lq + x) * (big + x))
    return tl.where(small, 0.125 * xs * xs * t * q, big)


@triton.jit
def _capped_delta(a, dd, cap):
    """c (tanh(a + dd) - tanh(a)) = 4c sinh(dd) e^(-s) / ((1 + e^-2|a+dd|)(1 + e^-2|a|)),
    s = |a + dd| + |a| >= |dd| (so e^(+-dd - s) never overflows); sinh by series below 1/2."""
    x = a + dd
    s = tl.abs(x) + tl.abs(a)
    small = tl.abs(dd) < 0.5
    ds = tl.where(small, dd, 0.0)
    d2 = ds * ds
    t = 1.0 + d2 * (1.0 / 110.0)
    t = 1.0 + d2 * (1.0 / 72.0) * t
    t = 1.0 + d2 * (1.0 / 42.0) * t
    t = 1.0 + d2 * (1.0 / 20.0) * t
    t = 1.0 + d2 * (1.0 / 6.0) * t
    sh = tl.where(small, ds * t * tl.exp(-s), 0.5 * (tl.exp(dd - s) - tl.exp(-dd - s)))
    den = (1.0 + tl.exp(-2.0 * tl.abs(x))) * (1.0 + tl.exp(-2.0 * tl.abs(a)))
    return 4.0 * cap * sh / den


# ---------------------------------------------------------------------------------------------
# tiles and kernels
# ---------------------------------------------------------------------------------------------


@triton.jit
def _cf_tile(UZ, UD, B, r0, n_rows, cols, vocab, n_pert, stride_z, stride_dr, stride_dm, scale,
             softcap, HAS_BIAS: tl.constexpr, HAS_CAP: tl.constexpr, BLOCK_R: tl.constexpr,
             MP: tl.constexpr, BLOCK_V: tl.constexpr):
    """(z [BLOCK_R, BLOCK_V], Delta [BLOCK_R, MP, BLOCK_V]) in float32 for rows r0.. and ``cols``,
    read from the chunk's raw products: UZ = h W^T (row stride ``stride_z``) and UD = delta W^T
    (row r, perturbation j at r * stride_dr + j * stride_dm), both float32 from one cuBLAS GEMM.

    Out-of-range rows, perturbations and columns are clamped to the last valid one (no masks;
    callers mask what they keep). The bias enters z only; Delta = z(h + delta) - z(h) is formed
    from W delta, never as a difference of two logit rows.
    """
    rr = tl.arange(0, BLOCK_R)
    r64 = tl.minimum(r0 + rr, n_rows - 1).to(tl.int64)
    xx = tl.arange(0, BLOCK_R * MP)
    xr64 = tl.minimum(r0 + xx // MP, n_rows - 1).to(tl.int64)
    xj64 = tl.minimum(xx % MP, n_pert - 1).to(tl.int64)
    c64 = tl.minimum(cols, vocab - 1).to(tl.int64)
    acc_z = tl.load(UZ + r64[:, None] * stride_z + c64[None, :])
    acc_d = tl.load(UD + (xr64 * stride_dr + xj64 * stride_dm)[:, None] + c64[None, :])
    if HAS_BIAS:
        acc_z = acc_z + tl.load(B + c64).to(tl.float32)[None, :]
    u = acc_z * scale
    du = tl.reshape(acc_d * scale, (BLOCK_R, MP, BLOCK_V))
    if HAS_CAP:
        a = u / softcap
        z = softcap * tanh(a)
        delta = _capped_delta(a[:, None, :], du / softcap, softcap)
    else:
        z = u
        delta = du
    return z, delta


@triton.jit
def _cf_stats_kernel(UZ, UD, B, PM, PS, PC, PK, PT, PSH, PE, n_rows, vocab, n_pert, stride_z,
                     stride_dr, stride_dm, scale, softcap, split_offset, n_tiles,
                     NEED_L: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_CAP: tl.constexpr,
                     BLOCK_R: tl.constexpr, MP: tl.constexpr, BLOCK_V: tl.constexpr,
                     V_SPLIT: tl.constexpr):
    """Per (row, split): m, S = sum e^(z-m), C = sum e^(z-m) Delta, the max k of the perturbed
    logits z~ = z + Delta with T = sum e^(z~ - k) (lse(z~) = k + log T: the overflow- and
    underflow-proof form of L = lse(z~) - lse(z), used for large divergences; one exponential of
    the sum, so a token whose base probability underflows but whose shift makes it the perturbed
    mode still counts), and, when NEED_L, the running mean sh = C/S with
    E = sum e^(z-m) expm1(Delta - sh), re-centred on every tile: moving the shift by d maps E to
    e^-d E + expm1(-d) S, so E/S stays O(|Delta - c|) and L = sh + log1p(E/S) keeps relative
    accuracy where T would lose ~eps in L. Exponents in E are clamped to +-80 and E to 1e30 (a
    shift that large means E/S >> 1, where the host takes L from T), so E never turns NaN."""
    pid_r = tl.program_id(0)
    pid_s = tl.program_id(1) + split_offset
    r0 = pid_r * BLOCK_R
    rows = r0 + tl.arange(0, BLOCK_R)
    jj = tl.arange(0, MP)
    m = tl.full([BLOCK_R], _NEG_BIG, tl.float32)
    s = tl.zeros([BLOCK_R], dtype=tl.float32)
    c = tl.zeros([BLOCK_R, MP], dtype=tl.float32)
    k = tl.full([BLOCK_R, MP], _NEG_BIG, tl.float32)
    t = tl.zeros([BLOCK_R, MP], dtype=tl.float32)
    sh = tl.zeros([BLOCK_R, MP], dtype=tl.float32)
    e = tl.zeros([BLOCK_R, MP], dtype=tl.float32)
    for i in range(0, n_tiles):
        cols = pid_s * V_SPLIT + i * BLOCK_V + tl.arange(0, BLOCK_V)
        col_ok = cols < vocab
        z, delta = _cf_tile(UZ, UD, B, r0, n_rows, cols, vocab, n_pert, stride_z, stride_dr,
                            stride_dm, scale, softcap, HAS_BIAS, HAS_CAP, BLOCK_R, MP, BLOCK_V)
        z = tl.where(col_ok[None, :], z, _NEG_BIG)
        m_new = tl.maximum(m, tl.max(z, axis=1))
        alpha = tl.exp(m - m_new)
        w = tl.where(col_ok[None, :], tl.exp(z - m_new[:, None]), 0.0)
        s_old = alpha * s
        s = s_old + tl.sum(w, axis=1)
        w3 = w[:, None, :]
        c = alpha[:, None] * c + tl.sum(w3 * delta, axis=2)
        zt = z[:, None, :] + delta                  # perturbed logits; ~ -1e30 off the vocabulary
        k_new = tl.maximum(k, tl.max(zt, axis=2))
        t = tl.exp(k - k_new) * t + tl.sum(tl.exp(zt - k_new[:, :, None]), axis=2)
        k = k_new
        if NEED_L:
            sh_new = c / s[:, None]
            d = sh_new - sh
            nd = tl.minimum(-d, 80.0)
            e = tl.exp(nd) * (alpha[:, None] * e) + _expm1(nd) * s_old[:, None]
            x = tl.minimum(tl.maximum(delta - sh_new[:, :, None], -80.0), 80.0)
            e += tl.sum(w3 * _expm1(x), axis=2)
            e = tl.where(-d > 80.0, 1.0e30, tl.minimum(e, 1.0e30))
            sh = sh_new
        m = m_new
    row_ok = rows < n_rows
    out = pid_s.to(tl.int64) * n_rows + rows.to(tl.int64)
    tl.store(PM + out, m, mask=row_ok)
    tl.store(PS + out, s, mask=row_ok)
    out2 = out[:, None] * n_pert + jj[None, :]
    ok2 = row_ok[:, None] & (jj[None, :] < n_pert)
    tl.store(PC + out2, c, mask=ok2)
    tl.store(PK + out2, k, mask=ok2)
    tl.store(PT + out2, t, mask=ok2)
    if NEED_L:
        tl.store(PSH + out2, sh, mask=ok2)
        tl.store(PE + out2, e, mask=ok2)


@triton.jit
def _cf_integrand_kernel(UZ, UD, B, LSE, SHIFT, PF, n_rows, vocab, n_pert, stride_z, stride_dr,
                         stride_dm, scale, softcap, split_offset, n_tiles, KIND: tl.constexpr,
                         HAS_BIAS: tl.constexpr, HAS_CAP: tl.constexpr, BLOCK_R: tl.constexpr,
                         MP: tl.constexpr, BLOCK_V: tl.constexpr, V_SPLIT: tl.constexpr):
    """Per (row, split): sum_v q_v f(x_v), q = e^(z - LSE), x = Delta - SHIFT, with f the
    integrand of the divergence whose registry code is KIND (a constexpr: one branch per entry
    with a ``triton_code``; the KL's is phi at SHIFT = c, the others' at SHIFT = L)."""
    pid_r = tl.program_id(0)
    pid_s = tl.program_id(1) + split_offset
    r0 = pid_r * BLOCK_R
    rows = r0 + tl.arange(0, BLOCK_R)
    row_ok = rows < n_rows
    jj = tl.arange(0, MP)
    ok2 = row_ok[:, None] & (jj[None, :] < n_pert)
    rows64 = rows.to(tl.int64)
    lse = tl.load(LSE + rows64, mask=row_ok, other=0.0)
    shift = tl.load(SHIFT + rows64[:, None] * n_pert + jj[None, :], mask=ok2, other=0.0)
    acc = tl.zeros([BLOCK_R, MP], dtype=tl.float32)
    for i in range(0, n_tiles):
        cols = pid_s * V_SPLIT + i * BLOCK_V + tl.arange(0, BLOCK_V)
        col_ok = cols < vocab
        z, delta = _cf_tile(UZ, UD, B, r0, n_rows, cols, vocab, n_pert, stride_z, stride_dr,
                            stride_dm, scale, softcap, HAS_BIAS, HAS_CAP, BLOCK_R, MP, BLOCK_V)
        lq = tl.where(col_ok[None, :], z - lse[:, None], _NEG_BIG)
        q = tl.exp(lq)[:, None, :]
        lq = lq[:, None, :]
        x = delta - shift[:, :, None]
        if KIND == _KL:
            f = _kl_term(x, lq, q)
        elif KIND == _TV:
            f = _tv_term(x, lq, q)
        else:
            tl.static_assert(KIND == _JS, "KIND is not a divergence code this kernel has a branch for")
            f = _js_term(x, lq, q)
        acc += tl.sum(tl.where(col_ok[None, None, :], f, 0.0), axis=2)
    out2 = (pid_s.to(tl.int64) * n_rows + rows64)[:, None] * n_pert + jj[None, :]
    tl.store(PF + out2, acc, mask=ok2)


# ---------------------------------------------------------------------------------------------
# host side
# ---------------------------------------------------------------------------------------------


def _padded(m: int) -> int:
    return 1 if m <= 1 else 1 << (m - 1).bit_length()


def config(device: torch.device, dtype: torch.dtype, mp: int) -> dict[str, int]:
    width = "32" if dtype == torch.float32 else "16"
    return CONFIGS[arch_key(device)][(width, mp)]


def _launch(kernel, cfg: dict[str, int], block_r: int, n_rows: int, vocab: int, args: tuple,
            consts: dict) -> None:
    """Run ``kernel`` over (row blocks, vocabulary splits); the last, shorter split apart, so that
    the loop trip count is a plain argument."""
    splits = triton.cdiv(vocab, cfg["V_SPLIT"])
    full_tiles = cfg["V_SPLIT"] // cfg["BLOCK_V"]
    last_tiles = triton.cdiv(vocab - (splits - 1) * cfg["V_SPLIT"], cfg["BLOCK_V"])
    for split_offset, count, n_tiles in ((0, splits - 1, full_tiles), (splits - 1, 1, last_tiles)):
        if count == 0:
            continue
        kernel[(triton.cdiv(n_rows, block_r), count)](
            *args, split_offset, n_tiles, **consts, BLOCK_R=block_r, BLOCK_V=cfg["BLOCK_V"],
            V_SPLIT=cfg["V_SPLIT"], num_warps=cfg["num_warps"],
            num_stages=cfg["num_stages"])


def _fold(x: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """fold_sum over the splits (dim 0); zeros of ``shape`` when there are none (an empty slice)."""
    return fold_sum(x) if x.shape[0] > 0 else torch.zeros(shape, dtype=x.dtype, device=x.device)


def _divergence_block(uz: torch.Tensor, ud: torch.Tensor, bias: torch.Tensor | None, r: int,
                      params: LogitParams, entry: Divergence, cfg: dict[str, int],
                      shard=None) -> torch.Tensor:
    """The first ``r`` rows of one chunk, at most MAX_MP perturbations -> [r, M] float32.

    ``uz`` [C, V] and ``ud`` [C, M, V] (a view: rows of V contiguous) are the chunk's raw products
    h W^T and delta W^T from its one GEMM; the two kernels read them (statistics, then the
    integrand), so W is not read again. With ``shard`` (vocabulary parallelism: the chunk is this
    rank's slice of the columns, possibly empty), the other ranks' vocabulary splits are just
    more splits: the maxima go through one MAX all-reduce, the per-rank folds of the split sums
    through rank sums (all-gathers folded in rank order), and the integrand kernel gets the global
    lse and shift as arguments; the kernels are unchanged.
    """
    m_pert, vocab = ud.shape[1], ud.shape[2]
    mp = _padded(m_pert)
    splits = triton.cdiv(vocab, cfg["V_SPLIT"])
    dev = uz.device
    pm = torch.empty(splits, r, dtype=torch.float32, device=dev)
    ps = torch.empty_like(pm)
    pc = torch.empty(splits, r, m_pert, dtype=torch.float32, device=dev)
    pk = torch.empty_like(pc)
    pt = torch.empty_like(pc)
    need_l = entry.needs_shift                                    # the integrand is at Delta - L
    psh = torch.empty_like(pc) if need_l else pc
    pe = torch.empty_like(pc) if need_l else pc
    head = (uz, ud, bias if bias is not None else uz)
    sizes = (r, vocab, m_pert, uz.stride(0), ud.stride(0), ud.stride(1), params.scale,
             params.softcap or 1.0)
    consts = dict(HAS_BIAS=bias is not None, HAS_CAP=params.softcap is not None, MP=mp)
    if vocab > 0:
        _launch(_cf_stats_kernel, cfg, cfg["BLOCK_R"], r, vocab,
                (*head, pm, ps, pc, pk, pt, psh, pe, *sizes), dict(consts, NEED_L=need_l))
    # merge the splits in a fixed order (maxima are exact; sums are left folds, independent of R)
    if shard is None:
        top = pm.amax(dim=0)                                      # [R]
        k = pk.amax(dim=0)                                        # max of z~, [R, M]
    else:
        neg = torch.full((r, 1 + m_pert), -math.inf, dtype=torch.float32, device=dev)
        local = neg if vocab == 0 else torch.cat([pm.amax(dim=0).unsqueeze(1), pk.amax(dim=0)], 1)
        both = shard.all_reduce(local, "max")                     # finite: V >= 1 in all
        top, k = both[:, 0].contiguous(), both[:, 1:].contiguous()
    a = torch.exp(pm - top)                                       # [S, R]
    s_split = a * ps                                              # [S, R]
    a3 = a.unsqueeze(2)
    if shard is None:
        s = fold_sum(s_split).unsqueeze(1)                        # [R, 1]
        c_num = fold_sum(a3 * pc)
        t_sum = fold_sum(torch.exp(pk - k) * pt)
    else:
        sums = rank_sum(shard, torch.cat([_fold(s_split, (r,)).unsqueeze(1),
                                          _fold(a3 * pc, (r, m_pert)),
                                          _fold(torch.exp(pk - k) * pt, (r, m_pert))], 1))
        s, c_num, t_sum = sums[:, :1], sums[:, 1:1 + m_pert], sums[:, 1 + m_pert:]
    lse = top + torch.log(s.squeeze(1))
    c = c_num / s                                                 # E_q[Delta], [R, M]
    lse_t = k + torch.log(t_sum)                                  # lse(z~)
    l_big = lse_t - lse.unsqueeze(1)                              # L = lse(z~) - lse(z)
    if not need_l:
        shift = c
    else:
        # re-centre every split's E on the global mean c: L = c + log1p(E / S) while E/S <= 1
        d = c - psh                                               # [S, R, M]
        nd = (-d).clamp(max=80.0)
        e_split = torch.exp(nd) * (a3 * pe) + torch.expm1(nd) * s_split.unsqueeze(2)
        far = (-d > 80.0).any(dim=0)                              # False for no splits
        if shard is None:
            e = fold_sum(e_split) / s
        else:
            both = rank_sum(shard, torch.cat([_fold(e_split, (r, m_pert)), far.to(torch.float32)], 1))
            e, far = both[:, :m_pert] / s, both[:, m_pert:] > 0
        e = torch.where(far, math.inf, e)
        l_small = c + torch.log1p(e)
        # l_big is exact to a few float32 ulps of the logits; l_small is far more accurate where
        # E/S is small and right, and the two agree there. Where they disagree beyond l_big's
        # rounding, E missed terms (base probabilities that underflow under huge shifts): l_big.
        ulps = 16 * torch.finfo(torch.float32).eps * (1.0 + k.abs() + lse_t.abs() + lse.abs().unsqueeze(1))
        agree = (e <= 1.0) & ((l_small - l_big).abs() <= ulps)
        shift = torch.where(agree, l_small, l_big)
    pf = torch.empty_like(pc)
    if vocab > 0:
        _launch(_cf_integrand_kernel, cfg, cfg[entry.triton_block_r], r, vocab,
                (*head, lse.contiguous(), shift.contiguous(), pf, *sizes),
                dict(consts, KIND=entry.triton_code))
    f = fold_sum(pf) if shard is None else rank_sum(shard, _fold(pf, (r, m_pert)))
    if not need_l:
        # the KL. F <= 1: KL = log1p(F) without cancellation; beyond (KL > ln 2, or an overflowed
        # F), the difference of log-normalizers is accurate in relative terms
        return torch.where(f <= 1.0, torch.log1p(f), (l_big - c).clamp_min(0.0))
    return entry.finish(f)                                        # scale, clamp to [0, upper]


def chunk_rows(vocab: int, m_pert: int, dim: int, dtype: torch.dtype, device: torch.device,
               budget: int | None = None) -> int:
    """C, the base rows of every chunk: the chunk's GEMM has C (M + 1) rows (the C latents and
    their C M perturbations, stacked) and writes a float32 [C (M + 1), V] workspace; C is as many
    rows as fit the budget with the [C (M + 1), D] staging buffer, at most ROW_CHUNK, a power of
    two from 64 rows on. A function of V, M, D, the dtype and the budget, never of R (batch
    invariance)."""
    budget = workspace_bytes(device) if budget is None else budget
    per_row = (m_pert + 1) * (vocab * 4 + dim * (torch.finfo(dtype).bits // 8))
    return pow2_rows(min(ROW_CHUNK, budget // max(1, per_row)))


def forward(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
            deltas: torch.Tensor, params: LogitParams, kind: str) -> torch.Tensor:
    """hidden [R, D], weight [V, D], bias [V] | None, deltas [R, M, D] (contiguous) -> [R, M] fp32.

    One GEMM per chunk of C rows for the base and all M perturbations; the kernels take the
    perturbations MAX_MP at a time from the same chunk.
    """
    return forward_sharded(hidden, weight, bias, deltas, params, kind, None)


def forward_sharded(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                    deltas: torch.Tensor, params: LogitParams, kind: str, shard) -> torch.Tensor:
    """:func:`forward` with ``weight`` [V_local, D] this rank's vocabulary slice (possibly empty)
    and ``shard`` its ``_vocab_parallel.VocabShard`` (None: the whole head) -> [R, M] float32,
    the same on every rank. Collectives per chunk and block of MAX_MP perturbations: one MAX
    all-reduce of [C, 1+M] and two rank sums ([C, 1+2M], [C, M]) for KL; one more ([C, 2M]) for
    JS and TV; and once per call the smallest C over the ranks (each sizes it for its own slice
    and budget), so every rank runs the same chunks. ``kind`` must name a registry entry with a ``triton_code`` (ValueError otherwise).

    Per chunk: the C latents and their C M perturbations are staged into one [C (M + 1), D]
    buffer (rows past the chunk's end zeroed), ``U = X W^T`` by one GEMM with a float32 result
    (cuBLAS on CUDA: 2 (M + 1) C V D FLOPs, one read of W), then the statistics and integrand
    kernels read U (12 bytes per element of U with the GEMM's write).
    """
    entry = _entry_with_kernel(kind)
    r, m_pert, dim = deltas.shape
    vocab = weight.shape[0]
    out = torch.empty(r, m_pert, dtype=torch.float32, device=hidden.device)
    if r == 0 or m_pert == 0:
        return out
    rows = chunk_rows(vocab, m_pert, dim, hidden.dtype, hidden.device)
    if shard is not None:  # every rank runs the same chunks (the same collectives)
        rows = shard.agree_min(rows)
    x = torch.empty(rows * (m_pert + 1), dim, dtype=hidden.dtype, device=hidden.device)
    u = torch.empty(rows * (m_pert + 1), vocab, dtype=torch.float32, device=hidden.device)
    uz, ud = u[:rows], u[rows:].view(rows, m_pert, vocab)
    flat_deltas = deltas.reshape(r, m_pert * dim)
    for r0 in range(0, r, rows):
        r1 = min(r, r0 + rows)
        stage_rows(hidden, r0, r1, x[:rows])
        stage_rows(flat_deltas, r0, r1, x[rows:].view(rows, m_pert * dim))
        if vocab > 0:
            raw_logits(x, weight, u)
        for m0 in range(0, m_pert, MAX_MP):
            m1 = min(m_pert, m0 + MAX_MP)
            cfg = config(hidden.device, hidden.dtype, _padded(m1 - m0))
            out[r0:r1, m0:m1] = _divergence_block(uz, ud[:, m0:m1], bias, r1 - r0, params, entry,
                                                  cfg, shard)
    return out


def _entry_with_kernel(kind: str) -> Divergence:
    """The registry entry ``kind``, refused with a ValueError when the integrand kernel has no
    branch for it (``triton_code`` None)."""
    entry = divergence_entry(kind)
    if entry.triton_code is None:
        raise ValueError(f"divergence {kind!r} has no Triton kernel (its registry entry's triton_code "
                         "is None): run it with backend='torch' or 'reference', or give it a code and a "
                         "branch in _cf_integrand_kernel (docs/CONTRIBUTING.md, 'A divergence')")
    return entry


def compile_cases(arch: str) -> list[CompileCase]:
    """Both kernels at every pinned (width, MP) configuration of ``arch`` (they read the float32
    chunk whatever the head's dtype; the bias keeps the head's): every flag on (bias, soft cap)
    for each kernel variant (statistics with and without the L accumulators, integrand for each
    kind), and with no flags for the KL path."""
    cases = []
    for (width, mp), cfg in CONFIGS[arch].items():
        variants = [(torch.bfloat16, True), (torch.bfloat16, False)] if width == "16" \
            else [(torch.float32, True)]
        for dtype, full in variants:
            t = TL_DTYPE_NAMES[dtype]
            head = {"UZ": "*fp32", "UD": "*fp32", "B": f"*{t}"}
            sizes = {"n_rows": "i32", "vocab": "i32", "n_pert": "i32", "stride_z": "i64",
                     "stride_dr": "i64", "stride_dm": "i64", "scale": "fp32", "softcap": "fp32",
                     "split_offset": "i32", "n_tiles": "i32"}
            consts = {"HAS_BIAS": full, "HAS_CAP": full, "BLOCK_R": cfg["BLOCK_R"], "MP": mp,
                      "BLOCK_V": cfg["BLOCK_V"], "V_SPLIT": cfg["V_SPLIT"]}
            tag = f"{t}-mp{mp}{'-all-flags' if full else ''}"
            div = ("vocab", "stride_z", "stride_dr", "stride_dm")
            for need_l in ((False, True) if full else (False,)):
                sconsts = {"NEED_L": need_l, **consts}
                stats_sig = {**head, "PM": "*fp32", "PS": "*fp32", "PC": "*fp32", "PK": "*fp32",
                             "PT": "*fp32", "PSH": "*fp32", "PE": "*fp32", **sizes,
                             **{k: "constexpr" for k in sconsts}}
                cases.append(CompileCase(f"stats{'-L' if need_l else ''}-{tag}", _cf_stats_kernel,
                                         stats_sig, sconsts, cfg["num_warps"], cfg["num_stages"],
                                         uses_dot=False, divisible_ints=div))
            # every registry entry with a kernel branch; without the flags, the KL's only
            for entry in (e for e in map(divergence_entry, KIND_CODES) if full or not e.needs_shift):
                kconsts = {"KIND": entry.triton_code, **consts, "BLOCK_R": cfg[entry.triton_block_r]}
                sig = {**head, "LSE": "*fp32", "SHIFT": "*fp32", "PF": "*fp32", **sizes,
                       **{k: "constexpr" for k in kconsts}}
                cases.append(CompileCase(f"integrand-{entry.name}-{tag}", _cf_integrand_kernel, sig,
                                         kconsts, cfg["num_warps"], cfg["num_stages"],
                                         uses_dot=False, divisible_ints=div))
    return cases
