"""SPEC §5-§6: episode rewards and token-level advantages (GRPO's advantage is the eta = 0 case).

Public: :func:`episode_rewards` (r = w_rob R_rob + w_eff R_eff) and :func:`token_advantages`
(A_t = A_out + eta * omega_t * R^_{k(t)}). The backend (``triton``: one segmented kernel launch
for the whole batch; ``torch``: vectorized segmented reductions; ``reference``: plain loops) is
picked by :mod:`gccpo_kernels._backend`. Advantages are constants of the loss: nothing here
carries a gradient.

This module registers the custom ops ``gccpo::episode_rewards`` (differentiable) and
``gccpo::token_advantages`` and looks the backend up in :data:`IMPLEMENTATIONS`
(docs/kernels_layout.md).
"""

from __future__ import annotations

import math

import torch

from ._backend import OpBackends, resolve_backend
from ._validation import check_float, check_same_device
from .chunked import advantages as torch_impl
from .reference_backend import advantages as reference_impl

SCALES = ("group", "batch", "none")
_INT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


def _triton_impl():
    from .triton import advantages as impl  # imports triton: only when the backend runs

    return impl


#: The advantages' backends, each with ``token_advantages(outcome_rewards, group_index,
#: episode_ids, episode_rewards, old_logp, mask, *, eta, gamma, scale, surprise_weighting,
#: normalize_returns, eps, dtype, normalize_rewards) -> [B, T]`` on checked, detached inputs with
#: B, T >= 1 and K >= 1.
IMPLEMENTATIONS = OpBackends("token_advantages", ("token_advantages",),
                             triton=_triton_impl, torch=torch_impl, reference=reference_impl)


def episode_rewards(robustness: torch.Tensor, effectiveness: torch.Tensor, *, w_rob: float = 0.9,
                    w_eff: float = 0.8) -> torch.Tensor:
    """SPEC §5: r_{i,k} = w_rob * R^rob_{i,k} + w_eff * R^eff_{i,k}.

    Args:
        robustness: ``[B, K]`` (or any shape) float tensor, R^rob = -(1/M) sum_m D(q || q~_m).
        effectiveness: same shape, R^eff (KL to the episode-index mixture, or the latent form).
        w_rob, w_eff: the weights (defaults 0.9 and 0.8, a *choice* of the spec).

    Returns:
        ``[B, K]`` float32 (float64 when either input is float64). Entries for episodes a completion
        does not have are passed through; :func:`token_advantages` never reads them.
    Cost: one elementwise pass.
    """
    check_float("robustness", robustness)
    check_float("effectiveness", effectiveness)
    if robustness.shape != effectiveness.shape:
        raise ValueError(f"robustness {tuple(robustness.shape)} and effectiveness "
                         f"{tuple(effectiveness.shape)} must have one shape ([B, K])")
    check_same_device(robustness=robustness, effectiveness=effectiveness)
    for name, value in (("w_rob", w_rob), ("w_eff", w_eff)):
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{name} must be a finite number, got {value!r}")
    return torch.ops.gccpo.episode_rewards(robustness, effectiveness, float(w_rob), float(w_eff))


def rewards_forward(robustness: torch.Tensor, effectiveness: torch.Tensor, w_rob: float,
                    w_eff: float) -> torch.Tensor:
    """The body of the ``gccpo::episode_rewards`` op (float64 when either input is, else float32)."""
    wide = torch.float64 in (robustness.dtype, effectiveness.dtype)
    dtype = torch.float64 if wide else torch.float32
    return w_rob * robustness.to(dtype) + w_eff * effectiveness.to(dtype)


@torch.library.custom_op(
    "gccpo::episode_rewards", mutates_args=(),
    schema="(Tensor robustness, Tensor effectiveness, float w_rob, float w_eff) -> Tensor")
def _episode_rewards_op(robustness, effectiveness, w_rob, w_eff):
    """w_rob * robustness + w_eff * effectiveness, float32 (float64 when either input is)."""
    return rewards_forward(robustness, effectiveness, w_rob, w_eff)


@_episode_rewards_op.register_fake
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


