"""SPEC §3 on the reference backend: ``forward`` and ``forward_sharded`` of
``chunked/divergence.py``, from :mod:`gccpo_kernels.reference`'s textbook forms on full [R, M, V]
tensors in float64. The caller has already restricted the head to the answer ids."""

from __future__ import annotations

import torch

from .. import reference
from .._logits import LogitParams
from .._validation import out_dtype_for


def forward(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
            deltas: torch.Tensor, params: LogitParams, kind: str) -> torch.Tensor:
    """hidden [R, D], weight [V, D], deltas [R, M, D] -> [R, M] in float32 (float64 for float64)."""
    out = reference.counterfactual_divergence(
        hidden, weight, deltas, bias=bias, temperature=params.temperature,
        logit_scale=params.logit_scale, softcap=params.softcap, kind=kind)
    return out.to(out_dtype_for(hidden.dtype))


def forward_sharded(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                    deltas: torch.Tensor, params: LogitParams, kind: str, shard) -> torch.Tensor:
    """:func:`forward` with ``weight`` / ``bias`` this rank's slice of the head; the same [R, M]
    on every rank."""
    out = reference.counterfactual_divergence_sharded(
        hidden, weight, deltas, shard, bias=bias, temperature=params.temperature,
        logit_scale=params.logit_scale, softcap=params.softcap, kind=kind)
    return out.to(out_dtype_for(hidden.dtype))
