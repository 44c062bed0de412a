"""Chunked torch backend for SPEC §4: group-wise answer-distribution statistics.

Rows arrive sorted by group (CSR ``offsets``). Two passes over W, each one GEMM per chunk of C rows
(4RVD FLOPs in all):

1. logits of the chunk -> per row lse and entropy H(q_i) = log S - sum_v e_v (z_v - m) / S (shifted by
   the row max m, S = sum e, so no cancellation against lse); the chunk's probabilities are added
   into the group mixtures with one segment sum per chunk, ``sums[g_lo:g_hi] += segment_sum(q)``
   (each group sums its own rows: deterministic, no atomics, and a NaN row cannot reach
   another group as it would through a 0/1 membership GEMM). Then q_bar = sums / n_g, H(q_bar), log q_bar.
2. logits again -> KL(q_i || q_bar_g) = sum_v q_v (log q_v - log q_bar_v), term by term, with
   log q = z - lse exact in log space.

Per group: mean entropy and JS = mean_i KL(q_i || q_bar_g), which equals H(q_bar) - mean_i H(q_i)
exactly in real arithmetic but does not cancel when the members agree. A group of one gets KL = JS
= 0 (exactly); an empty group gets zeros.

Memory: the [G, V] mixtures (SPEC §4 allows O(groups*V)) plus about three [C, V] buffers (C from
the workspace budget, at least 128); never R x V. Arithmetic in float32 (float64 for float64 inputs).

Vocabulary parallelism (:func:`forward_sharded`, W a slice of the head's rows): a token's mixture
column needs only that token's probabilities, so it is local to the rank that holds the token once
the rows' global lse is known; that takes one more pass (lse first, then mixtures, then KL).
"""

from __future__ import annotations

import bisect
import math

import torch

from .._logits import LogitParams
from .._vocab_parallel import combine_softmax_stats, rank_sum
from .._workspace import workspace_bytes
from ._common import chunk_rows, compute_operands, tile_logits

# GEMM rows per chunk at least (CPU BLAS is inefficient on thin GEMMs; 3 [128, V] buffers)
MIN_CHUNK_ROWS = 128