_episode_rewards_op.register_autograd(_episode_rewards_grad, setup_context=_episode_rewards_setup)


def _check_int(name: str, t: torch.Tensor, ndim: int) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _INT_DTYPES:
        raise TypeError(f"{name} must be an integer tensor (int64 or int32), got {t.dtype}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimension(s), got shape {tuple(t.shape)}")


def _check_options(eta: float, gamma: float, scale: str, eps: float) -> None:
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {SCALES}, got {scale!r}")
    for name, value in (("eta", eta), ("gamma", gamma), ("eps", eps)):
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{name} must be a finite number, got {value!r}")
    if gamma < 0:
        raise ValueError(f"gamma must be >= 0 (a discount factor), got {gamma}")
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")


def _validate_values(outcome_rewards: torch.Tensor, episode_ids: torch.Tensor,
                     episode_rewards: torch.Tensor, old_logp: torch.Tensor | None,
                     inside: torch.Tensor, surprise_weighting: bool,
                     mask: torch.Tensor | None = None) -> None:
    """Range and finiteness checks on exactly what the computation reads, and the mask's values
    (0 and 1 only, unless bool): a few fused passes and one host sync (nothing is compacted)."""
    k = episode_rewards.shape[1]
    dev = episode_ids.device
    in_ep = inside & (episode_ids >= 0)
    not_01 = None
    if mask is not None and mask.dtype != torch.bool:
        not_01 = (mask != 0) & (mask != 1)
    flags = [(inside & ((episode_ids < -1) | (episode_ids >= k))).any(),
             (~torch.isfinite(outcome_rewards)).any(),
             torch.zeros((), dtype=torch.bool, device=dev) if not_01 is None else not_01.any()]
    if surprise_weighting and old_logp is not None:
        flags.append((in_ep & ~torch.isfinite(old_logp)).any())
    else:
        flags.append(torch.zeros((), dtype=torch.bool, device=dev))
    if k > 0 and episode_ids.shape[1] > 0:
        minus_one = torch.full((), -1, dtype=torch.int64, device=dev)
        counts = torch.where(in_ep, episode_ids.to(torch.int64), minus_one).amax(dim=1) + 1
        used = torch.arange(k, device=dev)[None, :] < counts[:, None]
        flags.append((used & ~torch.isfinite(episode_rewards)).any())
    bad_ids, bad_out, bad_mask, bad_logp, *bad_rewards = torch.stack(flags).tolist()
    if bad_mask:
        value = mask[not_01].flatten()[0].item()
        raise ValueError(f"mask must hold only 0 and 1 (or be bool), found {value!r}; pass mask > 0 "
                         "(or mask.bool()) for a completion mask")
    problems = []
    if bad_ids:
        wrong = inside & ((episode_ids < -1) | (episode_ids >= k))
        problems.append(f"episode_ids hold {int(wrong.sum())} value(s) outside [-1, {k}) inside the "
                        f"mask (first: {episode_ids[wrong].flatten()[0].item()}); episode_rewards has "
                        f"K = {k} columns")
    if bad_out:
        problems.append("outcome_rewards hold NaN or inf")
    if bad_logp:
        problems.append("old_logp holds NaN or inf at completion tokens (a token of probability 0?)")
    if bad_rewards and bad_rewards[0] and not bad_ids:
        problems.append("episode_rewards hold NaN or inf for episodes the completions have")
    if problems:
        raise ValueError("; ".join(problems))


