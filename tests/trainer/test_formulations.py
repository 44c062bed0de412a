"""Episode-reward formulations (issue 19): the registry, and info_gain against float64."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from gccpo.config import FORMULATIONS, RewardConfig  # noqa: E402
from gccpo.formulations import (FORMULATION_REGISTRY, Readouts, answer_first_ids,  # noqa: E402
                                answer_log_probs, info_gain_rewards)
from gccpo.probes import EpisodeIndex  # noqa: E402

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

    from gccpo.probes import aligned_probe_ids

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


# ---- the shared pieces: per-term standardization, the truncated mean -------------------------


def _standardize_reference(values, valid, groups, eps, trim):
    """Plain-Python float64 (v - trimmed mean) / (sample std + eps) per group, 0 for equal values."""
    B, K = len(values), len(values[0])
    out = [[0.0] * K for _ in range(B)]
    for g in sorted(set(groups)):
        keys = [(i, k) for i in range(B) if groups[i] == g for k in range(K) if valid[i][k]]
        v = [values[i][k] for i, k in keys]
        n = len(v)
        if n == 0 or max(v) == min(v):
            continue
        cut = int(trim * n)
        kept = sorted(v)[cut:n - cut] or v
        center = sum(kept) / len(kept)
        mean = sum(v) / n
        std = (sum((x - mean) ** 2 for x in v) / (n - 1)) ** 0.5 if n > 1 else 0.0
        for (i, k), x in zip(keys, v):
            out[i][k] = (x - center) / (std + eps)
    return torch.tensor(out, dtype=F64)


@pytest.mark.parametrize("trim", [0.0, 0.1, 0.25])
def test_standardize_in_groups_float64(trim):
    from gccpo.formulations import standardize_in_groups

    g = torch.Generator().manual_seed(3)
    values = torch.randn(7, 4, generator=g, dtype=F64)
    values[2, 0] = 40.0                                   # an outlier the truncated mean ignores
    valid = torch.rand(7, 4, generator=g) < 0.8
    groups = torch.tensor([0, 0, 0, 1, 1, 2, 2])
    values[5:, :] = 1.5                                   # group 2: all equal -> exactly 0
    got = standardize_in_groups(values, valid, groups, eps=1e-4, trim=trim)
    want = _standardize_reference(values.tolist(), valid.tolist(), groups.tolist(), 1e-4, trim)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert not got[5:].any() and not got[~valid].any()
    if trim:  # the outlier moved the plain mean, not the trimmed one
        plain = standardize_in_groups(values, valid, groups, eps=1e-4)
        assert (got[:3][valid[:3]] - plain[:3][valid[:3]]).abs().min() > 1e-3


def test_answer_energy_share_float64():
    from gccpo.formulations import answer_energy_share

    g = torch.Generator().manual_seed(4)
    w = torch.randn(30, 6, generator=g, dtype=F64)
    h = torch.randn(5, 6, generator=g, dtype=F64)
    ids = torch.tensor([1, 4, 9, 20])
    a = (w[ids] - w[ids].mean(0)).T.numpy()                 # [D, A], rank A - 1 = 3
    import numpy as np

    want = []
    for x in h.numpy():
        coef, *_ = np.linalg.lstsq(a, x, rcond=None)
        proj = a @ coef
        want.append(float(proj @ proj / (x @ x)))
    got = answer_energy_share(h, w, ids)
    torch.testing.assert_close(got.double(), torch.tensor(want, dtype=F64), rtol=1e-4, atol=1e-5)
    # a latent inside the span reads 1, one orthogonal to it 0
    inside = torch.tensor(a[:, 0] - a[:, 1], dtype=F64)[None]
    q, _ = torch.linalg.qr(torch.tensor(a, dtype=F64), mode="complete")
    orth = q[:, -1][None]                                   # orthogonal to the 3-dim span (D = 6)
    torch.testing.assert_close(answer_energy_share(torch.cat([inside, orth]), w, ids).double(),
                               torch.tensor([1.0, 0.0], dtype=F64), rtol=0, atol=1e-5)


def _readouts(formulation: str, seed: int = 5, **config):
    g = torch.Generator().manual_seed(seed)
    counts = [2, 3, 1, 2, 1, 3]
    index = _index(counts)
    d, v = 8, 40
    w = torch.randn(v, d, generator=g, dtype=F64)
    lat = torch.randn(len(index.rows), d, generator=g, dtype=F64)
    groups = torch.tensor([0, 0, 0, 1, 1, 1])
    cfg = RewardConfig(formulation=formulation, **config)
    return Readouts(lat, index, groups, (6, 3), w, None, cfg, answer_ids=torch.tensor([3, 5, 9, 12]),
                    generator=torch.Generator().manual_seed(7), backend="torch",
                    outcome=torch.tensor([1.0, 0.0, 1.0, 0.0, 0.0, 1.0], dtype=F64),
                    prior_latents=torch.randn(6, d, generator=g, dtype=F64),
                    answer_first=torch.tensor([5, 5, 5, 9, 9, 9]))


def _q(h, w, ids):
    return torch.softmax(h @ w[ids].T, 1)


def test_paper_formulation_float64():
    """paper = truncated-mean normalization of w_rob z(stability) + w_eff z(norm ratio) + z(r_out/K),
    each z over the question's episodes; its advantages take the rewards as given, without returns."""
    from gccpo.formulations import answer_energy_share
    import gccpo_kernels as gk

    r = _readouts("paper", trim=0.2)
    out = FORMULATION_REGISTRY["paper"](r)
    ids = r.answer_ids
    # stability from the same perturbations (same seed), KL in float64
    deltas = gk.perturb_latents(r.latents, 4, sigma=0.05, group_index=r.group_index[r.index.rows],
                                generator=torch.Generator().manual_seed(7))
    q = _q(r.latents, r.weight, ids)
    stab = []
    for i in range(len(r.index.rows)):
        kls = []
        for m in range(4):
            qm = _q(r.latents[i:i + 1] + deltas[i, m:m + 1], r.weight, ids)[0]
            kls.append(float((q[i] * (q[i].log() - qm.log())).sum()))
        stab.append(-sum(kls) / 4)
    ratio = answer_energy_share(r.latents, r.weight, ids).double().tolist()
    counts = torch.bincount(r.index.rows).tolist()
    share = [float(r.outcome[b]) / counts[b] for b in r.index.rows.tolist()]
    valid = [[False] * 3 for _ in range(6)]
    tabs = [[[0.0] * 3 for _ in range(6)] for _ in range(3)]
    for j, (b, k) in enumerate(zip(r.index.rows.tolist(), r.index.ks.tolist())):
        valid[b][k] = True
        for t, vals in zip(tabs, (stab, ratio, share)):
            t[b][k] = vals[j]
    groups = r.group_index.tolist()
    z = [_standardize_reference(t, valid, groups, 1e-4, 0.0) for t in tabs]
    total = 0.9 * z[0] + 0.8 * z[1] + z[2]
    want = _standardize_reference(total.tolist(), valid, groups, 1e-4, 0.2)
    torch.testing.assert_close(out.reward.double(), want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out.robustness[r.valid()].double(), torch.tensor(stab, dtype=F64), rtol=1e-4,
                               atol=1e-7)
    assert out.advantage_options == {"normalize_rewards": False, "gamma": 0.0, "normalize_returns": False}
    assert set(out.metrics()) >= {"causal/norm_ratio", "causal/outcome_share", "causal/answer_mass"}


