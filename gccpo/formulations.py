"""Episode-reward formulations, by name (issue 19): ``reward.formulation`` picks one.

Each formulation maps one batch's episode readouts (:class:`Readouts`) to a
:class:`gccpo.rewards.CausalReward` (``[B, K]`` episode rewards and their parts), on the public
kernels. Register a new one with :func:`formulation`; :data:`gccpo.config.FORMULATIONS` lists the
names the config accepts (a test keeps the two equal). With ``reward.term_norm = "group"`` every
term is standardized over its question's episodes before the weights
(:func:`standardize_in_groups`), so that ``w_rob`` and ``w_eff`` mean what they say; the default,
``"auto"``, does so for ``paper`` and ``mi_floor`` and not for ``spec`` (measured: its
standardized effectiveness is gamed).

- ``spec``: SPEC §5 (robustness under perturbations + effectiveness against the batch mixture at
  the same episode index; :func:`gccpo.rewards.causal_reward`), raw by default, standardized
  with ``term_norm group``.
- ``paper``: our reading of the paper's §3.1-3.3 (its equations and appendices are not available
  to us; what is ours is marked *ours*): r = w_rob z(stability) + w_eff z(norm ratio)
  + z(r_out / K_i), then a truncated-mean group normalization (``reward.trim``), then the surprise
  weights map it to tokens, with no discounted returns. Stability is the robustness term,
  -(1/M) sum_m D(q || q~_m) under the configured g_m (M, sigma, divergence). The norm ratio (*ours*)
  is the share of the latent's energy in its answer block, ||P_A h||^2 / ||h||^2, P_A the
  projection onto the span of the centered answer rows of the LM head: the answer distribution
  reads h only through that span (softmax ignores a shared shift), so the ratio measures how much
  of the state the answer reads, the "energy" the paper's theory pairs with stability. The outcome
  reward is split evenly over a completion's K_i episodes and kept (the outcome advantage stays).
- ``info_gain``: the step's effect on the correct answer, r_k = log q_k(a*) - log q_{k-1}(a*),
  q_{-1} read right after the prompt. ``answer_readout = "first_token"``: q over the answer
  vocabulary at the aligned readout, a* the answer's first token; ``"sequence"``: the whole
  answer's teacher-forced log-likelihood after the probe. ``robust``: the gain averaged over the M
  perturbed latents. It telescopes over a completion (sum_k r_k = log q_last(a*) - log q_{-1}(a*),
  no length bias) and can only be raised by making the right answer more likely.
- ``mi_floor``: robustness plus a floor on effectiveness, never maximized per row. Effectiveness
  is each episode's share of the question-answer mutual information at its index,
  m_{i,k} = KL(q_{i,k} || q_bar_k) - KL(q_{i,k} || q_bar_qk) (q_bar_k the mixture of every row's
  readout at k, q_bar_qk that of question q's rows; its mean over the rows at k is
  I_k = H(q_bar_k) - sum_q (n_qk / n_k) H(q_bar_qk)), from two
  :func:`gccpo_kernels.group_distribution_stats` passes; an episode gets -max(0, mi_threshold - m)
  (0 where fewer than two questions reach k): penalized when its answer says less about its own
  question than the floor, never rewarded for saying more.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from .config import RewardConfig
import gccpo_kernels as gk

from .probes import EpisodeIndex
from .rewards import CausalReward, answer_logits, answer_mass, causal_reward, robustness

FORMULATION_REGISTRY: dict[str, Callable[["Readouts"], CausalReward]] = {}
# what a formulation reads beyond the latents: "answers" (prior readouts and the reference
# answer's tokens), "outcome" (the verifier's rewards)
FORMULATION_NEEDS: dict[str, frozenset[str]] = {}


def formulation(name: str, needs: tuple[str, ...] = ()):
    """Register ``fn(readouts) -> CausalReward`` as the formulation ``name``; ``needs``: the
    optional :class:`Readouts` inputs it reads (``"answers"``, ``"outcome"``)."""
    def register(fn: Callable[["Readouts"], CausalReward]) -> Callable[["Readouts"], CausalReward]:
        FORMULATION_REGISTRY[name] = fn
        FORMULATION_NEEDS[name] = frozenset(needs)
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
        answer_loglik: ``[R]`` / prior_loglik: ``[B]`` the whole answer's log-likelihood after each
            episode's / the prompt's probe (``info_gain`` with ``answer_readout = "sequence"``).
        outcome: ``[B]`` the verifier's rewards (``paper``).
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
    answer_loglik: torch.Tensor | None = None
    prior_loglik: torch.Tensor | None = None
    outcome: torch.Tensor | None = None

    def valid(self) -> torch.Tensor:
        """``[B, K]`` bool, the episodes that exist."""
        out = torch.zeros(self.shape, dtype=torch.bool, device=self.latents.device)
        out[self.index.rows, self.index.ks] = True
        return out

    def common(self) -> dict[str, Any]:
        """The readout options of the divergence and statistics kernels."""
        ids = None if self.answer_ids is None else self.answer_ids.to(self.latents.device)
        return dict(bias=None if self.bias is None else self.bias.detach(),
                    temperature=self.config.readout_temperature, logit_scale=self.logit_scale,
                    softcap=self.softcap, answer_token_ids=ids, backend=self.backend)

    def empty(self) -> CausalReward:
        """The rewards of a batch without episodes: zeros everywhere."""
        zero = torch.zeros(self.shape, dtype=torch.float32, device=self.latents.device)
        return CausalReward(zero, zero.clone(), zero.clone(), self.valid())

    def head_inputs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(weight, latents)`` detached, the latents in the LM head's dtype."""
        w = self.weight.detach()
        return w, self.latents.detach().to(w.dtype)

    def robustness(self) -> torch.Tensor:
        """``[B, K]`` SPEC §5's robustness of every episode (:func:`gccpo.rewards.robustness`)."""
        w, h = self.head_inputs()
        groups = self.group_index.to(h.device)[self.index.rows]
        return self.table(robustness(h, w, groups, self.config, self.generator, **self.common()))

    def answer_mass(self) -> torch.Tensor | None:
        """``[B, K]`` the answer vocabulary's share of the next-token mass at each readout (None
        without an answer vocabulary)."""
        if self.answer_ids is None:
            return None
        w, h = self.head_inputs()
        c = self.common()
        return self.table(answer_mass(h, w, c["bias"], c["answer_token_ids"], backend=self.backend,
                                      temperature=c["temperature"], logit_scale=self.logit_scale,
                                      softcap=self.softcap))

    def table(self, values: torch.Tensor) -> torch.Tensor:
        """``[B, K]`` float32 from ``[R]`` per-episode values (0 where no episode)."""
        out = torch.zeros(self.shape, dtype=torch.float32, device=self.latents.device)
        out[self.index.rows, self.index.ks] = values.float()
        return out


