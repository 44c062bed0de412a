"""Chunked torch backend for SPEC §3: counterfactual divergence without R x V tensors.

A chunk of C rows is processed at once: one GEMM ``[C*(M+1), D] @ W^T`` gives the base logits of
the C rows and the perturbation logits ``W delta`` of their C*M perturbations, so every row of W is
read once per chunk and the base row and its M perturbed rows come from the same read. The whole
vocabulary of the chunk is in the workspace, so this backend needs one pass over W (2(M+1)RVD
FLOPs in all) and works on exact per-row quantities (no online rescaling):

    Delta = z(h + delta) - z(h), formed from W delta (never as a difference of two logit rows)
    c     = E_q[Delta]
    F     = E_q[phi(Delta - c)],  phi(t) = exp(t) - 1 - t >= 0
    KL    = log1p(F)                       (= log E_q[exp(Delta)] - E_q[Delta], without cancellation;
                                            for F > 1, KL = logsumexp(log q + Delta) - c instead)
    L     = c + KL                         (= lse(z~) - lse(z), so log q~ - log q = Delta - L)
    D     = clamp(scale * E_q[f(Delta - L)], 0, upper)   for every other divergence, e.g.
    TV    = 0.5 E_q |expm1(Delta - L)|
    JS    = E_q[psi(Delta - L)],  psi(x) = (x e^x - (1 + e^x) log((1 + e^x)/2)) / 2

The integrand q f(x), the scale and the clamp of a divergence are its registry entry's ``terms``
and ``finish`` (``gccpo_kernels/divergences.py``); this module computes c, F, KL and L for all.

Arithmetic runs in float32 for 16/32-bit inputs (the weight is upcast once, O(V*D)) and in float64
for float64 inputs. Workspace: the GEMM output [C(M+1), V] with C at least 512/(M+1) rows, so that
the GEMM stays efficient (65 MB at V = 32000 in float32), or more when the workspace budget
(``gccpo_kernels._workspace``) allows; the elementwise work then runs on sub-chunks of C' rows whose
~3(M+1) [C', V] temporaries fit that budget (cache-sized on the CPU). Never R x V.

Vocabulary parallelism (:func:`forward_sharded`, W a slice of the head's rows): each rank
computes the same quantities over its slice (lse_r, lse~_r, c_r, F_r under the slice's own
softmax), and :func:`combine_slices` merges them exactly: with w_r = exp(lse_r - lse),
c = sum_r w_r c_r and F = sum_r w_r (e^(c_r - c) F_r + phi(c_r - c)), every term >= 0. Every
divergence but the KL needs L = c + KL first, so it takes a second pass over the slice for its
integrand.
"""

from __future__ import annotations

import math

import torch

from .._logits import LogitParams
from .._vocab_parallel import rank_sum
from .._workspace import workspace_bytes
from ..divergences import Divergence, divergence_entry
from ._common import chunk_rows, compute_operands

# A chunk's GEMM [C(M+1), D] x [D, V] has at least this many rows: the GEMM reads all of W once
# per chunk, and CPU BLAS loses ~1.5x efficiency below a few hundred rows. With the workspace
# budget (GCCPO_WORKSPACE_MB) larger, the budget decides.
MIN_GEMM_ROWS = 512
# combine_slices: a slice whose mean shift c_r exceeds the global c by more than this has its
# term combined in log space (e^dc overflows float32 at dc ~ 89). Below it, e^dc F_r overflows
# only for F_r > 6e3: F is then inf and KL takes the lse~ form, right to absolute rounding.
FAR_SHIFT = 80.0


def capped_delta(a: torch.Tensor, dd: torch.Tensor, cap: float) -> torch.Tensor:
    """c*(tanh(a + dd) - tanh(a)) without cancellation, a = u/c and dd = du/c (broadcasting).

    tanh(x) - tanh(y) = sinh(x - y) / (cosh x cosh y), with 1/cosh x = 2e^-|x| / (1 + e^-2|x|):
    the result is 4c * sinh(dd) e^(-|a+dd|-|a|) / ((1 + e^-2|a+dd|)(1 + e^-2|a|)). For |dd| >= 1
    sinh(dd) e^(-|a+dd|-|a|) = (e^(dd-s) - e^(-dd-s))/2, s = |a+dd| + |a| >= |dd|, so no exponent is
    positive and nothing overflows; below, torch.sinh is accurate to rounding.
    """
    x = a + dd
    s = x.abs() + a.abs()
    small = dd.abs() < 1.0
    big = 0.5 * (torch.exp(dd - s) - torch.exp(-dd - s))
    sh = torch.where(small, torch.sinh(torch.where(small, dd, 0.0)) * torch.exp(-s), big)
    den = (1.0 + torch.exp(-2.0 * x.abs())) * (1.0 + torch.exp(-2.0 * a.abs()))
    return sh.mul_(4.0 * cap).div_(den)