def test_paper_needs_the_answer_vocabulary_and_outcomes():
    r = _readouts("paper")
    r.answer_ids = None
    with pytest.raises(ValueError, match="answer block"):
        FORMULATION_REGISTRY["paper"](r)
    r = _readouts("paper")
    r.outcome = None
    with pytest.raises(ValueError, match="outcome"):
        FORMULATION_REGISTRY["paper"](r)


@pytest.mark.parametrize("threshold", [0.0, 0.3, 50.0])
def test_mi_floor_float64(threshold):
    """Per episode m_{i,k} = sum_a q_{i,k}(a) log(q_bar_qk(a) / q_bar_k(a)) (float64 loops), whose mean
    over the rows at k is I_k = H(q_bar_k) - sum_q n_qk/n_k H(q_bar_qk); the hinge -max(0, tau - m)
    per episode, 0 where fewer than two questions reach k."""
    r = _readouts("mi_floor", mi_threshold=threshold)
    # make k = 2 single-question: drop row 5's third episode (rows 1 and 5 reach k = 2)
    keep = ~((r.index.rows == 5) & (r.index.ks == 2))
    r.index = EpisodeIndex(r.index.rows[keep], r.index.ks[keep], r.index.ends[keep])
    r.latents = r.latents[keep]
    out = FORMULATION_REGISTRY["mi_floor"](r)
    q = _q(r.latents, r.weight, r.answer_ids)
    H = lambda p: float(-(p * p.log()).sum())  # noqa: E731
    rows, ks, qs = r.index.rows.tolist(), r.index.ks.tolist(), r.group_index[r.index.rows].tolist()
    for k in range(3):
        at = [j for j in range(len(rows)) if ks[j] == k]
        questions = sorted({qs[j] for j in at})
        mix = sum(q[j] for j in at) / len(at)
        cond = {g: sum(q[j] for j in at if qs[j] == g) / sum(1 for j in at if qs[j] == g) for g in questions}
        ms = []
        for j in at:
            m = float((q[j] * (cond[qs[j]].log() - mix.log())).sum()) if len(questions) >= 2 else 0.0
            ms.append(m)
            want = 0.0 if len(questions) < 2 else -max(0.0, threshold - m)
            assert abs(float(out.effectiveness[rows[j], k]) - want) < 1e-5
            assert abs(float(out.parts["mi_contribution"][rows[j], k]) - m) < 1e-5
        if len(questions) >= 2:  # the per-episode shares average to the mutual information
            mi = H(mix) - sum(sum(1 for j in at if qs[j] == g) / len(at) * H(cond[g]) for g in questions)
            assert abs(sum(ms) / len(ms) - mi) < 1e-9 and mi > 0
    v, groups = out.valid.tolist(), r.group_index.tolist()
    z = [_standardize_reference(t.double().tolist(), v, groups, 1e-4, 0.0) for t in (out.robustness, out.effectiveness)]
    torch.testing.assert_close(out.reward.double(), 0.9 * z[0] + 0.8 * z[1], rtol=1e-5, atol=1e-5)
    if threshold == 50.0:  # every defined episode is below the floor, with its own penalty
        pen = out.effectiveness[out.valid & (torch.arange(3)[None, :] < 2)]
        assert bool((pen < 0).all()) and len(set(pen.tolist())) > 1