def needs_prior(name: str) -> bool:
    """Whether formulation ``name`` reads the prompt readouts and the reference answers."""
    return "answers" in FORMULATION_NEEDS.get(name, frozenset())


def standardize_in_groups(values: torch.Tensor, valid: torch.Tensor, group_index: torch.Tensor, *,
                          eps: float = 1e-4, trim: float = 0.0) -> torch.Tensor:
    """``[B, K]`` (v - center_g) / (std_g + eps) over each group's valid entries, 0 elsewhere.

    Args:
        values: ``[B, K]`` float; valid: ``[B, K]`` bool, the entries that count.
        group_index: ``[B]`` the group of each row (all its episodes are in that group).
        eps: added to the std; trim: the fraction of a group's values dropped at each end before
            the center is taken (floor(trim * n) each side; 0: the mean). The std is the sample
            std (n - 1) of all the group's values around their mean, 0 for one value; a group
            whose values are all equal gets exactly 0.

    Cost: one sort per group of its n = (rows x episodes) values; O(B*K) memory.
    """
    out = torch.zeros_like(values)
    groups = group_index.to(values.device)
    for g in torch.unique(groups).tolist():
        sel = (groups == g)[:, None] & valid
        v = values[sel]
        n = v.numel()
        if n == 0 or bool(v.max() == v.min()):
            continue
        cut = int(trim * n)
        center = v.sort().values[cut:n - cut].mean() if n - 2 * cut > 0 else v.mean()
        std = v.std(unbiased=True) if n > 1 else v.new_zeros(())
        out[sel] = (v - center) / (std + eps)
    return out


