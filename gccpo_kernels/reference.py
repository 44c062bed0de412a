"""The spec in code: plain, materializing, float64-capable PyTorch.

Every fast path in gccpo_kernels is tested against the functions here. They build full N x V
tensors on purpose (clarity over memory) and are never used by the trainer's hot path. Each section
follows one section of SPEC.md (docs/spec.md in this repository). Inputs are computed in float64
when they are float64 and in float32 otherwise, unless ``dtype`` says otherwise; tests pass
float64 copies to get the exact answer.
"""

from __future__ import annotations

import torch

# ---------------------------------------------------------------------------------------------
# §1  Logits, log-probs and entropy
# ---------------------------------------------------------------------------------------------


def logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
           temperature: float = 1.0, logit_scale: float = 1.0, softcap: float | None = None,
           dtype: torch.dtype | None = None) -> torch.Tensor:
    """z = c*tanh(u/c) (or u), u = s*(h W^T + b)/tau, as a full [..., V] tensor (differentiable)."""
    if dtype is None:
        dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    u = hidden.to(dtype) @ weight.to(dtype).T
    if bias is not None:
        u = u + bias.to(dtype)
    u = u * (logit_scale / temperature)
    if softcap is not None:
        u = softcap * torch.tanh(u / softcap)
    return u


def linear_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                    bias: torch.Tensor | None = None, temperature: float = 1.0,
                    logit_scale: float = 1.0, softcap: float | None = None,
                    ignore_index: int = -100, dtype: torch.dtype | None = None,
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """SPEC §1: (logp, entropy), each of targets' shape; ignored rows give 0 and no gradient."""
    z = logits(hidden, weight, bias, temperature=temperature, logit_scale=logit_scale,
               softcap=softcap, dtype=dtype)
    logprobs = torch.log_softmax(z, dim=-1)
    valid = targets != ignore_index
    safe_targets = torch.where(valid, targets, torch.zeros_like(targets))
    logp = logprobs.gather(-1, safe_targets.unsqueeze(-1).long()).squeeze(-1)
    entropy = -(logprobs.exp() * logprobs).sum(-1)
    zero = torch.zeros((), dtype=logp.dtype, device=logp.device)
    return torch.where(valid, logp, zero), torch.where(valid, entropy, zero)
