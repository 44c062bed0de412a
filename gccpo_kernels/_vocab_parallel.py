"""Vocabulary parallelism: where a rank's slice of the LM head sits, and the O(N) collectives that
turn per-shard partials into global per-row values.

Layout (Megatron / verl / NeMo style): every rank of ``process_group`` holds the hidden rows of
*all* tokens and a contiguous slice ``weight[offset : offset + local]`` of the ``[V, D]`` LM head
(and of the bias). Slices are in rank order, so rank r's offset is the sum of the slice sizes of
ranks 0..r-1; slices may differ in size (V not divisible by P) and may be empty (P > V).

Every helper here is a plain (non-autograd) collective on small per-row tensors: the ops that use
them write their backward explicitly, so the gradient flow never passes through a collective
autograd does not know about. Nothing here ever sees an ``[N, V]`` tensor.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class VocabShard:
    """This rank's slice of the vocabulary.

    Attributes:
        group: the ``torch.distributed`` process group (None: the default group).
        rank, world: this rank's index in ``group`` and the group's size.
        offset: global id of the slice's first row (``weight[0]`` here is row ``offset`` of the full head).
        local: rows of the local slice (``weight.shape[0]``); may be 0.
        total: the full vocabulary size V (sum of every rank's ``local``).
    """

    group: Any
    rank: int
    world: int
    offset: int
    local: int
    total: int

    def local_targets(self, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Global target ids [N] -> (ids relative to this slice, bool [N]: the target is in this
        slice). Ids outside the slice (and ignore_index) are mapped to -1, which matches no
        column in any backend."""
        rel = targets - self.offset
        inside = (rel >= 0) & (rel < self.local)
        return torch.where(inside, rel, torch.full_like(rel, -1)), inside

    # -- collectives (in place on a copy; O(numel) traffic) ---------------------------------------

    def all_reduce(self, t: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """All-reduce ``t`` (``op``: "sum" or "max") over the group; returns a new tensor."""
        import torch.distributed as dist

        out = t.detach().clone().contiguous()
        dist.all_reduce(out, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX, group=self.group)
        return out

    def logsumexp(self, lse_local: torch.Tensor) -> torch.Tensor:
        """Global log-sum-exp from each rank's local log-sum-exp (any shape; -inf for an empty
        slice): two all-reduces (MAX, then SUM of exp(local - max)). Exact up to one rounding
        of the sum; -inf where every rank has -inf."""
        m = self.all_reduce(lse_local, "max")
        safe = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
        s = self.all_reduce(torch.exp(lse_local - safe), "sum")
        return torch.where(torch.isfinite(m), safe + torch.log(s), m)


def vocab_shard(weight: torch.Tensor, process_group: Any) -> VocabShard | None:
    """The :class:`VocabShard` of ``weight`` (this rank's ``[V_local, D]`` slice) in
    ``process_group``, or None when ``process_group`` is None (no vocabulary parallelism).

    ``process_group`` is a ``torch.distributed`` group or ``True`` for the default group. Costs one
    all-gather of P integers (the slice sizes) per call. Raises ValueError when torch.distributed
    is not initialised.
    """
    if process_group is None:
        return None
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        raise ValueError("process_group was given but torch.distributed is not initialised: call "
                         "torch.distributed.init_process_group first (or pass process_group=None)")
    group = None if process_group is True else process_group
    world = dist.get_world_size(group)
    rank = dist.get_rank(group)
    # gloo needs CPU tensors, NCCL device tensors: the group's backend decides
    device = weight.device if dist.get_backend(group) != "gloo" else torch.device("cpu")
    sizes = torch.zeros(world, dtype=torch.int64, device=device)
    sizes[rank] = weight.shape[0]
    dist.all_reduce(sizes, op=dist.ReduceOp.SUM, group=group)
    sizes = sizes.tolist()
    return VocabShard(group=group, rank=rank, world=world, offset=int(sum(sizes[:rank])),
                      local=int(weight.shape[0]), total=int(sum(sizes)))


def log_total(shard: VocabShard | None, local_vocab: int) -> float:
    """log V of the full vocabulary (the entropy's upper bound)."""
    return math.log(max(shard.total if shard is not None else local_vocab, 1))
