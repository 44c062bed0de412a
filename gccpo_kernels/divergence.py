"""SPEC §3: latent perturbations and the counterfactual divergence of the answer distribution.

Public: :func:`perturb_latents` (the perturbation vectors delta) and
:func:`counterfactual_divergence` (D(q(.|h) || q(.|h + delta_m)) for every row and perturbation).
The divergence is forward-only and never holds an R x V tensor on the fast backends: the base
logits and all M perturbed logit shifts of a row come from one read of each W tile, and the
divergence is combined from Delta = z(h + delta) - z(h) = s * W delta / tau, formed directly (never
as the difference of two logit rows), in forms without catastrophic cancellation. See
docs/counterfactual.md for the math.

This module registers the custom ops ``gccpo::perturb_latents`` and
``gccpo::counterfactual_divergence`` and looks the backend up in :data:`IMPLEMENTATIONS`
(docs/kernels_layout.md).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ._backend import OpBackends, resolve_backend
from ._logits import LogitParams, restrict_head
from ._validation import (check_answer_ids, check_bias_finite, check_finite, check_float,
                          check_lm_head, out_dtype_for)
from ._vocab_parallel import check_local_lm_head, check_total_vocab, local_answer_ids, vocab_shard
from .chunked import divergence as torch_impl
from .divergences import DIVERGENCES, divergence_entry
from .linear_logprobs import check_outputs_finite
from .reference_backend import divergence as reference_impl

#: the divergence names (``kind=``): a live view of the registry
#: :data:`gccpo_kernels.divergences.DIVERGENCES`, so a divergence registered later is in it
KINDS = DIVERGENCES.keys()
MODES = ("gaussian", "sibling")


def _triton_impl():
    from .triton import divergence as impl  # imports triton: only when the backend runs

    return impl


#: The divergence's backends, each with ``forward(h, w, b, deltas, params, kind) -> [R, M]`` and
#: ``forward_sharded(h, w, b, deltas, params, kind, shard) -> [R, M]`` on a head already
#: restricted to the answer ids, contiguous operands.
IMPLEMENTATIONS = OpBackends("counterfactual_divergence", ("forward", "forward_sharded"),
                             triton=_triton_impl, torch=torch_impl, reference=reference_impl)


# ---------------------------------------------------------------------------------------------
# perturbations
# ---------------------------------------------------------------------------------------------


def _tangent_gaussian(h: torch.Tensor, m: int, sigma: float,
                      generator: torch.Generator | None) -> torch.Tensor:
    """sigma * (||h|| / sqrt(D)) * P xi, P = I - h h^T / ||h||^2, xi ~ N(0, I); [R, m, D] in h's dtype."""
    r, d = h.shape
    xi = torch.randn(r, m, d, generator=generator, dtype=h.dtype, device=h.device)
    norm = torch.linalg.vector_norm(h, dim=1, keepdim=True)                  # [R, 1]
    unit = h / norm.clamp_min(torch.finfo(h.dtype).tiny)                      # 0 for h = 0
    xi.sub_(torch.einsum("rmd,rd->rm", xi, unit).unsqueeze(2) * unit.unsqueeze(1))
    return xi.mul_((sigma / math.sqrt(d)) * norm.unsqueeze(2))


