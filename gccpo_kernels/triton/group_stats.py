"""Triton backend for SPEC §4: group-wise answer-distribution statistics, rows sorted by group.

Three passes over W (6RVD FLOPs), none holding an R x V tensor:
  1. row statistics lse_i and H(q_i): the SPEC §1 forward kernel (``triton.linear_logprobs``),
     whose per-row running max / sum / entropy accumulator is exactly what is needed.
  2. ``_mixture_kernel``: a program owns one group and one [BLOCK_V] vocabulary tile. It walks
     the group's rows in blocks of BLOCK_R that start at the group's first row, recomputes their
     logit tile, forms q = e^(z - lse) and sums it over the block's rows. No other program writes
     that part of q_bar: no atomics, deterministic, any group sizes (a group of 100k rows is just
     a longer loop). Blocks start at the group's own first row, so a group's sums see the same
     rows in the same places whatever groups come before it: the statistics of a group are
     bitwise the same alone or inside any batch (batch invariance). The price: a group of s rows
     costs ceil(s / BLOCK_R) logit tiles, so groups much smaller than BLOCK_R (64 rows on a GPU)
     waste part of pass 2 (a group of 8 rows: 8 / 64 of each tile is used).
  3. ``_row_kl_kernel``: per (row block, vocabulary split) sum_v q_v (log q_v - log q_bar_g,v),
     term by term, reading log q_bar from the [G, V] buffer (SPEC §4 allows O(groups * V)).
H(q_bar) and the group means are segmented sums in ``_segment_sum_kernel`` (one program per
segment, blocks aligned to the segment's start: a fixed order, unlike torch's shape-dependent
reductions); the vocabulary splits of pass 3 are merged by a left fold (``_utils.fold_sum``).

Vocabulary parallelism (:func:`forward_sharded`, W a slice of the head's rows): the same kernels
on the slice; pass 1's statistics are merged over ranks, and passes 2 and 3 take the global lse as
their argument, so each rank's mixture columns and KL terms are those of the unsharded op.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .._logits import LogitParams
from .._vocab_parallel import combine_softmax_stats, rank_sum
from ._utils import TL_DTYPE_NAMES, CompileCase, arch_key, dot_precision, fold_sum, upcast_dots
from .linear_logprobs import _logit_tile
from .linear_logprobs import forward as _row_forward


def _cfg(r: int, v: int, d: int, warps: int, stages: int, split: int = 8192) -> dict[str, int]:
    return dict(BLOCK_R=r, BLOCK_V=v, BLOCK_D=d, V_SPLIT=split, num_warps=warps,
                num_stages=stages)


SEGMENT_BLOCK = 1024  # elements per step of _segment_sum_kernel (pinned: part of the fixed order)


# Pinned per architecture and input width, never by R or G.
CONFIGS: dict[str, dict[str, dict[str, int]]] = {
    "interpreter": {"16": _cfg(16, 64, 64, 4, 1, split=128), "32": _cfg(16, 64, 64, 4, 1, split=128)},
    "sm90": {"16": _cfg(64, 128, 64, 8, 3), "32": _cfg(64, 64, 32, 8, 3)},
    "sm80": {"16": _cfg(64, 128, 32, 8, 3), "32": _cfg(32, 64, 32, 8, 2)},
}


@triton.jit
def _mixture_kernel(H, W, B, LSE, OFF, MIX, n_rows, vocab, dim, stride_h, stride_w, stride_mix,
                    scale, softcap, HAS_BIAS: tl.constexpr, HAS_CAP: tl.constexpr,
                    BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
                    EVEN_D: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """Pass 2: q_bar's column tile of one group. Program (g, v) sums q = e^(z - LSE) over group
    g's rows (OFF[g]..OFF[g+1], in blocks of BLOCK_R from the group's own first row) for the
    vocabulary tile v, recomputing the [BLOCK_R, BLOCK_V] logits from H and W, and writes the mean
    to MIX[g, tile] (MIX: [G, V] float32). Only this program writes that tile: no atomics."""
    g = tl.program_id(0)
    pid_v = tl.program_id(1)
    lo = tl.load(OFF + g)
    hi = tl.load(OFF + g + 1)
    cols = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    col_ok = cols < vocab
    acc = tl.zeros([BLOCK_V], dtype=tl.float32)
    for r0 in range(lo, hi, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        row_ok = rows < hi
        z = _logit_tile(H, W, B, rows, n_rows, cols, col_ok, vocab, dim, stride_h, stride_w, scale,
                        softcap, HAS_BIAS, HAS_CAP, BLOCK_R, BLOCK_V, BLOCK_D, EVEN_D, UPCAST,
                        PRECISION)
        lse = tl.load(LSE + rows.to(tl.int64), mask=row_ok, other=0.0)
        q = tl.where(row_ok[:, None], tl.exp(z - lse[:, None]), 0.0)
        acc += tl.sum(q, axis=0)
    mix = acc / tl.maximum(hi - lo, 1).to(tl.float32)
    ptr = MIX + g.to(tl.int64) * stride_mix + cols
    tl.store(ptr, mix, mask=col_ok)


@triton.jit
def _segment_sum_kernel(X, OFF, OUT, BLOCK: tl.constexpr):
    """OUT[g] = sum of X[OFF[g]:OFF[g+1]] in blocks of BLOCK aligned to OFF[g]: the order depends
    only on the segment's own length."""
    g = tl.program_id(0)
    lo = tl.load(OFF + g)
    hi = tl.load(OFF + g + 1)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    # relative offsets in the loop (a segment is shorter than 2^31), the 64-bit start added to them
    for i0 in range(0, hi - lo, BLOCK):
        idx = lo + i0 + tl.arange(0, BLOCK)
        acc += tl.load(X + idx, mask=idx < hi, other=0.0)
    tl.store(OUT + g, tl.sum(acc, axis=0))


