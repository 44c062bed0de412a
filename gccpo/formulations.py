"""Episode-reward formulations, by name (issue 19): ``reward.formulation`` picks one.

Each formulation maps one batch's episode readouts (:class:`Readouts`) to a
:class:`gccpo.rewards.CausalReward` (``[B, K]`` episode rewards and their parts), on the public
kernels. Register a new one with :func:`formulation`; :data:`gccpo.config.FORMULATIONS` lists the
names the config accepts (a test keeps the two equal).

- ``spec``: SPEC §5 as built (robustness under perturbations + effectiveness against the batch
  mixture; :func:`gccpo.rewards.causal_reward`).
- ``info_gain``: the step's effect on the correct answer, r_k = log q_k(a*) - log q_{k-1}(a*),
  with q the readout's distribution over the answer vocabulary after episode k, q_{-1} read right
  after the prompt and a* the correct answer's first token as the tokenizer writes it after the
  aligned probe. It telescopes over a completion (sum_k r_k = log q_last(a*) - log q_{-1}(a*), no
  length bias) and can only be raised by making the right answer more likely.

Not built yet (issue 19): ``paper`` (stability under g_m plus a norm ratio) and ``mi_floor``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from .config import RewardConfig
from .rewards import CausalReward, EpisodeIndex, answer_logits, answer_mass, causal_reward

FORMULATION_REGISTRY: dict[str, Callable[["Readouts"], CausalReward]] = {}


def formulation(name: str):
    """Register ``fn(readouts) -> CausalReward`` as the formulation ``name``."""
    def register(fn: Callable[["Readouts"], CausalReward]) -> Callable[["Readouts"], CausalReward]:
        FORMULATION_REGISTRY[name] = fn
        return fn
    return register


@dataclass
class Readouts:
    """One batch's readouts and what a formulation may read.

    Attributes:
        latents: ``[R, D]`` readout latents of the episodes (row-major over ``index``).
        index: which (row, episode) each latent belongs to; shape: ``(B, K)``.
        group_index: ``[B]`` the question of each row.
        weight, bias: the LM head; logit_scale, softcap: the model's logit transform.
        config: the reward options; answer_ids: ``[A]`` answer vocabulary (None: full).
        generator: the perturbation RNG; backend: the kernel backend.
        prior_latents: ``[B, D]`` readouts right after each row's prompt (``info_gain``).
        answer_first: ``[B]`` int64 the correct answer's first token id per row, -1 unknown.
    """

    latents: torch.Tensor
    index: EpisodeIndex
    group_index: torch.Tensor
    shape: tuple[int, int]
    weight: torch.Tensor
    bias: torch.Tensor | None
    config: RewardConfig
    logit_scale: float = 1.0
    softcap: float | None = None
    answer_ids: torch.Tensor | None = None
    generator: torch.Generator | None = None
    backend: str | None = None
    prior_latents: torch.Tensor | None = None
    answer_first: torch.Tensor | None = None


def needs_prior(name: str) -> bool:
    """Whether formulation ``name`` reads :attr:`Readouts.prior_latents` and ``answer_first``."""
    return name == "info_gain"


@formulation("spec")
def spec(r: Readouts) -> CausalReward:
    return causal_reward(r.latents, r.index, r.group_index, r.shape, r.weight, r.bias, r.config,
                         logit_scale=r.logit_scale, softcap=r.softcap, answer_ids=r.answer_ids,
                         generator=r.generator, backend=r.backend)


def answer_log_probs(latents: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                     answer_ids: torch.Tensor, targets: torch.Tensor, *, temperature: float,
                     logit_scale: float, softcap: float | None) -> torch.Tensor:
    """``[R]`` log q(target) under the readout's distribution renormalized over ``answer_ids``
    (``targets``: positions in ``answer_ids``; an [R, A] product, float32)."""
    z = answer_logits(latents, weight, bias, answer_ids, temperature=temperature, logit_scale=logit_scale,
                      softcap=softcap)
    return torch.log_softmax(z, dim=1).gather(1, targets[:, None]).squeeze(1)


def info_gain_rewards(logq: torch.Tensor, prior: torch.Tensor, index: EpisodeIndex,
                      shape: tuple[int, int]) -> torch.Tensor:
    """``[B, K]`` r_k = logq_k - logq_{k-1} per row, logq_{-1} = ``prior[row]`` (``logq`` [R]
    over ``index``, episodes of a row in order; 0 where a row has no episode k)."""
    B, K = shape
    table = torch.zeros(B, K + 1, dtype=logq.dtype, device=logq.device)
    table[:, 0] = prior
    table[index.rows, index.ks + 1] = logq
    out = torch.zeros(B, K, dtype=logq.dtype, device=logq.device)
    out[index.rows, index.ks] = logq - table[index.rows, index.ks]
    return out


@formulation("info_gain")
def info_gain(r: Readouts) -> CausalReward:
    if r.prior_latents is None or r.answer_first is None:
        raise ValueError("reward.formulation info_gain needs the readout after the prompt and the correct "
                         "answer's first token (prior_latents, answer_first)")
    if r.answer_ids is None:
        raise ValueError("reward.formulation info_gain reads q over the answer vocabulary: use "
                         "--reward.answer_tokens digits (or auto on a numeric task)")
    B, K = r.shape
    device = r.latents.device
    ids = r.answer_ids.to(device)
    # position of each row's a* in the answer vocabulary (-1: not in it, or unknown)
    match = r.answer_first.to(device)[:, None] == ids[None, :]
    found = match.any(1)
    pos = match.float().argmax(1)
    kw = dict(temperature=r.config.readout_temperature, logit_scale=r.logit_scale, softcap=r.softcap)
    w = r.weight
    zero = torch.zeros(B, K, device=device)
    valid = torch.zeros(B, K, dtype=torch.bool, device=device)
    valid[r.index.rows, r.index.ks] = True
    if r.latents.shape[0] == 0:
        return CausalReward(zero, zero.clone(), zero.clone(), valid)
    logq = answer_log_probs(r.latents.to(w.dtype), w, r.bias, ids, pos[r.index.rows], **kw)
    prior = answer_log_probs(r.prior_latents.to(w.dtype), w, r.bias, ids, pos, **kw)
    rewards = info_gain_rewards(logq, prior, r.index, r.shape)
    rewards = rewards * found[:, None].float()               # rows without a usable a*: no reward
    mass = zero.clone()
    mass[r.index.rows, r.index.ks] = answer_mass(r.latents, w, r.bias, ids, backend=r.backend, **kw)
    logq_table = zero.clone()
    logq_table[r.index.rows, r.index.ks] = logq
    # robustness and effectiveness are not parts of this formulation (0); its part is log q_k(a*)
    return CausalReward(zero.clone(), zero.clone(), rewards.masked_fill(~valid, 0.0), valid, mass,
                        answer_logq=logq_table * found[:, None].float())


def answer_first_ids(tokenizer: Any, probe_text: str, probe_ids: list[int], answers: list[str]) -> torch.Tensor:
    """``[B]`` the token that writes each answer's first characters right after the aligned probe
    ``probe_ids``: the text of ``probe_text + " " + answer`` that the probe's tokens do not cover,
    tokenized on its own (SmolLM2: ``"12"`` -> ``1``, and ``"-3"`` -> ``-``, though it writes
    ``" -3"`` as ``" -"``, ``3`` without a probe before it); -1 when nothing is left."""
    sep = "" if probe_text[-1:].isspace() else " "
    covered = len(tokenizer.decode(probe_ids, skip_special_tokens=False, clean_up_tokenization_spaces=False))
    out = []
    for answer in answers:
        rest = (probe_text + sep + str(answer).strip())[covered:]
        ids = tokenizer(rest, add_special_tokens=False)["input_ids"] if rest else []
        out.append(ids[0] if ids else -1)
    return torch.tensor(out, dtype=torch.long)
