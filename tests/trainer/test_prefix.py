"""The shared-prompt forward (gccpo/prefix.py) equals the plain forward: hidden states and
parameter gradients, with groups split across micro-batches and left-padded prompts."""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("transformers")

from gccpo.prefix import shared_prompt_hidden  # noqa: E402
from gccpo.tensors import unique_prompts  # noqa: E402
from gccpo.probes import backbone_of  # noqa: E402
from gccpo.tensors import position_ids  # noqa: E402
from tests.trainer.test_trainer import tiny_model, tiny_tokenizer  # noqa: E402


def _batch(tok, rows_per_prompt=(3, 1, 2)):
    prompts = ["Q 1+2", "Q 14+27 longer", "Q 9"]
    enc = tok(prompts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False)
    reps = torch.tensor(rows_per_prompt)
    p_ids, p_mask = enc["input_ids"].repeat_interleave(reps, 0), enc["attention_mask"].repeat_interleave(reps, 0).bool()
    g = torch.Generator().manual_seed(0)
    B, T = p_ids.shape[0], 7
    c_ids = torch.randint(4, len(tok), (B, T), generator=g)
    lengths = torch.tensor([7, 3, 5, 1, 7, 6])[:B]
    c_mask = torch.arange(T).unsqueeze(0) < lengths.unsqueeze(1)
    return p_ids, p_mask, c_ids.masked_fill(~c_mask, tok.pad_token_id), c_mask


def test_unique_prompts_keeps_row_order():
    ids = torch.tensor([[5, 6], [1, 2], [5, 6], [1, 2], [0, 2]])
    mask = torch.tensor([[1, 1], [1, 1], [1, 1], [1, 1], [0, 1]])
    first, inverse = unique_prompts(ids, mask)
    assert torch.equal(ids[first][inverse], ids)
    assert sorted(first.tolist()) == [0, 1, 4]


def test_shared_prompt_forward_equals_plain_forward():
    tok = tiny_tokenizer()
    model = tiny_model(tok).double()
    twin = copy.deepcopy(model)
    p_ids, p_mask, c_ids, c_mask = _batch(tok)
    P = p_ids.shape[1]
    shared = shared_prompt_hidden(backbone_of(model), p_ids, p_mask, c_ids, c_mask)
    am = torch.cat([p_mask, c_mask], 1).long()
    plain = backbone_of(twin)(input_ids=torch.cat([p_ids, c_ids], 1), attention_mask=am,
                              position_ids=position_ids(am), use_cache=False).last_hidden_state
    assert shared is not None and shared.shape == plain.shape
    used = torch.cat([p_mask[:, -1:], c_mask[:, :-1]], 1)  # positions whose hidden state predicts a token
    torch.testing.assert_close(shared[:, P - 1:-1][used], plain[:, P - 1:-1][used], rtol=1e-10, atol=1e-10)
    weight = torch.randn(plain.shape[-1], dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    (shared[:, P - 1:-1][used] @ weight).square().sum().backward()
    (plain[:, P - 1:-1][used] @ weight).square().sum().backward()
    for (name, a), b in zip(model.named_parameters(), twin.parameters()):
        if b.grad is None:
            assert a.grad is None or not a.grad.any(), name
            continue
        # LlamaRMSNorm computes in float32 even in a float64 model, and the shared forward sums the
        # G rows' prompt gradients in another order: float32 reassociation, ~1e-8 of the largest entry
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=1e-6 * float(b.grad.abs().max()), msg=name)


def test_no_repeated_prompt_means_plain_forward():
    tok = tiny_tokenizer()
    p_ids, p_mask, c_ids, c_mask = _batch(tok, (1, 1, 1))
    assert shared_prompt_hidden(backbone_of(tiny_model(tok)), p_ids, p_mask, c_ids[:3], c_mask[:3]) is None
