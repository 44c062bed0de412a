"""Readouts of the answer distribution after each episode (SPEC §3): which tokens the probe is,
which episode a latent belongs to (:class:`EpisodeIndex`), and the no-grad forwards that read the
final hidden state after a probe: one sequence per probe (:func:`probe_latents`), every probe of a
completion packed into the policy's own forward with a 4D mask (:func:`packed_probe_forward`),
or the whole reference answer teacher-forced after the probe (:func:`answer_logliks`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

import gccpo_kernels as gk

from .config import RewardConfig
from .episodes import Episodes
from .prefix import encode_prompts
from .tensors import position_ids

#: attention implementations that take the 4D mask of :func:`packed_probe_forward`.
PACKED_ATTENTION = ("sdpa", "eager")


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
