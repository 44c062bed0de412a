"""The fused policy loss with its gradient computed in the forward (issue 18): 6NVD GEMM FLOPs
instead of the composed path's 8NVD.

A token-level policy loss (every TRL and verl aggregation; not GSPO's sequence-level ratio) is
``l = sum_i w_i f_i(logp_i) + sum_i w'_i (-c H_i)``: a per-token term ``f_i`` that reads only
token i's log-prob (and its old / reference log-prob, advantage, importance weight), weighted by
aggregation weights ``w_i`` that depend on the mask alone (1 / token count, 1 / (rows * len_b),
..., times ``loss_scale``), plus the entropy bonus with its own weights ``w'_i``. So a row
chunk's logits, as soon as they are computed, give the chunk's logp and entropy, then
``d l / d logp_i = w_i f_i'(logp_i)`` and ``d l / d H_i = -c w'_i``, then the logit gradient and
``d hidden``, ``d weight`` (``gccpo_kernels.chunked.loss_grad``): the logits are never
recomputed. The backward only multiplies the stored gradients by ``grad_output``.

One copy of the loss math: ``f_i'`` comes from autograd through :func:`policy_loss` itself (which
its caller hands in, as ``loss_fn``: this module never imports the loss's module), called
on the chunk's tokens as a ``[1, rows]`` batch with ``loss_agg="token-sum"`` (so its gradient is
the per-token ``f_i'``) and no entropy term; ``w`` and ``w'`` come from autograd through the
loss's own aggregation on the mask. The loss value and the metrics come from one
:func:`policy_loss` call on the whole batch's logp and entropy after the pass, exactly as the
composed path computes them (and with its value checks).

The pass over the logits has two implementations with one contract (``forward_with_grad``):
the torch backend's :mod:`gccpo_kernels.chunked.loss_grad` (cache-blocked torch passes, any
device) and the triton backend's :mod:`gccpo_kernels.triton.loss_epilogue` (cuBLAS GEMMs at a
fixed chunk shape, the row statistics and the logit gradient in two Triton kernels; batch
invariant). Used by :func:`gccpo_kernels.fused_linear_policy_loss` when :func:`eligible` says
so; otherwise (sequence-level importance sampling, vocabulary parallelism, torch.compile
tracing, the reference backend, or no gradient wanted) the composed path runs.
"""

from __future__ import annotations

import dataclasses

import torch
from torch.autograd.function import once_differentiable

from ._aggregation import aggregation_weights
from ._backend import OpBackends
from ._logits import LogitParams
from ._validation import out_dtype_for
from .chunked import loss_grad as torch_impl
from .linear_logprobs import check_outputs_finite, validate_rows


def _triton_impl():
    from .triton import loss_epilogue as impl  # imports triton: only when the backend runs

    return impl


#: The pass over the logits, by backend: ``forward_with_grad(h, w, b, y, params, token_grads,
#: needs, reads_entropy=) -> (logp, entropy, dh, dw, db)``. No reference form: the reference
#: backend composes.
IMPLEMENTATIONS = OpBackends("the in-forward loss gradient", ("forward_with_grad",),
                             triton=_triton_impl, torch=torch_impl)
BACKENDS = IMPLEMENTATIONS.names  # the backends with an in-forward gradient pass


def eligible(cfg, backend: str, process_group, needs: tuple[bool, bool, bool],
             *others) -> bool:
    """Whether the in-forward gradient path applies (see the module docstring). ``others``: the
    loss's other tensor arguments (advantages, old / reference log-probs, importance weights, a
    tensor normalizer or loss_scale): when any needs a gradient, the composed path gives it."""
    if any(isinstance(t, torch.Tensor) and t.requires_grad for t in others):
        return False
    return (backend in IMPLEMENTATIONS and process_group is None and any(needs)
            and cfg.importance_sampling_level == "token" and torch.is_grad_enabled()
            and not torch.compiler.is_compiling())


def _per_token(t: torch.Tensor | None, shape: torch.Size, rows: torch.Tensor | None,
               dtype: torch.dtype) -> torch.Tensor | None:
    """A [B, T] / [B, 1] / [B] input as a [n] vector at the flat token indices ``rows`` (all
    tokens when None)."""
    if t is None:
        return None
    t = t.to(dtype)
    t = (t[:, None] if t.dim() == 1 else t).expand(shape).reshape(-1)
    return t if rows is None else t.index_select(0, rows)


def _scatter(v: torch.Tensor, rows: torch.Tensor | None, total: int) -> torch.Tensor:
    """[n, ...] values of the kept rows as [total, ...], zeros elsewhere (``v`` when all kept)."""
    if rows is None:
        return v
    return v.new_zeros((total, *v.shape[1:])).index_copy_(0, rows, v)


class _InForwardLoss(torch.autograd.Function):
    """loss (a scalar) whose gradients with respect to hidden / weight / bias were computed in the
    forward; the backward scales them by grad_output."""

    @staticmethod
    def forward(ctx, loss, hidden, weight, bias, dh, dw, db):
        # the gradients in float32 (float64) until the backward has scaled them: a loss scale
        # (fp16 GradScaler) or 1 / accumulation steps is applied before any 16-bit rounding
        ctx.grads = (dh, dw, db)
        ctx.dtypes = tuple(None if t is None else t.dtype for t in (hidden, weight, bias))
        return loss.clone()

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        if ctx.grads is None:
            raise RuntimeError(
                "the fused policy loss's gradients were computed in its forward and are handed out "
                "once: a second backward through the same loss (retain_graph=True) is not supported; "
                "call fused_linear_policy_loss again")
        grads, ctx.grads = ctx.grads, None  # handed out once: ours alone, scaled in place
        # an upstream gradient of exactly 1 (loss.backward()) leaves them as they are (x * 1 == x
        # bitwise): read on the CPU only, where it costs no device sync, and not while a compiler
        # traces the backward (a value-dependent branch); saves a pass over V x D
        unit = (grad.device.type == "cpu" and not torch.compiler.is_compiling()
                and bool(grad == 1))
        out = [None if g is None else (g if unit else g.mul_(grad.to(g.dtype))).to(dt)
               for g, dt in zip(grads, ctx.dtypes)]
        del grads
        return (None, *out, None, None, None)


