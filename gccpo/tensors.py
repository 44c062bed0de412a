"""Small tensor helpers the rollout, decoding, prompt-sharing and reward modules share (a leaf
module: it imports only torch, so none of them imports another for these)."""

from __future__ import annotations

import inspect
from typing import Any

import torch


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counting only attended tokens (left padding gets 0), as ``generate`` uses them."""
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)


def unique_prompts(prompt_ids: torch.Tensor, prompt_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(first row of each distinct prompt [U], row -> distinct prompt [B])``; a prompt is its
    ids and its padding together (a pad id inside a real prompt cannot merge two prompts)."""
    key = torch.cat([prompt_ids, prompt_mask.long()], 1)
    _, inverse = torch.unique(key, dim=0, return_inverse=True)
    # first occurrence of each distinct prompt, in row order
    order = torch.arange(inverse.numel(), device=inverse.device)
    first = torch.full((int(inverse.max()) + 1 if inverse.numel() else 0,), inverse.numel(),
                       dtype=torch.long, device=inverse.device).scatter_reduce_(0, inverse, order, "amin")
    return first, inverse


def cache_arg_name(module: Any) -> str:
    """The name ``module.forward`` takes (and returns) its KV cache under: transformers renamed
    ``past_key_values`` to ``cache`` (5.2x), and both spellings are still in use."""
    return "cache" if "cache" in inspect.signature(module.forward).parameters else "past_key_values"
