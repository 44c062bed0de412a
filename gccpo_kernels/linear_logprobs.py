"""SPEC §1: per-token log-probs and entropy straight from hidden states and the LM-head weight.

Public: :func:`fused_linear_logprobs` and the :class:`FusedLinearLogprobs` module. The backend
(``triton``, ``torch`` or ``reference``) is picked by :mod:`gccpo_kernels._backend`. The fast
backends never hold an N x V tensor: the forward keeps per-row running statistics (max, sum of
exponentials, target logit, entropy accumulator), the backward recomputes the logits a bounded
chunk at a time.
"""

from __future__ import annotations

import torch

from ._backend import resolve_backend
from ._logits import LogitParams
from ._validation import check_finite, check_lm_head, check_logit_params, check_targets, out_dtype_for


def _impl(backend: str):
    if backend == "triton":
        from .triton import linear_logprobs as impl
    else:
        from .chunked import linear_logprobs as impl
    return impl


class _LinearLogprobsFunction(torch.autograd.Function):
    """hidden [N, D], weight [V, D], bias [V] | None, targets [N] -> (logp [N], entropy [N]).

    Ignored rows are dropped before any matmul (one host sync per call to test whether any row is
    ignored, and a nonzero() when some are), so they cost nothing and get exactly zero output and
    gradient.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, ignore_index: int, params: LogitParams,
                backend: str):
        impl = _impl(backend)
        n = hidden.shape[0]
        valid = targets != ignore_index
        rows = None
        if n > 0 and not bool(valid.all()):
            rows = valid.nonzero().squeeze(1)
        h = hidden if rows is None else hidden.index_select(0, rows)
        y = targets if rows is None else targets.index_select(0, rows)
        logp_v, ent_v, lse_v = impl.forward(h, weight, bias, y, params)
        if rows is None:
            logp, entropy = logp_v, ent_v
        else:
            logp = logp_v.new_zeros(n).index_copy_(0, rows, logp_v)
            entropy = ent_v.new_zeros(n).index_copy_(0, rows, ent_v)
        ctx.save_for_backward(hidden, weight, bias, targets, rows, lse_v, ent_v)
        ctx.params, ctx.impl = params, impl
        ctx.set_materialize_grads(False)
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        hidden, weight, bias, targets, rows, lse_v, ent_v = ctx.saved_tensors
        needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[1],
                 bias is not None and ctx.needs_input_grad[2])
        if (grad_logp is None and grad_entropy is None) or not any(needs):
            return None, None, None, None, None, None, None
        cd = lse_v.dtype

        def pick(g):
            if g is None:
                return None
            g = g.to(cd)
            # autograd hands out expanded (stride-0) gradients, e.g. for logp.sum(); kernels
            # index rows directly, so they get a dense copy
            return g.contiguous() if rows is None else g.index_select(0, rows)

        h = hidden if rows is None else hidden.index_select(0, rows)
        y = targets if rows is None else targets.index_select(0, rows)
        dh_v, dw, db = ctx.impl.backward(h, weight, bias, y, lse_v, ent_v, pick(grad_logp),
                                         pick(grad_entropy), ctx.params, needs)
        dh = dh_v
        if dh_v is not None and rows is not None:
            dh = dh_v.new_zeros(hidden.shape).index_copy_(0, rows, dh_v)
        return dh, dw, db, None, None, None, None


def fused_linear_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                          bias: torch.Tensor | None = None, temperature: float = 1.0,
                          logit_scale: float = 1.0, softcap: float | None = None,
                          ignore_index: int = -100, return_entropy: bool = False,
                          backend: str | None = None, validate: bool = True,
                          ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs of ``targets`` (and the entropy) under ``softmax(z)``, without N x V logits.

    z = c*tanh(u/c) (or u without ``softcap``), u = logit_scale * (hidden @ weight.T + bias) /
    temperature (SPEC §1).

    Args:
        hidden: ``[..., D]`` float16 / bfloat16 / float32 / float64 last hidden states.
        weight: ``[V, D]`` LM-head weight of hidden's dtype and device.
        targets: ``[...]`` int64 token ids in ``[0, V)``, or ``ignore_index``.
        bias: optional ``[V]`` LM-head bias.
        temperature, logit_scale, softcap: the logit transform (Cohere/Granite scaling, Gemma cap).
        ignore_index: rows with this target give logp = entropy = 0, no gradient, and no matmul.
        return_entropy: also return the entropy (else ``None``, and its work is skipped in backward).
        backend: ``"triton"``, ``"torch"``, ``"reference"`` or None (``$GCCPO_BACKEND``, then auto).
        validate: check target ranges and finiteness of hidden (one pass + one host sync each).

    Returns:
        ``(logp, entropy)`` of targets' shape, float32 (float64 for float64 inputs),
        differentiable with respect to hidden, weight and bias.

    Cost: forward 2NVD FLOPs, forward + backward 8NVD (the backward recomputes the logits).
    Memory: O(N + V*D) plus a bounded [chunk, V] workspace; never N x V.
    """
    check_lm_head(hidden, weight, bias)
    lead = hidden.shape[:-1]
    vocab, dim = weight.shape
    check_targets(targets, lead, vocab, ignore_index, validate, hidden.device)
    check_finite("hidden", hidden, validate)
    name = resolve_backend(backend, hidden.device, hidden.dtype)
    params = LogitParams.of(temperature, logit_scale, softcap)
    if name == "reference":
        from . import reference

        logp, entropy = reference.linear_logprobs(
            hidden, weight, targets, bias=bias, temperature=temperature, logit_scale=logit_scale,
            softcap=softcap, ignore_index=ignore_index, dtype=out_dtype_for(hidden.dtype))
        return logp, (entropy if return_entropy else None)
    # the kernels index rows, targets and bias with unit strides: make every operand dense
    h2 = hidden.reshape(-1, dim).contiguous()
    y1 = targets.reshape(-1).long().contiguous()
    w = weight.contiguous()
    bias = None if bias is None else bias.contiguous()
    logp, entropy = _LinearLogprobsFunction.apply(h2, w, bias, y1, int(ignore_index), params, name)
    logp = logp.reshape(lead)
    return logp, (entropy.reshape(lead) if return_entropy else None)


class FusedLinearLogprobs(torch.nn.Module):
    """Module form of :func:`fused_linear_logprobs`; holds only the options, not the weight.

    ``FusedLinearLogprobs(temperature=0.7)(hidden, model.lm_head.weight, targets)``.
    """

    def __init__(self, *, temperature: float = 1.0, logit_scale: float = 1.0,
                 softcap: float | None = None, ignore_index: int = -100,
                 return_entropy: bool = False, backend: str | None = None, validate: bool = True):
        super().__init__()
        check_logit_params(temperature, logit_scale, softcap)
        self.temperature, self.logit_scale, self.softcap = temperature, logit_scale, softcap
        self.ignore_index, self.return_entropy = ignore_index, return_entropy
        self.backend, self.validate = backend, validate

    def forward(self, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        return fused_linear_logprobs(
            hidden, weight, targets, bias=bias, temperature=self.temperature,
            logit_scale=self.logit_scale, softcap=self.softcap, ignore_index=self.ignore_index,
            return_entropy=self.return_entropy, backend=self.backend, validate=self.validate)

    def extra_repr(self) -> str:
        return (f"temperature={self.temperature}, logit_scale={self.logit_scale}, "
                f"softcap={self.softcap}, ignore_index={self.ignore_index}, "
                f"return_entropy={self.return_entropy}, backend={self.backend}")
