"""Triton backend for SPEC §4: group-wise answer-distribution statistics, rows sorted by group.

Issue 18's design: one GEMM per chunk, Triton over the chunk. Whole groups are packed, in order,
into chunks of at most C rows (C from the workspace budget, V, D and the dtype: never from R or
G); each chunk's rows are staged into a fixed [C, D] buffer (rows past the end zeroed) and
multiplied by W^T once (cuBLAS, float32 result: ``logit_epilogues.raw_logits``). Three Triton
passes then read that float32 chunk, so W is read **once** per chunk (2 R_pad V D FLOPs in all,
against 6RVD for the former three passes over W):

  1. row statistics lse_i and H(q_i): ``logit_epilogues._row_stats_kernel`` (online max /
     sum-exp / entropy, one read of the chunk).
  2. ``_mixture_kernel``: a program owns one group of the chunk and one [BLOCK_V] vocabulary tile;
     it walks the group's rows in blocks of BLOCK_R that start at the group's first row, forms
     q = e^(z - lse) and sums it over the rows (the host divides by the group's size). No other
     program writes that part of the sums: no atomics, deterministic. Blocks start at the group's
     own first row, so a group's sums see the same rows in the same order whatever groups come
     before it: a group's statistics are bitwise the same alone or inside any batch.
  3. ``_row_kl_kernel``: per (row block, vocabulary split) sum_v q_v (log q_v - log q_bar_g,v),
     reading log q_bar from the chunk's [G_c, V] buffer (SPEC §4 allows O(groups * V)).
H(q_bar) and the group means are segmented sums in ``_segment_sum_kernel`` (one program per
segment, blocks aligned to the segment's start: a fixed order, unlike torch's shape-dependent
reductions); the vocabulary splits of pass 3 are merged by a left fold (``_utils.fold_sum``).

A group of more than C rows cannot have its row KLs from the GEMM that gave its mixture: it is
streamed alone in chunks of C rows from its first row, the row statistics and mixture sums of a
chunk from one GEMM, the row KLs from a second (2 passes over W for that group only; the
mixture's sums add chunk by chunk in a fixed order). Which path a group takes depends only on its
own size (batch invariance). Chunks of empty groups only cost nothing.

Vocabulary parallelism (:func:`forward_sharded`, W a slice of the head's rows): the same chunks
and kernels on the slice (C: the smallest over the ranks of what each one's slice and budget
allow, one all-reduce per call, so every rank runs the same chunks); each chunk's per-slice lse and entropy are combined over ranks
(``combine_softmax_stats``: one all-gather of [2, C] per chunk) before passes 2 and 3, which then
see the global lse, so the mixture columns and KL terms of this slice are exactly those of the
unsharded op; the per-row KL and per-group H(q_bar) shares are summed over ranks at the end (one
rank sum of [R + G]).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .._logits import LogitParams
from .._vocab_parallel import combine_softmax_stats, rank_sum
from ._utils import TL_DTYPE_NAMES, CompileCase, arch_key, fold_sum
from .logit_epilogues import (CONFIGS as EPILOGUE_CONFIGS, _transform, chunk_rows, raw_logits,
                              row_stats, stage_rows)


def _cfg(r: int, v: int, warps: int, split: int = 8192) -> dict[str, int]:
    return dict(BLOCK_R=r, BLOCK_V=v, V_SPLIT=split, num_warps=warps, num_stages=1)


SEGMENT_BLOCK = 1024  # elements per step of _segment_sum_kernel (pinned: part of the fixed order)


# Pinned per architecture, never by R or G. Both kernels stream the float32 chunk (no dot), so
# the input width does not matter.
CONFIGS: dict[str, dict[str, int]] = {
    "interpreter": _cfg(16, 64, 4, split=128),
    "sm90": _cfg(16, 256, 4),
    "sm80": _cfg(16, 256, 4),
}


@triton.jit
def _chunk_logits(U, B, rows, row_ok, cols, col_ok, stride_u, scale, softcap,
                  HAS_BIAS: tl.constexpr, HAS_CAP: tl.constexpr):
    """z = cap(s (U + b) / tau) of a [rows, cols] tile of the float32 chunk U (raw products),
    masked rows and columns read 0 before the transform."""
    cols64 = cols.to(tl.int64)
    u = tl.load(U + rows.to(tl.int64)[:, None] * stride_u + cols64[None, :],
                mask=row_ok[:, None] & col_ok[None, :], other=0.0)
    return _transform(u, B, cols64, col_ok, scale, softcap, HAS_BIAS, HAS_CAP)


@triton.jit
def _mixture_kernel(U, B, LSE, OFF, MIX, vocab, stride_u, stride_mix, scale, softcap,
                    HAS_BIAS: tl.constexpr, HAS_CAP: tl.constexpr, BLOCK_R: tl.constexpr,
                    BLOCK_V: tl.constexpr):
    """Pass 2: the sum over group g's rows (OFF[g]..OFF[g+1] of the chunk, in blocks of BLOCK_R
    from the group's own first row) of q = e^(z - LSE) on the vocabulary tile of program (g, v),
    written to MIX[g, tile] (MIX: [G_c, V] float32). Only this program writes that tile."""
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
        z = _chunk_logits(U, B, rows, row_ok, cols, col_ok, stride_u, scale, softcap, HAS_BIAS,
                          HAS_CAP)
        lse = tl.load(LSE + rows.to(tl.int64), mask=row_ok, other=0.0)
        q = tl.where(row_ok[:, None], tl.exp(z - lse[:, None]), 0.0)
        acc += tl.sum(q, axis=0)
    tl.store(MIX + g.to(tl.int64) * stride_mix + cols, acc, mask=col_ok)


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
def _row_kl_kernel(U, B, LSE, GID, LMIX, PK, n_rows, vocab, stride_u, stride_mix, scale, softcap,
                   split_offset, n_tiles, HAS_BIAS: tl.constexpr, HAS_CAP: tl.constexpr,
                   BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr, V_SPLIT: tl.constexpr):
    """Pass 3: per (row block, vocabulary split), sum_v q_v (log q_v - log q_bar_g,v) over the
    split's n_tiles tiles of BLOCK_V columns, q from the chunk U and LSE, g = GID[row] (the
    chunk's local group) and log q_bar read from LMIX ([G_c, V]); writes the partial sums to
    PK[split, row] (folded on the host side in a fixed order)."""
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
        z = _chunk_logits(U, B, rows, row_ok, cols, col_ok, stride_u, scale, softcap, HAS_BIAS,
                          HAS_CAP)
        lq = z - lse[:, None]
        lm = tl.load(LMIX + gid[:, None] * stride_mix + cols[None, :],
                     mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        term = tl.exp(lq) * (lq - lm)
        acc += tl.sum(tl.where(col_ok[None, :], term, 0.0), axis=1)
    tl.store(PK + pid_s.to(tl.int64) * n_rows + rows64, acc, mask=row_ok)


class _Chunk:
    """The buffers of one chunk and the steps every path takes on it: stage + GEMM, the row
    statistics (combined over ranks with a shard), the mixture sums, the row KL terms."""

    def __init__(self, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                 params: LogitParams, shard, rows: int) -> None:
        dev, f32 = hidden.device, torch.float32
        self.hidden, self.weight, self.bias, self.params, self.shard = hidden, weight, bias, params, shard
        self.vocab = weight.shape[0]
        self.cfg = CONFIGS[arch_key(dev)]
        self.stats_cfg = EPILOGUE_CONFIGS[arch_key(dev)]["stats"]
        self.h_in = torch.empty(rows, hidden.shape[1], dtype=hidden.dtype, device=dev)
        self.u = torch.empty(rows, self.vocab, dtype=f32, device=dev)
        self.stats = torch.empty(3, rows, dtype=f32, device=dev)
        self.no_target = torch.full((rows,), -1, dtype=torch.long, device=dev)
        self.b_arg = bias if bias is not None else self.u

    def logits(self, r0: int, r1: int) -> None:
        """Rows r0:r1 of ``hidden`` staged, U = h W^T (one GEMM at the chunk's fixed shape)."""
        stage_rows(self.hidden, r0, r1, self.h_in)
        if self.vocab > 0:
            raw_logits(self.h_in, self.weight, self.u)

    def row_stats(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(lse [k], entropy [k]) of the chunk's first k rows, over the whole vocabulary."""
        dev = self.u.device
        if self.vocab > 0:
            row_stats(self.u, self.bias, self.no_target[:k], self.params, self.stats[0],
                      self.stats[1], self.stats[2], self.stats_cfg)
            lse, ent = self.stats[0, :k].clone(), self.stats[1, :k].clone()
        else:
            lse = torch.full((k,), -math.inf, dtype=torch.float32, device=dev)
            ent = torch.zeros(k, dtype=torch.float32, device=dev)
        if self.shard is not None:
            lse, ent = combine_softmax_stats(self.shard, lse, ent)
        return lse.contiguous(), ent.contiguous()

    def new_mixtures(self, groups: int) -> torch.Tensor:
        """A [groups, V] float32 buffer for :meth:`mixture_sums` (which writes every element)."""
        return torch.empty(groups, self.vocab, dtype=torch.float32, device=self.u.device)

    def mixture_sums(self, lse: torch.Tensor, local_off: torch.Tensor, out: torch.Tensor) -> None:
        """out [G_c, V] = per local group, the sum over its rows of q (pass 2); every element is
        written (0 for an empty group)."""
        if self.vocab == 0 or out.shape[0] == 0:
            return
        grid = (out.shape[0], triton.cdiv(self.vocab, self.cfg["BLOCK_V"]))
        _mixture_kernel[grid](self.u, self.b_arg, lse, local_off, out, self.vocab, self.u.stride(0),
                              out.stride(0), self.params.scale, self.params.softcap or 1.0,
                              **self._consts())

    def row_kl(self, lse: torch.Tensor, local_gid: torch.Tensor, log_mix: torch.Tensor) -> torch.Tensor:
        """[k] sum_v q_v (log q_v - log q_bar_v) over this slice of the vocabulary (pass 3)."""
        k, cfg = lse.shape[0], self.cfg
        if self.vocab == 0:
            return torch.zeros(k, dtype=torch.float32, device=lse.device)
        splits = triton.cdiv(self.vocab, cfg["V_SPLIT"])
        pk = torch.empty(splits, k, dtype=torch.float32, device=lse.device)
        full_tiles = cfg["V_SPLIT"] // cfg["BLOCK_V"]
        last_tiles = triton.cdiv(self.vocab - (splits - 1) * cfg["V_SPLIT"], cfg["BLOCK_V"])
        for split_offset, count, n_tiles in ((0, splits - 1, full_tiles), (splits - 1, 1, last_tiles)):
            if count == 0:
                continue
            _row_kl_kernel[(triton.cdiv(k, cfg["BLOCK_R"]), count)](
                self.u, self.b_arg, lse, local_gid, log_mix, pk, k, self.vocab, self.u.stride(0),
                log_mix.stride(0), self.params.scale, self.params.softcap or 1.0, split_offset,
                n_tiles, V_SPLIT=cfg["V_SPLIT"], **self._consts())
        return fold_sum(pk)

    def _consts(self) -> dict:
        cfg = self.cfg
        return dict(HAS_BIAS=self.bias is not None, HAS_CAP=self.params.softcap is not None,
                    BLOCK_R=cfg["BLOCK_R"], BLOCK_V=cfg["BLOCK_V"], num_warps=cfg["num_warps"],
                    num_stages=cfg["num_stages"])


def plan_chunks(offsets: list[int], rows: int) -> list[tuple[int, int]]:
    """Group ranges [g0, g1) in order: whole groups packed while their rows fit ``rows``; a group
    of more than ``rows`` rows alone (streamed). Empty groups join the chunk they fall in."""
    chunks, g0 = [], 0
    num = len(offsets) - 1
    while g0 < num:
        g1 = g0 + 1
        if offsets[g1] - offsets[g0] <= rows:
            while g1 < num and offsets[g1 + 1] - offsets[g0] <= rows:
                g1 += 1
        chunks.append((g0, g1))
        g0 = g1
    return chunks


def _mixture_entropy(mix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum_v -q_bar log q_bar per row of ``mix`` [G_c, V] in a fixed order, log q_bar)."""
    g, vocab = mix.shape
    vocab_offsets = torch.arange(g + 1, device=mix.device, dtype=torch.int64) * vocab
    ent = segment_sum(-torch.special.xlogy(mix, mix).reshape(-1), vocab_offsets)
    return ent, mix.clamp_min(torch.finfo(torch.float32).tiny).log_()


def _forward(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
             offsets: list[int], params: LogitParams, shard):
    r, dim = hidden.shape
    num_groups = len(offsets) - 1
    dev, f32 = hidden.device, torch.float32
    sizes = torch.tensor([offsets[g + 1] - offsets[g] for g in range(num_groups)], dtype=torch.long,
                         device=dev)
    if r == 0:       # every rank holds the same rows: none of them communicates
        z = torch.zeros(num_groups, dtype=f32, device=dev)
        e = torch.zeros(0, dtype=f32, device=dev)
        return e, e.clone(), z, z.clone(), z.clone()
    gid = torch.repeat_interleave(torch.arange(num_groups, device=dev, dtype=torch.int32), sizes)
    off = torch.tensor(offsets, dtype=torch.int64, device=dev)
    rows = chunk_rows(weight.shape[0], dim, hidden.dtype, dev, gradient=False)
    if shard is not None:  # every rank runs the same chunks (the same collectives)
        rows = shard.agree_min(rows)
    chunk = _Chunk(hidden, weight, bias, params, shard, rows)
    row_entropy = torch.empty(r, dtype=f32, device=dev)
    row_kl = torch.empty(r, dtype=f32, device=dev)
    mixture_entropy = torch.zeros(num_groups, dtype=f32, device=dev)
    for g0, g1 in plan_chunks(offsets, rows):
        r0, r1 = offsets[g0], offsets[g1]
        if r1 == r0:                 # empty groups only: zeros, no GEMM
            continue
        if r1 - r0 <= rows:          # whole groups: one GEMM, three passes over the chunk
            chunk.logits(r0, r1)
            lse, row_entropy[r0:r1] = chunk.row_stats(r1 - r0)
            mix = chunk.new_mixtures(g1 - g0)
            chunk.mixture_sums(lse, (off[g0:g1 + 1] - r0).contiguous(), mix)
            mix /= sizes[g0:g1].clamp_min(1).to(f32)[:, None]
            mixture_entropy[g0:g1], log_mix = _mixture_entropy(mix)
            row_kl[r0:r1] = chunk.row_kl(lse, (gid[r0:r1] - g0).contiguous(), log_mix)
            continue
        # one group larger than a chunk, streamed: its row statistics and mixture sums from one
        # GEMM per chunk (the chunk's lse is known before its mixture pass), its row KLs from a
        # second (they need the whole group's mixture): 2 passes over W for this group
        spans = [(c0, min(r1, c0 + rows)) for c0 in range(r0, r1, rows)]
        lses = []
        total = torch.zeros(1, weight.shape[0], dtype=f32, device=dev)
        part = chunk.new_mixtures(1)
        for c0, c1 in spans:
            chunk.logits(c0, c1)
            lse, row_entropy[c0:c1] = chunk.row_stats(c1 - c0)
            lses.append(lse)
            chunk.mixture_sums(lse, torch.tensor([0, c1 - c0], dtype=torch.int64, device=dev), part)
            total += part
        total /= float(r1 - r0)
        mixture_entropy[g0:g1], log_mix = _mixture_entropy(total)
        zeros = torch.zeros(rows, dtype=torch.int32, device=dev)
        for (c0, c1), lse in zip(spans, lses):
            chunk.logits(c0, c1)
            row_kl[c0:c1] = chunk.row_kl(lse, zeros[:c1 - c0], log_mix)
    if shard is not None:
        both = rank_sum(shard, torch.cat([row_kl, mixture_entropy]))
        row_kl, mixture_entropy = both[:r].contiguous(), both[r:].contiguous()
    return _finish(row_entropy, row_kl, mixture_entropy, sizes, gid, off)


def forward(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
            offsets: list[int], params: LogitParams):
    """hidden [R, D] sorted by group (contiguous), weight [V, D], offsets: G+1 host ints.

    Returns float32 (row_entropy [R], row_kl [R], mixture_entropy [G], mean_entropy [G], js [G]).
    Extra memory: the [C, V] float32 chunk and [C, D] staging, the [G_c, V] mixtures of one
    chunk, O(C V / V_SPLIT) split partials. GEMM FLOPs: 2 C V D per chunk of whole groups, 4 C V D
    per chunk of a group larger than a chunk.
    """
    return _forward(hidden, weight, bias, offsets, params, None)


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
    Collectives: one all-gather of [2, C] per chunk (the rows' lse and entropy), one rank sum of
    [R + G] at the end (see the module docstring)."""
    return _forward(hidden, weight, bias, offsets, params, shard)


def compile_cases(arch: str) -> list[CompileCase]:
    """The mixture and row-KL kernels at the pinned configuration of ``arch`` (pass 1 is the
    shared row-statistics epilogue, compiled with ``logit_epilogues``), plain and with every flag
    (the bias in each head dtype), and the segment sum."""
    cases = []
    cfg = CONFIGS[arch]
    for dtype, full in ((torch.bfloat16, False), (torch.bfloat16, True), (torch.float16, True),
                        (torch.float32, True)):
        t = TL_DTYPE_NAMES[dtype]
        flags = {"HAS_BIAS": full, "HAS_CAP": full, "BLOCK_R": cfg["BLOCK_R"],
                 "BLOCK_V": cfg["BLOCK_V"]}
        tag = f"{t}{'-all-flags' if full else ''}"
        div = ("vocab", "stride_u", "stride_mix")
        mix_sig = {"U": "*fp32", "B": f"*{t}", "LSE": "*fp32", "OFF": "*i64", "MIX": "*fp32",
                   "vocab": "i32", "stride_u": "i64", "stride_mix": "i64", "scale": "fp32",
                   "softcap": "fp32", **{k: "constexpr" for k in flags}}
        cases.append(CompileCase(f"mixture-{tag}", _mixture_kernel, mix_sig, flags,
                                 cfg["num_warps"], cfg["num_stages"], uses_dot=False,
                                 divisible_ints=div))
        kl_const = {**flags, "V_SPLIT": cfg["V_SPLIT"]}
        kl_sig = {"U": "*fp32", "B": f"*{t}", "LSE": "*fp32", "GID": "*i32", "LMIX": "*fp32",
                  "PK": "*fp32", "n_rows": "i32", "vocab": "i32", "stride_u": "i64",
                  "stride_mix": "i64", "scale": "fp32", "softcap": "fp32", "split_offset": "i32",
                  "n_tiles": "i32", **{k: "constexpr" for k in kl_const}}
        cases.append(CompileCase(f"row_kl-{tag}", _row_kl_kernel, kl_sig, kl_const,
                                 cfg["num_warps"], cfg["num_stages"], uses_dot=False,
                                 divisible_ints=div))
    cases.append(CompileCase("segment_sum", _segment_sum_kernel,
                             {"X": "*fp32", "OFF": "*i64", "OUT": "*fp32", "BLOCK": "constexpr"},
                             {"BLOCK": SEGMENT_BLOCK}, 4, 1, uses_dot=False))
    return cases
