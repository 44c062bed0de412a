"""Outcome and causal rewards on real rollouts of a tiny random model (no downloads)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from gccpo.config import RewardConfig  # noqa: E402
from gccpo.episodes import EpisodeConfig, split_episodes  # noqa: E402
from gccpo.prefix import encode_prompts  # noqa: E402
from gccpo.probes import EpisodeIndex, boundary_latents, packed_probe_forward, probe_latents  # noqa: E402
from gccpo.rewards import (answer_token_ids, bound_process, causal_reward, gate_by_outcome,  # noqa: E402
                           scale_process_by_outcome)
from gccpo.rollout import generate  # noqa: E402
from gccpo.tensors import position_ids  # noqa: E402
from tests.trainer.test_trainer import tiny_model, tiny_tokenizer  # noqa: E402


@pytest.fixture(scope="module")
def setup():
    tok = tiny_tokenizer()
    model = tiny_model(tok).eval()
    prompts = [tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
               for q in ("1+2", "33+4", "9")]
    torch.manual_seed(0)
    rollout = generate(model, tok, prompts, num_generations=3, max_new_tokens=14, temperature=1.0)
    episodes = split_episodes(rollout.completion_ids, rollout.completion_mask, tok,
                              EpisodeConfig(delimiter="tokens", tokens_per_episode=4))
    return tok, model, rollout, episodes


def test_rollout_shapes_and_sampling_logp(setup):
    tok, model, rollout, _ = setup
    B, T = rollout.completion_ids.shape
    assert B == 9 and rollout.group_index.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert rollout.sampling_logp.shape == (B, T)
    # the recorded sampling log-probs are the model's own log-softmax at the sampled tokens
    am = rollout.attention_mask
    P = rollout.prompt_ids.shape[1]
    with torch.no_grad():
        logits = model(input_ids=rollout.input_ids, attention_mask=am, position_ids=position_ids(am)).logits
    ref = torch.log_softmax(logits[:, P - 1:-1].float(), -1).gather(-1, rollout.completion_ids.unsqueeze(-1))[..., 0]
    m = rollout.completion_mask
    torch.testing.assert_close(rollout.sampling_logp[m], ref[m], rtol=1e-4, atol=1e-4)


def test_top_p_recorded_logp_is_renormalized(setup):
    tok, model, _, _ = setup
    prompt = tok.apply_chat_template([{"role": "user", "content": "5"}], tokenize=False, add_generation_prompt=True)
    r = generate(model, tok, [prompt], num_generations=4, max_new_tokens=6, top_p=0.3)
    m = r.completion_mask
    am, P = r.attention_mask, r.prompt_ids.shape[1]
    with torch.no_grad():
        logits = model(input_ids=r.input_ids, attention_mask=am, position_ids=position_ids(am)).logits
    full = torch.log_softmax(logits[:, P - 1:-1].float(), -1).gather(-1, r.completion_ids.unsqueeze(-1))[..., 0]
    # top-p renormalizes over the nucleus: the sampled token's log-prob rises (the random tiny model
    # is nearly uniform, so a 0.3 nucleus drops most of the vocabulary)
    assert torch.all(r.sampling_logp[m] <= 0)
    assert torch.all(r.sampling_logp[m] > full[m] + 0.5)


@pytest.mark.parametrize("share_prompt", [False, True])
def test_packed_probe_forward_equals_one_sequence_per_probe(setup, share_prompt):
    tok, model, rollout, episodes = setup
    probe = tok("\nAnswer:", add_special_tokens=False)["input_ids"]
    index = EpisodeIndex.of(episodes)
    assert index.rows.numel() > rollout.completion_ids.shape[0]  # several episodes per completion
    P = rollout.prompt_ids.shape[1]
    separate = probe_latents(model, rollout.input_ids, rollout.attention_mask, P, index, probe, batch_size=5)
    hidden, probe_hidden = packed_probe_forward(model, rollout.input_ids, rollout.attention_mask, P,
                                                episodes.episode_ends, probe, share_prompt=share_prompt)
    if share_prompt:  # the shared-prompt path really runs here (each prompt has 3 rows)
        assert encode_prompts(model.model, rollout.prompt_ids, rollout.prompt_mask) is not None
    torch.testing.assert_close(probe_hidden[index.rows, index.ks], separate, rtol=1e-4, atol=1e-4)
    # prompt + completion hidden states are those of a plain forward (probes are invisible to them)
    am = rollout.attention_mask
    with torch.no_grad():
        plain = model.model(input_ids=rollout.input_ids, attention_mask=am, position_ids=position_ids(am)).last_hidden_state
    keep = am.bool()
    torch.testing.assert_close(hidden[keep], plain[keep], rtol=1e-4, atol=1e-4)
    # one probe by hand: prefix (unpadded) + probe, last position
    b, e = int(index.rows[3]), int(index.ends[3])
    seq = torch.cat([rollout.input_ids[b, :P + e + 1][am[b, :P + e + 1].bool()], torch.tensor(probe)])
    with torch.no_grad():
        direct = model.model(input_ids=seq[None]).last_hidden_state[0, -1]
    torch.testing.assert_close(separate[3], direct, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("readout,effectiveness,perturbation",
                         [("probe", "answer", "gaussian"), ("boundary", "latent", "sibling")])
def test_causal_reward_finite_and_shaped(setup, readout, effectiveness, perturbation):
    tok, model, rollout, episodes = setup
    cfg = RewardConfig(readout=readout, effectiveness=effectiveness, perturbation=perturbation)
    index = EpisodeIndex.of(episodes)
    P = rollout.prompt_ids.shape[1]
    if readout == "probe":
        latents = probe_latents(model, rollout.input_ids, rollout.attention_mask, P, index,
                                tok("\nAnswer:", add_special_tokens=False)["input_ids"])
    else:
        am = rollout.attention_mask
        with torch.no_grad():
            hidden = model.model(input_ids=rollout.input_ids, attention_mask=am,
                                 position_ids=position_ids(am)).last_hidden_state
        latents = boundary_latents(hidden, P, index)
    B, K = rollout.completion_ids.shape[0], episodes.num_episodes
    head = model.get_output_embeddings()
    out = causal_reward(latents, index, rollout.group_index, (B, K), head.weight, None, cfg,
                        answer_ids=answer_token_ids(tok), generator=torch.Generator().manual_seed(0),
                        backend="torch")
    for t in (out.robustness, out.effectiveness, out.reward):
        assert t.shape == (B, K) and torch.isfinite(t).all()
    valid = episodes.episode_ends >= 0
    assert torch.equal(out.valid, valid)
    assert (out.robustness[valid] < 0).all() and (out.robustness[~valid] == 0).all()
    assert (out.effectiveness[valid] >= 0).all()
    torch.testing.assert_close(out.reward, (0.9 * out.robustness + 0.8 * out.effectiveness) * valid)
    assert set(out.metrics()) >= {"causal/robustness", "causal/effectiveness", "causal/episode_reward"}


def test_answer_token_ids_are_digits_and_minus():
    tok = tiny_tokenizer()
    ids = answer_token_ids(tok)
    assert sorted(tok.decode([i]) for i in ids.tolist()) == sorted(list("0123456789-"))
    assert answer_token_ids(tok, "full") is None


def test_gate_by_outcome_zeroes_groups_without_outcome_signal():
    """Groups (in any row order) whose outcome rewards are all equal get all-zero episode rewards,
    so token_advantages gives them no process advantage; the others keep theirs untouched."""
    import gccpo_kernels as gk

    group = torch.tensor([0, 1, 0, 2, 1, 2, 3])
    outcome = torch.tensor([1.0, 0.0, 0.0, 0.5, 0.0, 0.5, 1.0])   # groups 1, 2, 3 have no signal
    ep = torch.arange(14, dtype=torch.float32).view(7, 2) + 1
    gated = gate_by_outcome(ep, outcome, group)
    keep = torch.tensor([True, False, True, False, False, False, False])
    assert torch.equal(gated[keep], ep[keep]) and bool((gated[~keep] == 0).all())
    assert gate_by_outcome(ep[:0], outcome[:0], group[:0]).shape == (0, 2)
    ids = torch.tensor([[0, 0, 1, 1]] * 7)
    mask = torch.ones(7, 4, dtype=torch.bool)
    adv = gk.token_advantages(outcome, group, ids, gated, None, mask, eta=1.0, surprise_weighting=False,
                              backend="torch")
    grpo = gk.token_advantages(outcome, group, ids, gated, None, mask, eta=0.0, surprise_weighting=False,
                               backend="torch")
    assert bool((adv[~keep] == 0).all()) and not torch.equal(adv[keep], grpo[keep])


def test_process_advantage_scaled_by_the_outcome_advantage():
    """A = A_out + |A_out| (A_eta - A_out): zero process part where A_out = 0, the outcome's sign
    kept while eta |omega R^| < 1, and the process part's ordering within a row kept."""
    a_out = torch.tensor([[1.5, 1.5, 1.5], [-0.5, -0.5, -0.5], [0.0, 0.0, 0.0]])
    proc = torch.tensor([[0.4, -0.4, 0.2], [0.6, -0.6, 0.0], [0.9, -0.9, 0.3]])
    got = scale_process_by_outcome(a_out + proc, a_out)
    torch.testing.assert_close(got, a_out + a_out.abs() * proc)
    assert torch.equal(got[2], torch.zeros(3))
    assert bool((got[:2].sign() == a_out[:2].sign()).all())
    assert got[0, 0] > got[0, 2] > got[0, 1] and got[1, 0] > got[1, 2] > got[1, 1]


