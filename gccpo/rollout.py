"""Sampling groups of completions: transformers ``generate`` (default) or vLLM (optional, untested).

:func:`generate` repeats each prompt G times, samples with temperature / top-p (or greedily), and
returns a :class:`Rollout`: left-padded prompts, right-padded completions, the completion mask
(up to and including the first EOS) and the log-probs of the sampled tokens under the sampling
distribution (after temperature and top-p; a vLLM-style importance-correction input, and a check
that the trainer's own old_logp agree).

The sampling log-probs are recorded by a logits processor that applies temperature and top-p
itself (``generate`` then runs with its own warpers off) and keeps only the last step's
``[rows, V]`` log-softmax, gathering the chosen token one step later: no ``[rows, T, V]`` scores
are stored.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from .decode import compact_decode, greedy_sampler, supports_compact, temperature_sampler, warp_logits

DECODERS = ("compact", "generate")


@dataclass
class Rollout:
    """A batch of B = Q * G prompt + completion rows.

    Attributes:
        prompt_ids: ``[B, P]`` int64, left-padded; ``prompt_mask``: ``[B, P]`` bool.
        completion_ids: ``[B, T]`` int64, right-padded with the pad id.
        completion_mask: ``[B, T]`` bool, completion tokens up to and including the first EOS.
        sampling_logp: ``[B, T]`` float32 log-probs of the sampled tokens under the sampling
            distribution (0 where masked), or None for greedy decoding.
        group_index: ``[B]`` int64, the prompt each row answers (rows of a prompt are contiguous).
    """

    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    completion_ids: torch.Tensor
    completion_mask: torch.Tensor
    sampling_logp: torch.Tensor | None
    group_index: torch.Tensor

    @property
    def input_ids(self) -> torch.Tensor:
        """``[B, P + T]`` prompt and completion."""
        return torch.cat([self.prompt_ids, self.completion_ids], 1)

    @property
    def attention_mask(self) -> torch.Tensor:
        """``[B, P + T]`` int64 (padding on both sides is 0)."""
        return torch.cat([self.prompt_mask, self.completion_mask], 1).long()

    def select(self, rows: torch.Tensor | slice, width: int | None = None) -> "Rollout":
        """The sub-batch of the given rows (for micro-batches), its completions cut to ``width``
        columns when given (every masked token of ``rows`` must lie within them)."""
        pick = (lambda t: None if t is None else t[rows])
        cut = (lambda t: t if t is None or width is None else t[:, :width])
        return Rollout(pick(self.prompt_ids), pick(self.prompt_mask), cut(pick(self.completion_ids)),
                       cut(pick(self.completion_mask)), cut(pick(self.sampling_logp)), pick(self.group_index))


def eos_ids(model: Any, tokenizer: Any) -> list[int]:
    """EOS ids from the model's generation config, else the tokenizer's."""
    ids = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if ids is None:
        ids = tokenizer.eos_token_id
    if ids is None:
        return []
    return [int(i) for i in (ids if isinstance(ids, (list, tuple)) else [ids])]


def completion_mask(completion_ids: torch.Tensor, eos: Sequence[int], lengths: torch.Tensor | None = None) -> torch.Tensor:
    """``[B, T]`` bool: tokens up to and including the first EOS (all generated tokens without one)."""
    B, T = completion_ids.shape
    is_eos = torch.zeros_like(completion_ids, dtype=torch.bool)
    for e in eos:
        is_eos |= completion_ids == e
    first = torch.where(is_eos.any(1), is_eos.float().argmax(1), torch.full((B,), T, device=completion_ids.device))
    if lengths is not None:
        first = torch.minimum(first, lengths - 1)
    return torch.arange(T, device=completion_ids.device).unsqueeze(0) <= first.unsqueeze(1)


class _SampledLogprobs:
    """Logits processor: temperature + top-p, recording the sampled token's log-prob (see module)."""

    def __init__(self, temperature: float, top_p: float) -> None:
        self.temperature = float(temperature)
        self.top_p = float(top_p)
        self.prev: torch.Tensor | None = None
        self.out: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.prev is not None:
            self.out.append(self.prev.gather(1, input_ids[:, -1:]).squeeze(1))
        self.prev = warp_logits(scores, self.temperature, self.top_p)
        return self.prev

    def finish(self, last_tokens: torch.Tensor) -> torch.Tensor:
        if self.prev is not None:
            self.out.append(self.prev.gather(1, last_tokens.unsqueeze(1)).squeeze(1))
        return torch.stack(self.out, 1) if self.out else torch.zeros(last_tokens.shape[0], 0)


