"""SPEC §1: per-token log-probs and entropy straight from hidden states and the LM-head weight.

Public: :func:`fused_linear_logprobs` and the :class:`FusedLinearLogprobs` module. The backend
(``triton``, ``torch`` or ``reference``) is picked by :mod:`gccpo_kernels._backend`. The fast
backends never hold an N x V tensor: the forward keeps per-row running statistics (max, sum of
exponentials, target logit, entropy accumulator), the backward recomputes the logits a bounded
chunk at a time.

With ``process_group=`` (vocabulary parallelism, docs/vocab_parallel.md) each rank holds a slice
of the LM head: the same backend kernels compute the slice's statistics, which
:func:`forward_shard` combines across ranks with one all-gather of 3N values; the backend's
backward, given the global lse and entropy, gives the slice's gradients, and one all-reduce of
N x D sums the ranks' shares of d hidden (:func:`backward_shard`).

This module registers the op's ``torch.library`` custom ops, ``gccpo::linear_logprobs`` and its
backward ``gccpo::linear_logprobs_backward`` (so torch.compile traces through them), and looks the
backend up in :data:`IMPLEMENTATIONS`, the same way for all three (docs/kernels_layout.md).
"""

from __future__ import annotations

import math

import torch

from ._backend import OpBackends, resolve_backend
from ._logits import LogitParams
from ._validation import (check_bias_finite, check_finite, check_lm_head, check_logit_params,
                          check_targets, out_dtype_for)
from ._vocab_parallel import (VocabShard, check_local_lm_head, check_total_vocab,
                              combine_softmax_stats, vocab_shard)
from .chunked import linear_logprobs as torch_impl
from .reference_backend import linear_logprobs as reference_impl


def _triton_impl():
    from .triton import linear_logprobs as impl  # imports triton: only when the backend runs

    return impl


#: The op's backends, each with ``forward(h, w, b, y, params) -> (logp, entropy, lse)``,
#: ``forward_stats(h, w, b, y_local, params) -> (z_y, entropy, lse)`` (a vocabulary slice's
#: statistics) and ``backward(h, w, b, y, lse, entropy, g_logp, g_ent, params, needs,
#: dh_dtype=None) -> (dh, dw, db)`` on dense kept rows.
IMPLEMENTATIONS = OpBackends("linear_logprobs", ("forward", "forward_stats", "backward"),
                      triton=_triton_impl, torch=torch_impl, reference=reference_impl)


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
    validate_rows(hidden, weight, bias, targets, ignore_index, validate)
    impl = IMPLEMENTATIONS.load(backend)
    n = hidden.shape[0]
    rows = _kept_rows(targets, ignore_index)
    h, y = _select_rows(hidden, targets, rows, weight.shape[0])
    logp_v, ent_v, lse_v = impl.forward(h, weight, bias, y, params)
    # 0 <= H <= log V exactly; rounding can put a near-uniform row an ulp above log V
    ent_v.clamp_(min=0.0, max=math.log(weight.shape[0]))
    check_outputs_finite("fused_linear_logprobs", (logp_v, ent_v), validate)
    if rows is None:
        return logp_v, ent_v, lse_v
    scatter = lambda t: t.new_zeros(n).index_copy_(0, rows, t)  # noqa: E731
    return scatter(logp_v), scatter(ent_v), scatter(lse_v)


def validate_rows(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                  targets: torch.Tensor, ignore_index: int, validate: bool) -> None:
    """The primitive's value checks on dense rows (hidden [N, D], targets [N]): targets in
    [0, V) or ignore_index, finite hidden and bias (a host sync each; nothing when not
    ``validate``). Shared by every path that reads the LM head row by row."""
    check_targets(targets, targets.shape, weight.shape[0], ignore_index, validate, hidden.device)
    check_finite("hidden", hidden, validate)
    check_bias_finite(bias, validate)


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
    pick = _row_picker(rows, lse.dtype)
    h, y = _select_rows(hidden, targets, rows, weight.shape[0])
    dh_v, dw, db = IMPLEMENTATIONS.load(backend).backward(
        h, weight, bias, y, pick(lse), pick(entropy), pick(grad_logp), pick(grad_entropy), params,
        needs)
    dh = dh_v
    if dh_v is not None and rows is not None:
        dh = dh_v.new_zeros(hidden.shape).index_copy_(0, rows, dh_v)
    return dh, dw, db


