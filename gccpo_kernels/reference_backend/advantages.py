"""SPEC §6 on the reference backend: ``token_advantages`` of ``chunked/advantages.py``, from
:mod:`gccpo_kernels.reference`'s plain Python loops (float64)."""

from __future__ import annotations

import torch

from .. import reference


def token_advantages(outcome_rewards: torch.Tensor, group_index: torch.Tensor,
                     episode_ids: torch.Tensor, episode_rewards: torch.Tensor,
                     old_logp: torch.Tensor | None, mask: torch.Tensor, *, eta: float, gamma: float,
                     scale: str, surprise_weighting: bool, normalize_returns: bool, eps: float,
                     dtype: torch.dtype, normalize_rewards: bool = True) -> torch.Tensor:
    """[B, T] advantages in ``dtype`` on episode_ids' device (the loops run on host lists)."""
    out = reference.token_advantages(
        outcome_rewards, group_index, episode_ids, episode_rewards, old_logp, mask, eta=eta,
        gamma=gamma, scale=scale, surprise_weighting=surprise_weighting,
        normalize_returns=normalize_returns, eps=eps, dtype=dtype,
        normalize_rewards=normalize_rewards)
    return out.to(episode_ids.device)