def perturb_latents(hidden: torch.Tensor, num_perturbations: int, *, sigma: float = 0.05,
                    mode: str = "gaussian", alpha: float = 0.5,
                    group_index: torch.Tensor | None = None,
                    generator: torch.Generator | None = None) -> torch.Tensor:
    """Counterfactual perturbation vectors delta for the latents ``hidden`` (SPEC §3).

    Modes:
      ``gaussian``: delta_m = sigma * (||h|| / sqrt(D)) * P xi_m, xi_m ~ N(0, I_D), P = I - h h^T/||h||^2
        (tangent: delta is orthogonal to h, so ||h + delta|| = ||h|| to first order;
        E||delta||^2 = sigma^2 ||h||^2 (D - 1) / D). A zero row gets delta = 0.
      ``sibling``: delta_m = alpha * (h_j - h), j drawn uniformly with replacement, independently
        for each m, among the *other* rows of the row's group (``group_index``); a row alone in its
        group falls back to ``gaussian``.

    Args:
        hidden: ``[R, D]`` float latents (the LM head's input).
        num_perturbations: M >= 1.
        sigma: gaussian scale (>= 0); alpha: sibling interpolation factor.
        group_index: ``[R]`` integer group id per row (any order, any non-negative values);
            required for ``sibling``, ignored for ``gaussian``.
        generator: a ``torch.Generator`` on hidden's device. The same generator state gives the
            same deltas (draws: ``gaussian`` one [R, M, D] normal tensor; ``sibling`` one [R, M]
            uniform tensor, then one normal tensor for the lone rows, if any).

    Returns:
        ``[R, M, D]`` in hidden's dtype (drawn and combined in float32, float64 for float64).

    Cost: O(R*M*D) time and memory; no model call. Never differentiable (runs under no_grad).
    """
    check_float("hidden", hidden)
    if hidden.dim() != 2:
        raise ValueError(f"hidden must be [R, D], got shape {tuple(hidden.shape)}")
    if hidden.shape[1] < 1:
        raise ValueError(f"hidden must have D >= 1 features, got shape {tuple(hidden.shape)}")
    if isinstance(num_perturbations, bool) or not isinstance(num_perturbations, int) or num_perturbations < 1:
        raise ValueError(f"num_perturbations must be an int >= 1, got {num_perturbations!r}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if not (isinstance(sigma, (int, float)) and math.isfinite(sigma) and sigma >= 0):
        raise ValueError(f"sigma must be a finite number >= 0, got {sigma!r}")
    if not (isinstance(alpha, (int, float)) and math.isfinite(alpha)):
        raise ValueError(f"alpha must be a finite number, got {alpha!r}")
    if generator is not None and generator.device.type != hidden.device.type:
        raise ValueError(f"generator is on {generator.device} but hidden is on {hidden.device}; "
                         "create it with torch.Generator(device=hidden.device)")
    if mode == "sibling":
        r = hidden.shape[0]
        if group_index is None:
            raise ValueError("mode='sibling' needs group_index ([R] group id per row); pass "
                             "torch.zeros(R, dtype=torch.long) to treat all rows as one group")
        if not isinstance(group_index, torch.Tensor) or group_index.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"group_index must be an int64/int32 tensor of shape [{r}], got "
                            f"{getattr(group_index, 'dtype', type(group_index).__name__)}")
        if group_index.shape != (r,):
            raise ValueError(f"group_index must be an int64/int32 tensor of shape [{r}], got "
                             f"{tuple(group_index.shape)}")
        if group_index.device != hidden.device:
            raise ValueError(f"group_index is on {group_index.device} but hidden is on {hidden.device}")
    else:
        group_index = None
    return torch.ops.gccpo.perturb_latents(hidden.detach(), num_perturbations, float(sigma), mode,
                                           float(alpha), group_index, generator)


def perturbations(hidden: torch.Tensor, num_perturbations: int, sigma: float, mode: str,
                  alpha: float, group_index: torch.Tensor | None,
                  generator: torch.Generator | None) -> torch.Tensor:
    """The body of the ``gccpo::perturb_latents`` op, on arguments already checked for type, shape
    and device (the sign of the group ids is checked here: a host sync). Returns [R, M, D]."""
    r, _ = hidden.shape
    m = num_perturbations
    cd = out_dtype_for(hidden.dtype)
    with torch.no_grad():
        h = hidden.detach().to(cd)
        if mode == "gaussian":
            return _tangent_gaussian(h, m, float(sigma), generator).to(hidden.dtype)
        if r > 0 and bool((group_index < 0).any()):
            raise ValueError("group_index must hold non-negative group ids")
        gid = group_index.long()
        order = torch.argsort(gid, stable=True)                  # members of a group contiguous
        _, counts = torch.unique_consecutive(gid[order], return_counts=True)
        starts = torch.cumsum(counts, 0) - counts
        seg = torch.repeat_interleave(torch.arange(counts.numel(), device=h.device), counts)
        size_sorted = counts[seg]                                # group size, sorted order
        rank_sorted = torch.arange(r, device=h.device) - starts[seg]
        size = torch.empty_like(size_sorted).scatter_(0, order, size_sorted)
        rank = torch.empty_like(rank_sorted).scatter_(0, order, rank_sorted)
        start = torch.empty_like(size_sorted).scatter_(0, order, starts[seg])
        u = torch.rand(r, m, generator=generator, dtype=torch.float64, device=h.device)
        others = (size - 1).clamp_min(1).unsqueeze(1)            # [R, 1]
        k = torch.minimum((u * others).long(), others - 1)       # uniform in [0, size - 2]
        k = k + (k >= rank.unsqueeze(1)).long()                  # skip the row itself
        j = order[(start.unsqueeze(1) + k).clamp_max(max(r - 1, 0))]  # [R, M] sibling row ids
        delta = (h[j] - h.unsqueeze(1)).mul_(float(alpha))
        lone = (size == 1).nonzero().squeeze(1)
        if lone.numel() > 0:
            delta[lone] = _tangent_gaussian(h[lone], m, float(sigma), generator)
        return delta.to(hidden.dtype)


