"""Compact decoding (gccpo/decode.py): the same completions as transformers ``generate`` while rows
end at different steps and are dropped from the batch, correct sampling log-probs, edge cases."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from gccpo.decode import (compact_decode, greedy_sampler, supports_compact, temperature_sampler,  # noqa: E402
                          warp_logits)
from gccpo.rollout import completion_mask, generate  # noqa: E402
from gccpo.tensors import position_ids  # noqa: E402
from tests.trainer.test_trainer import tiny_model, tiny_tokenizer  # noqa: E402


@pytest.fixture(scope="module")
def setup():
    tok = tiny_tokenizer()
    model = tiny_model(tok).eval()
    prompts = ["Q 1+2", "Q 14+27, a longer one", "Q 9", "Q 5*5 =", "Q 0"]
    enc = tok(prompts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False)
    return tok, model, enc["input_ids"], enc["attention_mask"].bool()


def _eos_that_ends_rows_early(model, ids, mask, steps=12):
    """Tokens the greedy continuation produces at different steps, used as EOS so that rows end
    at different times (the random tiny model never picks its own EOS)."""
    out, _ = compact_decode(model, ids, mask, max_new_tokens=steps, eos=[], pad=0, sampler=greedy_sampler)
    assert out.shape[1] == steps
    return sorted({int(out[0, 2]), int(out[3, 6])})


def _reference(model, ids, mask, eos, max_new_tokens, pad):
    from transformers import GenerationConfig

    cfg = GenerationConfig(do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=eos, pad_token_id=pad)
    return model.generate(input_ids=ids, attention_mask=mask.long(), generation_config=cfg)[:, ids.shape[1]:]


@pytest.mark.parametrize("drop_fraction", [0.0, 0.125])
def test_greedy_equals_generate_with_rows_ending_at_different_steps(setup, drop_fraction):
    tok, model, ids, mask = setup
    eos = _eos_that_ends_rows_early(model, ids, mask)
    pad = tok.pad_token_id
    seen = []
    out, logp = compact_decode(model, ids, mask, max_new_tokens=12, eos=eos, pad=pad, sampler=greedy_sampler,
                               on_step=lambda done, computed: seen.append((done, computed)), drop_fraction=drop_fraction)
    ref = _reference(model, ids, mask, eos, 12, pad)
    m_out, m_ref = completion_mask(out, eos), completion_mask(ref, eos)
    assert torch.equal(m_out, m_ref[:, :out.shape[1]]) and not m_ref[:, out.shape[1]:].any()
    assert torch.equal(out[m_out], ref[:, :out.shape[1]][m_out])
    assert torch.all(out[~m_out] == pad)                      # padded after a row's EOS
    assert torch.all(logp == 0)
    lengths = m_out.sum(1)
    assert lengths.min() < lengths.max()                     # rows really ended at different steps
    assert min(c for _, c in seen) < ids.shape[0]            # finished rows left the batch
    finished = [d for d, _ in seen]                          # the progress count never goes back
    assert finished == sorted(finished) and finished[-1] <= ids.shape[0]


def test_repeated_prompts_are_encoded_once_and_sampled_independently(setup):
    tok, model, ids, mask = setup
    G = 4
    rep_ids, rep_mask = ids.repeat_interleave(G, 0), mask.repeat_interleave(G, 0)
    calls = []
    hook = model.model.register_forward_pre_hook(lambda m, a, kw: calls.append(kw["input_ids"].shape),
                                                 with_kwargs=True)
    try:
        torch.manual_seed(0)
        out, logp = compact_decode(model, rep_ids, rep_mask, max_new_tokens=6, eos=[], pad=tok.pad_token_id,
                                   sampler=temperature_sampler(1.0, 1.0))
    finally:
        hook.remove()
    assert calls[0][0] == ids.shape[0]                       # prefill: the 5 distinct prompts only
    assert all(c == (rep_ids.shape[0], 1) for c in calls[1:])
    groups = out.view(ids.shape[0], G, -1)
    assert any(not torch.equal(g[0], g[1]) for g in groups)  # the G rows of a prompt differ
    # each recorded log-prob is the model's log-softmax at the drawn token (teacher-forced)
    full_ids = torch.cat([rep_ids, out], 1)
    am = torch.cat([rep_mask, torch.ones_like(out, dtype=torch.bool)], 1).long()
    with torch.no_grad():
        logits = model(input_ids=full_ids, attention_mask=am, position_ids=position_ids(am)).logits
    P = rep_ids.shape[1]
    ref = torch.log_softmax(logits[:, P - 1:-1].float(), -1).gather(-1, out.unsqueeze(-1))[..., 0]
    torch.testing.assert_close(logp, ref, rtol=1e-4, atol=1e-4)


def test_warp_logits_temperature_and_top_p():
    scores = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    torch.testing.assert_close(warp_logits(scores, 2.0, 1.0), torch.log_softmax(scores / 2, -1))
    p = torch.softmax(scores, -1)[0]                          # 0.64, 0.24, 0.09, 0.03
    nucleus = warp_logits(scores, 1.0, 0.8)                   # the first two reach 0.8
    assert torch.isinf(nucleus[0, 2:]).all()
    torch.testing.assert_close(nucleus[0, :2].exp(), p[:2] / p[:2].sum())


def test_edge_cases(setup):
    tok, model, ids, mask = setup
    out, logp = compact_decode(model, ids[:0], mask[:0], max_new_tokens=5, eos=[1], pad=0, sampler=greedy_sampler)
    assert out.shape == (0, 0) and logp.shape == (0, 0)
    out, _ = compact_decode(model, ids, mask, max_new_tokens=0, eos=[1], pad=0, sampler=greedy_sampler)
    assert out.shape == (ids.shape[0], 0)
    # every row ends at its first token: one step, nothing more computed
    first, _ = compact_decode(model, ids, mask, max_new_tokens=1, eos=[], pad=0, sampler=greedy_sampler)
    out, _ = compact_decode(model, ids, mask, max_new_tokens=9, eos=first[:, 0].tolist(), pad=0,
                            sampler=greedy_sampler)
    assert out.shape == (ids.shape[0], 1)
    assert supports_compact(model)


def test_generate_decoders_agree(setup):
    """``rollout.generate``'s two decoders give the same greedy rollout (the trainer's eval path)."""
    tok, model, _, _ = setup
    prompts = [tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
               for q in ("1+2", "33+4", "9")]
    a = generate(model, tok, prompts, greedy=True, max_new_tokens=10, batch_size=2, decoder="compact")
    b = generate(model, tok, prompts, greedy=True, max_new_tokens=10, batch_size=2, decoder="generate")
    assert torch.equal(a.completion_mask, b.completion_mask)
    assert torch.equal(a.completion_ids[a.completion_mask], b.completion_ids[b.completion_mask])
    with pytest.raises(ValueError, match="decoder"):
        generate(model, tok, prompts, greedy=True, max_new_tokens=2, decoder="fast")
