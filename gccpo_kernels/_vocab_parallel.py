"""Vocabulary parallelism: where a rank's slice of the LM head sits, and the O(N) collectives that
turn per-shard partials into global per-row values.

Layout (Megatron / verl / NeMo style): every rank of ``process_group`` holds the hidden rows of
*all* tokens and a contiguous slice ``weight[offset : offset + local]`` of the ``[V, D]`` LM head
(and of the bias). Slices are in rank order, so rank r's offset is the sum of the slice sizes of
ranks 0..r-1; slices may differ in size (V not divisible by P) and may be empty (P > V).

Every helper here is a plain (non-autograd) collective on small per-row tensors: the ops that use
them write their backward explicitly, so the gradient flow never passes through a collective
autograd does not know about. Nothing here ever sees an ``[N, V]`` tensor.

One device rule for every collective (:attr:`VocabShard.comm_device`, :func:`comm_device_for`):
a pure gloo group communicates CPU tensors (device tensors are copied to the CPU and the result
back); any other backend (NCCL, or a group with a backend per device type) communicates the
tensors where they are (a pure NCCL group: on a CUDA device, copying CPU tensors there).

No rank may raise where another goes on into a collective (it would wait forever). So the first
collective, :func:`vocab_shard`, also carries each rank's verdict on its own arguments and the
kernel backend it resolved: a rank whose local checks fail, or ranks that resolved different
backends, make every rank raise. Every later check is on values that are the same on every rank
(the shared inputs, the global vocabulary size, the combined outputs).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from ._validation import check_lm_head


@dataclass(frozen=True)
class VocabShard:
    """This rank's slice of the vocabulary.

    Attributes:
        group: the ``torch.distributed`` process group (None: the default group).
        rank, world: this rank's index in ``group`` and the group's size.
        offset: global id of the slice's first row (``weight[0]`` here is row ``offset`` of the full head).
        local: rows of the local slice (``weight.shape[0]``); may be 0.
        total: the full vocabulary size V (sum of every rank's ``local``).
        comm_device: where the collectives' tensors live (the CPU for a gloo group).
        backend: the kernel backend every rank resolved (``"triton"``, ``"torch"``,
            ``"reference"``), or None when :func:`vocab_shard` was given no ``checks``.
    """

    group: Any
    rank: int
    world: int
    offset: int
    local: int
    total: int
    comm_device: torch.device = torch.device("cpu")
    backend: str | None = None

    def local_targets(self, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Global target ids [N] -> (ids relative to this slice, bool [N]: the target is in this
        slice). Ids outside the slice (and ignore_index) are mapped to -1, which matches no
        column in any backend."""
        rel = targets - self.offset
        inside = (rel >= 0) & (rel < self.local)
        return torch.where(inside, rel, torch.full_like(rel, -1)), inside

    # -- collectives (in place on a copy; O(numel) traffic) ---------------------------------------

    def all_reduce(self, t: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """All-reduce ``t`` (``op``: "sum" or "max") over the group; returns a new tensor on
        ``t``'s device."""
        out = t.detach().clone().contiguous()
        return self.all_reduce_(out, op)

    def all_reduce_(self, t: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """All-reduce the contiguous tensor ``t`` in place (through a CPU copy under gloo, see
        :attr:`comm_device`); returns ``t``."""
        import torch.distributed as dist

        buf = t if t.device == self.comm_device else t.to(self.comm_device)
        dist.all_reduce(buf, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX,
                        group=self.group)
        if buf is not t:
            t.copy_(buf)
        return t

    def agree_min(self, value: int) -> int:
        """The smallest ``value`` over the group (one all-reduce of one number): what every rank
        must use when a loop's trip count depends on a rank's own settings (its vocabulary slice,
        its ``GCCPO_WORKSPACE_MB``), so every rank runs the same number of collectives."""
        t = torch.tensor([-int(value)], dtype=torch.float64, device=self.comm_device)
        return int(-self.all_reduce_(t, "max").item())

    def logsumexp(self, lse_local: torch.Tensor) -> torch.Tensor:
        """Global log-sum-exp from each rank's local log-sum-exp (any shape; -inf for an empty
        slice): two all-reduces (MAX, then SUM of exp(local - max)). Exact up to one rounding
        of the sum; -inf where every rank has -inf."""
        m = self.all_reduce(lse_local, "max")
        safe = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
        s = self.all_reduce(torch.exp(lse_local - safe), "sum")
        return torch.where(torch.isfinite(m), safe + torch.log(s), m)


BACKEND_CODES = {"triton": 1, "torch": 2, "reference": 3}


def comm_device_for(group: Any, device: torch.device) -> torch.device:
    """Where ``group``'s collectives take their tensors: the CPU for a pure gloo group (gloo's
    collectives are CPU-only here), a CUDA device for a pure NCCL group (``device`` if it is
    one, else the current one), else ``device`` (e.g. "cpu:gloo,cuda:nccl" picks by device)."""
    import torch.distributed as dist

    backend = dist.get_backend(group)
    if backend == "gloo":
        return torch.device("cpu")
    if backend == "nccl" and torch.device(device).type != "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device(device)


def vocab_shard(weight: torch.Tensor, process_group: Any,
                checks: Callable[[], str] | None = None) -> VocabShard | None:
    """The :class:`VocabShard` of ``weight`` (this rank's ``[V_local, D]`` slice) in
    ``process_group``, or None when ``process_group`` is None (no vocabulary parallelism).

    ``process_group`` is a ``torch.distributed`` group or ``True`` for the default group.
    ``checks`` runs this rank's argument checks (everything that can fail before the first
    collective) and returns the kernel backend it resolved. Costs one all-reduce (SUM) of 3P
    integers: the slice sizes, each rank's backend code and each rank's check verdict, so that

    - a rank whose ``checks`` raised re-raises its own error and every other rank raises
      ValueError("rank k failed its input checks ..."), instead of waiting in a collective;
    - ranks that resolved different backends (whose collectives differ) all raise ValueError.

    Raises ValueError when torch.distributed is not initialised (after ``checks``: a wrong
    argument is reported first).
    """
    if process_group is None:
        return None
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        if checks is not None:
            checks()
        raise ValueError("process_group was given but torch.distributed is not initialised: call "
                         "torch.distributed.init_process_group first (or pass process_group=None)")
    group = None if process_group is True else process_group
    world = dist.get_world_size(group)
    rank = dist.get_rank(group)
    error: BaseException | None = None
    backend = None
    if checks is not None:
        try:
            backend = checks()
        except Exception as exc:  # re-raised below, after every rank has heard of it
            error = exc
    ok_weight = isinstance(weight, torch.Tensor) and weight.dim() == 2
    local = int(weight.shape[0]) if ok_weight else 0
    device = weight.device if ok_weight else torch.device("cpu")
    comm = comm_device_for(group, device)
    info = torch.zeros(3, world, dtype=torch.int64, device=comm)
    info[0, rank] = local
    info[1, rank] = BACKEND_CODES.get(backend, 0)
    info[2, rank] = error is not None
    dist.all_reduce(info, op=dist.ReduceOp.SUM, group=group)
    sizes, codes, failed = (row.tolist() for row in info.cpu())
    if error is not None:
        raise error
    bad = [r for r in range(world) if failed[r]]
    if bad:
        raise ValueError(f"rank{'s' if len(bad) > 1 else ''} {', '.join(map(str, bad))} of the "
                         f"process group failed {'their' if len(bad) > 1 else 'its'} input checks "
                         "(see that rank's error); every rank stops before the collectives")
    if len(set(codes)) > 1:
        names = {code: name for name, code in BACKEND_CODES.items()}
        per_rank = ", ".join(f"rank {r}: {names.get(c, '?')}" for r, c in enumerate(codes))
        raise ValueError(f"the ranks resolved different kernel backends ({per_rank}), whose "
                         "collectives differ: pass the same backend= on every rank (or set "
                         "GCCPO_BACKEND the same everywhere)")
    return VocabShard(group=group, rank=rank, world=world, offset=int(sum(sizes[:rank])),
                      local=local, total=int(sum(sizes)), comm_device=comm, backend=backend)


def all_gather(shard: VocabShard, t: torch.Tensor) -> torch.Tensor:
    """``[P, *t.shape]``: every rank's ``t`` in rank order (one all-gather, P * numel received).
    Unlike an all-reduce, the values arrive exact, so a combine over dim 0 in a fixed order
    gives identical bits on every rank whatever the collective's algorithm or message size."""
    import torch.distributed as dist

    t = t.detach().contiguous()
    buf = t.to(shard.comm_device)
    parts = [torch.empty_like(buf) for _ in range(shard.world)]
    dist.all_gather(parts, buf, group=shard.group)
    return torch.stack(parts).to(t.device)


def combine_softmax_stats(shard: VocabShard, lse: torch.Tensor, entropy: torch.Tensor,
                          *sums: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Per-row statistics of the softmax over the full vocabulary from each rank's statistics of
    the softmax over its slice: ``lse`` (-inf for an empty slice), ``entropy`` (0 there) and any
    number of plain per-row sums (e.g. the target logit, nonzero on one rank). Returns (lse,
    entropy, *sums) over all shards, identical on every rank.

    One all-gather of (2 + len(sums)) x numel values, combined in rank order by elementwise
    left folds (deterministic, independent of the batch size). With w_r = exp(lse_r - lse), the
    entropy is the chain rule H = sum_r w_r (H_r + lse - lse_r), evaluated as
    T / S + log S with S = sum_r e_r, T = sum_r e_r (H_r + m - lse_r), e_r = exp(lse_r - m),
    m = max_r lse_r: every term is >= 0, so nothing cancels.
    """
    g = all_gather(shard, torch.stack([lse, entropy, *sums]))
    lse_r, ent_r = g[:, 0], g[:, 1]
    m = lse_r.amax(dim=0)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    live = torch.isfinite(lse_r)
    zero = torch.zeros((), dtype=g.dtype, device=g.device)
    e = torch.where(live, torch.exp(lse_r - m), zero)
    t = torch.where(live, e * (ent_r + (m - lse_r)), zero)
    s_sum, t_sum = e[0].clone(), t[0].clone()
    for r in range(1, shard.world):
        s_sum.add_(e[r])
        t_sum.add_(t[r])
    log_s = torch.log(s_sum)
    out = [m + log_s, t_sum / s_sum + log_s]
    for i in range(len(sums)):
        acc = g[0, 2 + i].clone()
        for r in range(1, shard.world):
            acc.add_(g[r, 2 + i])
        out.append(acc)
    return tuple(out)


def rank_sum(shard: VocabShard, t: torch.Tensor) -> torch.Tensor:
    """Sum of ``t`` over the ranks, ((t_0 + t_1) + t_2) + ... in rank order: one all-gather
    (:func:`all_gather`), then elementwise adds. Bitwise the same on every rank, and each element's
    sum is independent of the tensor's size (batch invariance), which an all-reduce does not
    promise (its summation order follows the message's chunking)."""
    g = all_gather(shard, t)
    acc = g[0].clone()
    for r in range(1, shard.world):
        acc.add_(g[r])
    return acc


def local_answer_ids(shard: VocabShard, answer_token_ids: torch.Tensor | None) -> torch.Tensor | None:
    """The global ``answer_token_ids`` inside this rank's slice, relative to its first row
    (possibly none: a [0] tensor), in their given order; None stays None. A boolean selection (one
    host sync). Every answer id lands on exactly one rank."""
    if answer_token_ids is None:
        return None
    rel = answer_token_ids.long() - shard.offset
    return rel[(rel >= 0) & (rel < shard.local)]


def check_local_lm_head(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    """``_validation.check_lm_head`` for a vocabulary slice, which may be empty ([0, D] weight, [0]
    bias): the same dtype, shape and device checks; the full vocabulary's V >= 1 is checked on
    the shard (``VocabShard.total``)."""
    if isinstance(weight, torch.Tensor) and weight.dim() == 2 and weight.shape[0] == 0:
        if bias is not None and isinstance(bias, torch.Tensor) and bias.shape != (0,):
            raise ValueError(f"bias must be [V_local] = [0], got {tuple(bias.shape)}")
        # every other check on a one-row stand-in of the slice's dtype and device
        stand_in_bias = None if bias is None or not isinstance(bias, torch.Tensor) else bias.new_zeros(1)
        check_lm_head(hidden, weight.new_zeros(1, weight.shape[1]),
                      bias if stand_in_bias is None else stand_in_bias)
    else:
        check_lm_head(hidden, weight, bias)


def check_total_vocab(shard: VocabShard) -> None:
    """The full vocabulary (every rank's slice together) must have a row."""
    if shard.total < 1:
        raise ValueError("every rank's vocabulary slice is empty (V = 0): the LM head needs at "
                         "least one row")