# The schema is written out: Generator? is not inferred from annotations. The op draws random
# numbers, so it is tagged nondeterministic_seeded (the compiler never merges or reorders two calls).
@torch.library.custom_op(
    "gccpo::perturb_latents", mutates_args=(), tags=(torch.Tag.nondeterministic_seeded,),
    schema="(Tensor hidden, int num_perturbations, float sigma, str mode, float alpha, "
           "Tensor? group_index, Generator? generator) -> Tensor")
def _perturb_latents_op(hidden, num_perturbations, sigma, mode, alpha, group_index, generator):
    """hidden [R, D] -> perturbation vectors [R, M, D] in hidden's dtype."""
    return perturbations(hidden, num_perturbations, sigma, mode, alpha, group_index, generator)


@_perturb_latents_op.register_fake
def _perturb_latents_fake(hidden, num_perturbations, sigma, mode, alpha, group_index, generator):
    return hidden.new_empty((hidden.shape[0], num_perturbations, hidden.shape[1]))


# ---------------------------------------------------------------------------------------------
# counterfactual divergence
# ---------------------------------------------------------------------------------------------


def counterfactual_divergence(hidden: torch.Tensor, weight: torch.Tensor, deltas: torch.Tensor, *,
                              bias: torch.Tensor | None = None, temperature: float = 1.0,
                              logit_scale: float = 1.0, softcap: float | None = None,
                              kind: str = "kl", answer_token_ids: torch.Tensor | None = None,
                              backend: str | None = None, validate: bool = True,
                              process_group: Any = None) -> torch.Tensor:
    """Divergence D(q(.|h_r) || q(.|h_r + delta_{r,m})) for every row r and perturbation m.

    q(.|h) = softmax(z(h)), z from SPEC §1 (u = logit_scale*(W h + b)/temperature, optional soft
    cap), over the full vocabulary or renormalized over ``answer_token_ids``.

    Args:
        hidden: ``[R, D]`` latents, float16 / bfloat16 / float32 / float64.
        weight: ``[V, D]`` LM head; bias ``[V]`` or None. Same dtype and device as hidden.
        deltas: ``[R, M, D]`` perturbation vectors (e.g. from :func:`perturb_latents`), hidden's
            dtype. The perturbed latent h + delta is used in exact arithmetic (W h + W delta), never
            rounded to the input dtype.
        kind: a name in the divergence registry (:data:`KINDS`; ``gccpo_kernels/divergences.py``):
            ``"kl"`` KL(q || q~), ``"js"`` Jensen-Shannon (natural log, in [0, ln 2]), ``"tv"``
            total variation (in [0, 1]). A registered divergence without a Triton kernel branch
            runs on the torch and reference backends; the triton backend refuses it (ValueError).
        answer_token_ids: optional ``[K]`` distinct token ids; the distributions are renormalized
            over them (W and b are gathered to [K, D], [K]: cheap).
        backend: ``"triton"``, ``"torch"``, ``"reference"`` or None (``$GCCPO_BACKEND``, then auto).
        validate: check finiteness of hidden, deltas and bias, the answer ids (one pass + host
            sync each) and the outputs. R = 0 or M = 0 give an empty [R, M] result; D = 0 and
            V = 0 raise ValueError.
        process_group: vocabulary parallelism (docs/vocab_parallel.md): a ``torch.distributed``
            group, or ``True`` for the default group, or None (default: one device). Every rank
            passes the same hidden, deltas and answer ids (global token ids) and its contiguous
            slice ``weight[offset : offset + V_local]`` (and bias slice) in rank order; slices may
            differ in size or be empty. Every rank gets the full [R, M] result (the same bits on
            every rank). Costs one all-reduce of 3P ints (the slice sizes, the backends and the
            ranks' argument checks: a rank whose checks fail makes every rank raise), then for
            KL one MAX all-reduce of [R, 1+M] and two all-gathers of [R, 1+2M] and [R, M] values
            (JS, TV: one more [R, M]; the triton backend's are per block of up to 4
            perturbations), never R x V.
            Raises ValueError when torch.distributed is not initialised. This path calls the
            backend directly, not through the ``gccpo::counterfactual_divergence`` custom op (an
            op cannot take a process group), behind ``torch.compiler.disable``: a compiled
            caller graph-breaks there and runs it eagerly.

    Returns:
        ``[R, M]`` float32 (float64 for float64 inputs).

    Forward-only: it runs under ``torch.no_grad()`` and its result never carries a graph, also when
    hidden or weight require grad (the LM head weight usually does): the inputs are read detached.

    Accuracy (float32): |error| <= 2e-3 * KL + 2e-8 at realistic KL 1e-6..1e-4 (SPEC §3): Delta is
    formed from W delta, KL = log1p(E_q[exp(Delta - c) - 1 - (Delta - c)]) with c = E_q[Delta].

    Cost: 2(M+1)RVD FLOPs, one pass over W on both fast backends (a chunk's whole vocabulary is
    in the workspace; on triton the statistics and integrand kernels read that chunk). Memory:
    O(R*M) outputs plus a bounded workspace; never R x V (only the reference backend materializes).
    """
    if process_group is not None:
        return _divergence_sharded(hidden, weight, deltas, bias, temperature, logit_scale, softcap,
                                   kind, answer_token_ids, backend, validate, process_group)
    check_lm_head(hidden, weight, bias)
    _check_divergence_args(hidden, deltas, kind)
    # value checks (one host sync each) run inside the op, where torch.compile does not trace
    check_answer_ids(answer_token_ids, weight.shape[0], hidden.device, False)
    name = resolve_backend(backend, hidden.device, hidden.dtype)
    params = LogitParams.of(temperature, logit_scale, softcap)
    # forward-only: the op sees detached inputs, so its output never carries a graph
    return torch.ops.gccpo.counterfactual_divergence(
        hidden.detach(), weight.detach(), deltas.detach(), None if bias is None else bias.detach(),
        answer_token_ids, params.temperature, params.logit_scale, params.softcap, kind, name,
        validate)