def segment_mean(values: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` [R] (sorted by segment) over segments of ``sizes`` [G]; 0 when empty."""
    if values.numel() == 0:  # R = 0 (segment_reduce rejects an empty input): every group empty
        return values.new_zeros(sizes.shape[0])
    sums = torch.segment_reduce(values, "sum", lengths=sizes, initial=0)
    return sums / sizes.clamp_min(1).to(values.dtype)


def group_sizes(offsets: list[int], device: torch.device) -> torch.Tensor:
    """[G] int64 member counts from the G+1 CSR ``offsets`` (host ints)."""
    return torch.tensor([b - a for a, b in zip(offsets, offsets[1:])], dtype=torch.long,
                        device=device)


def forward(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
            offsets: list[int], params: LogitParams):
    """hidden [R, D] sorted by group, weight [V, D], bias [V] | None, offsets: G+1 ints (host).

    Returns (row_entropy [R], row_kl [R], mixture_entropy [G], mean_entropy [G], js [G]) in the
    compute dtype, rows in hidden's (sorted) order.
    """
    r, vocab, num_groups, device = hidden.shape[0], weight.shape[0], len(offsets) - 1, hidden.device
    cd, w, b = compute_operands(hidden, weight, bias)
    sizes = group_sizes(offsets, device)
    gid = torch.repeat_interleave(torch.arange(num_groups, device=device), sizes)
    row_entropy = torch.zeros(r, dtype=cd, device=device)
    row_kl = torch.zeros(r, dtype=cd, device=device)
    lse = torch.zeros(r, dtype=cd, device=device)
    mix = torch.zeros(num_groups, vocab, dtype=cd, device=device)
    if r > 0:
        chunk, zbuf, pbuf = _buffers(r, vocab, cd, device)
        _softmax_stats(hidden, w, b, params, chunk, zbuf, pbuf, lse, row_entropy, mix, offsets)
    mixture_entropy, log_mix = _mixture_entropy_and_log(mix, sizes)
    if r > 0:
        _row_kl(hidden, w, b, params, lse, log_mix, gid, chunk, zbuf, pbuf, row_kl)
        row_kl.masked_fill_(sizes.index_select(0, gid) == 1, 0.0)
    mean_entropy = segment_mean(row_entropy, sizes)
    js = segment_mean(row_kl, sizes)
    return row_entropy, row_kl, mixture_entropy, mean_entropy, js


def _buffers(r: int, vocab: int, cd: torch.dtype, device: torch.device):
    """(rows per chunk, two [chunk, vocab] buffers) for R >= 1 rows and vocab >= 1 columns."""
    # the floor applies only where it fits the workspace budget (SPEC §0)
    fits = max(1, workspace_bytes(device) // (vocab * 3 * (torch.finfo(cd).bits // 8)))
    chunk = min(r, max(chunk_rows(vocab, 3, cd, device), min(MIN_CHUNK_ROWS, fits)))
    zbuf = torch.empty(chunk, vocab, dtype=cd, device=device)
    return chunk, zbuf, torch.empty_like(zbuf)


def _softmax_stats(hidden, w, b, params, chunk, zbuf, pbuf, lse, entropy, mix=None,
                   offsets=None) -> None:
    """Pass 1: lse[i] and entropy[i] of row i's softmax over w's rows (H = log S - sum_v e_v
    (z_v - m) / S, shifted by the row max m, so no cancellation against lse); with ``mix``,
    each row's softmax is also added into its group's mixture sum (``offsets``: CSR)."""
    r = hidden.shape[0]
    for start in range(0, r, chunk):
        stop = min(r, start + chunk)
        z = tile_logits(hidden[start:stop].to(w.dtype), w, b, params, zbuf)
        m = z.amax(dim=1, keepdim=True)
        zm = z.sub_(m)
        e = torch.exp(zm, out=pbuf[: stop - start])
        s = e.sum(dim=1)
        log_s = torch.log(s)
        lse[start:stop] = m.squeeze(1) + log_s
        entropy[start:stop] = log_s - torch.linalg.vecdot(e, zm) / s
        if mix is not None:
            _add_to_mixtures(mix, e.div_(s.unsqueeze(1)), offsets, start, stop)


def _add_to_mixtures(mix: torch.Tensor, q: torch.Tensor, offsets: list[int], start: int,
                     stop: int) -> None:
    """mix[g] += sum of q's rows in group g, for the rows start..stop-1 (q [stop - start, V])."""
    # groups of rows start and stop - 1 (empty groups share an offset and are skipped);
    # each group sums its own rows (a segment sum, no atomics): a NaN row stays in its
    # group, where a 0/1 membership GEMM would spread 0 * NaN to every group of the chunk
    g_lo = bisect.bisect_right(offsets, start) - 1
    g_hi = bisect.bisect_right(offsets, stop - 1)
    lengths = [min(offsets[g + 1], stop) - max(offsets[g], start) for g in range(g_lo, g_hi)]
    mix[g_lo:g_hi] += torch.segment_reduce(q, "sum", lengths=torch.tensor(lengths, device=mix.device),
                                           axis=0)


def _mixture_entropy_and_log(mix: torch.Tensor, sizes: torch.Tensor):
    """Sums of member distributions [G, V] -> (sum_v of -q_bar log q_bar [G], log q_bar [G, V]);
    ``mix`` becomes q_bar, then log q_bar (in place)."""
    mix.div_(sizes.clamp_min(1).unsqueeze(1).to(mix.dtype))
    mixture_entropy = -torch.special.xlogy(mix, mix).sum(dim=1)
    # q_bar_v = 0 only where every member's q_v underflowed to 0: those terms are 0 * finite
    log_mix = mix.clamp_min_(torch.finfo(mix.dtype).tiny).log_()
    return mixture_entropy, log_mix


def _row_kl(hidden, w, b, params, lse, log_mix, gid, chunk, zbuf, pbuf, row_kl) -> None:
    """row_kl[i] = sum_v q_iv (log q_iv - log q_bar_g(i),v) over w's rows, q = e^(z - lse)."""
    r = hidden.shape[0]
    for start in range(0, r, chunk):
        stop = min(r, start + chunk)
        lq = tile_logits(hidden[start:stop].to(w.dtype), w, b, params, zbuf)
        lq.sub_(lse[start:stop].unsqueeze(1))
        q = torch.exp(lq, out=pbuf[: stop - start])
        diff = lq.sub_(log_mix.index_select(0, gid[start:stop]))
        row_kl[start:stop] = torch.linalg.vecdot(q, diff)


def forward_sharded(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                    offsets: list[int], params: LogitParams, shard):
    """:func:`forward` with ``weight`` [V_local, D] this rank's vocabulary slice (possibly empty)
    and ``shard`` its ``_vocab_parallel.VocabShard``; the outputs are the same on every rank.

    Three passes over the slice (one more than :func:`forward`, whose mixtures need the global
    normalizers): (1) each row's lse and entropy over the slice, combined over ranks into the
    global lse and H(q_i) (``combine_softmax_stats``: one all-gather of [2, R]); (2) the mixture
    columns of this slice, q_bar_g,v = mean_i e^(z_iv - lse_i), local to the rank (a token's
    mixture needs only that token's probabilities); (3) this slice's share of KL(q_i || q_bar_g)
    and of H(q_bar_g). The shares are summed over ranks with one rank sum of [R + G] values.
    Collectives: the slice sizes, then two all-gathers, never R x V.
    """
    r, vocab, num_groups, device = hidden.shape[0], weight.shape[0], len(offsets) - 1, hidden.device
    cd, w, b = compute_operands(hidden, weight, bias)
    sizes = group_sizes(offsets, device)
    if r == 0:       # every rank holds the same rows: none of them communicates
        z = torch.zeros(num_groups, dtype=cd, device=device)
        e = torch.zeros(0, dtype=cd, device=device)
        return e, e.clone(), z, z.clone(), z.clone()
    gid = torch.repeat_interleave(torch.arange(num_groups, device=device), sizes)
    lse_l = torch.full((r,), -math.inf, dtype=cd, device=device)
    ent_l = torch.zeros(r, dtype=cd, device=device)
    row_kl = torch.zeros(r, dtype=cd, device=device)
    mix = torch.zeros(num_groups, vocab, dtype=cd, device=device)
    if vocab > 0:
        chunk, zbuf, pbuf = _buffers(r, vocab, cd, device)
        _softmax_stats(hidden, w, b, params, chunk, zbuf, pbuf, lse_l, ent_l)
    lse, row_entropy = combine_softmax_stats(shard, lse_l, ent_l)
    if vocab > 0:
        for start in range(0, r, chunk):
            stop = min(r, start + chunk)
            lq = tile_logits(hidden[start:stop].to(cd), w, b, params, zbuf)
            q = torch.exp(lq.sub_(lse[start:stop].unsqueeze(1)), out=pbuf[: stop - start])
            _add_to_mixtures(mix, q, offsets, start, stop)
    mixture_entropy, log_mix = _mixture_entropy_and_log(mix, sizes)
    if vocab > 0:
        _row_kl(hidden, w, b, params, lse, log_mix, gid, chunk, zbuf, pbuf, row_kl)
    both = rank_sum(shard, torch.cat([row_kl, mixture_entropy]))
    row_kl, mixture_entropy = both[:r].contiguous(), both[r:].contiguous()
    row_kl.masked_fill_(sizes.index_select(0, gid) == 1, 0.0)
    mean_entropy = segment_mean(row_entropy, sizes)
    js = segment_mean(row_kl, sizes)
    return row_entropy, row_kl, mixture_entropy, mean_entropy, js