def _chunk_divergence(z: torch.Tensor, delta: torch.Tensor, entry: Divergence) -> torch.Tensor:
    """z [C, V] logits and delta [C, M, V] logit shifts (both overwritten) -> divergence [C, M].

    Temporaries: about two [C, M, V] and two [C, V] tensors (C is cache-sized on the CPU).
    """
    m = z.amax(dim=1, keepdim=True)
    zm = z.sub_(m)
    e = torch.exp(zm)
    s = e.sum(dim=1, keepdim=True)
    lq = zm.sub_(torch.log(s)).unsqueeze(1)         # log q, [C, 1, V]
    p = e.div_(s)                                   # q, [C, V]
    pcol = p.unsqueeze(2)                           # [C, V, 1]
    c = torch.bmm(delta, pcol)                      # E_q[Delta], [C, M, 1]
    x = delta.sub_(c)                               # Delta - c
    tmp = torch.expm1(x).sub_(x)                    # phi = e^t - 1 - t >= 0, abs. error ~eps*|t|
    f = torch.bmm(tmp, pcol)                        # E_q[phi(Delta - c)], [C, M, 1]
    small = f <= 1.0
    kl = torch.log1p(f)
    if not bool(small.all()):
        # KL > ln 2 (or F overflowed): lse(z~) - lse(z) - c = logsumexp(log q + Delta - c) is
        # accurate in relative terms there and cannot overflow
        big = torch.logsumexp(torch.add(lq, x, out=tmp), dim=2, keepdim=True)
        kl = torch.where(small, kl, big.clamp_min_(0.0))
    if not entry.needs_shift:                       # the KL itself
        return kl.squeeze(2)
    x.sub_(kl)                                      # Delta - L, L = lse(z~) - lse(z) = c + KL
    return entry.finish(entry.terms(x, lq, p.unsqueeze(1), tmp).sum(dim=2))