def divergence_forward(hidden: torch.Tensor, weight: torch.Tensor, deltas: torch.Tensor,
                       bias: torch.Tensor | None, answer_token_ids: torch.Tensor | None,
                       params: LogitParams, kind: str, name: str, validate: bool) -> torch.Tensor:
    """The body of the ``gccpo::counterfactual_divergence`` op: value checks, then the backend
    ``name`` on inputs already checked for shape, dtype and device. Returns [R, M]."""
    check_answer_ids(answer_token_ids, weight.shape[0], hidden.device, validate)
    check_finite("hidden", hidden, validate)
    check_finite("deltas", deltas, validate)
    check_bias_finite(bias, validate)
    with torch.no_grad():
        bias = None if bias is None else bias.contiguous()
        w, b = restrict_head(weight, bias, answer_token_ids)
        w = w if w.is_contiguous() else w.contiguous()
        h = hidden if hidden.is_contiguous() else hidden.contiguous()
        dl = deltas if deltas.is_contiguous() else deltas.contiguous()
        out = IMPLEMENTATIONS.load(name).forward(h, w, b, dl, params, kind)
    check_outputs_finite("counterfactual_divergence", (out,), validate)
    return out


@torch.library.custom_op(
    "gccpo::counterfactual_divergence", mutates_args=(),
    schema="(Tensor hidden, Tensor weight, Tensor deltas, Tensor? bias, Tensor? answer_token_ids, "
           "float temperature, float logit_scale, float? softcap, str kind, str backend, "
           "bool validate) -> Tensor")
