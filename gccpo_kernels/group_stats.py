"""SPEC §4: group-wise statistics of the answer distributions q_i = softmax(z(h_i)).

Public: :func:`group_distribution_stats` and the :class:`GroupStats` named tuple. Rows are
partitioned into groups by CSR offsets or by a group-id vector in any order (sorted internally,
stable). The fast backends keep the group mixtures q_bar_g as one [G, V] buffer (SPEC §4 allows
O(groups*V)) and never hold an R x V tensor.

This module registers the custom op ``gccpo::group_distribution_stats`` and looks the backend up
in :data:`IMPLEMENTATIONS` (docs/kernels_layout.md).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from ._backend import OpBackends, resolve_backend
from ._logits import LogitParams, restrict_head
from ._validation import (check_answer_ids, check_bias_finite, check_finite, check_lm_head,
                          out_dtype_for)
from ._vocab_parallel import (VocabShard, check_local_lm_head, check_total_vocab, local_answer_ids,
                              vocab_shard)
from .chunked import group_stats as torch_impl
from .linear_logprobs import check_outputs_finite
from .reference_backend import group_stats as reference_impl


def _triton_impl():
    from .triton import group_stats as impl  # imports triton: only when the backend runs

    return impl


#: The statistics' backends, each with ``forward(h, w, b, offsets, params)`` and
#: ``forward_sharded(h, w, b, offsets, params, shard)`` -> the five outputs, on rows sorted by
#: group (``offsets``: G + 1 host ints) and a head already restricted to the answer ids.
IMPLEMENTATIONS = OpBackends("group_distribution_stats", ("forward", "forward_sharded"),
                             triton=_triton_impl, torch=torch_impl, reference=reference_impl)


class GroupStats(NamedTuple):
    """Outputs of :func:`group_distribution_stats`; per-row fields follow hidden's row order.

    row_entropy [R]: H(q_i). row_kl_to_mixture [R]: KL(q_i || q_bar_g(i)) (0 in a group of one).
    group_mixture_entropy [G]: H(q_bar_g). group_mean_entropy [G]: mean_i H(q_i).
    group_js [G]: H(q_bar_g) - mean_i H(q_i), computed as mean_i KL(q_i || q_bar_g) (the same number
    in exact arithmetic, without the cancellation of the difference; 0 for a group of one).
    Empty groups get zeros.
    """

    row_entropy: torch.Tensor
    row_kl_to_mixture: torch.Tensor
    group_mixture_entropy: torch.Tensor
    group_mean_entropy: torch.Tensor
    group_js: torch.Tensor


def _check_int_vector(name: str, t: torch.Tensor, device: torch.device) -> None:
    if not isinstance(t, torch.Tensor) or t.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{name} must be an int64/int32 tensor, got {getattr(t, 'dtype', type(t).__name__)}")
    if t.dim() != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but hidden is on {device}")


def resolve_groups(num_rows: int, device: torch.device, group_offsets: torch.Tensor | None,
                   group_ids: torch.Tensor | None, num_groups: int | None,
                   ) -> tuple[list[int], torch.Tensor | None]:
    """(offsets as G+1 host ints, permutation sorting the rows by group or None if sorted).

    Always validates (the offsets are needed on the host anyway: one small device-to-host copy).
    """
    if (group_offsets is None) == (group_ids is None):
        raise ValueError("pass exactly one of group_offsets ([G+1] CSR offsets from 0 to R) or "
                         "group_ids ([R] group id per row)")
    if group_offsets is not None:
        _check_int_vector("group_offsets", group_offsets, device)
        offsets = [int(v) for v in group_offsets.tolist()]
        if len(offsets) < 1:
            raise ValueError("group_offsets must have length G + 1 >= 1")
        if offsets[0] != 0 or offsets[-1] != num_rows:
            raise ValueError(f"group_offsets must start at 0 and end at R = {num_rows}, got "
                             f"{offsets[0]} .. {offsets[-1]}")
        if any(b < a for a, b in zip(offsets, offsets[1:])):
            raise ValueError("group_offsets must be non-decreasing")
        if num_groups is not None and num_groups != len(offsets) - 1:
            raise ValueError(f"num_groups={num_groups} disagrees with len(group_offsets) - 1 = "
                             f"{len(offsets) - 1}")
        return offsets, None
    _check_int_vector("group_ids", group_ids, device)
    if group_ids.shape[0] != num_rows:
        raise ValueError(f"group_ids must have one id per row ({num_rows}), got {group_ids.shape[0]}")
    ids = group_ids.long()
    lo = int(ids.min()) if num_rows else 0
    hi = int(ids.max()) if num_rows else -1
    if lo < 0:
        raise ValueError(f"group_ids must be >= 0, got {lo}")
    if num_groups is None:
        num_groups = hi + 1
    elif not isinstance(num_groups, int) or num_groups < 0:
        raise ValueError(f"num_groups must be an int >= 0, got {num_groups!r}")
    if hi >= num_groups:
        raise ValueError(f"group_ids must be < num_groups = {num_groups}, got {hi}")
    counts = torch.bincount(ids, minlength=num_groups).tolist()
    offsets = [0]
    for c in counts:
        offsets.append(offsets[-1] + c)
    order = None
    if num_rows > 1 and not bool((ids[1:] >= ids[:-1]).all()):
        order = torch.argsort(ids, stable=True)
    return offsets, order


def group_distribution_stats(hidden: torch.Tensor, weight: torch.Tensor, *,
                             group_offsets: torch.Tensor | None = None,
                             group_ids: torch.Tensor | None = None, num_groups: int | None = None,
                             bias: torch.Tensor | None = None, temperature: float = 1.0,
                             logit_scale: float = 1.0, softcap: float | None = None,
                             answer_token_ids: torch.Tensor | None = None,
                             backend: str | None = None, validate: bool = True,
                             process_group: Any = None) -> GroupStats:
    """Entropies, KL to the group mixture and group JS of the answer distributions (SPEC §4).

    q_i = softmax(z(h_i)) with z from SPEC §1, over the full vocabulary or renormalized over
    ``answer_token_ids``; q_bar_g = mean of q_i over the rows of group g.

    Args:
        hidden: ``[R, D]`` latents, float16 / bfloat16 / float32 / float64.
        weight: ``[V, D]`` LM head; bias ``[V]`` or None; same dtype and device as hidden.
        group_offsets: ``[G+1]`` int CSR offsets (0 = o_0 <= o_1 <= ... <= o_G = R): rows
            o_g .. o_{g+1}-1 form group g. Or
        group_ids: ``[R]`` int group id per row, any order, in [0, num_groups).
        num_groups: G for ``group_ids`` (default max id + 1; larger values add empty groups).
        answer_token_ids: optional ``[K]`` distinct token ids to restrict and renormalize over.
        backend: ``"triton"``, ``"torch"``, ``"reference"`` or None (``$GCCPO_BACKEND``, then auto).
        validate: check finiteness of hidden, bias and the outputs, and the answer ids (group
            layouts are always checked). R = 0 rows give empty per-row outputs and zeros for
            the G groups (all empty); D = 0 and V = 0 raise ValueError.
        process_group: vocabulary parallelism (docs/vocab_parallel.md): a ``torch.distributed``
            group, or ``True`` for the default group, or None (default: one device). Every rank
            passes the same hidden, group layout and answer ids (global token ids) and its
            contiguous slice ``weight[offset : offset + V_local]`` (and bias slice) in rank order;
            slices may differ in size or be empty. Every rank gets the full outputs (the same bits
            on every rank). Each rank keeps the mixture columns of its own tokens ([G, V_local]).
            Costs one all-reduce of 3P ints (the slice sizes, the backends and the ranks'
            argument checks: a rank whose checks fail makes every rank raise), one all-gather of
            [2, R] (lse and entropy; on triton one of [2, C] per chunk, and one all-reduce of
            the chunk size) and one of [R + G] (the KL and mixture-entropy shares), never R x V;
            the torch backend makes one more pass over the slice than unsharded (the mixtures
            need the global normalizers), the triton backend the same passes. Raises ValueError when torch.distributed is not initialised.
            This path calls the backend directly, not through the ``gccpo::group_distribution_stats``
            custom op (an op cannot take a process group), behind ``torch.compiler.disable``: a
            compiled caller graph-breaks there and runs it eagerly.

    Returns:
        :class:`GroupStats`, float32 (float64 for float64 inputs).

    Forward-only: runs under ``torch.no_grad()``; inputs that require grad are read detached and
    the outputs never carry a graph.

    Cost: the torch backend makes two passes over W (4RVD FLOPs), the triton backend one (2RVD:
    one GEMM per chunk of whole groups, its three passes over the chunk; a group larger than a
    chunk takes two passes over W). Memory: the [G, V] mixtures plus a bounded workspace (and a
    sorted copy of hidden when group_ids are not sorted); never R x V.
    """
    if process_group is not None:
        return _stats_sharded(hidden, weight, group_offsets, group_ids, num_groups, bias,
                              temperature, logit_scale, softcap, answer_token_ids, backend,
                              validate, process_group)
    check_lm_head(hidden, weight, bias)
    if hidden.dim() != 2:
        raise ValueError(f"hidden must be [R, D], got shape {tuple(hidden.shape)}")
    check_group_args(hidden.device, group_offsets, group_ids, num_groups)
    # value checks (one host sync each) run inside the op, where torch.compile does not trace
    check_answer_ids(answer_token_ids, weight.shape[0], hidden.device, False)
    name = resolve_backend(backend, hidden.device, hidden.dtype)
    params = LogitParams.of(temperature, logit_scale, softcap)
    # forward-only: the op sees detached inputs, so its outputs never carry a graph
    return GroupStats(*torch.ops.gccpo.group_distribution_stats(
        hidden.detach(), weight.detach(), group_offsets, group_ids, num_groups,
        None if bias is None else bias.detach(), answer_token_ids, params.temperature,
        params.logit_scale, params.softcap, name, validate))


def check_group_args(device: torch.device, group_offsets: torch.Tensor | None,
                     group_ids: torch.Tensor | None, num_groups: int | None) -> None:
    """The free checks of a group layout (which one is given, dtypes, dims, devices); the values
    are checked by :func:`resolve_groups`."""
    if (group_offsets is None) == (group_ids is None):
        raise ValueError("pass exactly one of group_offsets ([G+1] CSR offsets from 0 to R) or "
                         "group_ids ([R] group id per row)")
    if group_offsets is not None:
        _check_int_vector("group_offsets", group_offsets, device)
    else:
        _check_int_vector("group_ids", group_ids, device)
    if num_groups is not None and (isinstance(num_groups, bool) or not isinstance(num_groups, int)):
        raise ValueError(f"num_groups must be an int >= 0, got {num_groups!r}")


def stats_forward(hidden: torch.Tensor, weight: torch.Tensor, group_offsets: torch.Tensor | None,
                  group_ids: torch.Tensor | None, num_groups: int | None,
                  bias: torch.Tensor | None, answer_token_ids: torch.Tensor | None,
                  params: LogitParams, name: str, validate: bool, shard: VocabShard | None = None,
                  layout: tuple[list[int], torch.Tensor | None] | None = None,
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The body of the ``gccpo::group_distribution_stats`` op: the group layout's values (always),
    the answer ids and finiteness (when ``validate``), then the backend ``name``. With ``shard``
    (called directly, not as the op), ``weight`` / ``bias`` are this rank's vocabulary slice.
    ``layout``: the (offsets, order) of :func:`resolve_groups` when the caller already has them."""
    r = hidden.shape[0]
    if layout is None:
        layout = resolve_groups(r, hidden.device, group_offsets, group_ids, num_groups)
    offsets, order = layout
    check_answer_ids(answer_token_ids, weight.shape[0] if shard is None else shard.total,
                     hidden.device, validate)
    check_finite("hidden", hidden, validate)
    check_bias_finite(bias, validate)
    with torch.no_grad():
        bias = None if bias is None else bias.contiguous()
        if shard is not None:
            answer_token_ids = local_answer_ids(shard, answer_token_ids)
        w, b = restrict_head(weight, bias, answer_token_ids)
        w = w if w.is_contiguous() else w.contiguous()
        h = hidden if order is None else hidden.index_select(0, order)
        h = h if h.is_contiguous() else h.contiguous()
        impl = IMPLEMENTATIONS.load(name)
        if shard is None:
            row_entropy, row_kl, mix_entropy, mean_entropy, js = impl.forward(h, w, b, offsets, params)
        else:
            row_entropy, row_kl, mix_entropy, mean_entropy, js = impl.forward_sharded(
                h, w, b, offsets, params, shard)
        if order is not None:
            row_entropy = torch.empty_like(row_entropy).scatter_(0, order, row_entropy)
            row_kl = torch.empty_like(row_kl).scatter_(0, order, row_kl)
    outs = (row_entropy, row_kl, mix_entropy, mean_entropy, js)
    check_outputs_finite("group_distribution_stats", outs, validate)
    return outs


