"""SPEC §4 on the reference backend: ``forward`` and ``forward_sharded`` of
``chunked/group_stats.py``, from :mod:`gccpo_kernels.reference`'s per-group loops over full [R, V]
distributions in float64. Rows come sorted by group (CSR ``offsets``), the head already
restricted to the answer ids."""

from __future__ import annotations

import torch

from .. import reference
from .._logits import LogitParams
from .._validation import out_dtype_for


def _group_ids(offsets: list[int], device: torch.device) -> torch.Tensor:
    """[R] group id of each row of the sorted CSR layout ``offsets`` (G + 1 host ints)."""
    # dtype given: an empty list (G = 0) would make a float tensor
    sizes = torch.tensor([b - a for a, b in zip(offsets, offsets[1:])], dtype=torch.long, device=device)
    return torch.repeat_interleave(torch.arange(len(offsets) - 1, device=device), sizes)


def forward(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
            offsets: list[int], params: LogitParams) -> tuple[torch.Tensor, ...]:
    """(row_entropy [R], row_kl_to_mixture [R], group_mixture_entropy [G], group_mean_entropy [G],
    group_js [G]) in float32 (float64 for float64 inputs)."""
    outs = reference.group_distribution_stats(
        hidden, weight, _group_ids(offsets, hidden.device), len(offsets) - 1, bias=bias,
        temperature=params.temperature, logit_scale=params.logit_scale, softcap=params.softcap)
    return tuple(t.to(out_dtype_for(hidden.dtype)) for t in outs)


def forward_sharded(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                    offsets: list[int], params: LogitParams, shard) -> tuple[torch.Tensor, ...]:
    """:func:`forward` with ``weight`` / ``bias`` this rank's slice of the head; the same outputs
    on every rank."""
    outs = reference.group_distribution_stats_sharded(
        hidden, weight, _group_ids(offsets, hidden.device), len(offsets) - 1, shard, bias=bias,
        temperature=params.temperature, logit_scale=params.logit_scale, softcap=params.softcap)
    return tuple(t.to(out_dtype_for(hidden.dtype)) for t in outs)