def _counterfactual_divergence_op(hidden, weight, deltas, bias, answer_token_ids, temperature,
                                  logit_scale, softcap, kind, backend, validate):
    """hidden [R, D], weight [V, D], deltas [R, M, D] -> divergence [R, M]."""
    return divergence_forward(hidden, weight, deltas, bias, answer_token_ids,
                              LogitParams(temperature, logit_scale, softcap), kind, backend,
                              validate)


@_counterfactual_divergence_op.register_fake
def _counterfactual_divergence_fake(hidden, weight, deltas, bias, answer_token_ids, temperature,
                                    logit_scale, softcap, kind, backend, validate):
    return hidden.new_empty(deltas.shape[:2], dtype=out_dtype_for(hidden.dtype))


def _check_divergence_args(hidden: torch.Tensor, deltas: torch.Tensor, kind: str) -> None:
    """The free checks of kind, hidden and deltas (the LM head is checked by the caller)."""
    divergence_entry(kind)                          # ValueError naming the registered kinds
    if hidden.dim() != 2:
        raise ValueError(f"hidden must be [R, D], got shape {tuple(hidden.shape)}")
    check_float("deltas", deltas)
    r, d = hidden.shape
    if deltas.dim() != 3 or deltas.shape[0] != r or deltas.shape[2] != d:
        raise ValueError(f"deltas must be [R, M, D] = [{r}, M, {d}], got {tuple(deltas.shape)}")
    if deltas.dtype != hidden.dtype:
        raise TypeError(f"deltas ({deltas.dtype}) must have hidden's dtype ({hidden.dtype})")
    if deltas.device != hidden.device:
        raise ValueError(f"deltas are on {deltas.device} but hidden is on {hidden.device}")


@torch.compiler.disable
def _divergence_sharded(hidden: torch.Tensor, weight: torch.Tensor, deltas: torch.Tensor,
                        bias: torch.Tensor | None, temperature: float, logit_scale: float,
                        softcap: float | None, kind: str, answer_token_ids: torch.Tensor | None,
                        backend: str | None, validate: bool, process_group: Any) -> torch.Tensor:
    """:func:`counterfactual_divergence` with ``weight`` this rank's vocabulary slice. The local
    checks run inside :func:`vocab_shard`'s first collective, so a rank whose arguments fail them
    makes every rank raise instead of leaving the others waiting."""
    opts = {}

    def checks() -> str:
        check_local_lm_head(hidden, weight, bias)
        _check_divergence_args(hidden, deltas, kind)
        check_answer_ids(answer_token_ids, weight.shape[0], hidden.device, False)  # free checks only
        opts["params"] = LogitParams.of(temperature, logit_scale, softcap)
        return resolve_backend(backend, hidden.device, hidden.dtype)

    shard = vocab_shard(weight, process_group, checks)  # raises ValueError without torch.distributed
    name, params = shard.backend, opts["params"]
    check_total_vocab(shard)
    check_answer_ids(answer_token_ids, shard.total, hidden.device, validate)
    check_finite("hidden", hidden, validate)
    check_finite("deltas", deltas, validate)
    check_bias_finite(bias, validate)
    with torch.no_grad():
        hidden, weight, deltas = hidden.detach(), weight.detach(), deltas.detach()
        bias = None if bias is None else bias.detach().contiguous()
        w, b = restrict_head(weight, bias, local_answer_ids(shard, answer_token_ids))
        w = w if w.is_contiguous() else w.contiguous()
        h = hidden if hidden.is_contiguous() else hidden.contiguous()
        dl = deltas if deltas.is_contiguous() else deltas.contiguous()
        out = IMPLEMENTATIONS.load(name).forward_sharded(h, w, b, dl, params, kind, shard)
    check_outputs_finite("counterfactual_divergence", (out,), validate)
    return out
