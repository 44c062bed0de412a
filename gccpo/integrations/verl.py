"""verl glue: the ``"gccpo"`` policy loss and a fused log-prob + entropy backend.

Importing this module registers ``"gccpo"`` in verl's policy-loss registry
(``verl.trainer.ppo.core_algos.register_policy_loss``). Select it with
``actor_rollout_ref.actor.policy_loss.loss_mode=gccpo``; to have every verl worker process import
it, set ``VERL_USE_EXTERNAL_MODULES=gccpo.integrations.verl`` (verl imports the listed modules
when it is imported). The loss is verl's ``vanilla`` clipped PPO loss — same options, same
meanings — computed by :func:`gccpo_kernels.policy_loss` (the library's one copy of the loss
math) through :meth:`gccpo_kernels.PolicyLossConfig.from_verl`:

- every ``loss_agg_mode`` of verl's ``agg_loss``, with verl's meanings: sequence means over rows
  that have at least one token, ``seq-mean-token-sum-norm`` = sum / rows / ``loss_scale_factor``
  (the padded response length by default), ``token-sum`` = sum * dp_size;
- ``config.global_batch_info`` (``dp_size``, ``batch_num_tokens``, ``global_batch_size``,
  ``loss_scale_factor``, set by verl's ``ppo_loss``) becomes the loss's ``normalizer``;
- dual clip with ``clip_ratio_c`` (verl: always on, 3.0), ``clip_ratio_low`` / ``clip_ratio_high``,
  the log-ratio clamped to +-20 before ``exp``; ``rollout_is_weights`` multiply the policy term;
- metrics under verl's names: ``actor/pg_clipfrac``, ``actor/ppo_kl``, ``actor/pg_clipfrac_lower``;
- inputs are ``[B, T]`` padded (what verl's ``ppo_loss`` hands a policy loss after
  ``no_padding_2_padding``) or ``torch.jagged`` nested tensors of the responses (verl's
  remove-padding layout), which are padded here.

As with every verl policy loss, the KL and entropy terms are added by verl's ``ppo_loss``
(``use_kl_loss``, ``entropy_coeff``), not here.

Differences from ``vanilla``, both below 1e-8 relative: a row's token mean divides by
``max(count, 1)`` where verl divides by ``count + 1e-8``, and the metrics' means divide by
``max(count, 1)`` where verl adds 1e-8. With no token at all, ``token-mean`` without
``batch_num_tokens`` gives 0 where verl gives NaN (0 / 0).

:class:`GCCPOFusedLinearForPPO` has the interface of verl's ``FusedLinearForPPO``
(``hidden_states, vocab_weights, input_ids, temperature -> log_probs, entropy``) on top of
:func:`gccpo_kernels.fused_linear_logprobs`; :func:`use_gccpo_fused_backend` makes verl's
fused-kernel model forward (``actor_rollout_ref.model.use_fused_kernels=True``,
``fused_kernel_options.impl_backend=torch``) use it. Setting ``GCCPO_VERL_FUSED_BACKEND=1``
installs it when this module is imported (e.g. through ``VERL_USE_EXTERNAL_MODULES``).

verl imports ``ray`` when it is imported, so this module needs verl's runtime (verl, ray,
tensordict, omegaconf, codetiming).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import torch

from gccpo_kernels import PolicyLossConfig, fused_linear_logprobs, policy_loss, reduce_metrics

try:
    from verl.trainer.ppo import core_algos as _core_algos
except ImportError as exc:  # pragma: no cover - depends on the install
    raise ImportError(
        "gccpo.integrations.verl needs verl (pip install verl; for the loss alone: pip install --no-deps "
        f"verl tensordict pyvers omegaconf codetiming, plus ray): importing it failed with {exc!r}") from exc

__all__ = ["LOSS_NAME", "VERL_AGG_MODES", "gccpo_policy_loss", "loss_config_for", "GCCPOFusedLinearForPPO",
           "use_gccpo_fused_backend"]

#: the name under which the loss is registered in verl's policy-loss registry.
LOSS_NAME = "gccpo"
#: verl's ``agg_loss`` modes.
VERL_AGG_MODES: tuple[str, ...] = ("token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean",
                                   "seq-mean-token-sum-norm")
_ENV_BACKEND = "GCCPO_VERL_FUSED_BACKEND"


def _get(config: Any, name: str, default: Any = None) -> Any:
    """``config.name`` for verl's dataclass configs, DictConfigs and plain dicts alike."""
    if isinstance(config, dict):
        return config.get(name, default)
    getter = getattr(config, "get", None)
    if callable(getter):
        try:
            return getter(name, default)
        except (KeyError, AttributeError, TypeError):
            pass
    return getattr(config, name, default)