def test_spec_standardizes_each_term():
    """term_norm group: w_rob z(R_rob) + w_eff z(R_eff); none: SPEC §5 as written."""
    from gccpo.formulations import standardize_in_groups

    grouped = FORMULATION_REGISTRY["spec"](_readouts("spec", term_norm="group"))
    raw = FORMULATION_REGISTRY["spec"](_readouts("spec", term_norm="none"))
    default = FORMULATION_REGISTRY["spec"](_readouts("spec"))  # auto: spec's terms stay raw
    torch.testing.assert_close(default.reward, raw.reward)
    torch.testing.assert_close(raw.robustness, grouped.robustness)
    v, groups = grouped.valid, torch.tensor([0, 0, 0, 1, 1, 1])
    want = 0.9 * standardize_in_groups(grouped.robustness, v, groups) + \
        0.8 * standardize_in_groups(grouped.effectiveness, v, groups)
    torch.testing.assert_close(grouped.reward, want.masked_fill(~v, 0.0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(raw.reward, (0.9 * raw.robustness + 0.8 * raw.effectiveness).masked_fill(~v, 0.0))


def test_info_gain_robust_float64():
    """robust: log q(a*) averaged over the M perturbed latents (the same draws), then the gains."""
    import gccpo_kernels as gk

    r = _readouts("info_gain", robust=True, num_perturbations=3, sigma=0.3)
    out = FORMULATION_REGISTRY["info_gain"](r)
    gen = torch.Generator().manual_seed(7)
    ids = r.answer_ids
    pos = torch.tensor([1, 1, 1, 2, 2, 2])

    def mean_logq(h, groups, targets):
        d = gk.perturb_latents(h, 3, sigma=0.3, group_index=groups, generator=gen)
        return torch.stack([torch.log_softmax((h + d[:, m]) @ r.weight[ids].T, 1).gather(1, targets[:, None])[:, 0]
                            for m in range(3)], 1).mean(1)

    logq = mean_logq(r.latents, r.group_index[r.index.rows], pos[r.index.rows])
    prior = mean_logq(r.prior_latents, r.group_index, pos)
    want = info_gain_rewards(logq, prior, r.index, (6, 3))
    torch.testing.assert_close(out.reward.double(), want, rtol=1e-5, atol=1e-6)
    plain = FORMULATION_REGISTRY["info_gain"](_readouts("info_gain"))
    assert (plain.reward - out.reward).abs().max() > 1e-3


def test_info_gain_sequence_reads_the_given_logliks():
    r = _readouts("info_gain", answer_readout="sequence")
    g = torch.Generator().manual_seed(9)
    r.answer_loglik = -torch.rand(len(r.index.rows), generator=g) * 5
    r.prior_loglik = -torch.rand(6, generator=g) * 5
    r.answer_first = torch.tensor([5, 5, 5, -1, -1, -1])   # question 1: no answer tokens
    out = FORMULATION_REGISTRY["info_gain"](r)
    want = info_gain_rewards(r.answer_loglik, r.prior_loglik, r.index, (6, 3))
    torch.testing.assert_close(out.reward[:3], want[:3].float())
    assert not out.reward[3:].any()


def test_answer_logliks_match_a_plain_forward():
    """The whole answer's teacher-forced log-likelihood after each episode's probe equals log-softmax
    of the model's own logits on prefix + probe + answer (tiny random Llama, answers of 1-3 tokens)."""
    from gccpo.probes import answer_logliks
    from tests.trainer.test_trainer import tiny_model, tiny_tokenizer

    model = tiny_model(tiny_tokenizer())
    g = torch.Generator().manual_seed(0)
    B, P, T = 3, 4, 6
    ids = torch.randint(3, 60, (B, P + T), generator=g)
    am = torch.ones(B, P + T, dtype=torch.long)
    am[0, :2] = 0                                             # a left-padded prompt
    index = EpisodeIndex(torch.tensor([0, 0, 1, 2, 2]), torch.tensor([0, 1, 0, 0, 1]), torch.tensor([1, 5, -1, 2, 4]))
    probe = [7, 8]
    answers = [[11, 12], [13], [14, 15, 16]]
    weight = model.get_output_embeddings().weight
    got = answer_logliks(model, ids, am, P, index, probe, answers, weight, None, batch_size=2, backend="torch")
    for j, (b, e) in enumerate(zip(index.rows.tolist(), index.ends.tolist())):
        prefix = ids[b, :P + e + 1][am[b, :P + e + 1] != 0].tolist()
        seq = torch.tensor([prefix + probe + answers[b]])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=seq).logits.double(), -1)[0]
        n = len(answers[b])
        want = sum(float(logp[len(seq[0]) - n - 1 + t, answers[b][t]]) for t in range(n))
        assert abs(float(got[j]) - want) < 1e-4, (j, float(got[j]), want)