def test_bounded_process_part_never_flips_the_outcome_sign():
    """With a bound < 1 the outcome gate keeps every token on its completion's side, even where the
    surprise weight makes eta * omega * R^ larger than 1; bound 0 changes nothing."""
    a_out = torch.tensor([[1.5, 1.5, 1.5], [-0.5, -0.5, -0.5], [0.0, 0.0, 0.0]])
    proc = torch.tensor([[-2.5, 0.3, 0.1], [1.7, -0.2, 0.7], [3.0, -3.0, 0.0]])
    unbounded = scale_process_by_outcome(a_out + proc, a_out)
    assert bool((unbounded[:2].sign() != a_out[:2].sign()).any())          # flips without a bound
    got = scale_process_by_outcome(bound_process(a_out + proc, a_out, 0.5), a_out)
    torch.testing.assert_close(got, a_out + a_out.abs() * proc.clamp(-0.5, 0.5))
    assert bool((got[:2].sign() == a_out[:2].sign()).all())
    assert torch.equal(got[2], torch.zeros(3))
    assert torch.equal(bound_process(a_out + proc, a_out, 0.0), a_out + proc)


# ---- the readout reads the answer (issue 19) -------------------------------------------------------

class _CharTokenizer:
    """A tokenizer that writes " 12" as one token (space included), unlike SmolLM2."""

    def __init__(self):
        self.vocab = ["\n", "Answer", ":", " 7", " 12", "7", "x", " "]

    def __call__(self, text, add_special_tokens=False):
        ids, i = [], 0
        while i < len(text):
            for j, tok in sorted(enumerate(self.vocab), key=lambda p: -len(p[1])):
                if text.startswith(tok, i):
                    ids.append(j)
                    i += len(tok)
                    break
            else:
                raise ValueError(text[i:])
        return {"input_ids": ids}

    def decode(self, ids, **kw):
        return "".join(self.vocab[i] for i in ids)


