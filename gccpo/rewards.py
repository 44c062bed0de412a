"""The causal counterfactual episode reward's pieces (SPEC §3, §5): the answer vocabulary and the
answer distribution at a readout, the robustness and SPEC §5 reward, and how the process
advantage meets the outcome (gates, bound). The readouts themselves (probe forwards) are in
:mod:`gccpo.probes`, the outcome reward in :mod:`gccpo.tasks`, the formulations that combine the
pieces in :mod:`gccpo.formulations`.

Causal reward, for every episode k of every completion i (R episodes in the batch):
1. the episode latent h_{i,k} (the LM head's input):
   - ``probe`` readout (default): the final hidden state at the last token of the probe text
     (``"\\nAnswer:"``) appended right after the episode's last token. Each probe sequence is the
     row's unpadded prompt + completion up to the episode end, followed by the probe tokens; the
     sequences are left-padded and run through the backbone in no-grad batches (explicit position
     ids, so the padding changes nothing): every probe attends exactly to its own prefix. This is
     the one model call beyond the policy forward that yields old_logp (SPEC §3).
   - ``boundary`` readout: the hidden state at the episode's last token, taken from that forward
     (no extra model call).
2. robustness R_rob = -(1/M) sum_m D(q(.|h) || q(.|h + delta_m)), deltas from
   :func:`gccpo_kernels.perturb_latents`, D from :func:`gccpo_kernels.counterfactual_divergence`;
3. effectiveness R_eff: KL(q_{i,k} || mean over the batch of q_{., k}) from
   :func:`gccpo_kernels.group_distribution_stats` with groups = episode index k (``answer``), or
   log(1 + ||h - mu_k||^2 / D) (``latent``);
4. r = w_rob R_rob + w_eff R_eff (:func:`gccpo_kernels.episode_rewards`).
The answer distribution q is read with the model's logit scale and soft cap at the readout
temperature, renormalized over the digit and minus tokens for numeric tasks.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch

import gccpo_kernels as gk

from .config import RewardConfig
from .probes import EpisodeIndex

_DIGITS = re.compile(r"\d+|-")


def answer_token_ids(tokenizer: Any, mode: str = "digits") -> torch.Tensor | None:
    """Token ids of the answer vocabulary: ``"digits"``: every non-special token whose text,
    stripped of whitespace, is a run of ASCII digits or a minus sign; ``"full"``: None (the
    whole vocabulary)."""
    if mode == "full":
        return None
    if mode != "digits":
        raise ValueError(f"answer token mode must be 'digits' or 'full', got {mode!r}")
    vocab = len(tokenizer)
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    texts = tokenizer.batch_decode([[i] for i in range(vocab)], skip_special_tokens=False)
    ids = [i for i, t in enumerate(texts)
           if i not in special and t.isascii() and _DIGITS.fullmatch(t.strip() or "x")]
    if not ids:
        raise ValueError("the tokenizer has no digit or minus tokens; use --reward.answer_tokens full")
    return torch.tensor(ids, dtype=torch.long)


def answer_logits(latents: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                  answer_ids: torch.Tensor, *, temperature: float = 1.0, logit_scale: float = 1.0,
                  softcap: float | None = None) -> torch.Tensor:
    """``[R, A]`` float32 logits of the answer vocabulary at the readout latents, with the model's
    transform (scale / temperature, soft cap): an [R, D] x [D, A] product, A small."""
    ids = answer_ids.to(latents.device)
    z = latents.float() @ weight.detach().index_select(0, ids).float().T
    if bias is not None:
        z = z + bias.detach().index_select(0, ids).float()
    z = z * (logit_scale / temperature)
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return z


def answer_mass(latents: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                answer_ids: torch.Tensor, *, temperature: float = 1.0, logit_scale: float = 1.0,
                softcap: float | None = None, backend: str | None = None) -> torch.Tensor:
    """``[R]`` the answer vocabulary's share of the next-token probability at each readout latent
    (before the readout renormalizes over it): exp(logsumexp_A z - logsumexp_V z).

    The full-vocabulary log-normalizer comes from the fused primitive (lse = z_t - logp_t for one
    answer token t), the answer logits from an [R, A] product: never R x V memory.
    """
    h = latents.detach().to(weight.dtype)
    ids = answer_ids.to(h.device)
    if h.shape[0] == 0:
        return torch.zeros(0, device=h.device)
    target = ids[:1].expand(h.shape[0])
    logp_t, _ = gk.fused_linear_logprobs(h, weight.detach(), target, bias=None if bias is None else bias.detach(),
                                         temperature=temperature, logit_scale=logit_scale, softcap=softcap,
                                         backend=backend)
    z = answer_logits(h, weight, bias, ids, temperature=temperature, logit_scale=logit_scale, softcap=softcap)
    lse = z[:, 0] - logp_t.float()
    return torch.exp(torch.logsumexp(z, dim=1) - lse).clamp(max=1.0)


@dataclass
class CausalReward:
    """Per-episode rewards on ``[B, K]`` (0 where a completion has no episode k).

    Attributes:
        robustness, effectiveness, reward: ``[B, K]`` float32.
        valid: ``[B, K]`` bool, the episodes that exist.
    """

    robustness: torch.Tensor
    effectiveness: torch.Tensor
    reward: torch.Tensor
    valid: torch.Tensor
    answer_mass: torch.Tensor | None = None  # [B, K]: the answer vocabulary's share at the readout
    answer_logq: torch.Tensor | None = None  # [B, K]: log q_k(a*) of the reference answer (info_gain)
    # [B, K] further parts a formulation logs as causal/<name> (e.g. paper's norm ratio)
    parts: dict[str, torch.Tensor] | None = None
    # token_advantages options this formulation fixes (paper: its own normalization, no returns)
    advantage_options: dict[str, Any] | None = None

    def metrics(self) -> dict[str, float]:
        v = self.valid
        n = max(int(v.sum()), 1)
        mean = (lambda t: float((t * v).sum()) / n)
        out = {"causal/robustness": mean(self.robustness), "causal/effectiveness": mean(self.effectiveness),
               "causal/episode_reward": mean(self.reward),
               "causal/robustness_min": float(self.robustness[v].min()) if v.any() else 0.0}
        if self.answer_mass is not None:
            out["causal/answer_mass"] = mean(self.answer_mass)
        if self.answer_logq is not None:
            out["causal/answer_logq"] = mean(self.answer_logq)
        for name, value in (self.parts or {}).items():
            out[f"causal/{name}"] = mean(value)
        return out


def gate_by_outcome(episode_rewards: torch.Tensor, outcome: torch.Tensor, group_index: torch.Tensor,
                    ) -> torch.Tensor:
    """``[B, K]`` episode rewards with every row of a group whose outcome rewards are all equal set
    to 0, so :func:`gccpo_kernels.token_advantages` gives those groups no process advantage (a
    group's normalized process rewards are 0 when its episode rewards are all equal).

    Args:
        episode_rewards: ``[B, K]``; outcome: ``[B]`` outcome rewards; group_index: ``[B]`` int64.
    """
    if outcome.shape[0] == 0:
        return episode_rewards
    groups = int(group_index.max()) + 1
    g = group_index.long()
    lo = torch.full((groups,), float("inf"), device=outcome.device).scatter_reduce(
        0, g, outcome.float(), "amin")
    hi = torch.full((groups,), float("-inf"), device=outcome.device).scatter_reduce(
        0, g, outcome.float(), "amax")
    signal = (hi > lo)[g]
    return episode_rewards * signal.unsqueeze(1).to(episode_rewards.dtype)


def scale_process_by_outcome(advantages: torch.Tensor, outcome_advantages: torch.Tensor) -> torch.Tensor:
    """``[B, T]`` A_out + |A_out| * (A - A_out): the process part of ``advantages`` (from
    :func:`gccpo_kernels.token_advantages` with eta > 0) scaled per token by the magnitude of the
    outcome advantage ``outcome_advantages`` (the same call with eta = 0, constant along a row)."""
    return outcome_advantages + outcome_advantages.abs() * (advantages - outcome_advantages)


def bound_process(advantages: torch.Tensor, outcome_advantages: torch.Tensor, bound: float) -> torch.Tensor:
    """``[B, T]`` A_out + clamp(A - A_out, -bound, bound): the process part eta * omega_t * R^ of each
    token limited to ``bound`` (0: unchanged). With the ``outcome`` gate and bound < 1 the process
    part then never turns a token's advantage against the sign of its completion's outcome
    advantage (the surprise weight omega_t alone can exceed 1 / eta on a surprising token)."""
    if not bound:
        return advantages
    return outcome_advantages + (advantages - outcome_advantages).clamp(-bound, bound)


def robustness(h: torch.Tensor, weight: torch.Tensor, groups: torch.Tensor, config: RewardConfig,
               generator: torch.Generator | None, **common: Any) -> torch.Tensor:
    """``[R]`` float32 R_rob = -(1/M) sum_m D(q(h) || q(h + delta_m)) (SPEC §5) of latents ``h``
    [R, D] (LM-head dtype), ``groups`` [R] the question of each latent (the sibling perturbation's
    pool), ``common``: the divergence kernel's readout options. Cost: (M + 1) R V D FLOPs."""
    deltas = gk.perturb_latents(h, config.num_perturbations, sigma=config.sigma, mode=config.perturbation,
                                alpha=config.alpha, group_index=groups.long(), generator=generator)
    return -gk.counterfactual_divergence(h, weight, deltas, kind=config.divergence, **common).float().mean(1)


def causal_reward(latents: torch.Tensor, index: EpisodeIndex, group_index: torch.Tensor, shape: tuple[int, int],
                  weight: torch.Tensor, bias: torch.Tensor | None, config: RewardConfig, *,
                  logit_scale: float = 1.0, softcap: float | None = None,
                  answer_ids: torch.Tensor | None = None, generator: torch.Generator | None = None,
                  backend: str | None = None) -> CausalReward:
    """SPEC §5 episode rewards from the episode latents.

    Args:
        latents: ``[R, D]`` episode latents (row-major over ``index``).
        index: which (row, episode) each latent belongs to.
        group_index: ``[B]`` the question of each row (the sibling perturbation's groups).
        shape: ``(B, K)`` of the output.
        weight, bias: the LM head (read detached).
        config: reward options (M, sigma, perturbation, divergence, effectiveness, weights, tau_r).
        logit_scale, softcap: the model's logit transform.
        answer_ids: ``[A]`` answer vocabulary (None: full vocabulary).
        generator: perturbation RNG on the latents' device.
        backend: kernel backend.

    Cost: (M + 1) * R * V * D FLOPs for the divergences and 2 R V D for the statistics (V the
    answer vocabulary size when restricted); never R x V memory.
    """
    B, K = shape
    device = latents.device
    w = weight.detach()
    h = latents.detach().to(w.dtype)
    b = None if bias is None else bias.detach()
    ids = None if answer_ids is None else answer_ids.to(device)
    common = dict(bias=b, temperature=config.readout_temperature, logit_scale=logit_scale, softcap=softcap,
                  answer_token_ids=ids, backend=backend)
    rob = torch.zeros(B, K, dtype=torch.float32, device=device)
    eff = torch.zeros(B, K, dtype=torch.float32, device=device)
    valid = torch.zeros(B, K, dtype=torch.bool, device=device)
    if h.shape[0] > 0:
        rob[index.rows, index.ks] = robustness(h, w, group_index[index.rows], config, generator, **common)
        if config.effectiveness == "answer":
            stats = gk.group_distribution_stats(h, w, group_ids=index.ks, num_groups=K, **common)
            eff[index.rows, index.ks] = stats.row_kl_to_mixture.float()
        else:
            hf = h.float()
            sums = torch.zeros(K, hf.shape[1], device=device).index_add_(0, index.ks, hf)
            counts = torch.bincount(index.ks, minlength=K).clamp_min(1).unsqueeze(1)
            mu = sums / counts
            eff[index.rows, index.ks] = torch.log1p(((hf - mu[index.ks]) ** 2).sum(1) / hf.shape[1])
        valid[index.rows, index.ks] = True
    reward = gk.episode_rewards(rob, eff, w_rob=config.w_rob, w_eff=config.w_eff).masked_fill(~valid, 0.0)
    mass = None
    if ids is not None:
        mass = torch.zeros(B, K, dtype=torch.float32, device=device)
        if h.shape[0] > 0:
            mass[index.rows, index.ks] = answer_mass(h, w, b, ids, temperature=config.readout_temperature,
                                                     logit_scale=logit_scale, softcap=softcap, backend=backend)
    return CausalReward(rob, eff, reward, valid, mass)
