"""SPEC §2's aggregation: per-token loss values to one scalar over the mask, and each token's
weight in it.

A leaf shared by the loss math (:func:`gccpo_kernels.policy_loss.policy_loss` aggregates with
:func:`aggregate`) and the in-forward gradient (:mod:`gccpo_kernels.loss_in_forward` takes the
per-token weights from :func:`aggregation_weights`, the same aggregation differentiated), so the
aggregation exists once and neither module imports the other's.
"""

from __future__ import annotations

from typing import Protocol

import torch

LOSS_AGGS: tuple[str, ...] = (
    "token-mean",
    "token-sum",
    "seq-mean-token-mean",
    "seq-mean-token-sum",
    "seq-mean-token-sum-norm",
)


class AggregationOptions(Protocol):
    """The config fields the aggregation reads; :class:`gccpo_kernels.PolicyLossConfig` has them."""

    @property
    def skip_empty_rows(self) -> bool: ...

    @property
    def max_len(self) -> int | None: ...

    @property
    def sum_norm_rows(self) -> bool: ...


def aggregate(values: torch.Tensor, m: torch.Tensor, count_rows: torch.Tensor, mode: str,
              normalizer, cfg: AggregationOptions) -> torch.Tensor:
    """Scalar aggregate of per-token ``values`` (``[B, T]`` or broadcastable) over the mask.

    ``mode`` is one of :data:`LOSS_AGGS` (SPEC §2's meanings); ``normalizer`` (a number or a 0-dim
    tensor, None: the local count) replaces the denominator; ``cfg`` gives ``skip_empty_rows``,
    ``max_len`` and ``sum_norm_rows``. Masked values are dropped with ``where``. Linear in
    ``values``, so its gradient on the mask is the aggregation weight of each token
    (:func:`aggregation_weights`).
    """
    b, t = m.shape
    vals = torch.where(m, values, values.new_zeros(()))
    if mode == "token-sum":
        return vals.sum()
    if mode == "token-mean":
        den = count_rows.sum().clamp(min=1) if normalizer is None else normalizer
        return vals.sum() / den
    # max(., 1): an empty batch (B = 0 or T = 0) sums to 0 and gives loss 0, never 0 / 0
    rows = (count_rows > 0).sum().clamp(min=1) if cfg.skip_empty_rows else max(b, 1)
    if mode == "seq-mean-token-mean":
        num = (vals.sum(1) / count_rows.clamp(min=1)).sum()
        den = rows
    elif mode == "seq-mean-token-sum":
        num, den = vals.sum(), rows
    else:  # seq-mean-token-sum-norm
        horizon = max(t, 1) if cfg.max_len is None else cfg.max_len
        num, den = vals.sum(), (rows * horizon if cfg.sum_norm_rows else horizon)
    return num / (den if normalizer is None else normalizer)


def aggregation_weights(m: torch.Tensor, cfg: AggregationOptions, mode: str, normalizer, loss_scale,
                        dtype: torch.dtype) -> torch.Tensor:
    """[B, T] d(aggregate) / d(per-token value) under ``mode``, times ``loss_scale``: the loss's
    own aggregation differentiated (it is linear in the values, so this is exact)."""
    if isinstance(normalizer, torch.Tensor):  # a one-element tensor of any shape -> a scalar
        normalizer = normalizer.to(device=m.device, dtype=dtype).reshape(())
    if isinstance(loss_scale, torch.Tensor):
        loss_scale = loss_scale.to(device=m.device, dtype=dtype).reshape(())
    with torch.enable_grad():
        ones = torch.ones(m.shape, dtype=dtype, device=m.device, requires_grad=True)
        count_rows = m.to(dtype).sum(1)
        total = aggregate(ones, m, count_rows, mode, normalizer, cfg) * loss_scale
        (w,) = torch.autograd.grad(total, ones, allow_unused=True)
    return torch.zeros_like(ones) if w is None else w.detach()