def test_aligned_probe_stops_before_the_answer_token():
    from gccpo.probes import aligned_probe_ids

    tok = _CharTokenizer()
    assert aligned_probe_ids(tok, "\nAnswer:") == [0, 1, 2]      # " 7" carries the space
    # "x" has no space-carrying token: the space is its own token and belongs to the probe
    assert aligned_probe_ids(tok, "\nAnswer:", "x") == [0, 1, 2, 7]
    assert aligned_probe_ids(tok, "\nAnswer: ", "x") == [0, 1, 2, 7]
    with pytest.raises(ValueError, match="no token"):
        aligned_probe_ids(tok, "")


@pytest.fixture(scope="module")
def smollm2_model():
    from tests.trainer.test_episodes import _smollm2_gguf

    path, why = _smollm2_gguf()
    if path is None:
        pytest.skip(why)
    from gccpo.config import ModelConfig
    from gccpo.models import load_model

    model, tokenizer = load_model(ModelConfig(), torch.device("cpu"))
    return model.eval(), tokenizer


def test_aligned_probe_reads_the_answer_on_smollm2(smollm2_model):
    """On the embedded default (step 0), the aligned probe puts >= 0.5 of the next-token mass on
    the answer vocabulary; the probe text's own tokens ("...Answer:") put almost all of it on the
    space SmolLM2 writes before a number."""
    from gccpo.config import RewardConfig, TaskConfig
    from gccpo.probes import backbone_of, probe_token_ids
    from gccpo.rewards import answer_mass, answer_token_ids
    from gccpo.models import logit_params

    model, tok = smollm2_model
    prompt = TaskConfig().prompt
    steps = [("4 + 7 - 3 = ?", "4 + 7 = 11\n\n11 - 3 = 8."), ("12 + 5 = ?", "12 + 5 = 17."),
             ("9 - 4 + 6 = ?", "9 - 4 = 5\n\n5 + 6 = 11.")]
    answers = answer_token_ids(tok, "digits")
    scale, cap = logit_params(model.config)
    masses = {}
    for align in (True, False):
        probe = probe_token_ids(tok, RewardConfig(align_probe=align))
        latents = []
        for question, so_far in steps:
            chat = tok.apply_chat_template([{"role": "user", "content": prompt.format(question=question)}],
                                           tokenize=False, add_generation_prompt=True)
            ids = tok(chat + so_far, add_special_tokens=False)["input_ids"] + probe
            with torch.no_grad():
                hidden = backbone_of(model)(input_ids=torch.tensor([ids])).last_hidden_state
            latents.append(hidden[0, -1])
        mass = answer_mass(torch.stack(latents), model.lm_head.weight, None, answers,
                           logit_scale=scale, softcap=cap)
        masses[align] = mass
    assert float(masses[True].min()) >= 0.5, masses
    assert float(masses[False].max()) < 0.1, masses