def segment_sum(values: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """[G] float32 sums of the contiguous float32 ``values`` over the int64 CSR ``offsets`` [G+1],
    in a fixed order (see ``_segment_sum_kernel``); 0 for empty segments."""
    num = offsets.shape[0] - 1
    out = torch.empty(num, dtype=torch.float32, device=values.device)
    if num > 0:
        _segment_sum_kernel[(num,)](values, offsets, out, BLOCK=SEGMENT_BLOCK, num_warps=4)
    return out


@triton.jit
def _row_kl_kernel(H, W, B, LSE, GID, LMIX, PK, n_rows, vocab, dim, stride_h, stride_w, stride_mix,
                   scale, softcap, split_offset, n_tiles, HAS_BIAS: tl.constexpr,
                   HAS_CAP: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr,
                   BLOCK_D: tl.constexpr, V_SPLIT: tl.constexpr, EVEN_D: tl.constexpr,
                   UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """Pass 3: per (row block, vocabulary split), sum_v q_v (log q_v - log q_bar_g,v) over the
    split's n_tiles tiles of BLOCK_V columns, with q from the recomputed logits and LSE, g = GID[row]
    and log q_bar read from LMIX ([G, V]); writes the partial sums to PK[split, row] (the splits
    are folded on the host side in a fixed order)."""
    pid_r = tl.program_id(0)
    pid_s = tl.program_id(1) + split_offset
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < n_rows
    rows64 = rows.to(tl.int64)
    lse = tl.load(LSE + rows64, mask=row_ok, other=0.0)
    gid = tl.load(GID + rows64, mask=row_ok, other=0).to(tl.int64)
    acc = tl.zeros([BLOCK_R], dtype=tl.float32)
    for i in range(0, n_tiles):
        cols = pid_s * V_SPLIT + i * BLOCK_V + tl.arange(0, BLOCK_V)
        col_ok = cols < vocab
        z = _logit_tile(H, W, B, rows, n_rows, cols, col_ok, vocab, dim, stride_h, stride_w, scale,
                        softcap, HAS_BIAS, HAS_CAP, BLOCK_R, BLOCK_V, BLOCK_D, EVEN_D, UPCAST,
                        PRECISION)
        lq = z - lse[:, None]
        lm = tl.load(LMIX + gid[:, None] * stride_mix + cols[None, :],
                     mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        term = tl.exp(lq) * (lq - lm)
        acc += tl.sum(tl.where(col_ok[None, :], term, 0.0), axis=1)
    tl.store(PK + pid_s.to(tl.int64) * n_rows + rows64, acc, mask=row_ok)


def config(device: torch.device, dtype: torch.dtype) -> dict[str, int]:
    return CONFIGS[arch_key(device)]["32" if dtype == torch.float32 else "16"]


def forward(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
            offsets: list[int], params: LogitParams):
    """hidden [R, D] sorted by group (contiguous), weight [V, D], offsets: G+1 host ints.

    Returns float32 (row_entropy [R], row_kl [R], mixture_entropy [G], mean_entropy [G], js [G]).
    Extra memory: the [G, V] mixtures, O(R * V / V_SPLIT) split partials.
    """
    r, dim = hidden.shape
    vocab = weight.shape[0]
    num_groups = len(offsets) - 1
    dev = hidden.device
    sizes = torch.tensor([offsets[g + 1] - offsets[g] for g in range(num_groups)], dtype=torch.long,
                         device=dev)
    if r == 0:
        z = torch.zeros(num_groups, dtype=torch.float32, device=dev)
        e = torch.zeros(0, dtype=torch.float32, device=dev)
        return e, e.clone(), z, z.clone(), z.clone()
    gid = torch.repeat_interleave(torch.arange(num_groups, device=dev, dtype=torch.int32), sizes)
    off = torch.tensor(offsets, dtype=torch.int64, device=dev)
    # pass 1: lse and entropy per row (the SPEC §1 forward; its log-prob output is not used)
    _, row_entropy, lse = _row_forward(hidden, weight, bias, torch.zeros(r, dtype=torch.long, device=dev),
                                       params)
    lse = lse.contiguous()
    row_kl, mixture_entropy = _mixture_and_kl(hidden, weight, bias, lse, off, gid, params)
    return _finish(row_entropy, row_kl, mixture_entropy, sizes, gid, off)


def _mixture_and_kl(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                    lse: torch.Tensor, off: torch.Tensor, gid: torch.Tensor, params: LogitParams,
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Passes 2 and 3 over ``weight``'s rows given the rows' lse [R]: (sum_v q_iv (log q_iv -
    log q_bar_g(i),v) [R], sum_v -q_bar_gv log q_bar_gv [G]) over those rows of the vocabulary."""
    r, dim = hidden.shape
    vocab = weight.shape[0]
    num_groups = off.shape[0] - 1
    dev = hidden.device
    cfg = config(dev, hidden.dtype)
    common = dict(HAS_BIAS=bias is not None, HAS_CAP=params.softcap is not None,
                  BLOCK_R=cfg["BLOCK_R"], BLOCK_V=cfg["BLOCK_V"], BLOCK_D=cfg["BLOCK_D"],
                  EVEN_D=dim % cfg["BLOCK_D"] == 0, UPCAST=upcast_dots(hidden.dtype),
                  PRECISION=dot_precision(hidden.dtype), num_warps=cfg["num_warps"],
                  num_stages=cfg["num_stages"])
    b_arg = bias if bias is not None else hidden
    # pass 2: mixtures
    mix = torch.empty(num_groups, vocab, dtype=torch.float32, device=dev)
    if num_groups > 0:
        grid = (num_groups, triton.cdiv(vocab, cfg["BLOCK_V"]))
        _mixture_kernel[grid](hidden, weight, b_arg, lse, off, mix, r, vocab, dim,
                              hidden.stride(0), weight.stride(0), mix.stride(0), params.scale,
                              params.softcap or 1.0, **common)
    vocab_offsets = torch.arange(num_groups + 1, device=dev, dtype=torch.int64) * vocab
    mixture_entropy = segment_sum(-torch.special.xlogy(mix, mix).reshape(-1), vocab_offsets)
    log_mix = mix.clamp_min_(torch.finfo(torch.float32).tiny).log_()
    # pass 3: KL(q_i || q_bar_g) per row and vocabulary split
    splits = triton.cdiv(vocab, cfg["V_SPLIT"])
    pk = torch.empty(splits, r, dtype=torch.float32, device=dev)
    full_tiles = cfg["V_SPLIT"] // cfg["BLOCK_V"]
    last_tiles = triton.cdiv(vocab - (splits - 1) * cfg["V_SPLIT"], cfg["BLOCK_V"])
    for split_offset, count, n_tiles in ((0, splits - 1, full_tiles), (splits - 1, 1, last_tiles)):
        if count == 0:
            continue
        _row_kl_kernel[(triton.cdiv(r, cfg["BLOCK_R"]), count)](
            hidden, weight, b_arg, lse, gid, log_mix, pk, r, vocab, dim, hidden.stride(0),
            weight.stride(0), log_mix.stride(0), params.scale, params.softcap or 1.0, split_offset,
            n_tiles, V_SPLIT=cfg["V_SPLIT"], **common)
    return fold_sum(pk), mixture_entropy


def _finish(row_entropy, row_kl, mixture_entropy, sizes, gid, off):
    """The group outputs from the per-row ones; a group of one gets KL = JS = 0."""
    row_kl.masked_fill_(sizes.index_select(0, gid.long()) == 1, 0.0)
    count = sizes.clamp_min(1).to(torch.float32)
    mean_entropy = segment_sum(row_entropy.contiguous(), off) / count
    js = segment_sum(row_kl, off) / count
    return row_entropy, row_kl, mixture_entropy, mean_entropy, js


def forward_sharded(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                    offsets: list[int], params: LogitParams, shard):
    """:func:`forward` with ``weight`` [V_local, D] this rank's vocabulary slice (possibly empty)
    and ``shard`` its ``_vocab_parallel.VocabShard``; float32 outputs, the same on every rank.

    The same three passes and kernels on the slice: pass 1's per-slice lse and entropy are
    combined over ranks (``combine_softmax_stats``, one all-gather of [2, R]); passes 2 and 3
    get the global lse as their argument, so the mixture columns and the KL terms of this slice
    are exactly those of the unsharded op; the per-row KL and per-group H(q_bar) shares are
    summed over ranks (one rank sum of [R + G]).
    """
    r = hidden.shape[0]
    vocab = weight.shape[0]
    num_groups = len(offsets) - 1
    dev = hidden.device
    sizes = torch.tensor([offsets[g + 1] - offsets[g] for g in range(num_groups)], dtype=torch.long,
                         device=dev)
    if r == 0:       # every rank holds the same rows: none of them communicates
        z = torch.zeros(num_groups, dtype=torch.float32, device=dev)
        e = torch.zeros(0, dtype=torch.float32, device=dev)
        return e, e.clone(), z, z.clone(), z.clone()
    gid = torch.repeat_interleave(torch.arange(num_groups, device=dev, dtype=torch.int32), sizes)
    off = torch.tensor(offsets, dtype=torch.int64, device=dev)
    if vocab > 0:
        _, ent_l, lse_l = _row_forward(hidden, weight, bias,
                                       torch.zeros(r, dtype=torch.long, device=dev), params)
    else:
        lse_l = torch.full((r,), -math.inf, dtype=torch.float32, device=dev)
        ent_l = torch.zeros(r, dtype=torch.float32, device=dev)
    lse, row_entropy = combine_softmax_stats(shard, lse_l, ent_l)
    lse = lse.contiguous()
    if vocab > 0:
        row_kl, mixture_entropy = _mixture_and_kl(hidden, weight, bias, lse, off, gid, params)
    else:
        row_kl = torch.zeros(r, dtype=torch.float32, device=dev)
        mixture_entropy = torch.zeros(num_groups, dtype=torch.float32, device=dev)
    both = rank_sum(shard, torch.cat([row_kl, mixture_entropy]))
    return _finish(row_entropy.contiguous(), both[:r].contiguous(), both[r:].contiguous(), sizes,
                   gid, off)


def compile_cases(arch: str) -> list[CompileCase]:
    """The mixture and row-KL kernels at the pinned configurations of ``arch`` (pass 1 is the
    SPEC §1 forward kernel, compiled with its own module): bf16 plain and with every flag,
    fp16 and fp32 with every flag."""
    cases = []
    for dtype, full in ((torch.bfloat16, False), (torch.bfloat16, True), (torch.float16, True),
                        (torch.float32, True)):
        t = TL_DTYPE_NAMES[dtype]
        cfg = CONFIGS[arch]["32" if dtype == torch.float32 else "16"]
        head = {"H": f"*{t}", "W": f"*{t}", "B": f"*{t}", "LSE": "*fp32", "GID": "*i32"}
        flags = {"HAS_BIAS": full, "HAS_CAP": full, "BLOCK_R": cfg["BLOCK_R"],
                 "BLOCK_V": cfg["BLOCK_V"], "BLOCK_D": cfg["BLOCK_D"]}
        tail = {"EVEN_D": not full, "UPCAST": False, "PRECISION": dot_precision(dtype)}
        tag = f"{t}{'-all-flags' if full else ''}"
        large = dtype == torch.bfloat16
        div = ("dim", "stride_h", "stride_w", "stride_mix")
        mix_const = {**flags, **tail}
        mix_head = {k: v for k, v in head.items() if k != "GID"}
        mix_sig = {**mix_head, "OFF": "*i64", "MIX": "*fp32", "n_rows": "i32", "vocab": "i32",
                   "dim": "i32", "stride_h": "i64", "stride_w": "i64",
                   "stride_mix": "i64", "scale": "fp32", "softcap": "fp32",
                   **{k: "constexpr" for k in mix_const}}
        cases.append(CompileCase(f"mixture-{tag}", _mixture_kernel, mix_sig, mix_const,
                                 cfg["num_warps"], cfg["num_stages"], large_shape_config=large,
                                 divisible_ints=div))
        kl_const = {**flags, "V_SPLIT": cfg["V_SPLIT"], **tail}
        kl_sig = {**head, "LMIX": "*fp32", "PK": "*fp32", "n_rows": "i32", "vocab": "i32",
                  "dim": "i32", "stride_h": "i64", "stride_w": "i64", "stride_mix": "i64",
                  "scale": "fp32", "softcap": "fp32", "split_offset": "i32", "n_tiles": "i32",
                  **{k: "constexpr" for k in kl_const}}
        cases.append(CompileCase(f"row_kl-{tag}", _row_kl_kernel, kl_sig, kl_const,
                                 cfg["num_warps"], cfg["num_stages"], large_shape_config=large,
                                 divisible_ints=div))
    cases.append(CompileCase("segment_sum", _segment_sum_kernel,
                             {"X": "*fp32", "OFF": "*i64", "OUT": "*fp32", "BLOCK": "constexpr"},
                             {"BLOCK": SEGMENT_BLOCK}, 4, 1, uses_dot=False))
    return cases
