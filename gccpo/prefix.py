"""Shared-prompt forward: the backbone runs each distinct prompt once per batch, not G times.

A GRPO-family batch holds G completions of every prompt, and on the default task the prompt (chat
template + instructions, ~85 tokens) is longer than the completion (~10-40 tokens), so a plain
forward over ``[B, P + T]`` spends most of its FLOPs re-encoding the same prompt G times. Here the
prompt rows are de-duplicated, encoded once with a KV cache, the cache is expanded to the B rows
(``index_select``, differentiable: the gradient of every completion token reaches the prompt's
activations and the parameters exactly as in the plain forward), and the completions run on top of
it. The result is the same ``[B, P + T, D]`` hidden-state tensor as the plain forward, up to
floating-point reassociation (tested against it, values and parameter gradients).

Cost: prompt FLOPs divided by the number of rows per distinct prompt (G when micro-batches hold
whole groups); extra memory: the expanded KV cache of the prompt, ``[B, P]`` keys and values per
layer (the plain forward holds the same activations).
"""

from __future__ import annotations

from typing import Any

import torch

from .tensors import cache_arg_name, position_ids, unique_prompts


def encode_prompts(backbone: Any, prompt_ids: torch.Tensor,
                   prompt_mask: torch.Tensor) -> tuple[torch.Tensor, Any, str] | None:
    """Run each distinct prompt once: ``(prompt hidden states [B, P, D], KV cache expanded to the B
    rows, the backbone's name for its cache argument)``; None when no prompt repeats or the backbone
    returns no selectable KV cache (e.g. gradient checkpointing turns caching off)."""
    first, inverse = unique_prompts(prompt_ids, prompt_mask)
    if first.numel() == prompt_ids.shape[0]:
        return None
    p_mask = prompt_mask[first].long()
    out = backbone(input_ids=prompt_ids[first], attention_mask=p_mask, position_ids=position_ids(p_mask),
                   use_cache=True)
    name = cache_arg_name(backbone)
    cache = getattr(out, name, None)
    if cache is None or not hasattr(cache, "batch_select_indices"):
        return None
    cache.batch_select_indices(inverse)
    return out.last_hidden_state.index_select(0, inverse), cache, name


def shared_prompt_hidden(backbone: Any, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
                         completion_ids: torch.Tensor, completion_mask: torch.Tensor) -> torch.Tensor | None:
    """``[B, P + T, D]`` last hidden states of ``backbone`` over prompt + completion, encoding each
    distinct prompt once; None when :func:`encode_prompts` is (or there is no completion token), so
    the caller runs the plain forward.

    Args:
        backbone: the decoder without its LM head (a transformers base model taking
            ``past_key_values``).
        prompt_ids, prompt_mask: ``[B, P]`` left-padded prompts (rows of a prompt identical).
        completion_ids, completion_mask: ``[B, T]`` right-padded completions.
    """
    if completion_ids.shape[1] == 0:
        return None
    encoded = encode_prompts(backbone, prompt_ids, prompt_mask)
    if encoded is None:
        return None
    prompt_hidden, cache, name = encoded
    am = torch.cat([prompt_mask, completion_mask], 1).long()
    P = prompt_ids.shape[1]
    tail = backbone(input_ids=completion_ids, attention_mask=am, position_ids=position_ids(am)[:, P:],
                    use_cache=True, **{name: cache}).last_hidden_state
    return torch.cat([prompt_hidden, tail], 1)