@pytest.mark.parametrize("extra", [("--reward.formulation", "paper"), ("--reward.formulation", "mi_floor"),
                                   ("--reward.formulation", "info_gain", "--reward.robust", "true"),
                                   ("--reward.formulation", "info_gain", "--reward.answer_readout", "sequence")],
                         ids=["paper", "mi_floor", "info_gain-robust", "info_gain-sequence"])
def test_a_training_step_with_each_formulation(tmp_path, extra):
    import math

    from tests.trainer.test_trainer import make_trainer, tiny_config

    trainer = make_trainer(tiny_config(tmp_path, "--train.eval_before", "false", "--reward.readout", "probe", *extra))
    metrics = trainer.train_step()
    assert math.isfinite(metrics["loss"]) and math.isfinite(metrics["causal/episode_reward"])
    assert metrics["advantage/process_abs_mean"] > 0.0  # the process part moved the advantages
    name = extra[1]
    assert {"paper": "causal/norm_ratio", "mi_floor": "causal/mi_contribution"}.get(name, "causal/answer_logq") \
        in metrics


def test_sequence_readout_refuses_sharding():
    from gccpo.config import Config, ConfigError

    cfg = Config()
    cfg.reward.formulation, cfg.reward.answer_readout, cfg.model.sharding = "info_gain", "sequence", "fsdp"
    with pytest.raises(ConfigError, match="answer_readout sequence"):
        cfg.validate()
    with pytest.raises(ConfigError, match="reward.robust"):
        RewardConfig(formulation="info_gain", robust=True, answer_readout="sequence")
    with pytest.raises(ConfigError, match="reward.robust"):
        RewardConfig(formulation="info_gain", robust=True, perturbation="sibling")