def loss_config_for(config: Any, loss_agg_mode: str, response_length: int,
                    ) -> tuple[PolicyLossConfig, Any, Any]:
    """verl's actor config + ``loss_agg_mode`` -> ``(PolicyLossConfig, normalizer, loss_scale)``.

    Args:
        config: verl's ``ActorConfig`` (or any object / dict with ``clip_ratio``,
            ``clip_ratio_low``, ``clip_ratio_high``, ``clip_ratio_c`` and ``global_batch_info``).
        loss_agg_mode: one of :data:`VERL_AGG_MODES`.
        response_length: T, the padded response length (the default horizon of
            ``seq-mean-token-sum-norm``).

    Returns:
        The config of :func:`gccpo_kernels.policy_loss` and its ``normalizer`` (None: the local
        count) and ``loss_scale`` arguments, so that the loss equals verl's ``agg_loss`` of the
        vanilla per-token loss: ``token-mean``: sum / (batch_num_tokens / dp_size); sequence
        modes: sum of the row values / (global_batch_size / dp_size), ``seq-mean-token-sum-norm``
        also / ``loss_scale_factor``; ``token-sum``: sum * dp_size.

    (63 lines, kept whole: one branch per verl option, read as the mapping table it is.)
    """
    if loss_agg_mode not in VERL_AGG_MODES:
        raise ValueError(f"loss_agg_mode={loss_agg_mode!r} is not one of verl's modes {VERL_AGG_MODES}")
    if config is None:
        raise ValueError("verl passes its actor config as config=; the gccpo loss reads clip_ratio* and "
                         "global_batch_info from it")
    clip = _get(config, "clip_ratio", 0.2)
    low = _get(config, "clip_ratio_low", None)
    high = _get(config, "clip_ratio_high", None)
    clip_c = _get(config, "clip_ratio_c", 3.0)
    if clip_c is None or not clip_c > 1.0:
        raise ValueError(f"clip_ratio_c (dual clip) must be > 1 as in verl, got {clip_c!r}")
    info = dict(_get(config, "global_batch_info", None) or {})
    unknown = set(info) - {"dp_size", "batch_num_tokens", "global_batch_size", "loss_scale_factor"}
    if unknown:
        raise ValueError(f"global_batch_info has keys {sorted(unknown)} that verl's agg_loss does not take")
    dp = info.get("dp_size") or 1
    tokens = info.get("batch_num_tokens")
    rows = info.get("global_batch_size")
    horizon = info.get("loss_scale_factor")
    if horizon is None:
        horizon = _get(config, "loss_scale_factor", None)
    common = dict(clip_ratio=clip, clip_ratio_low=low, clip_ratio_high=high, clip_ratio_c=float(clip_c))

    if loss_agg_mode in ("token-mean", "token-sum"):
        cfg = PolicyLossConfig.from_verl("token-mean", **common)
        if loss_agg_mode == "token-sum":
            return dataclasses.replace(cfg, loss_agg="token-sum"), None, dp
        if tokens is None:
            if dp > 1:
                raise ValueError("loss_agg_mode='token-mean' with dp_size > 1 needs global_batch_info"
                                 "['batch_num_tokens'] (the global token count), as in verl")
            return cfg, None, 1.0
        return cfg, tokens / dp, 1.0
    sum_norm = loss_agg_mode == "seq-mean-token-sum-norm"
    cfg = PolicyLossConfig.from_verl(loss_agg_mode, loss_scale_factor=horizon if sum_norm else None,
                                     sum_norm_divides_rows=True, **common)
    if rows is None:
        if dp > 1:
            raise ValueError(f"loss_agg_mode={loss_agg_mode!r} with dp_size > 1 needs global_batch_info"
                             "['global_batch_size'] (the global number of sequences), as in verl")
        return cfg, None, 1.0
    normalizer = rows / dp
    if sum_norm:
        normalizer = normalizer * (response_length if horizon is None else horizon)
    return cfg, normalizer, 1.0


