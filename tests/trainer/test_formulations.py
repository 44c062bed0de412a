"""Episode-reward formulations (issue 19): the registry, and info_gain against float64."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from gccpo.config import FORMULATIONS, RewardConfig  # noqa: E402
from gccpo.formulations import (FORMULATION_REGISTRY, Readouts, answer_first_ids,  # noqa: E402
                                answer_log_probs, info_gain_rewards)
from gccpo.rewards import EpisodeIndex  # noqa: E402

F64 = torch.float64


def test_the_registry_is_what_the_config_accepts():
    assert set(FORMULATION_REGISTRY) == set(FORMULATIONS)


def _index(counts: list[int]) -> EpisodeIndex:
    rows = torch.tensor([b for b, c in enumerate(counts) for _ in range(c)])
    ks = torch.tensor([k for c in counts for k in range(c)])
    return EpisodeIndex(rows, ks, ks * 3)


def test_info_gain_telescopes_float64():
    g = torch.Generator().manual_seed(0)
    counts = [3, 1, 0, 2]
    index = _index(counts)
    logq = -torch.rand(len(index.rows), generator=g, dtype=F64) * 4
    prior = -torch.rand(4, generator=g, dtype=F64) * 4
    r = info_gain_rewards(logq, prior, index, (4, 3))
    want = torch.zeros(4, 3, dtype=F64)
    i = 0
    for b, c in enumerate(counts):
        last = prior[b]
        for k in range(c):
            want[b, k] = logq[i] - last
            last = logq[i]
            i += 1
    torch.testing.assert_close(r, want, rtol=0, atol=0)
    # a completion's rewards sum to log q_last(a*) - log q_{-1}(a*): no reward for length
    torch.testing.assert_close(r[0].sum(), logq[2] - prior[0])


@pytest.mark.parametrize("softcap", [None, 4.0])
def test_answer_log_probs_float64(softcap):
    g = torch.Generator().manual_seed(1)
    h = torch.randn(5, 8, generator=g, dtype=F64)
    w = torch.randn(50, 8, generator=g, dtype=F64)
    b = torch.randn(50, generator=g, dtype=F64)
    ids = torch.tensor([2, 7, 11, 30])
    targets = torch.tensor([0, 3, 1, 1, 2])
    z = (h @ w[ids].T + b[ids]) * 1.5 / 0.8
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    want = torch.log_softmax(z, 1).gather(1, targets[:, None]).squeeze(1)
    got = answer_log_probs(h, w, b, ids, targets, temperature=0.8, logit_scale=1.5, softcap=softcap)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


def test_info_gain_formulation_end_to_end():
    """The registered function: rewards are the gains in log q(a*); rows whose a* is not in the
    answer vocabulary get none."""
    g = torch.Generator().manual_seed(2)
    counts = [2, 3]
    index = _index(counts)
    d, v = 8, 40
    w = torch.randn(v, d, generator=g)
    lat = torch.randn(len(index.rows), d, generator=g)
    prior = torch.randn(2, d, generator=g)
    ids = torch.tensor([3, 5, 9])
    first = torch.tensor([5, 17])                       # row 1's a* is outside the vocabulary
    r = Readouts(lat, index, torch.tensor([0, 0]), (2, 3), w, None, RewardConfig(formulation="info_gain"),
                 answer_ids=ids, backend="torch", prior_latents=prior, answer_first=first)
    out = FORMULATION_REGISTRY["info_gain"](r)
    lq = torch.log_softmax(lat @ w[ids].T, 1)[:, 1]
    lp = torch.log_softmax(prior @ w[ids].T, 1)[:, 1]
    torch.testing.assert_close(out.reward[0, :2], torch.stack([lq[0] - lp[0], lq[1] - lq[0]]), rtol=1e-5, atol=1e-6)
    assert not out.reward[1].any()
    assert out.answer_mass is not None and bool((out.answer_mass[out.valid] > 0).all())
    torch.testing.assert_close(out.answer_logq[0, :2], lq[:2], rtol=1e-5, atol=1e-6)
    assert not out.answer_logq[1].any() and not out.effectiveness.any() and not out.robustness.any()


def test_info_gain_needs_the_aligned_probe():
    from gccpo.config import ConfigError

    with pytest.raises(ConfigError, match="reward.formulation"):
        RewardConfig(formulation="info_gain", align_probe=False)
    with pytest.raises(ConfigError, match="reward.formulation"):
        RewardConfig(formulation="nope")


def test_answer_first_token_on_smollm2():
    from tests.trainer.test_episodes import _smollm2_gguf

    path, why = _smollm2_gguf()
    if path is None:
        pytest.skip(why)
    import os

    from transformers import AutoTokenizer

    from gccpo.rewards import aligned_probe_ids

    tok = AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
    probe = aligned_probe_ids(tok, "\nAnswer:")
    first = answer_first_ids(tok, "\nAnswer:", probe, ["12", "-3", "7"])
    assert tok.convert_ids_to_tokens(first.tolist()) == ["1", "-", "7"]


def test_a_training_step_with_info_gain(tmp_path, monkeypatch):
    """The trainer runs the info_gain formulation end to end (tiny random Llama): finite loss,
    robustness not computed, log q(a*) logged; the readout after the prompt runs once per question
    (not once per row) and gives every row of a question the per-row readout."""
    import math

    import gccpo.trainer as trainer_module
    from tests.trainer.test_trainer import make_trainer, tiny_config

    calls = []
    real = trainer_module.probe_latents

    def spy(model, input_ids, attention_mask, prompt_len, index, *a, **k):
        out = real(model, input_ids, attention_mask, prompt_len, index, *a, **k)
        if bool((index.ends == -1).all()):  # the prompt readouts: compare with one per row
            every = trainer_module.EpisodeIndex(torch.arange(input_ids.shape[0]), torch.zeros(input_ids.shape[0],
                                                dtype=torch.long), torch.full((input_ids.shape[0],), -1))
            calls.append((len(index.rows), out, real(model, input_ids, attention_mask, prompt_len, every, *a, **k)))
        return out

    monkeypatch.setattr(trainer_module, "probe_latents", spy)
    trainer = make_trainer(tiny_config(tmp_path, "--train.eval_before", "false", "--reward.formulation", "info_gain",
                                       "--reward.readout", "probe"))
    metrics = trainer.train_step()
    assert math.isfinite(metrics["loss"]) and metrics["causal/robustness"] == 0.0
    assert 0.0 < metrics["causal/answer_mass"] <= 1.0 and math.isfinite(metrics["causal/answer_logq"])
    (n_sequences, per_question, per_row), = calls
    rows = trainer.config.rollout.questions_per_step * trainer.config.rollout.num_generations
    assert n_sequences == trainer.config.rollout.questions_per_step < rows
    assert per_row.shape[0] == rows
    # rows are grouped by question (G consecutive rows each): the shared readout is each row's
    g = trainer.config.rollout.num_generations
    torch.testing.assert_close(per_question.repeat_interleave(g, 0), per_row, rtol=1e-4, atol=1e-5)