def weigh_terms(terms: list[tuple[float, torch.Tensor]], r: Readouts) -> torch.Tensor:
    """``[B, K]`` sum_j w_j t_j over the valid episodes, each term standardized over its question's
    episodes first when ``reward.term_norm`` says so (:attr:`RewardConfig.terms_standardized`)."""
    valid = r.valid()
    total = torch.zeros(r.shape, dtype=torch.float32, device=r.latents.device)
    for w, t in terms:
        if r.config.terms_standardized:
            t = standardize_in_groups(t, valid, r.group_index, eps=r.config.eps)
        total = total + w * t
    return total.masked_fill(~valid, 0.0)


@formulation("spec")
def spec(r: Readouts) -> CausalReward:
    out = causal_reward(r.latents, r.index, r.group_index, r.shape, r.weight, r.bias, r.config,
                        logit_scale=r.logit_scale, softcap=r.softcap, answer_ids=r.answer_ids,
                        generator=r.generator, backend=r.backend)
    if r.config.terms_standardized:
        out.reward = weigh_terms([(r.config.w_rob, out.robustness), (r.config.w_eff, out.effectiveness)], r)
    return out


def answer_energy_share(latents: torch.Tensor, weight: torch.Tensor, answer_ids: torch.Tensor) -> torch.Tensor:
    """``[R]`` ||P_A h||^2 / ||h||^2: the share of each latent's energy in the span of the centered
    answer rows ``weight[answer_ids] - their mean`` (the directions the answer distribution reads;
    0 for a zero latent). Cost: one SVD of [D, A] and an [R, D] x [D, A] product, float32."""
    rows = weight.detach()[answer_ids.to(weight.device)].float()
    centered = (rows - rows.mean(0, keepdim=True)).T  # [D, A]
    u, sv, _ = torch.linalg.svd(centered, full_matrices=False)
    basis = u[:, sv > sv.max() * max(centered.shape) * torch.finfo(torch.float32).eps]
    if basis.shape[1] >= centered.shape[0]:
        raise ValueError(f"the {answer_ids.numel()} answer rows span the whole {centered.shape[0]}-dimensional latent "
                         "space, so the norm ratio is 1 for every latent: use a smaller answer vocabulary "
                         "(--reward.answer_tokens digits)")
    h = latents.detach().float()
    energy = (h * h).sum(1)
    inside = ((h @ basis) ** 2).sum(1)
    return torch.where(energy > 0, inside / energy.clamp_min(torch.finfo(torch.float32).tiny), 0.0)


def outcome_shares(outcome: torch.Tensor, r: Readouts) -> torch.Tensor:
    """``[B, K]`` r_out_i / K_i on each of row i's K_i episodes (the outcome split evenly)."""
    counts = torch.bincount(r.index.rows, minlength=r.shape[0]).clamp_min(1).float()
    return r.table((outcome.to(r.latents.device).float() / counts)[r.index.rows])


@formulation("paper", needs=("outcome",))
def paper(r: Readouts) -> CausalReward:
    if r.answer_ids is None:
        raise ValueError("reward.formulation paper reads the answer block of the latent: use "
                         "--reward.answer_tokens digits (or auto on a numeric task)")
    if r.outcome is None:
        raise ValueError("reward.formulation paper splits the outcome reward over the episodes: pass outcome")
    if r.latents.shape[0] == 0:
        return r.empty()
    valid = r.valid()
    w, h = r.head_inputs()
    stability = r.robustness()
    ratio = r.table(answer_energy_share(h, w, r.common()["answer_token_ids"]))
    shares = outcome_shares(r.outcome, r)
    total = weigh_terms([(r.config.w_rob, stability), (r.config.w_eff, ratio), (1.0, shares)], r)
    reward = standardize_in_groups(total, valid, r.group_index, eps=r.config.eps, trim=r.config.trim)
    return CausalReward(stability, ratio, reward, valid, r.answer_mass(), parts={"norm_ratio": ratio, "outcome_share": shares},
                        advantage_options={"normalize_rewards": False, "gamma": 0.0, "normalize_returns": False})


