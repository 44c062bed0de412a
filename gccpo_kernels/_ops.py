"""The ``gccpo`` torch.library custom ops behind every public kernel op, so torch.compile traces
through them without graph breaks.

Each public function checks shapes, dtypes and devices in Python (free; traced by dynamo) and then
calls one op of this module. An op's body runs eagerly, also inside a compiled graph: it holds the
value checks that need a host synchronisation (target ranges, finiteness, group layouts), the
row compaction of the SPEC §1 primitive and the backend dispatch, none of which dynamo could trace
without a graph break. Each op has a fake (meta) implementation that gives its outputs' shapes and
dtypes to the tracer. The §1 primitive has an autograd formula whose backward is itself an op
(``gccpo::linear_logprobs_backward``), so AOTAutograd traces the compiled backward through it too.
``episode_rewards`` is differentiable as well (a weighted sum); the other ops are forward-only
(their public functions pass detached inputs).

Ops (``torch.ops.gccpo.<name>``): ``linear_logprobs``, ``linear_logprobs_backward``,
``counterfactual_divergence``, ``perturb_latents``, ``group_distribution_stats``,
``token_advantages``, ``episode_rewards``, and the policy loss's value checks ``checked_mask``,
``finite_advantages``, ``masked_targets``, ``checked_loss_inputs``. ``policy_loss`` is otherwise
plain differentiable torch code that dynamo traces as it is, and ``fused_linear_policy_loss``
composes it with ``linear_logprobs``: both compile with ``validate=True``.

Not traceable: a ``torch.Generator`` argument (dynamo cannot take one as a graph input), so
``perturb_latents(..., generator=g)`` runs outside a compiled region (it is a rollout-time,
no-grad op); with ``generator=None`` it traces.

Dispatch cost: a custom op adds a few microseconds of Python per call, nothing per element.
"""

# no `from __future__ import annotations`: torch.library infers the op schemas from the annotations

from typing import Optional

import torch

from ._logits import LogitParams
from ._validation import out_dtype_for

NAMESPACE = "gccpo"
OPS: tuple[str, ...] = ("linear_logprobs", "linear_logprobs_backward", "counterfactual_divergence",
                        "perturb_latents", "group_distribution_stats", "token_advantages",
                        "episode_rewards", "checked_mask", "finite_advantages", "masked_targets",
                        "checked_loss_inputs")


# ------------------------------------------------------------------------------------------------
# SPEC §1: the primitive, with its autograd formula
# ------------------------------------------------------------------------------------------------