def fused_loss_in_forward(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                          y: torch.Tensor, m: torch.Tensor, advantages: torch.Tensor,
                          old_logp: torch.Tensor | None, ref_logp: torch.Tensor | None,
                          is_weights: torch.Tensor | None, cfg, normalizer, loss_scale,
                          params: LogitParams, ignore_index: int, validate: bool,
                          needs: tuple[bool, bool, bool], backend: str, loss_fn):
    """``(loss, logp [B, T], entropy [B, T], metrics)`` of the fused policy loss, the loss carrying
    the gradients computed in this forward. ``y``: targets with ``ignore_index`` where the mask
    ``m`` ([B, T] bool, checked) is False; ``backend``: ``"torch"`` or ``"triton"``, whose pass
    over the logits runs; ``loss_fn``: the loss math, :func:`gccpo_kernels.policy_loss.policy_loss`
    (handed in by its caller: this module is the pass over the logits, the math has one copy).
    The caller has checked the loss's arguments; the other arguments as in
    :func:`gccpo_kernels.fused_linear_policy_loss`."""
    b, t, dim = hidden.shape
    shape = m.shape
    cd = out_dtype_for(hidden.dtype)
    y1 = y.reshape(-1)
    validate_rows(hidden.reshape(-1, dim), weight, bias, y1, ignore_index, validate)
    # the rows the composed path keeps: target != ignore_index (masked tokens carry it; with
    # validate=False an unmasked one may too, and gets logp 0 there as well). Every row kept
    # (one host sync): views, no copies
    kept = y1 != ignore_index
    rows = None if bool(kept.all()) else kept.nonzero().squeeze(1)
    h = hidden.detach().reshape(-1, dim)
    targets = y1
    if rows is not None:
        h, targets = h.index_select(0, rows), y1.index_select(0, rows)
    # out of range (possible only with validate=False): -1 or V, which match no column (logit 0
    # read, no one-hot gradient), as on the composed path
    targets = targets.clamp(-1, weight.shape[0])

    # the per-token inputs at the kept tokens, and the aggregation weights
    adv = _per_token(advantages, shape, rows, cd)
    old = _per_token(old_logp, shape, rows, cd)
    ref = _per_token(ref_logp, shape, rows, cd)
    isw = _per_token(is_weights, shape, rows, cd)
    w_loss = _per_token(aggregation_weights(m, cfg, cfg.loss_agg, normalizer, loss_scale, cd),
                        shape, rows, cd)
    w_ent = None
    if cfg.entropy_coef != 0:
        mode = cfg.loss_agg if cfg.entropy_agg is None else cfg.entropy_agg
        norm = normalizer if cfg.entropy_agg is None else None
        w_ent = _per_token(aggregation_weights(m, cfg, mode, norm, loss_scale, cd), shape, rows, cd)
    chunk_cfg = dataclasses.replace(cfg, loss_agg="token-sum", entropy_coef=0.0, entropy_agg=None,
                                    max_len=None)

    def token_grads(r0: int, r1: int, lp: torch.Tensor, ent: torch.Tensor):
        piece = lambda v: None if v is None else v[r0:r1][None]  # noqa: E731
        with torch.enable_grad():
            lp_c = lp.detach()[None].requires_grad_()
            ones = torch.ones_like(lp_c, dtype=torch.bool)
            # old_logp None is on-policy: policy_loss reads the ratio as exp(lp - lp.detach())
            loss_c, _ = loss_fn(lp_c, piece(old), piece(adv), ones, ref_logp=piece(ref),
                                is_weights=piece(isw), config=chunk_cfg, validate=False)
            (g,) = torch.autograd.grad(loss_c, lp_c)
        g_logp = g[0] * w_loss[r0:r1]
        g_ent = None if w_ent is None else w_ent[r0:r1] * -cfg.entropy_coef
        return g_logp, g_ent

    logp_v, ent_v, dh_v, dw, db = IMPLEMENTATIONS.load(backend).forward_with_grad(
        h, weight.detach(), None if bias is None else bias.detach(), targets, params, token_grads,
        needs, reads_entropy=w_ent is not None)
    logp = _scatter(logp_v, rows, b * t).reshape(shape)
    entropy = _scatter(ent_v, rows, b * t).reshape(shape)
    check_outputs_finite("fused_linear_policy_loss", (logp_v, ent_v), validate)
    with torch.no_grad():  # the value and the metrics: the one loss call, with its value checks
        loss, metrics = loss_fn(logp, old_logp, advantages, m, ref_logp=ref_logp, entropy=entropy,
                                is_weights=is_weights, config=cfg, normalizer=normalizer,
                                loss_scale=loss_scale, validate=validate)
    dh = None if dh_v is None else _scatter(dh_v, rows, b * t).reshape(hidden.shape)
    loss = _InForwardLoss.apply(loss, hidden, weight, bias, dh, dw, db)
    return loss, logp, entropy, metrics
