"""One advantage-shaping path: outcome and process parts, the gates and the bound (issue 19).

The trainer, the TRL integration (``GCCPOGRPOTrainer``) and ``examples/train_gccpo.py`` all shape
their token advantages here, so the options mean the same thing everywhere:

- ``reward.process_gate``: ``"outcome"`` scales the process part per token by |A_out| (no process
  push where the outcome carries no signal, a smaller one where it carries little); ``"signal"``
  zeroes the episode rewards of groups whose outcomes are all equal (:func:`gate_episodes`);
  ``"none"`` is SPEC §6 as written.
- ``reward.process_bound``: the process part of each token clamped to ±bound (0: unbounded).

The advantages come from a function ``with_eta(eta) -> [B, T]``: SPEC §6's token advantages with
process weight ``eta`` (``with_eta(0)`` is the outcome part, A_out). The trainer passes one
:func:`gccpo_kernels.token_advantages` call per eta; TRL passes its own per-sequence outcome
advantage plus the process-only advantages (token_advantages on zero outcome rewards, which SPEC
§6's linear split makes exactly the process part).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from .config import RewardConfig
from .rewards import CausalReward, bound_process, gate_by_outcome, scale_process_by_outcome


@dataclass
class ShapedAdvantages:
    """``total`` [B, T]: the advantages the loss reads; ``outcome`` [B, T]: A_out (eta = 0)."""

    total: torch.Tensor
    outcome: torch.Tensor

    @property
    def process(self) -> torch.Tensor:
        """[B, T] the process part after the gate and the bound (total - outcome)."""
        return self.total - self.outcome


def advantage_options(config: RewardConfig, causal: CausalReward | None) -> dict[str, Any]:
    """The :func:`gccpo_kernels.token_advantages` options (gamma, scale, surprise weighting, the
    normalizations, eps) from ``config``, with those the formulation fixes
    (:attr:`CausalReward.advantage_options`; ``paper``: rewards as given, no returns) on top."""
    opts: dict[str, Any] = dict(gamma=config.gamma, scale=config.scale, surprise_weighting=config.surprise_weighting,
                                normalize_returns=config.normalize_returns, eps=config.eps)
    if causal is not None and causal.advantage_options:
        opts.update(causal.advantage_options)
    return opts


def gate_episodes(episode_rewards: torch.Tensor, outcome_rewards: torch.Tensor, group_index: torch.Tensor,
                  config: RewardConfig) -> torch.Tensor:
    """``[B, K]`` episode rewards after the ``"signal"`` gate (unchanged for the other gates)."""
    if config.process_gate == "signal":
        return gate_by_outcome(episode_rewards, outcome_rewards, group_index)
    return episode_rewards


def shape_advantages(with_eta: Callable[[float], torch.Tensor], eta: float,
                     config: RewardConfig) -> ShapedAdvantages:
    """Token advantages with the process part bounded and gated as ``config`` says.

    Args:
        with_eta: ``eta -> [B, T]`` SPEC §6 token advantages (outcome + eta * process), with the
            episode rewards already through :func:`gate_episodes`.
        eta: the process weight (0: GRPO, the outcome part alone, one call).
        config: ``process_bound`` and ``process_gate``.

    Cost: two calls of ``with_eta`` (one when eta is 0) and O(B*T) elementwise work.
    """
    outcome = with_eta(0.0)
    if not eta:
        return ShapedAdvantages(outcome, outcome)
    total = bound_process(with_eta(eta), outcome, config.process_bound)
    if config.process_gate == "outcome":
        total = scale_process_by_outcome(total, outcome)
    return ShapedAdvantages(total, outcome)