@torch.library.custom_op(
    "gccpo::group_distribution_stats", mutates_args=(),
    schema="(Tensor hidden, Tensor weight, Tensor? group_offsets, Tensor? group_ids, "
           "SymInt? num_groups, Tensor? bias, Tensor? answer_token_ids, float temperature, "
           "float logit_scale, float? softcap, str backend, bool validate) "
           "-> (Tensor, Tensor, Tensor, Tensor, Tensor)")
def _group_distribution_stats_op(hidden, weight, group_offsets, group_ids, num_groups, bias,
                                 answer_token_ids, temperature, logit_scale, softcap, backend,
                                 validate):
    """(row_entropy [R], row_kl_to_mixture [R], group_mixture_entropy [G], group_mean_entropy [G],
    group_js [G])."""
    return stats_forward(hidden, weight, group_offsets, group_ids, num_groups, bias,
                         answer_token_ids, LogitParams(temperature, logit_scale, softcap), backend,
                         validate)


@_group_distribution_stats_op.register_fake
def _group_distribution_stats_fake(hidden, weight, group_offsets, group_ids, num_groups, bias,
                                   answer_token_ids, temperature, logit_scale, softcap, backend,
                                   validate):
    if group_offsets is not None:
        g = group_offsets.shape[0] - 1
    elif num_groups is not None:
        g = num_groups
    else:  # max(group_ids) + 1: known only from the data
        g = torch.library.get_ctx().new_dynamic_size()
    r = hidden.shape[0]
    cd = out_dtype_for(hidden.dtype)
    rows = [hidden.new_empty(r, dtype=cd) for _ in range(2)]
    groups = [hidden.new_empty(g, dtype=cd) for _ in range(3)]
    return (*rows, *groups)