def check_outputs_finite(op: str, outputs: tuple[torch.Tensor, ...], validate: bool) -> None:
    """Raise when an op produced NaN or inf from finite hidden states (one reduction and one host
    sync per call; skipped when not ``validate``).

    With the inputs checked finite (hidden, deltas and the bias are scanned), a non-finite
    output means the logits overflowed the compute dtype (|logit_scale * (W h + b) /
    temperature| above 3.4e38 in float32, e.g. hidden states near the bfloat16 limits times an
    O(1) weight) or the weight holds NaN / inf (it is not scanned: a pass over V x D per call
    would cost more than the op's output check).
    """
    if not validate:
        return
    bad = [t for t in outputs if t.numel() > 0]
    if bad and not bool(torch.stack([torch.isfinite(t.abs().amax()) for t in bad]).all()):
        raise ValueError(
            f"{op} produced NaN or inf from finite hidden states and bias: the logits "
            "logit_scale * (W h + b) / temperature overflowed the compute dtype (float32 for "
            "16/32-bit inputs: |logit| > 3.4e38), or weight holds NaN or inf; scale the "
            "hidden states or the weight down, or raise the temperature")


def _in_reach(targets: torch.Tensor, vocab: int) -> torch.Tensor:
    """Targets clamped to [-1, V] (one elementwise pass, no sync). In range they are unchanged; an
    out-of-range target (possible only with validate=False) becomes -1 or V, which match no
    column in any backend (the kernels compare ids in 32 bits, where 2^32 + 5 would read as 5):
    its logit reads as 0, so logp = -lse and its gradient has no one-hot term."""
    return targets.clamp(-1, vocab)