def _pad_right(rows: list[torch.Tensor], width: int, value: float | int) -> torch.Tensor:
    return torch.cat([torch.nn.functional.pad(r, (0, width - r.shape[1]), value=value) for r in rows], 0)


@torch.no_grad()
def generate(model: Any, tokenizer: Any, prompts: Sequence[str], *, num_generations: int = 1,
             temperature: float = 1.0, top_p: float = 1.0, max_new_tokens: int = 128,
             greedy: bool = False, batch_size: int | None = None,
             progress: str | None = None, decoder: str = "compact") -> Rollout:
    """Sample ``num_generations`` completions of every prompt.

    Args:
        model: a causal LM (in eval mode for sampling; its mode is restored afterwards).
        tokenizer: its tokenizer (a pad token is taken from EOS when missing).
        prompts: Q prompt strings (chat template already applied).
        num_generations: G rows per prompt; rows of a prompt are contiguous (``group_index``).
        temperature, top_p: sampling distribution; ignored when ``greedy``.
        max_new_tokens: completion cap.
        greedy: argmax decoding (evaluation); no sampling log-probs then.
        batch_size: rows per ``generate`` call (None: all B rows at once).
        progress: a tqdm bar with this description over the batches (None: no bar).
        decoder: ``"compact"`` (:func:`gccpo.decode.compact_decode`: each distinct prompt encoded
            once, finished rows dropped from the batch; falls back to ``"generate"`` for a model
            whose forward takes no KV cache / position ids) or ``"generate"`` (transformers
            ``generate``; needed when processes must decode in lock-step, e.g. FSDP).

    Returns:
        :class:`Rollout` on the model's device.
    Cost: ``compact``: prefill of the distinct prompts + one single-token step per generated token
    of each row; ``generate``: B * (longest row) decoding steps. One [rows, V] log-softmax per step.

    (92 lines, kept whole: batching, the decoder choice and the padding of the result read as one
    recipe; each part alone would only be called here.)
    """
    if decoder not in DECODERS:
        raise ValueError(f"decoder must be one of {DECODERS}, got {decoder!r}")
    from transformers import GenerationConfig, LogitsProcessorList

    device = next(model.parameters()).device
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    pad = int(tokenizer.pad_token_id)
    eos = eos_ids(model, tokenizer)
    enc = tokenizer(list(prompts), return_tensors="pt", padding=True, padding_side="left",
                    add_special_tokens=False)
    prompt_ids = enc["input_ids"].repeat_interleave(num_generations, 0).to(device)
    prompt_mask = enc["attention_mask"].repeat_interleave(num_generations, 0).to(device).bool()
    group = torch.arange(len(prompts), device=device).repeat_interleave(num_generations)
    B, P = prompt_ids.shape
    step = B if not batch_size else int(batch_size)
    # no warpers of generate's own (temperature / top-p are applied by the recorder), whatever the
    # model's generation_config says
    neutral = {} if greedy else {"temperature": 1.0, "top_p": 1.0, "top_k": 0}
    gen_config = GenerationConfig(do_sample=not greedy, max_new_tokens=int(max_new_tokens),
                                  eos_token_id=eos or None, pad_token_id=pad, **neutral)
    was_training = model.training
    model.eval()
    completions, logps = [], []
    bar = None
    try:
        compact = decoder == "compact" and supports_compact(model)
        starts = range(0, B, step)
        if progress:
            from tqdm import tqdm

            if compact:  # a bar over finished rows, moved by every decoding step
                bar = tqdm(total=B, desc=progress, leave=False, dynamic_ncols=True, unit="row")
            else:
                starts = tqdm(starts, desc=progress, leave=False, dynamic_ncols=True)
        for start in starts:
            ids, am = prompt_ids[start:start + step], prompt_mask[start:start + step].long()
            if compact:
                sampler = greedy_sampler if greedy else temperature_sampler(temperature, top_p)
                on_step = None if bar is None else (lambda done, _, s=start: bar.update(s + done - bar.n))
                comp, lp = compact_decode(model, ids, am.bool(), max_new_tokens=max_new_tokens, eos=eos,
                                          pad=pad, sampler=sampler, on_step=on_step)
                completions.append(comp)
                logps.append(lp)
                if bar is not None:
                    bar.update(start + comp.shape[0] - bar.n)
                continue
            recorder = None if greedy else _SampledLogprobs(temperature, top_p)
            out = model.generate(input_ids=ids, attention_mask=am, generation_config=gen_config,
                                 logits_processor=LogitsProcessorList([recorder] if recorder else []))
            comp = out[:, P:]
            completions.append(comp)
            if recorder is not None:
                logps.append(recorder.finish(comp[:, -1]) if comp.shape[1] else comp.float())
    finally:
        model.train(was_training)
        if bar is not None:
            bar.close()
    T = max(c.shape[1] for c in completions)
    completion_ids = _pad_right(completions, T, pad)
    lengths = torch.cat([torch.full((c.shape[0],), c.shape[1], device=device) for c in completions])
    mask = completion_mask(completion_ids, eos, lengths)
    sampling_logp = None
    if not greedy:
        sampling_logp = _pad_right([lp.float() for lp in logps], T, 0.0).masked_fill(~mask, 0.0)
    return Rollout(prompt_ids, prompt_mask, completion_ids, mask, sampling_logp, group)