@torch.compiler.disable
def _stats_sharded(hidden: torch.Tensor, weight: torch.Tensor, group_offsets: torch.Tensor | None,
                   group_ids: torch.Tensor | None, num_groups: int | None,
                   bias: torch.Tensor | None, temperature: float, logit_scale: float,
                   softcap: float | None, answer_token_ids: torch.Tensor | None,
                   backend: str | None, validate: bool, process_group: Any) -> GroupStats:
    """:func:`group_distribution_stats` with ``weight`` this rank's vocabulary slice. The local
    checks (the group layout's values included) run inside :func:`vocab_shard`'s first
    collective, so a rank whose arguments fail them makes every rank raise instead of leaving
    the others waiting."""
    opts = {}

    def checks() -> str:
        check_local_lm_head(hidden, weight, bias)
        if hidden.dim() != 2:
            raise ValueError(f"hidden must be [R, D], got shape {tuple(hidden.shape)}")
        check_group_args(hidden.device, group_offsets, group_ids, num_groups)
        opts["layout"] = resolve_groups(hidden.shape[0], hidden.device, group_offsets, group_ids,
                                        num_groups)
        check_answer_ids(answer_token_ids, weight.shape[0], hidden.device, False)  # free checks only
        opts["params"] = LogitParams.of(temperature, logit_scale, softcap)
        return resolve_backend(backend, hidden.device, hidden.dtype)

    shard = vocab_shard(weight, process_group, checks)  # raises ValueError without torch.distributed
    check_total_vocab(shard)
    outs = stats_forward(hidden.detach(), weight.detach(), group_offsets, group_ids, num_groups,
                         None if bias is None else bias.detach(), answer_token_ids, opts["params"],
                         shard.backend, validate, shard, opts["layout"])
    return GroupStats(*outs)