def token_advantages(outcome_rewards: torch.Tensor, group_index: torch.Tensor,
                     episode_ids: torch.Tensor, episode_rewards: torch.Tensor,
                     old_logp: torch.Tensor | None, mask: torch.Tensor, *, eta: float = 1.0,
                     gamma: float = 1.0, scale: str = "group", surprise_weighting: bool = True,
                     normalize_returns: bool = True, eps: float = 1e-4, backend: str | None = None,
                     validate: bool = True, normalize_rewards: bool = True) -> torch.Tensor:
    """SPEC §6: token-level advantages A_t = A_out_i + eta * omega_t * R^_{i,k(t)}.

    Args:
        outcome_rewards: ``[B]`` float, the verifier's reward r^out_i of each completion.
        group_index: ``[B]`` integer group id of each completion (the prompt it answers). Any values,
            any order; groups may have different sizes and B need not be a multiple of G.
        episode_ids: ``[B, T]`` integer episode id of each token, contiguous from 0 within a
            completion, -1 for tokens in no episode. Read only where ``mask`` is set.
        episode_rewards: ``[B, K]`` float process reward r_{i,k} (:func:`episode_rewards`). Entries
            with k >= the completion's episode count (1 + its largest id) are never read.
        old_logp: ``[B, T]`` float log-probs of the rollout policy (surprise s_t = -old_logp_t).
            May be None when ``surprise_weighting`` is False.
        mask: ``[B, T]`` completion mask (bool, or 0/1 int/float; other values raise
            ValueError when ``validate``, complex raises TypeError); left or right padding.
        eta: weight of the process advantage; 0 gives GRPO's advantage exactly.
        gamma: discount of the return over later episodes of the same completion.
        scale: outcome advantage (r - mean_group) / (std_group + eps) (``"group"``), with the
            batch's std (``"batch"``), or r - mean_group (``"none"``, Dr. GRPO).
        surprise_weighting: omega_t = |e_k| s_t / sum_{e_k} s (1 when that sum is 0); off: omega = 1.
        normalize_returns: normalize the returns again over the group's episodes.
        normalize_rewards: standardize the episode rewards over the group's episodes before the
            returns (SPEC §6). False: ``episode_rewards`` are used as given (r~ = r), for a caller
            that normalized them its own way (the ``paper`` formulation's truncated mean).
        eps: added to every std.
        backend: ``"triton"``, ``"torch"``, ``"reference"`` or None (``$GCCPO_BACKEND``, then auto).
        validate: check id ranges, mask values and finiteness of what is read (one host sync).

    Returns:
        ``[B, T]`` float32 (float64 when a float input is float64); 0 outside the mask, the outcome
        advantage alone on completion tokens with episode id -1.

    Statistics: std is the sample std (n - 1), 0 for one value. A group whose outcome rewards are
    all equal (a group of one included) gets A_out = 0 exactly; likewise every normalized process
    reward / return of a group whose episode values are all equal is exactly 0 (the value
    (r - mean) / (0 + eps) would be 0 up to rounding of the mean). An empty completion (no mask)
    has no episodes but counts in its group's outcome statistics.

    Cost: O(B*T) reads of ids, mask and old_logp (twice on the triton backend) and one write of
    the output; O(B*K) scratch; nothing of size B*T besides the output on the triton backend.
    """
    _check_options(eta, gamma, scale, eps)
    check_float("outcome_rewards", outcome_rewards)
    check_float("episode_rewards", episode_rewards)
    _check_int("group_index", group_index, 1)
    _check_int("episode_ids", episode_ids, 2)
    if outcome_rewards.dim() != 1:
        raise ValueError(f"outcome_rewards must be [B], got shape {tuple(outcome_rewards.shape)}")
    B, T = episode_ids.shape
    if outcome_rewards.shape[0] != B or group_index.shape[0] != B:
        raise ValueError(f"outcome_rewards {tuple(outcome_rewards.shape)} and group_index "
                         f"{tuple(group_index.shape)} must be [B] with B = {B} (episode_ids' rows)")
    if episode_rewards.dim() != 2 or episode_rewards.shape[0] != B:
        raise ValueError(f"episode_rewards must be [B, K] with B = {B}, got {tuple(episode_rewards.shape)}")
    if not isinstance(mask, torch.Tensor) or mask.shape != (B, T):
        raise ValueError(f"mask must be a [B, T] = [{B}, {T}] tensor, got "
                         f"{tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__}")
    if mask.dtype.is_complex:
        raise TypeError(f"mask must be bool or a 0/1 int/float tensor, got {mask.dtype}")
    if old_logp is None:
        if surprise_weighting:
            raise ValueError("old_logp is required when surprise_weighting=True")
    else:
        check_float("old_logp", old_logp)
        if old_logp.shape != (B, T):
            raise ValueError(f"old_logp must be [B, T] = [{B}, {T}], got {tuple(old_logp.shape)}")
    check_same_device(outcome_rewards=outcome_rewards, group_index=group_index, episode_ids=episode_ids,
                      episode_rewards=episode_rewards, old_logp=old_logp, mask=mask)

    floats = [outcome_rewards.dtype, episode_rewards.dtype]
    if old_logp is not None and surprise_weighting:
        floats.append(old_logp.dtype)
    dtype = torch.float64 if torch.float64 in floats else torch.float32
    name = resolve_backend(backend, episode_ids.device, dtype)
    return torch.ops.gccpo.token_advantages(
        outcome_rewards.detach(), group_index, episode_ids, episode_rewards.detach(),
        None if old_logp is None else old_logp.detach(), mask, float(eta), float(gamma), scale,
        bool(surprise_weighting), bool(normalize_returns), float(eps), name, bool(validate), dtype,
        bool(normalize_rewards))


