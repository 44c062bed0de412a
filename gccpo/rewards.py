"""Outcome reward and the causal counterfactual episode reward (SPEC §3, §5).

Outcome: the task's verifier on each completion's text, in [0, 1].

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
from typing import Any, Sequence

import torch

import gccpo_kernels as gk

from .config import RewardConfig
from .episodes import Episodes
from .prefix import encode_prompts
from .tensors import position_ids
from .tasks import sanitize_reward

_DIGITS = re.compile(r"\d+|-")
#: attention implementations that take the 4D mask of :func:`packed_probe_forward`.
PACKED_ATTENTION = ("sdpa", "eager")


def outcome_rewards(task: Any, problems: Sequence[Any], texts: Sequence[str],
                    counts: dict[str, int] | None = None) -> torch.Tensor:
    """``[B]`` float32 verifier scores of the completions (``problems[i]`` is row i's problem).

    Never lets one completion stop the run: a verifier that raises scores 0; a non-finite or
    out-of-[0, 1] value scores 0 or is clamped (:func:`gccpo.tasks.sanitize_reward`). When
    ``counts`` is given it gets, over these completions: ``empty`` (no text), ``unparsable`` (no
    answer could be extracted), ``verifier_errors``, ``nonfinite``, ``out_of_range``. A task with
    ``extract`` and ``verify`` (:class:`gccpo.tasks.Task`) has each answer extracted once;
    otherwise its ``score(text, problem)`` is the verifier.
    """
    tally = dict.fromkeys(("empty", "unparsable", "verifier_errors", "nonfinite", "out_of_range"), 0)
    staged = hasattr(task, "extract") and hasattr(task, "verify")
    scores = []
    for text, problem in zip(texts, problems):
        tally["empty"] += not text.strip()
        try:
            if staged:
                answer = task.extract(text)
                tally["unparsable"] += answer is None
                raw = float(task.verify(answer, problem))
            else:
                raw = float(task.score(text, problem))
        except Exception:
            tally["verifier_errors"] += 1
            raw = 0.0
        value, fault = sanitize_reward(raw)
        if fault is not None:
            tally[fault] += 1
        scores.append(value)
    if counts is not None:
        for k, v in tally.items():
            counts[k] = counts.get(k, 0) + v
    return torch.tensor(scores, dtype=torch.float32)


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


def aligned_probe_ids(tokenizer: Any, probe_text: str, example_answer: str = "7") -> list[int]:
    """Token ids of ``probe_text`` ending exactly where an answer's first token starts, as this
    tokenizer writes an answer after it.

    Completions end with ``"Answer: <answer>"``: the answer follows the probe text after one
    space (none when the probe already ends in whitespace). Tokenizers differ in where that space
    goes: SmolLM2 writes ``" 12"`` as a bare space token then ``1``, ``2`` (so the readout must
    come after the space, or it reads P(space) and the rare tokens that carry a leading space);
    others write ``" 12"`` as one token (the readout must come before it). So the probe is derived
    from tokenizing ``probe_text + sep + example_answer``: its tokens that hold no character of
    the answer. Raises ValueError when that leaves no token.
    """
    sep = "" if probe_text[-1:].isspace() else " "
    text = probe_text + sep + example_answer
    start = len(probe_text + sep)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    keep = 0
    for k in range(1, len(ids) + 1):  # the longest prefix that decodes to text before the answer
        decoded = tokenizer.decode(ids[:k], skip_special_tokens=False, clean_up_tokenization_spaces=False)
        if len(decoded) <= start and text.startswith(decoded):
            keep = k
        else:
            break
    if keep == 0:
        raise ValueError(f"the probe text {probe_text!r} leaves no token before the answer's first token")
    return list(ids[:keep])


def probe_token_ids(tokenizer: Any, config: RewardConfig) -> list[int]:
    """The probe's token ids under ``config``: aligned to the answer's first token
    (:func:`aligned_probe_ids`) when ``config.align_probe``, else the probe text's own tokens."""
    if config.align_probe:
        return aligned_probe_ids(tokenizer, config.probe_text)
    ids = tokenizer(config.probe_text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError(f"the probe text {config.probe_text!r} tokenizes to no token")
    return list(ids)


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


def backbone_of(model: Any) -> torch.nn.Module:
    """The decoder without its LM head (``model.model`` for Llama-style models)."""
    base = getattr(model, getattr(model, "base_model_prefix", "model"), None)
    if base is None or base is model:
        raise ValueError(f"cannot find the backbone of {type(model).__name__} (base_model_prefix)")
    return base


@dataclass
class EpisodeIndex:
    """The R episodes of a batch in row-major order: row ``b`` and episode index ``k`` of each."""

    rows: torch.Tensor
    ks: torch.Tensor
    ends: torch.Tensor  # [R] last-token position in completion coordinates

    @classmethod
    def of(cls, episodes: Episodes) -> "EpisodeIndex":
        valid = episodes.episode_ends >= 0
        rows, ks = valid.nonzero(as_tuple=True)
        return cls(rows, ks, episodes.episode_ends[rows, ks])


def boundary_latents(hidden: torch.Tensor, prompt_len: int, index: EpisodeIndex) -> torch.Tensor:
    """``[R, D]`` final hidden states at each episode's last token (``hidden``: ``[B, P+T, D]``)."""
    return hidden[index.rows, prompt_len + index.ends]


def _suffixed_batches(input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_len: int,
                      index: EpisodeIndex, suffixes: Sequence[torch.Tensor], batch_size: int):
    """Left-padded batches of ``prefix up to each episode's end + suffixes[i]`` (prefix without
    padding; ``index.ends == -1``: the prompt alone), sorted by length to limit padding.

    Yields ``(chunk, ids [n, L], attention_mask [n, L])``, ``chunk`` the sequences' positions in
    ``index``.
    """
    device = input_ids.device
    seqs = []
    for i, (b, e) in enumerate(zip(index.rows.tolist(), index.ends.tolist())):
        upto = prompt_len + e + 1
        seqs.append(torch.cat([input_ids[b, :upto][attention_mask[b, :upto] != 0], suffixes[i]]))
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        width = max(len(seqs[i]) for i in chunk)
        ids = torch.zeros(len(chunk), width, dtype=torch.long, device=device)
        am = torch.zeros(len(chunk), width, dtype=torch.long, device=device)
        for j, i in enumerate(chunk):
            ids[j, width - len(seqs[i]):] = seqs[i]
            am[j, width - len(seqs[i]):] = 1
        yield chunk, ids, am


@torch.no_grad()
def probe_latents(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_len: int,
                  index: EpisodeIndex, probe_ids: Sequence[int], *, batch_size: int = 32,
                  autocast: Any = None) -> torch.Tensor:
    """``[R, D]`` final hidden states at the last probe token appended after each episode.

    Args:
        model: the causal LM (only its backbone runs).
        input_ids, attention_mask: ``[B, P + T]`` prompt (left-padded) + completion.
        prompt_len: P; index: the episodes (:class:`EpisodeIndex`; ``ends == -1`` reads right
            after the prompt).
        probe_ids: token ids of the probe text.
        batch_size: probe sequences per forward (sorted by length to limit padding).
        autocast: a context-manager factory for mixed precision (None: none).

    Cost: one backbone forward per probe sequence, i.e. about (mean episodes per completion) x the
    policy forward in tokens; no LM head call.
    """
    backbone = backbone_of(model)
    device = input_ids.device
    probe = torch.tensor(list(probe_ids), dtype=torch.long, device=device)
    out = None
    for chunk, ids, am in _suffixed_batches(input_ids, attention_mask, prompt_len, index,
                                            [probe] * len(index.rows), batch_size):
        ctx = autocast() if autocast is not None else torch.autocast(device.type, enabled=False)
        with ctx:
            h = backbone(input_ids=ids, attention_mask=am, position_ids=position_ids(am),
                         use_cache=False).last_hidden_state[:, -1]
        if out is None:
            out = torch.empty(len(index.rows), h.shape[-1], dtype=h.dtype, device=device)
        out[torch.tensor(chunk, device=device)] = h
    if out is None:
        hidden_size = backbone.config.hidden_size if hasattr(backbone, "config") else 0
        out = torch.empty(0, hidden_size, device=device)
    return out


@torch.no_grad()
def answer_logliks(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_len: int,
                   index: EpisodeIndex, probe_ids: Sequence[int], answers: Sequence[Sequence[int]],
                   weight: torch.Tensor, bias: torch.Tensor | None, *, temperature: float = 1.0,
                   logit_scale: float = 1.0, softcap: float | None = None, batch_size: int = 32,
                   autocast: Any = None, backend: str | None = None) -> torch.Tensor:
    """``[R]`` float32 log p(answer | prefix + probe): the teacher-forced log-likelihood of every
    token of a row's reference answer written right after the probe appended to each episode.

    Args:
        model, input_ids, attention_mask, prompt_len, index, probe_ids: as :func:`probe_latents`.
        answers: per row of the batch (indexed by ``index.rows``), the answer's token ids as the
            tokenizer writes them after the probe (:func:`gccpo.formulations.answer_continuations`);
            a row with none gets 0.
        weight, bias: the LM head; temperature, logit_scale, softcap: the readout's logit transform.

    Cost: one backbone forward per (episode, answer) sequence (prefix + probe + answer tokens) and
    :func:`gccpo_kernels.fused_linear_logprobs` on the answer positions; never R x V memory.
    """
    backbone = backbone_of(model)
    device = input_ids.device
    probe = torch.tensor(list(probe_ids), dtype=torch.long, device=device)
    rows = index.rows.tolist()
    tails = [torch.tensor(list(answers[b]), dtype=torch.long, device=device) for b in rows]
    out = torch.zeros(len(rows), dtype=torch.float32, device=device)
    for chunk, ids, am in _suffixed_batches(input_ids, attention_mask, prompt_len, index,
                                            [torch.cat([probe, t]) for t in tails], batch_size):
        n = max(len(tails[i]) for i in chunk)
        if n == 0:
            continue
        ctx = autocast() if autocast is not None else torch.autocast(device.type, enabled=False)
        with ctx:
            h = backbone(input_ids=ids, attention_mask=am, position_ids=position_ids(am),
                         use_cache=False).last_hidden_state
        # the n positions before the last n tokens predict them; shorter answers are left-aligned
        # at their own end, so mask the positions before their first answer token
        targets = ids[:, -n:].clone()
        lengths = torch.tensor([len(tails[i]) for i in chunk], device=device)
        targets[torch.arange(n, device=device)[None, :] < (n - lengths)[:, None]] = -100
        logp, _ = gk.fused_linear_logprobs(h[:, -n - 1:-1].to(weight.dtype), weight, targets, bias=bias,
                                           temperature=temperature, logit_scale=logit_scale, softcap=softcap,
                                           backend=backend)
        out[torch.tensor(chunk, device=device)] = (logp.float() * (targets != -100)).sum(1)
    return out


def packed_probe_mask(attention_mask: torch.Tensor, ends: torch.Tensor, prompt_len: int, probe_len: int,
                      dtype: torch.dtype | None) -> tuple[torch.Tensor, torch.Tensor]:
    """4D attention mask and position ids for ``[prompt | completion | probe_0 | ... | probe_{K-1}]``.

    Args:
        attention_mask: ``[b, S]`` (S = P + T) padding mask of prompt + completion.
        ends: ``[b, K]`` episode end positions in completion coordinates (-1: no such episode).
        prompt_len: P; probe_len: tokens of the probe text.
        dtype: None for a boolean mask (True = attend; what ``sdpa`` takes), or the float dtype
            of an additive mask (0 / dtype's min; what ``eager`` attention takes).

    Returns:
        ``(mask [b, 1, L, L], position_ids [b, L])`` with L = S + K * probe_len. Prompt and
        completion tokens attend causally to non-padding tokens (they never see a probe, so their
        hidden states equal a plain forward's); probe k attends to the prefix up to and including
        token P + ends[k] and causally to its own tokens, with positions continuing from there.
        Padding queries and missing probes attend to themselves only (their outputs are unused).
    """
    b, S = attention_mask.shape
    K = ends.shape[1]
    L = S + K * probe_len
    device = attention_mask.device
    valid_key = attention_mask != 0
    i = torch.arange(L, device=device)
    allowed = torch.zeros(b, L, L, dtype=torch.bool, device=device)
    allowed[:, :S, :S] = (i[:S, None] >= i[None, :S]) & valid_key[:, None, :]
    pos = torch.zeros(b, L, dtype=torch.long, device=device)
    pos[:, :S] = position_ids(attention_mask)
    u = torch.arange(probe_len, device=device)
    own = u[:, None] >= u[None, :]                                   # causal within the probe
    for k in range(K):
        e = ends[:, k]
        has = e >= 0
        last = (prompt_len + e).clamp_min(0)                         # [b] last prefix position
        q = slice(S + k * probe_len, S + (k + 1) * probe_len)
        prefix = (i[None, :S] <= last[:, None]) & valid_key & has[:, None]   # [b, S]
        allowed[:, q, :S] = prefix[:, None, :]
        allowed[:, q, q] = own[None] & has[:, None, None]
        pos[:, q] = pos.gather(1, last[:, None]) + 1 + u[None]
    allowed[:, i, i] = True
    if dtype is None:
        return allowed[:, None], pos
    mask = torch.zeros(b, 1, L, L, dtype=dtype, device=device)
    mask.masked_fill_(~allowed[:, None], torch.finfo(dtype).min)
    return mask, pos


@torch.no_grad()
def packed_probe_forward(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_len: int,
                         ends: torch.Tensor, probe_ids: Sequence[int], *,
                         share_prompt: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """One no-grad backbone forward of prompt + completion with every episode's probe appended.

    The probes of a completion share its forward (:func:`packed_probe_mask`), so the policy's
    hidden states (for old_logp) and all probe latents come from one pass costing only
    K * len(probe) extra tokens per row. Needs an attention implementation that takes a 4D mask
    (``sdpa``, ``eager``); use :func:`probe_latents` with flash-attention. ``share_prompt``:
    each distinct prompt is encoded once and its KV cache expanded to its rows
    (:func:`gccpo.prefix.encode_prompts`); completion and probe tokens then run on top with the
    same mask's rows, so the result equals the plain packed forward up to rounding.

    Returns:
        ``(hidden [b, S, D], probe_hidden [b, K, D])``: final hidden states of prompt + completion,
        and at the last probe token of each episode (garbage where ``ends == -1``).
    """
    backbone = backbone_of(model)
    b, S = input_ids.shape
    K, n = ends.shape[1], len(probe_ids)
    impl = getattr(model.config, "_attn_implementation", "sdpa")
    if impl not in PACKED_ATTENTION:
        raise ValueError(f"the packed probe forward needs a 4D attention mask, which {impl!r} attention does "
                         "not take; use probe_latents (one sequence per probe)")
    dtype = None if impl == "sdpa" else next(backbone.parameters()).dtype
    mask, pos = packed_probe_mask(attention_mask, ends, prompt_len, n, dtype)
    probe = torch.tensor(list(probe_ids), dtype=torch.long, device=input_ids.device)
    ids = torch.cat([input_ids, probe.repeat(K).unsqueeze(0).expand(b, -1)], 1)
    encoded = encode_prompts(backbone, input_ids[:, :prompt_len], attention_mask[:, :prompt_len].bool()) \
        if share_prompt and S > prompt_len else None
    if encoded is None:
        out = backbone(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False).last_hidden_state
    else:
        prompt_hidden, cache, name = encoded
        tail = backbone(input_ids=ids[:, prompt_len:], attention_mask=mask[:, :, prompt_len:],
                        position_ids=pos[:, prompt_len:], use_cache=True, **{name: cache}).last_hidden_state
        out = torch.cat([prompt_hidden, tail], 1)
    last = S + torch.arange(K, device=ids.device) * n + (n - 1)
    return out[:, :S], out[:, last]


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
