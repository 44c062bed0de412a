"""SPEC §1 on the reference backend: ``forward``, ``forward_stats`` and ``backward`` of
``chunked/linear_logprobs.py``, from :mod:`gccpo_kernels.reference`'s materialized [N, V] logits."""

from __future__ import annotations

import torch

from .. import reference
from .._logits import LogitParams
from .._validation import out_dtype_for


def forward_stats(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                  targets: torch.Tensor, params: LogitParams,
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(target logit z_y, entropy, lse), each [N] in float32 (float64 for float64 inputs); a
    target outside [0, V) (another vocabulary shard's token, or an out-of-range id clamped to -1
    or V) gives z_y = 0."""
    return reference.linear_logprobs_shard_stats(
        hidden, weight, targets, bias=bias, temperature=params.temperature,
        logit_scale=params.logit_scale, softcap=params.softcap, dtype=out_dtype_for(hidden.dtype))


def forward(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
            targets: torch.Tensor, params: LogitParams,
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logp, entropy, lse), each [N]: :func:`forward_stats` with logp = z_y - lse."""
    z_target, entropy, lse = forward_stats(hidden, weight, bias, targets, params)
    return z_target - lse, entropy, lse


def backward(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
             targets: torch.Tensor, lse: torch.Tensor, entropy: torch.Tensor,
             grad_logp: torch.Tensor | None, grad_entropy: torch.Tensor | None,
             params: LogitParams, needs: tuple[bool, bool, bool],
             dh_dtype: torch.dtype | None = None,
             ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """(d hidden, d weight, d bias) of sum(g_logp * logp + g_ent * entropy) given the rows' lse and
    entropy over the whole softmax (so a vocabulary shard gets its share, as in chunked/), None
    where ``needs`` says no; d hidden in ``dh_dtype`` (None: hidden's), the others in their
    parameter's dtype."""
    dh, dw, db = reference.linear_logprobs_shard_grads(
        hidden, weight, targets, lse, entropy, grad_logp, grad_entropy, bias=bias,
        temperature=params.temperature, logit_scale=params.logit_scale, softcap=params.softcap,
        dtype=out_dtype_for(hidden.dtype))
    need_h, need_w, need_b = needs
    return (dh.to(dh_dtype or hidden.dtype) if need_h else None, dw if need_w else None,
            db if need_b and bias is not None else None)