class VLLMSampler:
    """Sampling with vLLM (``pip install vllm``), weights synced from the policy before each call.

    Untested in this project's CI (no vLLM, no GPU there): kept deliberately small. It needs a model
    vLLM can load by name or directory (not the embedded GGUF default); the policy's state dict is
    pushed into the engine's model through ``load_weights`` before each generation.
    """

    def __init__(self, model_path: str, tokenizer: Any, *, gpu_memory_utilization: float = 0.3,
                 dtype: str = "bfloat16", seed: int = 0) -> None:
        try:
            from vllm import LLM
        except ImportError:
            raise ImportError("rollout.backend=vllm needs vLLM: pip install vllm "
                              "(or use --rollout.backend transformers)") from None
        self.tokenizer = tokenizer
        self.llm = LLM(model=model_path, gpu_memory_utilization=gpu_memory_utilization, dtype=dtype,
                       seed=seed, enable_prefix_caching=True)

    def sync_weights(self, model: torch.nn.Module) -> None:
        """Copy the policy's current weights into the vLLM engine."""
        engine = self.llm.llm_engine
        state = ((k, v.detach()) for k, v in model.state_dict().items())
        try:
            runner = engine.model_executor.driver_worker.worker.model_runner
        except AttributeError:
            runner = engine.model_executor.driver_worker.model_runner
        runner.model.load_weights(state)
        if hasattr(engine, "reset_prefix_cache"):
            engine.reset_prefix_cache()

    def generate(self, model: torch.nn.Module, prompts: Sequence[str], *, num_generations: int,
                 temperature: float, top_p: float, max_new_tokens: int, greedy: bool = False) -> Rollout:
        from vllm import SamplingParams

        self.sync_weights(model)
        device = next(model.parameters()).device
        params = SamplingParams(n=1 if greedy else num_generations, temperature=0.0 if greedy else temperature,
                                top_p=1.0 if greedy else top_p, max_tokens=max_new_tokens, logprobs=0)
        outputs = self.llm.generate(list(prompts), params, use_tqdm=False)
        tok = self.tokenizer
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        enc = tok(list(prompts), return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False)
        g = 1 if greedy else num_generations
        rows, lps = [], []
        for out in outputs:
            for c in out.outputs:
                rows.append(list(c.token_ids))
                lps.append([next(iter(d.values())).logprob if d else 0.0 for d in (c.logprobs or [])]
                           or [0.0] * len(c.token_ids))
        T = max([len(r) for r in rows] + [1])
        ids = torch.full((len(rows), T), pad, dtype=torch.long)
        mask = torch.zeros(len(rows), T, dtype=torch.bool)
        logp = torch.zeros(len(rows), T)
        for i, (r, lp) in enumerate(zip(rows, lps)):
            ids[i, :len(r)] = torch.tensor(r, dtype=torch.long)
            mask[i, :len(r)] = True
            logp[i, :len(lp)] = torch.tensor(lp)
        return Rollout(enc["input_ids"].repeat_interleave(g, 0).to(device),
                       enc["attention_mask"].repeat_interleave(g, 0).bool().to(device), ids.to(device),
                       mask.to(device), None if greedy else logp.to(device),
                       torch.arange(len(prompts), device=device).repeat_interleave(g))