def test_info_gain_has_no_length_bias_in_the_token_advantages():
    """Two completions of one question with the same outcome that raise log q(a*) by the same 1.0,
    one in one step and one in two: SPEC §6 with the gains as given (info_gain's options) gives both
    the same first-token advantage; standardizing the gains first (the default) would not."""
    import gccpo_kernels as gk
    from gccpo.shaping import advantage_options

    r = _readouts("info_gain")
    out = FORMULATION_REGISTRY["info_gain"](r)
    assert out.advantage_options == {"normalize_rewards": False}
    ids = torch.tensor([[0, 0, 0, 0], [0, 0, 1, 1]])
    rewards = torch.tensor([[1.0, 0.0], [0.5, 0.5]])
    kw = dict(eta=1.0, backend="reference")
    same = torch.tensor([1.0, 1.0])
    opts = {**advantage_options(RewardConfig(formulation="info_gain"), out), "surprise_weighting": False}
    adv = gk.token_advantages(same, torch.tensor([0, 0]), ids, rewards, None, torch.ones(2, 4), **kw, **opts)
    assert abs(float(adv[0, 0]) - float(adv[1, 0])) < 1e-9
    biased = gk.token_advantages(same, torch.tensor([0, 0]), ids, rewards, None, torch.ones(2, 4), **kw,
                                 surprise_weighting=False)
    assert float(biased[0, 0] - biased[1, 0]) > 1.0


def test_the_trainer_passes_the_formulation_options(tmp_path, monkeypatch):
    """A paper step calls token_advantages with the rewards as given, gamma 0 and no return
    normalization (the formulation's options over the config's), every call of the step."""
    import gccpo.trainer as trainer_module
    from tests.trainer.test_trainer import make_trainer, tiny_config

    seen = []
    real = trainer_module.gk.token_advantages

    def spy(*a, **k):
        seen.append({key: k.get(key) for key in ("normalize_rewards", "gamma", "normalize_returns")})
        return real(*a, **k)

    monkeypatch.setattr(trainer_module.gk, "token_advantages", spy)
    trainer = make_trainer(tiny_config(tmp_path, "--train.eval_before", "false", "--reward.formulation", "paper",
                                       "--reward.gamma", "0.9"))
    trainer.train_step()
    assert seen and all(s == {"normalize_rewards": False, "gamma": 0.0, "normalize_returns": False} for s in seen)


def test_answer_energy_share_refuses_a_span_of_the_whole_space():
    from gccpo.formulations import answer_energy_share

    g = torch.Generator().manual_seed(6)
    w = torch.randn(30, 4, generator=g)
    with pytest.raises(ValueError, match="span the whole"):
        answer_energy_share(torch.randn(3, 4, generator=g), w, torch.arange(8))  # 7 centered rows in 4 dims


def test_a_formulation_without_its_answer_vocabulary_is_refused_at_start(tmp_path):
    """paper on a task whose answers are not numbers (answer_tokens auto -> the full vocabulary):
    a one-line ConfigError when the trainer is built, not at the first step."""
    import json

    from gccpo.config import ConfigError
    from tests.trainer.test_trainer import make_trainer, tiny_config

    cfg = tiny_config(tmp_path, "--reward.formulation", "paper")
    words = tmp_path / "words.jsonl"
    words.write_text("".join(json.dumps({"question": f"q{i}", "answer": "yes" if i % 2 else "no"}) + "\n"
                             for i in range(20)))
    cfg.task.train_file = cfg.task.eval_file = cfg.task.ood_file = str(words)
    with pytest.raises(ConfigError, match="reads the answer vocabulary"):
        make_trainer(cfg)


def test_term_norm_auto_standardizes_paper_and_mi_floor_not_spec():
    assert [RewardConfig(formulation=f).terms_standardized for f in ("spec", "paper", "info_gain", "mi_floor")] == \
        [False, True, False, True]
    assert RewardConfig(formulation="spec", term_norm="group").terms_standardized
    assert not RewardConfig(formulation="paper", term_norm="none").terms_standardized