def advantages_forward(outcome_rewards: torch.Tensor, group_index: torch.Tensor,
                       episode_ids: torch.Tensor, episode_rewards: torch.Tensor,
                       old_logp: torch.Tensor | None, mask: torch.Tensor, *, eta: float,
                       gamma: float, scale: str, surprise_weighting: bool, normalize_returns: bool,
                       eps: float, name: str, validate: bool, dtype: torch.dtype,
                       normalize_rewards: bool = True) -> torch.Tensor:
    """The body of the ``gccpo::token_advantages`` op: value checks (one host sync, when
    ``validate``), then the backend ``name`` on inputs already checked for shape and device."""
    B, T = episode_ids.shape
    device = episode_ids.device
    inside = mask != 0
    if validate:
        _validate_values(outcome_rewards, episode_ids, episode_rewards, old_logp, inside,
                         surprise_weighting, mask)
    if not surprise_weighting:
        old_logp = None
    opts = dict(eta=float(eta), gamma=float(gamma), scale=scale, surprise_weighting=surprise_weighting,
                normalize_returns=bool(normalize_returns), eps=float(eps),
                normalize_rewards=bool(normalize_rewards))
    if B == 0 or T == 0:
        return torch.zeros((B, T), dtype=dtype, device=device)
    if episode_rewards.shape[1] == 0:
        # no completion has an episode (ids are all -1 inside the mask): one unread column
        episode_rewards = torch.zeros((B, 1), dtype=episode_rewards.dtype, device=device)
    with torch.no_grad():
        return IMPLEMENTATIONS.load(name).token_advantages(
            outcome_rewards.detach(), group_index, episode_ids, episode_rewards.detach(),
            None if old_logp is None else old_logp.detach(), mask, dtype=dtype, **opts)


@torch.library.custom_op(
    "gccpo::token_advantages", mutates_args=(),
    schema="(Tensor outcome_rewards, Tensor group_index, Tensor episode_ids, "
           "Tensor episode_rewards, Tensor? old_logp, Tensor mask, float eta, float gamma, "
           "str scale, bool surprise_weighting, bool normalize_returns, float eps, str backend, "
           "bool validate, ScalarType dtype, bool normalize_rewards=True) -> Tensor")
def _token_advantages_op(outcome_rewards, group_index, episode_ids, episode_rewards, old_logp,
                         mask, eta, gamma, scale, surprise_weighting, normalize_returns, eps,
                         backend, validate, dtype, normalize_rewards=True):
    """[B, T] token advantages in ``dtype``."""
    return advantages_forward(outcome_rewards, group_index, episode_ids, episode_rewards, old_logp,
                              mask, eta=eta, gamma=gamma, scale=scale,
                              surprise_weighting=surprise_weighting,
                              normalize_returns=normalize_returns, eps=eps, name=backend,
                              validate=validate, dtype=dtype, normalize_rewards=normalize_rewards)


@_token_advantages_op.register_fake
def _token_advantages_fake(outcome_rewards, group_index, episode_ids, episode_rewards, old_logp,
                           mask, eta, gamma, scale, surprise_weighting, normalize_returns, eps,
                           backend, validate, dtype, normalize_rewards=True):
    return episode_ids.new_empty(episode_ids.shape, dtype=dtype)