def _select_rows(hidden: torch.Tensor, targets: torch.Tensor, rows: torch.Tensor | None,
                 vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(hidden, targets) of the kept ``rows`` (all rows when None), the targets clamped into
    reach of a ``vocab``-row head (:func:`_in_reach`)."""
    if rows is None:
        return hidden, _in_reach(targets, vocab)
    return hidden.index_select(0, rows), _in_reach(targets.index_select(0, rows), vocab)


def _row_picker(rows: torch.Tensor | None, dtype: torch.dtype):
    """A function taking a per-row tensor (or None) to its kept ``rows`` in ``dtype``, dense."""

    def pick(t: torch.Tensor | None) -> torch.Tensor | None:
        if t is None:
            return None
        t = t.to(dtype)
        # autograd hands out expanded (stride-0) gradients, e.g. for logp.sum(); kernels
        # index rows directly, so they get a dense copy
        return t.contiguous() if rows is None else t.index_select(0, rows)

    return pick


def _kept_rows(targets: torch.Tensor, ignore_index: int) -> torch.Tensor | None:
    """Indices of the rows whose target is not ignore_index, or None when every row is kept."""
    valid = targets != ignore_index
    if targets.shape[0] > 0 and not bool(valid.all()):
        return valid.nonzero().squeeze(1)
    return None


# ------------------------------------------------------------------------------------------------
# the custom ops gccpo::linear_logprobs and gccpo::linear_logprobs_backward (torch.compile traces
# through them; their bodies run eagerly: value checks, row compaction, backend dispatch)
# ------------------------------------------------------------------------------------------------

@torch.library.custom_op(
    "gccpo::linear_logprobs", mutates_args=(),
    schema="(Tensor hidden, Tensor weight, Tensor? bias, Tensor targets, SymInt ignore_index, "
           "float temperature, float logit_scale, float? softcap, str backend, bool validate) "
           "-> (Tensor, Tensor, Tensor)")
def _linear_logprobs_op(hidden, weight, bias, targets, ignore_index, temperature, logit_scale,
                        softcap, backend, validate):
    """hidden [N, D], weight [V, D], bias [V] | None, targets [N] (dense) -> logp, entropy, lse [N]."""
    return forward_rows(hidden, weight, bias, targets, ignore_index,
                        LogitParams(temperature, logit_scale, softcap), backend, validate)


@_linear_logprobs_op.register_fake
def _linear_logprobs_fake(hidden, weight, bias, targets, ignore_index, temperature, logit_scale,
                          softcap, backend, validate):
    n = hidden.shape[0]
    cd = out_dtype_for(hidden.dtype)
    return hidden.new_empty(n, dtype=cd), hidden.new_empty(n, dtype=cd), hidden.new_empty(n, dtype=cd)


@torch.library.custom_op(
    "gccpo::linear_logprobs_backward", mutates_args=(),
    schema="(Tensor hidden, Tensor weight, Tensor? bias, Tensor targets, Tensor lse, "
           "Tensor entropy, Tensor? grad_logp, Tensor? grad_entropy, SymInt ignore_index, "
           "float temperature, float logit_scale, float? softcap, str backend, bool need_hidden, "
           "bool need_weight, bool need_bias) -> (Tensor, Tensor, Tensor)")
def _linear_logprobs_backward_op(hidden, weight, bias, targets, lse, entropy, grad_logp,
                                 grad_entropy, ignore_index, temperature, logit_scale, softcap,
                                 backend, need_hidden, need_weight, need_bias):
    """(d hidden, d weight, d bias); a gradient that is not needed comes back as an empty [0]
    tensor (an op returns tensors only)."""
    needs = (need_hidden, need_weight, need_bias and bias is not None)
    grads = backward_rows(hidden, weight, bias, targets, lse, entropy, grad_logp, grad_entropy,
                          ignore_index, LogitParams(temperature, logit_scale, softcap), backend,
                          needs)
    shapes = (hidden.shape, weight.shape, weight.shape[:1])
    like = (hidden, weight, weight)
    out = []
    for need, g, shape, t in zip(needs, grads, shapes, like):
        if not need:
            out.append(t.new_empty(0))
        else:  # no upstream gradient at all: zeros (the autograd formula skips the call then)
            out.append(g if g is not None else t.new_zeros(shape))
    return tuple(out)


@_linear_logprobs_backward_op.register_fake
def _linear_logprobs_backward_fake(hidden, weight, bias, targets, lse, entropy, grad_logp,
                                   grad_entropy, ignore_index, temperature, logit_scale, softcap,
                                   backend, need_hidden, need_weight, need_bias):
    need_bias = need_bias and bias is not None
    return (hidden.new_empty(hidden.shape if need_hidden else (0,)),
            weight.new_empty(weight.shape if need_weight else (0,)),
            weight.new_empty(weight.shape[:1] if need_bias else (0,)))


def _linear_logprobs_setup(ctx, inputs, output) -> None:
    hidden, weight, bias, targets, ignore_index, temperature, logit_scale, softcap, backend, _ = inputs
    _, entropy, lse = output
    ctx.save_for_backward(hidden, weight, bias, targets, lse, entropy)
    ctx.opts = (ignore_index, temperature, logit_scale, softcap, backend)
    ctx.has_bias = bias is not None
    ctx.mark_non_differentiable(lse)
    # an output nobody differentiates (entropy, when return_entropy=False) gets None, not zeros,
    # so the backward skips its work
    ctx.set_materialize_grads(False)


def _linear_logprobs_grad(ctx, grad_logp, grad_entropy, grad_lse):
    hidden, weight, bias, targets, lse, entropy = ctx.saved_tensors
    needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[1],
             ctx.has_bias and ctx.needs_input_grad[2])
    rest = (None,) * 7
    if (grad_logp is None and grad_entropy is None) or not any(needs):
        return (None, None, None, *rest)
    dh, dw, db = torch.ops.gccpo.linear_logprobs_backward(
        hidden, weight, bias, targets, lse, entropy, grad_logp, grad_entropy, *ctx.opts, *needs)
    return (dh if needs[0] else None, dw if needs[1] else None, db if needs[2] else None, *rest)


_linear_logprobs_op.register_autograd(_linear_logprobs_grad, setup_context=_linear_logprobs_setup)


def _linear_logprobs(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                     targets: torch.Tensor, ignore_index: int, params: LogitParams, backend: str,
                     validate: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(logp, entropy) [N] through ``gccpo::linear_logprobs``; differentiable w.r.t. hidden,
    weight and bias."""
    logp, entropy, _ = torch.ops.gccpo.linear_logprobs(
        hidden, weight, bias, targets, ignore_index, params.temperature, params.logit_scale,
        params.softcap, backend, validate)
    return logp, entropy


# ------------------------------------------------------------------------------------------------
# vocabulary parallelism (process_group=...): each rank holds a slice of the LM head
# ------------------------------------------------------------------------------------------------

def forward_shard(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                  targets: torch.Tensor, ignore_index: int, params: LogitParams, backend: str,
                  validate: bool, shard: VocabShard,
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`forward_rows` with the LM head split over ``shard``'s group: hidden [N, D] (every
    token), weight [V_local, D] and bias [V_local] | None (this rank's slice), targets [N] GLOBAL
    ids -> (logp, entropy, lse) [N] over the whole vocabulary, identical on every rank.

    The backend computes the slice's statistics (target logit where the target is in the slice,
    lse and entropy of the softmax over the slice) with the same kernels as the unsharded op;
    :func:`gccpo_kernels._vocab_parallel.combine_softmax_stats` merges them with one all-gather
    of 3N values. The collective always covers all N rows (ignored rows are zeroed afterwards),
    so its size never depends on the data.
    """
    check_targets(targets, targets.shape, shard.total, ignore_index, validate, hidden.device)
    check_finite("hidden", hidden, validate)
    check_bias_finite(bias, validate)
    n = hidden.shape[0]
    cd = out_dtype_for(hidden.dtype)
    rows = _kept_rows(targets, ignore_index)
    kept = n if rows is None else rows.numel()
    stats = hidden.new_zeros(3, n, dtype=cd)  # lse, entropy, target logit of this slice
    if shard.local == 0:  # an empty slice: softmax over nothing
        stats[0].fill_(-math.inf)
    elif kept > 0:
        h, y = _select_rows(hidden, targets, rows, shard.total)
        y_local, _ = shard.local_targets(y)
        z_y, ent, lse = IMPLEMENTATIONS.load(backend).forward_stats(h, weight, bias, y_local, params)
        ent.clamp_(min=0.0, max=math.log(shard.local))
        local = torch.stack([lse, ent, z_y]).to(cd)
        if rows is None:
            stats = local
        else:
            stats.index_copy_(1, rows, local)
    if n == 0:
        return stats[0], stats[1], stats[2]
    lse, entropy, z_y = combine_softmax_stats(shard, stats[0], stats[1], stats[2])
    entropy.clamp_(min=0.0, max=math.log(shard.total))
    logp = z_y - lse
    if rows is not None:
        ignored = targets == ignore_index
        zero = torch.zeros((), dtype=cd, device=hidden.device)
        logp, entropy, lse = (torch.where(ignored, zero, t) for t in (logp, entropy, lse))
    check_outputs_finite("fused_linear_logprobs", (logp, entropy), validate)
    return logp, entropy, lse


def backward_shard(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                   targets: torch.Tensor, lse: torch.Tensor, entropy: torch.Tensor,
                   grad_logp: torch.Tensor | None, grad_entropy: torch.Tensor | None,
                   ignore_index: int, params: LogitParams, backend: str,
                   needs: tuple[bool, bool, bool], shard: VocabShard,
                   ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """:func:`backward_rows` with the LM head split over ``shard``'s group: (the FULL d hidden,
    identical on every rank; this rank's d weight slice; its d bias slice). ``lse`` and
    ``entropy`` are the global values from :func:`forward_shard`, so the unchanged backend
    backward gives this slice's exact logit gradient. The ranks' shares of d hidden are summed by
    one all-reduce of N x D values in the compute dtype (float32 / float64), then cast to
    hidden's dtype. The upstream gradients must be the same on every rank (they are when every
    rank computes the same loss from the identical outputs)."""
    need_h, need_w, need_b = needs
    if (grad_logp is None and grad_entropy is None) or not any(needs):
        return None, None, None
    cd = lse.dtype
    n, dim = hidden.shape
    rows = _kept_rows(targets, ignore_index)
    kept = n if rows is None else rows.numel()
    dh_v = dw = db = None
    if shard.local > 0 and kept > 0:
        pick = _row_picker(rows, cd)
        h, y = _select_rows(hidden, targets, rows, shard.total)
        y_local, _ = shard.local_targets(y)
        dh_v, dw, db = IMPLEMENTATIONS.load(backend).backward(
            h, weight, bias, y_local, pick(lse), pick(entropy), pick(grad_logp),
            pick(grad_entropy), params, needs, dh_dtype=cd)
    if need_w and dw is None:
        dw = torch.zeros_like(weight)
    if need_b and db is None:
        db = torch.zeros_like(bias)
    dh = None
    if need_h:
        if dh_v is None:
            dh = hidden.new_zeros(n, dim, dtype=cd)
        elif rows is None:
            dh = dh_v
        else:
            dh = dh_v.new_zeros(n, dim).index_copy_(0, rows, dh_v)
        if n > 0:
            # in place on a buffer this function owns (no copy of N x D beyond gloo's CPU one)
            shard.all_reduce_(dh)
        dh = dh.to(hidden.dtype)
    return dh, dw, db


@torch.compiler.disable
def _vocab_parallel_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                             bias: torch.Tensor | None, temperature: float, logit_scale: float,
                             softcap: float | None, ignore_index: int, backend: str | None,
                             validate: bool, process_group,
                             ) -> tuple[torch.Tensor, torch.Tensor]:
    """(logp, entropy) of targets' shape on the vocabulary-parallel path. The argument checks
    run inside :func:`vocab_shard`'s first collective, so a rank whose slice fails them makes
    every rank raise (none is left waiting). Kept out of torch.compile's graphs (collectives,
    host syncs and a ProcessGroup argument): a compiled caller graph-breaks here and runs this
    eagerly."""
    opts = {}

    def checks() -> str:
        check_local_lm_head(hidden, weight, bias)
        # value checks (the global target range) need the full V: after the first collective
        check_targets(targets, hidden.shape[:-1], weight.shape[0], ignore_index, False, hidden.device)
        opts["params"] = LogitParams.of(temperature, logit_scale, softcap)
        opts["ignore_index"] = int(ignore_index)
        return resolve_backend(backend, hidden.device, hidden.dtype)

    shard = vocab_shard(weight, process_group, checks)
    check_total_vocab(shard)
    lead = hidden.shape[:-1]
    logp, entropy = _VocabParallelLinearLogprobs.apply(
        hidden.reshape(-1, hidden.shape[-1]).contiguous(), weight.contiguous(),
        None if bias is None else bias.contiguous(), targets.reshape(-1).long().contiguous(),
        opts["ignore_index"], opts["params"], shard.backend, validate, shard)
    return logp.reshape(lead), entropy.reshape(lead)


class _VocabParallelLinearLogprobs(torch.autograd.Function):
    """(logp, entropy) with the LM head split over a process group: :func:`forward_shard` and
    :func:`backward_shard`. A plain autograd.Function, not a ``torch.library`` custom op (an op
    cannot take a ProcessGroup), so under torch.compile it is a graph break, not a traced op."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, ignore_index, params, backend, validate, shard):
        logp, entropy, lse = forward_shard(hidden, weight, bias, targets, ignore_index, params,
                                           backend, validate, shard)
        ctx.save_for_backward(hidden, weight, bias, targets, lse, entropy)
        ctx.opts = (ignore_index, params, backend, shard)
        ctx.has_bias = bias is not None
        ctx.set_materialize_grads(False)
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        hidden, weight, bias, targets, lse, entropy = ctx.saved_tensors
        ignore_index, params, backend, shard = ctx.opts
        needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[1],
                 ctx.has_bias and ctx.needs_input_grad[2])
        dh, dw, db = backward_shard(hidden, weight, bias, targets, lse, entropy, grad_logp,
                                    grad_entropy, ignore_index, params, backend, needs, shard)
        return dh, dw, db, None, None, None, None, None, None