def _shift_tiles(hidden: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None,
                 deltas: torch.Tensor, params: LogitParams, cd: torch.dtype):
    """Yield (r0, r1, z [C', V], Delta [C', M, V]) for consecutive row ranges covering all R rows:
    the logits and logit shifts of the rows r0..r1-1 over all of w's rows (the consumer may
    overwrite both; they live in the chunk's workspace). R, M >= 1 and V >= 1."""
    r, m_pert, d = deltas.shape
    vocab = w.shape[0]
    sub = min(r, chunk_rows(vocab, 3 * m_pert + 3, cd, hidden.device, multiple=1))
    # the GEMM-efficiency floor applies only where it fits the workspace budget (SPEC §0)
    fits = max(1, workspace_bytes(hidden.device) // (vocab * (m_pert + 1) * (torch.finfo(cd).bits // 8)))
    chunk = min(r, max(sub, min(-(-MIN_GEMM_ROWS // (m_pert + 1)), fits)))
    xbuf = torch.empty(chunk * (m_pert + 1), d, dtype=cd, device=hidden.device)
    ubuf = torch.empty(chunk * (m_pert + 1), vocab, dtype=cd, device=hidden.device)
    scale = params.scale
    cap = params.softcap
    for start in range(0, r, chunk):
        stop = min(r, start + chunk)
        n = stop - start
        x = xbuf[: n * (m_pert + 1)]
        x[:n].copy_(hidden[start:stop])
        x[n:].copy_(deltas[start:stop].reshape(n * m_pert, d))
        u = torch.mm(x, w.T, out=ubuf[: n * (m_pert + 1)])
        base = u[:n]
        if b is not None:
            base.add_(b)
        if scale != 1.0:
            u.mul_(scale)
        delta = u[n:].view(n, m_pert, vocab)       # s * W delta / tau: exact Delta without a cap
        # the elementwise work runs on cache-sized sub-chunks of rows (contiguous slices)
        for s0 in range(0, n, sub):
            s1 = min(n, s0 + sub)
            z, dl = base[s0:s1], delta[s0:s1]
            if cap is not None:
                a = z / cap
                z = torch.tanh(a).mul_(cap)
                dl = capped_delta(a.unsqueeze(1), dl / cap, cap)
            yield start + s0, start + s1, z, dl


def forward(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
            deltas: torch.Tensor, params: LogitParams, kind: str) -> torch.Tensor:
    """hidden [R, D], weight [V, D], bias [V] | None, deltas [R, M, D] -> divergence [R, M].

    Float32 output (float64 for float64 inputs). One pass over W per chunk of rows. ``kind`` names
    an entry of :data:`gccpo_kernels.divergences.DIVERGENCES` (its torch ``terms`` and ``finish``).
    """
    entry = divergence_entry(kind)
    r, m_pert, d = deltas.shape
    cd, w, b = compute_operands(hidden, weight, bias)
    out = torch.empty(r, m_pert, dtype=cd, device=hidden.device)
    if r == 0 or m_pert == 0:
        return out
    for r0, r1, z, dl in _shift_tiles(hidden, w, b, deltas, params, cd):
        out[r0:r1] = _chunk_divergence(z, dl, entry)
    return out


# ---------------------------------------------------------------------------------------------
# vocabulary parallelism: this rank holds a slice of W's rows
# ---------------------------------------------------------------------------------------------


def _slice_stats(z: torch.Tensor, delta: torch.Tensor):
    """z [C, V] logits and delta [C, M, V] shifts of one vocabulary slice (both overwritten) ->
    the slice's (lse [C], lse~ [C, M], c [C, M], F [C, M]): log-sum-exps of z and z~ = z + Delta,
    c = E_q'[Delta] and F = E_q'[phi(Delta - c)] under q' = the softmax over the slice alone."""
    m = z.amax(dim=1, keepdim=True)
    zm = z.sub_(m)
    e = torch.exp(zm)
    s = e.sum(dim=1, keepdim=True)
    log_s = torch.log(s)
    lse = (m + log_s).squeeze(1)
    lq = zm.sub_(log_s).unsqueeze(1)               # log q', [C, 1, V]
    tmp = torch.add(lq, delta)
    lse_t = torch.logsumexp(tmp, dim=2).add_(lse.unsqueeze(1))
    pcol = e.div_(s).unsqueeze(2)                  # q', [C, V, 1]
    c = torch.bmm(delta, pcol)
    x = delta.sub_(c)
    torch.expm1(x, out=tmp).sub_(x)                # phi(Delta - c) >= 0
    f = torch.bmm(tmp, pcol)
    return lse, lse_t, c.squeeze(2), f.squeeze(2)


def _phi(t: torch.Tensor) -> torch.Tensor:
    return torch.expm1(t).sub_(t)


def combine_slices(shard, lse_l: torch.Tensor, lse_t_l: torch.Tensor, c_l: torch.Tensor,
                   f_l: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every rank's slice statistics (from :func:`_slice_stats`; lse = lse~ = -inf, c = F = 0
    for an empty slice) -> the global (lse [R], c [R, M], KL [R, M]), the same on every rank.

    With w_r = exp(lse_r - lse) the slice weights and c = sum_r w_r c_r, the exact identity
    F = E_q[phi(Delta - c)] = sum_r w_r (e^(c_r - c) F_r + phi(c_r - c)) (because
    sum_r w_r (c_r - c) = 0) has only non-negative terms: KL = log1p(F) keeps its relative
    accuracy; for F > 1, KL = lse(z~) - lse(z) - c as on one device.
    Collectives: one MAX all-reduce of [R, 1+M], two rank sums (all-gathers) of [R, 1+2M], [R, M].
    """
    m_pert = c_l.shape[1]
    mx = shard.all_reduce(torch.cat([lse_l.unsqueeze(1), lse_t_l], dim=1), "max")  # finite: V >= 1
    m0, mt = mx[:, :1], mx[:, 1:]
    t = torch.exp(lse_l.unsqueeze(1) - m0)         # [R, 1], 0 for an empty slice
    sums = rank_sum(shard, torch.cat([t, torch.exp(lse_t_l - mt), t * c_l], dim=1))
    s = sums[:, :1]
    lse = m0 + torch.log(s)
    lse_t = mt + torch.log(sums[:, 1:1 + m_pert])
    c = sums[:, 1 + m_pert:] / s
    # A slice's term w_r (e^dc F_r + phi(dc)), dc = c_r - c, is finite and accurate as written
    # for dc <= FAR_SHIFT. Beyond, e^dc would overflow, but w_r may be tiny (a low-probability
    # slice pushed up by a large shift: w_r ~ e^-95, dc ~ 100), so the term may be anything
    # from ~0 to huge: it is evaluated in log space, e^(log w_r + dc) (1 + F_r) (phi(dc) =
    # e^dc (1 - (1 + dc) e^-dc), the correction below 1e-33 relative), which is exact where
    # it is small and overflows to inf (F > 1: the lse~ form below) where it is huge.
    dc = c_l - c
    near = dc <= FAR_SHIFT
    dcn = torch.where(near, dc, 0.0)
    part = (t / s) * (torch.exp(dcn) * f_l + _phi(dcn))
    log_w = (lse_l.unsqueeze(1) - m0) - torch.log(s)
    far = torch.exp(torch.where(near, 0.0, log_w + dc)) * (1.0 + f_l)
    part = torch.where(near, part, far)
    f = rank_sum(shard, torch.where(t > 0, part, torch.zeros_like(part)))
    kl = torch.where(f <= 1.0, torch.log1p(f), (lse_t - lse - c).clamp_min(0.0))
    return lse.squeeze(1), c, kl


def _slice_integrand(z: torch.Tensor, delta: torch.Tensor, lse: torch.Tensor, shift: torch.Tensor,
                     entry: Divergence) -> torch.Tensor:
    """This slice's share of the integrand sum ([C, M], before ``entry.finish``): sum over the
    slice's tokens of ``entry.terms`` (q f(x)), x = Delta - L (``shift`` L [C, M]),
    q = e^(z - lse) with the global ``lse`` [C]. z and delta are overwritten."""
    lq = z.sub_(lse.unsqueeze(1)).unsqueeze(1)    # global log q, [C, 1, V]
    x = delta.sub_(shift.unsqueeze(2))
    return entry.terms(x, lq, torch.exp(lq), None).sum(dim=2)


def forward_sharded(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                    deltas: torch.Tensor, params: LogitParams, kind: str, shard) -> torch.Tensor:
    """:func:`forward` with ``weight`` [V_local, D] (possibly empty) this rank's slice of the head
    and ``shard`` its ``_vocab_parallel.VocabShard`` -> [R, M], the same on every rank.

    Pass 1 (one GEMM per chunk, as :func:`forward`): each slice's lse, lse~, c, F; combined by
    :func:`combine_slices` into KL. Every other divergence (JS, TV) needs L = c + KL first, so a
    second pass computes each slice's sum of the entry's ``terms`` with the global lse and L,
    summed over ranks, then ``entry.finish``. Collectives: 3 for KL, 4 for the others, each on
    O(R*M) values.
    """
    entry = divergence_entry(kind)
    r, m_pert, _ = deltas.shape
    cd, w, b = compute_operands(hidden, weight, bias)
    if r == 0 or m_pert == 0:
        return torch.empty(r, m_pert, dtype=cd, device=hidden.device)
    dev = hidden.device
    lse_l = torch.full((r,), -math.inf, dtype=cd, device=dev)
    lse_t_l = torch.full((r, m_pert), -math.inf, dtype=cd, device=dev)
    c_l = torch.zeros(r, m_pert, dtype=cd, device=dev)
    f_l = torch.zeros_like(c_l)
    local = w.shape[0] > 0
    if local:
        for r0, r1, z, dl in _shift_tiles(hidden, w, b, deltas, params, cd):
            lse_l[r0:r1], lse_t_l[r0:r1], c_l[r0:r1], f_l[r0:r1] = _slice_stats(z, dl)
    lse, c, kl = combine_slices(shard, lse_l, lse_t_l, c_l, f_l)
    if not entry.needs_shift:                       # the KL itself
        return kl
    shift = c + kl                                  # L = lse(z~) - lse(z)
    part = torch.zeros_like(c_l)
    if local:
        for r0, r1, z, dl in _shift_tiles(hidden, w, b, deltas, params, cd):
            part[r0:r1] = _slice_integrand(z, dl, lse[r0:r1], shift[r0:r1], entry)
    return entry.finish(rank_sum(shard, part))
