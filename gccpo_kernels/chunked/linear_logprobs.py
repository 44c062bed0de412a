"""Chunked torch backend for SPEC §1: log-probs and entropy from hidden states, [C, V] at a time.

Rows are processed in chunks of C rows, C chosen so that the two live [C, V] buffers fit the
workspace budget (``gccpo_kernels._workspace``). The forward does one GEMM per chunk (2NVD FLOPs
in all); the backward recomputes the chunk's logits and does the two gradient GEMMs (6NVD), so
forward + backward is 8NVD, the floor for a method that does not store logits. Arithmetic runs in
float32 for 16/32-bit inputs (the weight is upcast once, O(V*D)) and float64 for float64 inputs.
"""

from __future__ import annotations

import torch

from .._logits import LogitParams
from .._validation import out_dtype_for
from .._workspace import rows_per_chunk


def _compute_operands(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
    cd = out_dtype_for(hidden.dtype)
    w = weight if weight.dtype == cd else weight.to(cd)
    b = None if bias is None else (bias if bias.dtype == cd else bias.to(cd))
    return cd, w, b


def _chunk_logits(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, params: LogitParams,
                  out: torch.Tensor) -> torch.Tensor:
    """out[:rows] <- z for the chunk (u before the soft cap is not kept)."""
    z = out[: h.shape[0]]
    if b is None:
        torch.mm(h, w.T, out=z)
    else:
        torch.addmm(b, h, w.T, out=z)
    return params.apply_(z)


def _chunk_size(vocab: int, elem: int, device: torch.device, buffers: int) -> int:
    return rows_per_chunk(vocab, elem * buffers, device, multiple=8)


def forward(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
            targets: torch.Tensor, params: LogitParams,
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """hidden [N, D], weight [V, D], bias [V] | None, targets [N] in [0, V) (no ignored rows).

    Returns (logp, entropy, lse), each [N] in float32 (float64 for float64 inputs).
    Extra memory: two [C, V] buffers plus the upcast weight for 16-bit inputs.
    """
    n, vocab = hidden.shape[0], weight.shape[0]
    cd, w, b = _compute_operands(hidden, weight, bias)
    logp = torch.empty(n, dtype=cd, device=hidden.device)
    entropy = torch.empty_like(logp)
    lse = torch.empty_like(logp)
    if n == 0:
        return logp, entropy, lse
    elem = torch.finfo(cd).bits // 8
    chunk = min(n, _chunk_size(vocab, elem, hidden.device, buffers=2))
    zbuf = torch.empty(chunk, vocab, dtype=cd, device=hidden.device)
    pbuf = torch.empty_like(zbuf)
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        h = hidden[start:stop].to(cd)
        z = _chunk_logits(h, w, b, params, zbuf)
        z_target = z.gather(1, targets[start:stop, None].long()).squeeze(1)
        m = z.amax(dim=1, keepdim=True)
        zm = z.sub_(m)  # z - m <= 0, so exp cannot overflow and E[z - m] has no cancellation
        e = torch.exp(zm, out=pbuf[: stop - start])
        s = e.sum(dim=1)
        log_s = torch.log(s)
        lse[start:stop] = m.squeeze(1) + log_s
        entropy[start:stop] = log_s - torch.linalg.vecdot(e, zm) / s
        logp[start:stop] = z_target - lse[start:stop]
    return logp, entropy, lse


def backward(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
             targets: torch.Tensor, lse: torch.Tensor, entropy: torch.Tensor,
             grad_logp: torch.Tensor | None, grad_entropy: torch.Tensor | None,
             params: LogitParams, needs: tuple[bool, bool, bool],
             ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Gradients (d hidden, d weight, d bias) of sum(g_logp*logp + g_ent*entropy).

    g_z = g_logp (onehot - p) - g_ent p (z - (lse - H)); with a cap g_u = g_z (1 - (z/c)^2);
    dh = (s/tau) g_u W, dW = (s/tau) g_u^T h, db = (s/tau) sum_n g_u. dW and db accumulate in
    float32 (float64 for float64 inputs) and are returned in the weight's dtype.
    """
    need_h, need_w, need_b = needs
    n, vocab = hidden.shape[0], weight.shape[0]
    cd, w, b = _compute_operands(hidden, weight, bias)
    device = hidden.device
    dh = torch.empty(n, hidden.shape[1], dtype=cd, device=device) if need_h else None
    dw = torch.zeros(vocab, weight.shape[1], dtype=cd, device=device) if need_w else None
    db = torch.zeros(vocab, dtype=cd, device=device) if need_b else None
    if n > 0 and (need_h or need_w or need_b):
        elem = torch.finfo(cd).bits // 8
        buffers = 3 if params.softcap is not None else 2
        chunk = min(n, _chunk_size(vocab, elem, device, buffers=buffers))
        zbuf = torch.empty(chunk, vocab, dtype=cd, device=device)
        gbuf = torch.empty_like(zbuf)
        dbuf = torch.empty_like(zbuf) if params.softcap is not None else None
        scale = params.scale
        one = torch.ones((), dtype=cd, device=device)
        for start in range(0, n, chunk):
            stop = min(n, start + chunk)
            rows = stop - start
            h = hidden[start:stop].to(cd)
            z = _chunk_logits(h, w, b, params, zbuf)
            if params.softcap is not None:
                # d z / d u = 1 - tanh^2 = 1 - (z / c)^2, taken before z is overwritten
                dcap = torch.addcmul(one, z, z, value=-1.0 / params.softcap ** 2, out=dbuf[:rows])
            g = torch.sub(z, lse[start:stop, None], out=gbuf[:rows]).exp_()  # p
            # g_u = scale * (g_logp onehot - p * (g_logp + g_ent (z - mu))): the row constants fold
            # into one addcmul, coef = z * (-s g_ent) + s (g_ent mu - g_logp), then g = p * coef
            gl = grad_logp[start:stop] if grad_logp is not None else None
            if grad_entropy is not None:
                ge = grad_entropy[start:stop]
                mu = lse[start:stop] - entropy[start:stop]
                const = ge * mu if gl is None else ge * mu - gl
                coef = torch.addcmul((const * scale)[:, None], z, (ge * -scale)[:, None], out=z)
                g.mul_(coef)
            elif gl is not None:
                g.mul_((gl * -scale)[:, None])
            else:
                g.zero_()
            if gl is not None:
                g.scatter_add_(1, targets[start:stop, None].long(), (gl * scale)[:, None])
            if dbuf is not None:
                g.mul_(dcap)
            if need_h:
                torch.mm(g, w, out=dh[start:stop])
            if need_w:
                dw.addmm_(g.T, h)
            if need_b:
                db.add_(g.sum(dim=0))
    return (
        None if dh is None else dh.to(hidden.dtype),
        None if dw is None else dw.to(weight.dtype),
        None if db is None else db.to(bias.dtype),
    )
