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
    TV    = 0.5 E_q |expm1(Delta - L)|
    JS    = E_q[psi(Delta - L)],  psi(x) = (x e^x - (1 + e^x) log((1 + e^x)/2)) / 2

Arithmetic runs in float32 for 16/32-bit inputs (the weight is upcast once, O(V*D)) and in float64
for float64 inputs. Workspace: the GEMM output [C(M+1), V] with C at least 512/(M+1) rows, so that
the GEMM stays efficient (65 MB at V = 32000 in float32), or more when the workspace budget
(``gccpo_kernels._workspace``) allows; the elementwise work then runs on sub-chunks of C' rows whose
~3(M+1) [C', V] temporaries fit that budget (cache-sized on the CPU). Never R x V.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .._logits import LogitParams
from .._workspace import workspace_bytes
from ._common import chunk_rows, compute_operands

LN2 = math.log(2.0)
# psi(x) = (x e^x - (1 + e^x) log((1 + e^x)/2)) / 2 = x^2/8 * sum_k JS_SERIES[k] x^k: below
# JS_SERIES_BELOW the closed form loses ~eps/x^2 relative accuracy, the series (to x^12) does not.
JS_SERIES_BELOW = 0.25
JS_SERIES = (1.0, 1.0 / 2, 1.0 / 8, 1.0 / 48, 1.0 / 288, 1.0 / 1440, 1.0 / 11520, -1.0 / 483840,
             -1.0 / 4838400, 11.0 / 14515200, 11.0 / 174182400)
# A chunk's GEMM [C(M+1), D] x [D, V] has at least this many rows: the GEMM reads all of W once
# per chunk, and CPU BLAS loses ~1.5x efficiency below a few hundred rows. With the workspace
# budget (GCCPO_WORKSPACE_MB) larger, the budget decides.
MIN_GEMM_ROWS = 512


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


def js_integrand(x: torch.Tensor, lq: torch.Tensor) -> torch.Tensor:
    """q * psi(x) for log q = lq (broadcast) and x = log q~ - log q, stable for every x.

    |x| < JS_SERIES_BELOW: the Taylor series psi(x) = x^2/8 * sum_k JS_SERIES[k] x^k (truncation
    ~1e-14 relative). Otherwise the mixture form 0.5[q (ln2 - softplus(x)) + q~ (ln2 - softplus(-x))],
    q~ = e^(lq + x), whose two terms cancel by at most a factor ~10 there.
    """
    small = x.abs() < JS_SERIES_BELOW
    xs = torch.where(small, x, 0.0)
    poly = torch.full_like(xs, JS_SERIES[-1])
    for coef in reversed(JS_SERIES[:-1]):
        poly.mul_(xs).add_(coef)
    series = poly.mul_(xs.square()).mul_(0.125).mul_(torch.exp(lq))
    direct = 0.5 * (torch.exp(lq) * (LN2 - F.softplus(x)) + torch.exp(lq + x) * (LN2 - F.softplus(-x)))
    return torch.where(small, series, direct)


def _chunk_divergence(z: torch.Tensor, delta: torch.Tensor, kind: str) -> torch.Tensor:
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
    if kind == "kl":
        return kl.squeeze(2)
    x.sub_(kl)                                      # Delta - L, L = lse(z~) - lse(z) = c + KL
    if kind == "tv":
        # |q~ - q| = q |expm1(x)|; for |x| >= 1/2 as |e^(log q + x) - q| (no overflow where q = 0)
        pb = p.unsqueeze(1)
        t = torch.where(x.abs() < 0.5, torch.expm1(x, out=tmp).abs_().mul_(pb),
                        torch.exp(lq + x).sub_(pb).abs_())
        return t.sum(dim=2).mul_(0.5).clamp_(max=1.0)
    return js_integrand(x, lq).sum(dim=2).clamp_(min=0.0, max=LN2)


def forward(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
            deltas: torch.Tensor, params: LogitParams, kind: str) -> torch.Tensor:
    """hidden [R, D], weight [V, D], bias [V] | None, deltas [R, M, D] -> divergence [R, M].

    Float32 output (float64 for float64 inputs). One pass over W per chunk of rows.
    """
    r, m_pert, d = deltas.shape
    vocab = weight.shape[0]
    cd, w, b = compute_operands(hidden, weight, bias)
    out = torch.empty(r, m_pert, dtype=cd, device=hidden.device)
    if r == 0 or m_pert == 0:
        return out
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
            out[start + s0:start + s1] = _chunk_divergence(z, dl, kind)
    return out