@torch.library.custom_op("gccpo::linear_logprobs", mutates_args=())
def _linear_logprobs(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                     targets: torch.Tensor, ignore_index: int, temperature: float,
                     logit_scale: float, softcap: Optional[float], backend: str,
                     validate: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """hidden [N, D], weight [V, D], bias [V] | None, targets [N] (dense) -> logp, entropy, lse [N]."""
    from .linear_logprobs import forward_rows

    return forward_rows(hidden, weight, bias, targets, ignore_index,
                        LogitParams(temperature, logit_scale, softcap), backend, validate)


@_linear_logprobs.register_fake
def _linear_logprobs_fake(hidden, weight, bias, targets, ignore_index, temperature, logit_scale,
                          softcap, backend, validate):
    n = hidden.shape[0]
    cd = out_dtype_for(hidden.dtype)
    return hidden.new_empty(n, dtype=cd), hidden.new_empty(n, dtype=cd), hidden.new_empty(n, dtype=cd)


@torch.library.custom_op("gccpo::linear_logprobs_backward", mutates_args=())
def _linear_logprobs_backward(hidden: torch.Tensor, weight: torch.Tensor,
                              bias: Optional[torch.Tensor], targets: torch.Tensor,
                              lse: torch.Tensor, entropy: torch.Tensor,
                              grad_logp: Optional[torch.Tensor],
                              grad_entropy: Optional[torch.Tensor], ignore_index: int,
                              temperature: float, logit_scale: float, softcap: Optional[float],
                              backend: str, need_hidden: bool, need_weight: bool,
                              need_bias: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(d hidden, d weight, d bias); a gradient that is not needed comes back as an empty [0]
    tensor (an op returns tensors only)."""
    from .linear_logprobs import backward_rows

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


@_linear_logprobs_backward.register_fake
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


torch.library.register_autograd("gccpo::linear_logprobs", _linear_logprobs_grad,
                                setup_context=_linear_logprobs_setup)


def linear_logprobs(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                    targets: torch.Tensor, ignore_index: int, params: LogitParams, backend: str,
                    validate: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(logp, entropy) [N] through ``gccpo::linear_logprobs``; differentiable w.r.t. hidden,
    weight and bias."""
    logp, entropy, _ = torch.ops.gccpo.linear_logprobs(
        hidden, weight, bias, targets, ignore_index, params.temperature, params.logit_scale,
        params.softcap, backend, validate)
    return logp, entropy


# ------------------------------------------------------------------------------------------------
# SPEC §3: perturbations and counterfactual divergence (forward-only)
# ------------------------------------------------------------------------------------------------

@torch.library.custom_op("gccpo::counterfactual_divergence", mutates_args=())
def _counterfactual_divergence(hidden: torch.Tensor, weight: torch.Tensor, deltas: torch.Tensor,
                               bias: Optional[torch.Tensor],
                               answer_token_ids: Optional[torch.Tensor], temperature: float,
                               logit_scale: float, softcap: Optional[float], kind: str,
                               backend: str, validate: bool) -> torch.Tensor:
    """hidden [R, D], weight [V, D], deltas [R, M, D] -> divergence [R, M]."""
    from .divergence import divergence_forward

    return divergence_forward(hidden, weight, deltas, bias, answer_token_ids,
                              LogitParams(temperature, logit_scale, softcap), kind, backend,
                              validate)


@_counterfactual_divergence.register_fake
def _counterfactual_divergence_fake(hidden, weight, deltas, bias, answer_token_ids, temperature,
                                    logit_scale, softcap, kind, backend, validate):
    return hidden.new_empty(deltas.shape[:2], dtype=out_dtype_for(hidden.dtype))


def counterfactual_divergence(hidden: torch.Tensor, weight: torch.Tensor, deltas: torch.Tensor,
                              bias: torch.Tensor | None, answer_token_ids: torch.Tensor | None,
                              params: LogitParams, kind: str, backend: str,
                              validate: bool) -> torch.Tensor:
    """[R, M] divergences through ``gccpo::counterfactual_divergence`` (inputs detached)."""
    return torch.ops.gccpo.counterfactual_divergence(
        hidden, weight, deltas, bias, answer_token_ids, params.temperature, params.logit_scale,
        params.softcap, kind, backend, validate)


# The schema is written out: Generator? is not inferred from annotations. The op draws random
# numbers, so it is tagged nondeterministic_seeded (the compiler never merges or reorders two calls).
@torch.library.custom_op(
    "gccpo::perturb_latents", mutates_args=(), tags=(torch.Tag.nondeterministic_seeded,),
    schema="(Tensor hidden, int num_perturbations, float sigma, str mode, float alpha, "
           "Tensor? group_index, Generator? generator) -> Tensor")
def _perturb_latents(hidden, num_perturbations, sigma, mode, alpha, group_index, generator):
    """hidden [R, D] -> perturbation vectors [R, M, D] in hidden's dtype."""
    from .divergence import perturbations

    return perturbations(hidden, num_perturbations, sigma, mode, alpha, group_index, generator)


@_perturb_latents.register_fake
def _perturb_latents_fake(hidden, num_perturbations, sigma, mode, alpha, group_index, generator):
    return hidden.new_empty((hidden.shape[0], num_perturbations, hidden.shape[1]))


def perturb_latents(hidden: torch.Tensor, num_perturbations: int, sigma: float, mode: str,
                    alpha: float, group_index: torch.Tensor | None,
                    generator: torch.Generator | None) -> torch.Tensor:
    """[R, M, D] perturbations through ``gccpo::perturb_latents``."""
    return torch.ops.gccpo.perturb_latents(hidden, num_perturbations, sigma, mode, alpha,
                                           group_index, generator)


# ------------------------------------------------------------------------------------------------
# SPEC §4: group statistics (forward-only)
# ------------------------------------------------------------------------------------------------

@torch.library.custom_op("gccpo::group_distribution_stats", mutates_args=())
def _group_distribution_stats(hidden: torch.Tensor, weight: torch.Tensor,
                              group_offsets: Optional[torch.Tensor],
                              group_ids: Optional[torch.Tensor], num_groups: Optional[int],
                              bias: Optional[torch.Tensor],
                              answer_token_ids: Optional[torch.Tensor], temperature: float,
                              logit_scale: float, softcap: Optional[float], backend: str,
                              validate: bool,
                              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                         torch.Tensor]:
    """(row_entropy [R], row_kl_to_mixture [R], group_mixture_entropy [G], group_mean_entropy [G],
    group_js [G])."""
    from .group_stats import stats_forward

    return stats_forward(hidden, weight, group_offsets, group_ids, num_groups, bias,
                         answer_token_ids, LogitParams(temperature, logit_scale, softcap), backend,
                         validate)


@_group_distribution_stats.register_fake
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


def group_distribution_stats(hidden: torch.Tensor, weight: torch.Tensor,
                             group_offsets: torch.Tensor | None, group_ids: torch.Tensor | None,
                             num_groups: int | None, bias: torch.Tensor | None,
                             answer_token_ids: torch.Tensor | None, params: LogitParams,
                             backend: str, validate: bool) -> tuple[torch.Tensor, ...]:
    """The five GroupStats fields through ``gccpo::group_distribution_stats`` (inputs detached)."""
    return torch.ops.gccpo.group_distribution_stats(
        hidden, weight, group_offsets, group_ids, num_groups, bias, answer_token_ids,
        params.temperature, params.logit_scale, params.softcap, backend, validate)


# ------------------------------------------------------------------------------------------------
# SPEC §5-§6: episode rewards (differentiable) and token advantages (constants of the loss)
# ------------------------------------------------------------------------------------------------

@torch.library.custom_op("gccpo::episode_rewards", mutates_args=())
def _episode_rewards(robustness: torch.Tensor, effectiveness: torch.Tensor, w_rob: float,
                     w_eff: float) -> torch.Tensor:
    """w_rob * robustness + w_eff * effectiveness, float32 (float64 when either input is)."""
    from .advantages import rewards_forward

    return rewards_forward(robustness, effectiveness, w_rob, w_eff)


@_episode_rewards.register_fake
def _episode_rewards_fake(robustness, effectiveness, w_rob, w_eff):
    wide = torch.float64 in (robustness.dtype, effectiveness.dtype)
    return robustness.new_empty(robustness.shape, dtype=torch.float64 if wide else torch.float32)


def _episode_rewards_setup(ctx, inputs, output) -> None:
    robustness, effectiveness, w_rob, w_eff = inputs
    ctx.weights = (w_rob, w_eff)
    ctx.dtypes = (robustness.dtype, effectiveness.dtype)


def _episode_rewards_grad(ctx, grad):
    (w_rob, w_eff), (d_rob, d_eff) = ctx.weights, ctx.dtypes
    g_rob = (grad * w_rob).to(d_rob) if ctx.needs_input_grad[0] else None
    g_eff = (grad * w_eff).to(d_eff) if ctx.needs_input_grad[1] else None
    return g_rob, g_eff, None, None


torch.library.register_autograd("gccpo::episode_rewards", _episode_rewards_grad,
                                setup_context=_episode_rewards_setup)


def episode_rewards(robustness: torch.Tensor, effectiveness: torch.Tensor, w_rob: float,
                    w_eff: float) -> torch.Tensor:
    """r = w_rob R_rob + w_eff R_eff through ``gccpo::episode_rewards``."""
    return torch.ops.gccpo.episode_rewards(robustness, effectiveness, w_rob, w_eff)


@torch.library.custom_op("gccpo::token_advantages", mutates_args=())
def _token_advantages(outcome_rewards: torch.Tensor, group_index: torch.Tensor,
                      episode_ids: torch.Tensor, episode_rewards: torch.Tensor,
                      old_logp: Optional[torch.Tensor], mask: torch.Tensor, eta: float,
                      gamma: float, scale: str, surprise_weighting: bool, normalize_returns: bool,
                      eps: float, backend: str, validate: bool, dtype: torch.dtype,
                      normalize_rewards: bool = True) -> torch.Tensor:
    """[B, T] token advantages in ``dtype``."""
    from .advantages import advantages_forward

    return advantages_forward(outcome_rewards, group_index, episode_ids, episode_rewards, old_logp,
                              mask, eta=eta, gamma=gamma, scale=scale,
                              surprise_weighting=surprise_weighting,
                              normalize_returns=normalize_returns, eps=eps, name=backend,
                              validate=validate, dtype=dtype, normalize_rewards=normalize_rewards)


@_token_advantages.register_fake
def _token_advantages_fake(outcome_rewards, group_index, episode_ids, episode_rewards, old_logp,
                           mask, eta, gamma, scale, surprise_weighting, normalize_returns, eps,
                           backend, validate, dtype, normalize_rewards=True):
    return episode_ids.new_empty(episode_ids.shape, dtype=dtype)


def token_advantages(outcome_rewards: torch.Tensor, group_index: torch.Tensor,
                     episode_ids: torch.Tensor, episode_rewards: torch.Tensor,
                     old_logp: torch.Tensor | None, mask: torch.Tensor, eta: float, gamma: float,
                     scale: str, surprise_weighting: bool, normalize_returns: bool, eps: float,
                     backend: str, validate: bool, dtype: torch.dtype,
                     normalize_rewards: bool = True) -> torch.Tensor:
    """[B, T] advantages through ``gccpo::token_advantages`` (float inputs detached)."""
    return torch.ops.gccpo.token_advantages(
        outcome_rewards, group_index, episode_ids, episode_rewards, old_logp, mask, eta, gamma,
        scale, surprise_weighting, normalize_returns, eps, backend, validate, dtype, normalize_rewards)


# ------------------------------------------------------------------------------------------------
# SPEC §2: the policy loss's value checks (its math is plain torch code that dynamo traces)
# ------------------------------------------------------------------------------------------------
# Each check needs a host synchronisation; inside an op it runs eagerly, also in a compiled graph,
# and its output (what the loss goes on to use) keeps it from being dropped as dead code.


@torch.library.custom_op("gccpo::checked_mask", mutates_args=())
def _checked_mask(mask: torch.Tensor) -> torch.Tensor:
    if mask.numel() > 0:
        bad = (mask != 0) & (mask != 1)
        if bool(bad.any()):
            value = mask[bad].flatten()[0].item()
            raise ValueError(f"mask must hold only 0 and 1 (or be bool), found {value!r}; pass mask > 0 "
                             "(or mask.bool()) if it holds weights, and put weights into is_weights")
    return mask != 0


@_checked_mask.register_fake
def _checked_mask_fake(mask):
    return torch.empty_like(mask, dtype=torch.bool)


def checked_mask(mask: torch.Tensor) -> torch.Tensor:
    """``mask != 0`` after checking that a non-bool mask holds only 0 and 1."""
    return torch.ops.gccpo.checked_mask(mask)


@torch.library.custom_op("gccpo::finite_advantages", mutates_args=())
def _finite_advantages(advantages: torch.Tensor, used: torch.Tensor) -> torch.Tensor:
    bad = ~torch.isfinite(advantages) & used
    if bool(bad.any()):
        raise ValueError(f"advantages hold {int(bad.sum())} NaN/inf value(s) on unmasked tokens; "
                         "check the reward / advantage computation (e.g. a group std of 0)")
    return torch.where(used, advantages, torch.zeros((), dtype=advantages.dtype, device=advantages.device))


@_finite_advantages.register_fake
def _finite_advantages_fake(advantages, used):
    return torch.empty(torch.broadcast_shapes(advantages.shape, used.shape), dtype=advantages.dtype,
                       device=advantages.device)


def _finite_advantages_setup(ctx, inputs, output) -> None:
    ctx.save_for_backward(inputs[1])


def _finite_advantages_grad(ctx, grad):
    (used,) = ctx.saved_tensors
    return torch.where(used, grad, torch.zeros((), dtype=grad.dtype, device=grad.device)), None


_finite_advantages.register_autograd(_finite_advantages_grad, setup_context=_finite_advantages_setup)


def finite_advantages(advantages: torch.Tensor, used: torch.Tensor) -> torch.Tensor:
    """``advantages`` where ``used`` (0 elsewhere: masked garbage never reaches the backward), after
    checking that every used value is finite."""
    return torch.ops.gccpo.finite_advantages(advantages, used)


@torch.library.custom_op("gccpo::masked_targets", mutates_args=())
def _masked_targets(targets: torch.Tensor, mask: torch.Tensor, ignore_index: int) -> torch.Tensor:
    if targets.numel() > 0 and bool((mask & (targets == ignore_index)).any()):
        raise ValueError(f"targets == ignore_index ({ignore_index}) on tokens where mask is 1: "
                         "set mask to 0 there (the loss would silently count them with logp = 0)")
    return targets.masked_fill(~mask, ignore_index)


@_masked_targets.register_fake
def _masked_targets_fake(targets, mask, ignore_index):
    return torch.empty_like(targets)


def masked_targets(targets: torch.Tensor, mask: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """``targets`` with ``ignore_index`` where ``mask`` is False, after checking that no unmasked
    target already is ``ignore_index``."""
    return torch.ops.gccpo.masked_targets(targets, mask, ignore_index)


@torch.library.custom_op("gccpo::checked_loss_inputs", mutates_args=())
def _checked_loss_inputs(mask: torch.Tensor, logp: torch.Tensor, old_logp: Optional[torch.Tensor],
                         ref_logp: Optional[torch.Tensor], entropy: Optional[torch.Tensor],
                         is_weights: Optional[torch.Tensor], normalizer: Optional[torch.Tensor],
                         loss_scale: Optional[torch.Tensor]) -> torch.Tensor:
    """A copy of the bool ``mask`` [B, T] after checking (one host sync) that logp, old_logp,
    ref_logp, entropy ([B, T]) and is_weights ([B, 1] or [B, T]) are finite where the loss reads
    them (unmasked tokens; for a [B, 1] value, rows with an unmasked token), that a tensor
    ``normalizer`` is finite and > 0 and a tensor ``loss_scale`` finite."""
    named = [("logp", logp), ("old_logp", old_logp), ("ref_logp", ref_logp), ("entropy", entropy),
             ("is_weights", is_weights)]
    named = [(k, t) for k, t in named if t is not None]
    bad = []
    for _, t in named:
        used = mask if t.shape[1] > 1 else mask.any(1, keepdim=True)
        bad.append(~torch.isfinite(t) & used)
    flags = [b.any() for b in bad]
    scalars = [(k, v) for k, v in (("normalizer", normalizer), ("loss_scale", loss_scale)) if v is not None]
    for k, v in scalars:
        ok = torch.isfinite(v) & (v > 0) if k == "normalizer" else torch.isfinite(v)
        flags.append(~ok.reshape(()))
    if flags and any(torch.stack(flags).tolist()):
        problems = []
        for (k, t), b in zip(named, bad):
            count = int(b.sum())
            if count:
                where = "unmasked tokens" if t.shape[1] > 1 else "rows with an unmasked token"
                problems.append(f"{k} holds {count} NaN/inf value(s) on {where}")
        for k, v in scalars:
            value = float(v.reshape(()))
            finite = value == value and abs(value) != float("inf")
            if not finite or (k == "normalizer" and not value > 0):
                need = "a finite number > 0" if k == "normalizer" else "finite"
                problems.append(f"{k} must be {need}, got tensor value {value!r}")
        raise ValueError("; ".join(problems) + " (validate=False skips this check and gives a NaN "
                         "or wrong loss)")
    return mask.clone()


@_checked_loss_inputs.register_fake
def _checked_loss_inputs_fake(mask, logp, old_logp, ref_logp, entropy, is_weights, normalizer,
                              loss_scale):
    return torch.empty_like(mask)


def checked_loss_inputs(mask: torch.Tensor, logp: torch.Tensor, old_logp: torch.Tensor | None,
                        ref_logp: torch.Tensor | None, entropy: torch.Tensor | None,
                        is_weights: torch.Tensor | None, normalizer: torch.Tensor | None,
                        loss_scale: torch.Tensor | None) -> torch.Tensor:
    """The bool ``mask`` (a copy) after the policy loss's finiteness checks of its float inputs
    (see ``gccpo::checked_loss_inputs``); the inputs are read detached."""
    det = lambda t: None if t is None else t.detach()  # noqa: E731
    return torch.ops.gccpo.checked_loss_inputs(mask, logp.detach(), det(old_logp), det(ref_logp),
                                               det(entropy), det(is_weights), det(normalizer),
                                               det(loss_scale))