def mutual_information(h: torch.Tensor, weight: torch.Tensor, index: EpisodeIndex, group_index: torch.Tensor,
                       K: int, common: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each episode's share of the question-answer mutual information at its index.

    With q_bar_k the mixture of every row's readout at index k and q_bar_qk that of question q's
    rows, I_k = H(q_bar_k) - sum_q (n_qk / n_k) H(q_bar_qk) = mean over the rows at k of
    m_{i,k} = sum_a q_{i,k}(a) log(q_bar_qk(a) / q_bar_k(a)) = KL(q_{i,k} || q_bar_k) - KL(q_{i,k} || q_bar_qk):
    how much more row i's answer distribution agrees with its own question's than with the batch's.

    Returns:
        ``(m [R], I [K], defined [K])``: per episode m, per index I, and where at least two
        questions reach k (elsewhere m = I = 0). Cost: two
        :func:`gccpo_kernels.group_distribution_stats` passes (4 R V D FLOPs).
    """
    _, question = torch.unique(group_index.to(h.device)[index.rows], return_inverse=True)
    Q = int(question.max()) + 1
    ks = index.ks.to(h.device)
    whole = gk.group_distribution_stats(h, weight, group_ids=ks, num_groups=K, **common)
    cells = question * K + ks
    per_cell = gk.group_distribution_stats(h, weight, group_ids=cells, num_groups=Q * K, **common)
    n_cell = torch.bincount(cells, minlength=Q * K).float()
    n_k = torch.bincount(ks, minlength=K).float()
    defined = (n_cell.view(Q, K) > 0).sum(0) >= 2
    m = torch.where(defined[ks], whole.row_kl_to_mixture.float() - per_cell.row_kl_to_mixture.float(), 0.0)
    mi = torch.zeros(K, device=h.device).index_add_(0, ks, m) / n_k.clamp_min(1)
    return m, mi, defined


@formulation("mi_floor")
def mi_floor(r: Readouts) -> CausalReward:
    if r.latents.shape[0] == 0:
        return r.empty()
    w, h = r.head_inputs()
    rob = r.robustness()
    m, mi, defined = mutual_information(h, w, r.index, r.group_index, r.shape[1], r.common())
    # a hinge below the floor, per episode: 0 for every episode whose answer distribution carries
    # at least mi_threshold nats about its question, never a reward for more
    penalty = torch.where(defined[r.index.ks.to(h.device)], -(r.config.mi_threshold - m).clamp_min(0.0), 0.0)
    eff = r.table(penalty)
    reward = weigh_terms([(r.config.w_rob, rob), (r.config.w_eff, eff)], r)
    return CausalReward(rob, eff, reward, r.valid(), r.answer_mass(), parts={"mi_contribution": r.table(m)})


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


@formulation("info_gain", needs=("answers",))
def info_gain(r: Readouts) -> CausalReward:
    sequence = r.config.answer_readout == "sequence"
    if r.answer_first is None or (r.prior_loglik is None if sequence else r.prior_latents is None):
        raise ValueError("reward.formulation info_gain needs the readout after the prompt and the correct "
                         "answer's tokens (prior_latents / prior_loglik, answer_first)")
    if sequence and r.answer_loglik is None:
        raise ValueError("reward.answer_readout sequence needs answer_loglik (gccpo.probes.answer_logliks)")
    if r.answer_ids is None and not sequence:
        raise ValueError("reward.formulation info_gain reads q over the answer vocabulary: use "
                         "--reward.answer_tokens digits (or auto on a numeric task)")
    if r.latents.shape[0] == 0:
        return r.empty()
    valid = r.valid()
    zero = torch.zeros(r.shape, dtype=torch.float32, device=r.latents.device)
    device = r.latents.device
    if sequence:  # the whole answer's log-likelihood, read by the trainer's extra probe forward
        found = r.answer_first.to(device) >= 0
        logq, prior = r.answer_loglik.to(device).float(), r.prior_loglik.to(device).float()
    else:
        ids = r.answer_ids.to(device)
        # position of each row's a* in the answer vocabulary (not found: not in it, or unknown)
        match = r.answer_first.to(device)[:, None] == ids[None, :]
        found = match.any(1)
        pos = match.float().argmax(1)
        logq = robust_log_probs(r.latents, r.group_index.to(device)[r.index.rows], pos[r.index.rows], r)
        prior = robust_log_probs(r.prior_latents, r.group_index.to(device), pos, r)
    rewards = info_gain_rewards(logq, prior, r.index, r.shape)
    rewards = rewards * found[:, None].float()               # rows without a usable a*: no reward
    mass = r.answer_mass()
    # robustness and effectiveness are not parts of this formulation (0); its part is log q_k(a*).
    # The gains reach the returns as given: standardizing them over the group's episodes first (SPEC
    # §6's r~) would subtract the group's mean gain once per episode, charging a K-step completion
    # K times that mean, a length bias the telescoping sum does not have
    return CausalReward(zero.clone(), zero.clone(), rewards.masked_fill(~valid, 0.0), valid, mass,
                        answer_logq=r.table(logq) * found[:, None].float(),
                        advantage_options={"normalize_rewards": False})


def robust_log_probs(latents: torch.Tensor, groups: torch.Tensor, targets: torch.Tensor, r: Readouts) -> torch.Tensor:
    """``[n]`` log q(target | h) of each latent over the answer vocabulary; with ``reward.robust``
    the mean over the M perturbed latents h + delta_m (the perturbations of SPEC §3, ``groups`` the
    sibling pool), whose gains then average too (the gain is linear in log q). Cost: (M or 1) n A D."""
    w = r.weight
    kw = dict(temperature=r.config.readout_temperature, logit_scale=r.logit_scale, softcap=r.softcap)
    ids = r.answer_ids.to(latents.device)
    h = latents.detach().to(w.dtype)
    if not r.config.robust:
        return answer_log_probs(h, w, r.bias, ids, targets, **kw)
    c = r.config
    deltas = gk.perturb_latents(h, c.num_perturbations, sigma=c.sigma, mode=c.perturbation, alpha=c.alpha,
                                group_index=groups.long(), generator=r.generator)  # [n, M, D]
    n, M = deltas.shape[:2]
    moved = (h[:, None, :] + deltas).reshape(n * M, -1)
    return answer_log_probs(moved, w, r.bias, ids, targets.repeat_interleave(M), **kw).view(n, M).mean(1)


def answer_continuations(tokenizer: Any, probe_text: str, probe_ids: list[int], answers: list[str]) -> list[list[int]]:
    """Each answer's token ids as the tokenizer writes them right after the aligned probe
    ``probe_ids``: the text of ``probe_text + " " + answer`` that the probe's tokens do not cover,
    tokenized on its own (SmolLM2: ``"12"`` -> ``1``, ``2``, and ``"-3"`` -> ``-``, ``3``, though it
    writes ``" -3"`` as ``" -"``, ``3`` without a probe before it); empty when nothing is left."""
    sep = "" if probe_text[-1:].isspace() else " "
    covered = len(tokenizer.decode(probe_ids, skip_special_tokens=False, clean_up_tokenization_spaces=False))
    out = []
    for answer in answers:
        rest = (probe_text + sep + str(answer).strip())[covered:]
        out.append(list(tokenizer(rest, add_special_tokens=False)["input_ids"]) if rest else [])
    return out


def answer_first_ids(tokenizer: Any, probe_text: str, probe_ids: list[int], answers: list[str]) -> torch.Tensor:
    """``[B]`` int64 the first token of each :func:`answer_continuations` (-1 when it is empty)."""
    return torch.tensor([ids[0] if ids else -1 for ids in answer_continuations(tokenizer, probe_text, probe_ids,
                                                                               answers)], dtype=torch.long)