@pytest.mark.parametrize("softcap", [None, 5.0])
def test_answer_mass_equals_the_softmax_share_float64(softcap):
    from gccpo.rewards import answer_mass

    g = torch.Generator().manual_seed(0)
    h = torch.randn(6, 16, generator=g, dtype=torch.float64)
    w = torch.randn(300, 16, generator=g, dtype=torch.float64)
    b = torch.randn(300, generator=g, dtype=torch.float64)
    ids = torch.tensor([3, 17, 42, 299])
    z = (h @ w.T + b) * 1.3 / 0.7
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    want = torch.softmax(z, -1)[:, ids].sum(1)
    got = answer_mass(h, w, b, ids, temperature=0.7, logit_scale=1.3, softcap=softcap)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-7)  # the [R, A] part in float32


# ---- one shaping path (issue 19): the trainer and the TRL integration agree -------------------------

def _formulation_output(name: str, group_index, rewards, K: int, gen):
    """The registered formulation ``name`` on random readouts of a [B, K] batch (every row K episodes)."""
    from gccpo.config import RewardConfig
    from gccpo.formulations import FORMULATION_REGISTRY, Readouts
    from gccpo.probes import EpisodeIndex

    B, d = group_index.shape[0], 8
    rows = torch.arange(B).repeat_interleave(K)
    ks = torch.arange(K).repeat(B)
    w = torch.randn(40, d, generator=gen)
    r = Readouts(torch.randn(B * K, d, generator=gen), EpisodeIndex(rows, ks, ks), group_index, (B, K), w, None,
                 RewardConfig(formulation=name), answer_ids=torch.tensor([3, 5, 9, 12]), backend="torch",
                 generator=torch.Generator().manual_seed(1), outcome=rewards,
                 prior_latents=torch.randn(B, d, generator=gen), answer_first=torch.full((B,), 5))
    return FORMULATION_REGISTRY[name](r)


@pytest.mark.parametrize("formulation", ["spec", "paper", "info_gain", "mi_floor"])
@pytest.mark.parametrize("gate", ["outcome", "signal", "none"])
@pytest.mark.parametrize("bound", [0.0, 0.5])
def test_trainer_and_trl_shape_advantages_alike(gate, bound, formulation):
    """The trainer's advantages (token_advantages with eta and the formulation's options, through
    gccpo.shaping) equal the TRL integration's (TRL's per-sequence outcome advantage + its
    process-only advantages, through the same shaping) for every gate, bound and formulation;
    each gate and the bound change something."""
    import gccpo_kernels as gk
    from gccpo.config import FORMULATIONS, RewardConfig
    from gccpo.integrations.trl import trl_process_advantages, trl_token_advantages
    from gccpo.shaping import advantage_options, gate_episodes, shape_advantages

    assert formulation in FORMULATIONS
    g = torch.Generator().manual_seed(3)
    B, T, K, G = 12, 10, 3, 4
    group_index = torch.arange(B) // G
    rewards = torch.randint(0, 2, (B,), generator=g).float()
    rewards[:G] = 1.0                                           # a group without signal
    episode_ids = torch.arange(T).mul(K).div(T, rounding_mode="floor").repeat(B, 1)  # K episodes per row
    mask = torch.ones(B, T)
    mask[:, -2:] = 0
    old_logp = -torch.rand(B, T, generator=g) * 3
    causal = _formulation_output(formulation, group_index, rewards, K, g)
    cfg = RewardConfig(eta=0.7, process_gate=gate, process_bound=bound, formulation=formulation)
    kw = dict(backend="torch", **advantage_options(cfg, causal))
    ep = gate_episodes(causal.reward, rewards, group_index, cfg)

    trainer = shape_advantages(lambda eta: gk.token_advantages(rewards, group_index, episode_ids, ep, old_logp,
                                                               mask, eta=eta, **kw), cfg.eta, cfg).total
    outcome = gk.token_advantages(rewards, group_index, episode_ids, ep, old_logp, mask, eta=0.0, **kw)[:, 0]
    process = trl_process_advantages(causal, outcome, group_index, episode_ids, old_logp, mask, cfg, "torch")
    trl = trl_token_advantages(outcome, process, mask, cfg)
    torch.testing.assert_close(trl * mask, trainer * mask, rtol=1e-5, atol=1e-6)
    assert float(((trainer - outcome[:, None]) * mask).abs().max()) > 1e-3   # a process part exists
    if gate != "none":  # the group without signal gets no process push under either gate
        torch.testing.assert_close(trainer[:G] * mask[:G], outcome[:G, None].expand(G, T) * mask[:G])
    if bound:
        assert float(((trainer - outcome[:, None]) * mask).abs().max()) <= bound * (
            1 if gate != "outcome" else float(outcome.abs().max())) + 1e-6