def _padded(name: str, t: torch.Tensor | None, like: torch.Tensor | None) -> torch.Tensor | None:
    """A jagged nested tensor of responses -> ``[B, T]`` padded with 0 (T of ``like``, else the
    longest row)."""
    if t is None or not t.is_nested:
        return t
    if t.layout != torch.jagged:
        raise ValueError(f"{name} is a nested tensor with layout {t.layout}; verl's remove-padding layout is "
                         "torch.jagged (torch.nested.nested_tensor_from_jagged)")
    if like is not None:
        size = tuple(like.shape)
    else:
        lengths = t.offsets().diff()
        size = (lengths.numel(), int(lengths.max()) if lengths.numel() else 0)
    return t.to_padded_tensor(0.0, output_size=size)


def gccpo_policy_loss(old_log_prob: torch.Tensor, log_prob: torch.Tensor, advantages: torch.Tensor,
                      response_mask: torch.Tensor, loss_agg_mode: str = "token-mean", config: Any = None,
                      rollout_is_weights: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """verl's ``vanilla`` PPO policy loss computed by :func:`gccpo_kernels.policy_loss`.

    The signature is verl's ``PolicyLossFn``; verl calls it by keyword from ``ppo_loss``.

    Args:
        old_log_prob, log_prob, advantages: ``[B, T]`` (``log_prob`` differentiable), or jagged
            nested tensors of the responses (padded here with 0 to the mask's shape).
        response_mask: ``[B, T]`` bool / 0-1 (or jagged nested).
        loss_agg_mode: one of :data:`VERL_AGG_MODES`, with verl's meanings (see
            :func:`loss_config_for`).
        config: verl's actor config (clip ratios, ``clip_ratio_c``, ``global_batch_info``).
        rollout_is_weights: optional ``[B, T]`` rollout-correction weights (policy term only).

    Returns:
        ``(pg_loss, metrics)``: the scalar loss (float32; float64 for float64 log-probs) and
        ``{"actor/pg_clipfrac", "actor/ppo_kl", "actor/pg_clipfrac_lower"}`` as floats (one host
        sync, as verl's ``.item()`` calls).

    Cost: O(B*T) elementwise.
    """
    mask = _padded("response_mask", response_mask, None)
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
        raise ValueError(f"response_mask must be [B, T], got "
                         f"{tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__}")
    log_prob = _padded("log_prob", log_prob, mask)
    old_log_prob = _padded("old_log_prob", old_log_prob, mask)
    advantages = _padded("advantages", advantages, mask)
    rollout_is_weights = _padded("rollout_is_weights", rollout_is_weights, mask)
    if old_log_prob is None:
        raise ValueError("old_log_prob is required (verl always passes the rollout policy's log-probs)")
    cfg, normalizer, loss_scale = loss_config_for(config, loss_agg_mode, mask.shape[1])
    loss, metrics = policy_loss(log_prob, old_log_prob.detach(), advantages.detach(), mask,
                                is_weights=None if rollout_is_weights is None else rollout_is_weights.detach(),
                                config=cfg, normalizer=normalizer, loss_scale=loss_scale)
    wanted = {k: metrics[k] for k in ("clip_frac_region", "approx_kl", "clip_frac_dual")}
    values = reduce_metrics(wanted)
    return loss, {"actor/pg_clipfrac": values["clip_frac_region"], "actor/ppo_kl": values["approx_kl"],
                  "actor/pg_clipfrac_lower": values["clip_frac_dual"]}


_core_algos.register_policy_loss(LOSS_NAME)(gccpo_policy_loss)


class GCCPOFusedLinearForPPO(torch.nn.Module):
    """verl's ``FusedLinearForPPO`` interface on :func:`gccpo_kernels.fused_linear_logprobs`.

    ``forward(hidden_states, vocab_weights, input_ids, temperature) -> (log_probs, entropy)``:

    - ``hidden_states``: ``[B, T, D]`` or packed ``[N, D]`` (verl's remove-padding layout,
      also ``[1, N, D]``); ``vocab_weights``: ``[V, D]`` (the LM head, no bias);
      ``input_ids``: ``[B, T]`` / ``[N]`` target ids (verl passes the rolled labels).
    - ``log_probs``, ``entropy``: the targets' shape, float32 (float64 for float64 inputs); verl's
      module returns the entropy in the hidden states' dtype, this one keeps float32. Targets equal
      to -100 give 0 and no gradient (verl's module would fail on them).

    Never builds ``[N, V]`` logits (verl's torch module builds ``[chunk_size, V]`` tiles in the
    forward and recomputes them in the backward; the kernel here bounds its own workspace, so
    ``chunk_size`` is accepted for compatibility and unused). ``impl_backend`` is accepted for the
    same reason; ``backend`` picks this library's backend (None: automatic).
    """

    def __init__(self, chunk_size: int = 512, impl_backend: str = "torch", *, backend: str | None = None):
        super().__init__()
        if not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"chunk_size must be an int >= 1, got {chunk_size!r}")
        self.chunk_size, self.impl_backend, self.backend = chunk_size, impl_backend, backend

    def forward(self, hidden_states: torch.Tensor, vocab_weights: torch.Tensor, input_ids: torch.Tensor,
                temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
        if not isinstance(hidden_states, torch.Tensor) or hidden_states.dim() not in (2, 3):
            shape = tuple(hidden_states.shape) if isinstance(hidden_states, torch.Tensor) else type(hidden_states)
            raise ValueError(f"hidden_states must be [N, D] or [B, T, D], got {shape}")
        if not isinstance(input_ids, torch.Tensor) or tuple(input_ids.shape) != tuple(hidden_states.shape[:-1]):
            shape = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids)
            raise ValueError(f"input_ids must have hidden_states' leading shape {tuple(hidden_states.shape[:-1])}, "
                             f"got {shape}")
        log_probs, entropy = fused_linear_logprobs(hidden_states, vocab_weights, input_ids.to(torch.int64),
                                                   temperature=temperature, return_entropy=True,
                                                   backend=self.backend)
        return log_probs, entropy

    def extra_repr(self) -> str:
        return f"backend={self.backend}"


def use_gccpo_fused_backend() -> None:
    """Route verl's fused-kernel model forward through :class:`GCCPOFusedLinearForPPO`.

    verl's ``forward_with_torch_backend`` (installed on the model when
    ``actor_rollout_ref.model.use_fused_kernels=True`` with ``fused_kernel_options.impl_backend``
    ``torch``) builds ``verl.utils.experimental.torch_functional.FusedLinearForPPO`` on every call;
    this replaces that class in the worker process. Idempotent.
    """
    from verl.utils.experimental import torch_functional

    torch_functional.FusedLinearForPPO = GCCPOFusedLinearForPPO


if os.environ.get(_ENV_BACKEND, "0").strip().lower() in ("1", "true", "yes"):
    use_gccpo_fused_backend()