def fused_linear_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                          bias: torch.Tensor | None = None, temperature: float = 1.0,
                          logit_scale: float = 1.0, softcap: float | None = None,
                          ignore_index: int = -100, return_entropy: bool = False,
                          backend: str | None = None, validate: bool = True,
                          process_group=None,
                          ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs of ``targets`` (and the entropy) under ``softmax(z)``, without N x V logits.

    z = c*tanh(u/c) (or u without ``softcap``), u = logit_scale * (hidden @ weight.T + bias) /
    temperature (SPEC §1).

    Args:
        hidden: ``[..., D]`` float16 / bfloat16 / float32 / float64 last hidden states.
        weight: ``[V, D]`` LM-head weight of hidden's dtype and device (with ``process_group``:
            this rank's contiguous slice ``[V_local, D]``, see below).
        targets: ``[...]`` int64 token ids in ``[0, V)``, or ``ignore_index``.
        bias: optional ``[V]`` LM-head bias (with ``process_group``: this rank's ``[V_local]``).
        temperature, logit_scale, softcap: the logit transform (Cohere/Granite scaling, Gemma cap).
        ignore_index: rows with this target give logp = entropy = 0, no gradient, and no matmul.
        return_entropy: also return the entropy (else ``None``, and its work is skipped in backward).
        backend: ``"triton"``, ``"torch"``, ``"reference"`` or None (``$GCCPO_BACKEND``, then auto).
        validate: check target ranges and finiteness of hidden and bias (one pass + one host sync
            each) and of the outputs (logits that overflow, a weight holding NaN / inf).
            Shapes and dtypes are always checked (D = 0 and V = 0 raise ValueError); N = 0 rows
            give empty outputs and zero gradients.
        process_group: vocabulary parallelism (docs/vocab_parallel.md). None (default): weight is
            the whole head. A ``torch.distributed`` process group (or ``True`` for the default
            group): every rank passes the hidden rows and targets of ALL tokens (the same on
            every rank) and its slice ``weight[offset : offset + V_local]`` of the head, slices in
            rank order (offset = the lower ranks' sizes; sizes may differ, one may be empty).
            Targets are global ids in ``[0, sum V_local)``. Outputs are the unsharded values,
            identical on every rank; the backward gives every rank the full d hidden and its own
            d weight / d bias slice. Collectives: forward one all-reduce of 3P ints (slice
            sizes, backends, the ranks' argument checks: a rank whose checks fail makes every
            rank raise) and one all-gather of 3N floats; backward one all-reduce of N x D floats
            (when hidden needs a gradient). This path is a torch.autograd.Function, not a custom op:
            torch.compile graph-breaks on it (not tested under fullgraph).

    Returns:
        ``(logp, entropy)`` of targets' shape, float32 (float64 for float64 inputs),
        differentiable with respect to hidden, weight and bias.

    Cost: forward 2NVD FLOPs, forward + backward 8NVD (the backward recomputes the logits); with
    ``process_group`` each rank does its V_local share of both.
    Memory: O(N + V*D) plus a bounded [chunk, V] workspace; never N x V.
    """
    if process_group is not None:
        logp, entropy = _vocab_parallel_logprobs(
            hidden, weight, targets, bias, temperature, logit_scale, softcap, ignore_index,
            backend, validate, process_group)
        return logp, (entropy if return_entropy else None)
    check_lm_head(hidden, weight, bias)
    lead = hidden.shape[:-1]
    vocab, dim = weight.shape
    # value checks (one host sync each) run inside the op, where torch.compile does not trace
    check_targets(targets, lead, vocab, ignore_index, False, hidden.device)
    name = resolve_backend(backend, hidden.device, hidden.dtype)
    params = LogitParams.of(temperature, logit_scale, softcap)
    # the kernels index rows, targets and bias with unit strides: make every operand dense
    h2 = hidden.reshape(-1, dim).contiguous()
    y1 = targets.reshape(-1).long().contiguous()
    w = weight.contiguous()
    bias = None if bias is None else bias.contiguous()
    logp, entropy = _linear_logprobs(h2, w, bias, y1, int(ignore_index), params, name, validate)
    logp = logp.reshape(lead)
    return logp, (entropy.reshape(lead) if return_entropy else None)


class FusedLinearLogprobs(torch.nn.Module):
    """Module form of :func:`fused_linear_logprobs`; holds only the options, not the weight.

    ``FusedLinearLogprobs(temperature=0.7)(hidden, model.lm_head.weight, targets)``; with
    ``process_group=`` the weight passed to ``forward`` is this rank's vocabulary slice (see
    :func:`fused_linear_logprobs`).
    """

    def __init__(self, *, temperature: float = 1.0, logit_scale: float = 1.0,
                 softcap: float | None = None, ignore_index: int = -100,
                 return_entropy: bool = False, backend: str | None = None, validate: bool = True,
                 process_group=None):
        super().__init__()
        check_logit_params(temperature, logit_scale, softcap)
        self.temperature, self.logit_scale, self.softcap = temperature, logit_scale, softcap
        self.ignore_index, self.return_entropy = ignore_index, return_entropy
        self.backend, self.validate, self.process_group = backend, validate, process_group

    def forward(self, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        return fused_linear_logprobs(
            hidden, weight, targets, bias=bias, temperature=self.temperature,
            logit_scale=self.logit_scale, softcap=self.softcap, ignore_index=self.ignore_index,
            return_entropy=self.return_entropy, backend=self.backend, validate=self.validate,
            process_group=self.process_group)

    def extra_repr(self) -> str:
        return (f"temperature={self.temperature}, logit_scale={self.logit_scale}, "
                f"softcap={self.softcap}, ignore_index={self.ignore_index}, "
                f"return_entropy={self.return_entropy}, backend={self.backend}"
                + ("" if self.process_group is None else ", vocab_parallel=True"))
