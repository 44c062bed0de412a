"""SPEC §1: per-token log-probs and entropy straight from hidden states and the LM-head weight.

Public: :func:`fused_linear_logprobs` and the :class:`FusedLinearLogprobs` module. The backend
(``triton``, ``torch`` or ``reference``) is picked by :mod:`gccpo_kernels._backend`. The fast
backends never hold an N x V tensor: the forward keeps per-row running statistics (max, sum of
exponentials, target logit, entropy accumulator), the backward recomputes the logits a bounded
chunk at a time.
"""

from __future__ import annotations

import math

import torch

from . import _ops
from ._backend import resolve_backend
from ._logits import LogitParams
from ._validation import check_finite, check_lm_head, check_logit_params, check_targets, out_dtype_for


def _impl(backend: str):
    if backend == "triton":
        from .triton import linear_logprobs as impl
    else:
        from .chunked import linear_logprobs as impl
    return impl


def forward_rows(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                 targets: torch.Tensor, ignore_index: int, params: LogitParams, backend: str,
                 validate: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The body of the ``gccpo::linear_logprobs`` op: hidden [N, D], weight [V, D], bias [V] | None,
    targets [N] (all dense) -> (logp, entropy, lse), each [N], 0 on ignored rows.

    Value checks (target range, finite hidden) run here, inside the op, so that they cost no graph
    break under torch.compile. Ignored rows are dropped before any matmul (one host sync per call
    to test whether any row is ignored, and a nonzero() when some are), so they cost nothing and
    get exactly zero output and, in :func:`backward_rows`, zero gradient.
    """
    check_targets(targets, targets.shape, weight.shape[0], ignore_index, validate, hidden.device)
    check_finite("hidden", hidden, validate)
    impl = _impl(backend)
    n = hidden.shape[0]
    rows = _kept_rows(targets, ignore_index)
    h = hidden if rows is None else hidden.index_select(0, rows)
    y = _in_reach(targets if rows is None else targets.index_select(0, rows), weight.shape[0])
    logp_v, ent_v, lse_v = impl.forward(h, weight, bias, y, params)
    # 0 <= H <= log V exactly; rounding can put a near-uniform row an ulp above log V
    ent_v.clamp_(min=0.0, max=math.log(weight.shape[0]))
    check_outputs_finite("fused_linear_logprobs", (logp_v, ent_v), validate)
    if rows is None:
        return logp_v, ent_v, lse_v
    scatter = lambda t: t.new_zeros(n).index_copy_(0, rows, t)  # noqa: E731
    return scatter(logp_v), scatter(ent_v), scatter(lse_v)


def backward_rows(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                  targets: torch.Tensor, lse: torch.Tensor, entropy: torch.Tensor,
                  grad_logp: torch.Tensor | None, grad_entropy: torch.Tensor | None,
                  ignore_index: int, params: LogitParams, backend: str,
                  needs: tuple[bool, bool, bool],
                  ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """The body of the ``gccpo::linear_logprobs_backward`` op: (d hidden, d weight, d bias) of
    sum(g_logp * logp + g_ent * entropy), None where ``needs`` says a gradient is not wanted.
    Ignored rows are dropped again (exactly zero gradient, no matmul)."""
    if (grad_logp is None and grad_entropy is None) or not any(needs):
        return None, None, None
    rows = _kept_rows(targets, ignore_index)
    cd = lse.dtype

    def pick(t: torch.Tensor | None) -> torch.Tensor | None:
        if t is None:
            return None
        t = t.to(cd)
        # autograd hands out expanded (stride-0) gradients, e.g. for logp.sum(); kernels
        # index rows directly, so they get a dense copy
        return t.contiguous() if rows is None else t.index_select(0, rows)

    h = hidden if rows is None else hidden.index_select(0, rows)
    y = _in_reach(targets if rows is None else targets.index_select(0, rows), weight.shape[0])
    dh_v, dw, db = _impl(backend).backward(h, weight, bias, y, pick(lse), pick(entropy),
                                           pick(grad_logp), pick(grad_entropy), params, needs)
    dh = dh_v
    if dh_v is not None and rows is not None:
        dh = dh_v.new_zeros(hidden.shape).index_copy_(0, rows, dh_v)
    return dh, dw, db


def check_outputs_finite(op: str, outputs: tuple[torch.Tensor, ...], validate: bool) -> None:
    """Raise when an op produced NaN or inf from finite hidden states (one reduction and one host
    sync per call; skipped when not ``validate``).

    With the inputs checked finite, a non-finite output means the logits overflowed the compute
    dtype (|logit_scale * (W h + b) / temperature| above 3.4e38 in float32, e.g. hidden states
    near the bfloat16 limits times an O(1) weight) or the weight or bias hold NaN / inf (they are
    not scanned: a pass over V x D per call would cost more than the op's output check).
    """
    if not validate:
        return
    bad = [t for t in outputs if t.numel() > 0]
    if bad and not bool(torch.stack([torch.isfinite(t.abs().amax()) for t in bad]).all()):
        raise ValueError(
            f"{op} produced NaN or inf from finite hidden states: the logits "
            "logit_scale * (W h + b) / temperature overflowed the compute dtype (float32 for "
            "16/32-bit inputs: |logit| > 3.4e38), or weight / bias hold NaN or inf; scale the "
            "hidden states or the weight down, or raise the temperature")


def _in_reach(targets: torch.Tensor, vocab: int) -> torch.Tensor:
    """Targets clamped to [-1, V] (one elementwise pass, no sync). In range they are unchanged; an
    out-of-range target (possible only with validate=False) becomes -1 or V, which match no
    column in any backend (the kernels compare ids in 32 bits, where 2^32 + 5 would read as 5):
    its logit reads as 0, so logp = -lse and its gradient has no one-hot term."""
    return targets.clamp(-1, vocab)


def _kept_rows(targets: torch.Tensor, ignore_index: int) -> torch.Tensor | None:
    """Indices of the rows whose target is not ignore_index, or None when every row is kept."""
    valid = targets != ignore_index
    if targets.shape[0] > 0 and not bool(valid.all()):
        return valid.nonzero().squeeze(1)
    return None


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
    # value checks (one host sync each) run inside the op, where torch.compile does not trace
    check_targets(targets, lead, vocab, ignore_index, False, hidden.device)
    name = resolve_backend(backend, hidden.device, hidden.dtype)
    params = LogitParams.of(temperature, logit_scale, softcap)
    if name == "reference":
        from . import reference

        check_targets(targets, lead, vocab, ignore_index, validate, hidden.device)
        check_finite("hidden", hidden, validate)

        logp, entropy = reference.linear_logprobs(
            hidden, weight, targets, bias=bias, temperature=temperature, logit_scale=logit_scale,
            softcap=softcap, ignore_index=ignore_index, dtype=out_dtype_for(hidden.dtype))
        return logp, (entropy if return_entropy else None)
    # the kernels index rows, targets and bias with unit strides: make every operand dense
    h2 = hidden.reshape(-1, dim).contiguous()
    y1 = targets.reshape(-1).long().contiguous()
    w = weight.contiguous()
    bias = None if bias is None else bias.contiguous()
    logp, entropy = _ops.linear_logprobs(h2, w, bias, y1, int(ignore_index), params, name, validate)
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
