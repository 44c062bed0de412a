"""gccpo.integrations.trl against the real TRL package (GRPOTrainer itself, not a copy of its code).

Offline on the CPU: a tiny random Llama (hidden 32, 2 layers, vocab 64) and a character-level
tokenizer are built here and saved to a temporary directory (TRL builds its reference model from
the policy's path). For every TRL loss type the fused loss covers, with beta 0 and 0.04 (and a few
extra option sets), a real ``GRPOTrainer`` runs 2 optimizer steps (``num_generations=4``,
``num_iterations=2`` so that the second step is off-policy and clips, gradient accumulation 2);
every micro-batch it trains on is recorded with the parameters it saw, TRL's loss and TRL's
parameter gradients. ``GCCPOGRPOTrainer`` then computes its loss on the same inputs and
parameters: loss and every parameter gradient must agree within 1e-6 (relative to max(1, the
largest magnitude of the tensor); float32 models), and the
metrics TRL logs must agree. ``GCCPOGRPOTrainer`` also trains 2 optimizer steps itself.
"""

from __future__ import annotations

import copy
import importlib.util
import string
import warnings

import pytest
import torch

pytestmark = pytest.mark.skipif(importlib.util.find_spec("trl") is None,
                                reason="trl is not installed (pip install 'gccpo[peers]', trl >= 1.16)")

TOL = 1e-6  # on the loss and on every parameter gradient, relative to max(1, the tensor's largest |value|)
# The same with the compiled CPU row statistics (csrc/row_stats.c), whose log-sum-exp is float32's
# correctly rounded value where torch's ops (ours with GCCPO_NATIVE=0, and TRL's) round it on
# either side: 1 ulp apart in a log-prob, which a KL term far from its reference (exp(ref - logp)
# ~ 1e3 here) carries into the loss and the gradients at up to ~1e-6 of their largest entry
TOL_COMPILED = 2e-6


def _scaled_diff(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """max |ours - ref| / max(1, max |ref|): float32 round-off grows with the magnitude (a KL term
    far from the reference gives losses of ~1e3 and gradients of ~1e4 here)."""
    return float((ours.double() - ref.double()).abs().max()) / max(1.0, float(ref.double().abs().max()))
LOSS_TYPES = ["grpo", "bnpo", "dr_grpo", "dapo"]


def char_tokenizer():
    """A character-level fast tokenizer: one token per character, no merges, no download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2}
    for ch in string.ascii_lowercase + string.digits + " +-=?.\n":
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny random Llama + the character tokenizer, saved (TRL loads the reference model by path)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0,
                      eos_token_id=1, bos_token_id=None, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():  # make EOS likely (~13% a token) so that completions have different lengths
        h = model.model(input_ids=torch.randint(3, 46, (64, 12))).last_hidden_state.reshape(-1, 32)
        model.lm_head.weight[1] = 1.5 * h.mean(0) / h.mean(0).norm()
    path = tmp_path_factory.mktemp("tiny_llama")
    model.save_pretrained(path)
    char_tokenizer().save_pretrained(path)
    return str(path)


def reward_digits_and_length(completions, **kwargs):
    return [float(sum(ch.isdigit() for ch in c)) + 0.25 * len(c) for c in completions]


def _dataset():
    from datasets import Dataset

    return Dataset.from_dict({"prompt": ["1+2=", "ab c", "9-3=", "hello", "x?", "42"] * 4})


def _args(out_dir, loss_type, beta, **extra):
    from trl import GRPOConfig

    kw = dict(output_dir=str(out_dir), use_cpu=True, bf16=False, gradient_checkpointing=False, report_to="none",
              num_generations=4, num_iterations=2, per_device_train_batch_size=4, gradient_accumulation_steps=2,
              max_completion_length=8, max_steps=2, learning_rate=0.02, loss_type=loss_type, beta=beta,
              temperature=0.7, logging_steps=1, save_strategy="no", seed=0, disable_tqdm=True)
    kw.update(extra)
    return GRPOConfig(**kw)


def _trainer(cls, model_dir, args, **kw):
    from transformers import AutoTokenizer

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return cls(model=model_dir, reward_funcs=reward_digits_and_length, args=args, train_dataset=_dataset(),
                   processing_class=AutoTokenizer.from_pretrained(model_dir), **kw)


def _record_micro_batches(trainer) -> list[dict]:
    """Wrap the trainer's compute_loss: keep each micro-batch's inputs, the parameters it saw,
    the loss, the parameter gradients and the metrics logged during the call."""
    records = []
    original = trainer.compute_loss

    def compute_loss(model, inputs, return_outputs=False, num_items_in_batch=None):
        state = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
        before = {k: len(v) for k, v in trainer._metrics["train"].items()}
        loss = original(model, inputs, return_outputs, num_items_in_batch)
        params = [p for p in trainer.model.parameters() if p.requires_grad]
        grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True, materialize_grads=True)
        logged = {k: v[-1] for k, v in trainer._metrics["train"].items() if len(v) > before.get(k, 0)}
        records.append(dict(inputs={k: v.clone() if isinstance(v, torch.Tensor) else copy.deepcopy(v)
                                    for k, v in inputs.items()},
                            state=state, loss=loss.detach().clone(), grads=[g.clone() for g in grads],
                            accumulation=trainer.current_gradient_accumulation_steps, metrics=logged))
        return loss

    trainer.compute_loss = compute_loss
    return records


CASES = [(lt, beta, {}) for lt in LOSS_TYPES for beta in (0.0, 0.04)] + [
    ("dapo", 0.04, dict(entropy_coef=0.02, delta=1.5, epsilon_high=0.28, use_bias_correction_kl=False,
                        mask_truncated_completions=True)),
    ("grpo", 0.04, dict(importance_sampling_level="sequence", scale_rewards="batch", entropy_coef=0.01)),
    ("dr_grpo", 0.0, dict(epsilon=0.1, epsilon_high=0.3, temperature=1.3, steps_per_generation=4)),
    ("bnpo", 0.04, dict(importance_sampling_level="sequence", delta=2.0)),
    # cispo (issue 22): TRL's epsilon_high caps the weight itself; None -> epsilon = 0.2, below every ratio
    ("cispo", 0.0, dict(epsilon_high=1.02)),
    ("cispo", 0.04, dict(entropy_coef=0.02, delta=1.5)),
]
METRICS = ["entropy", "kl", "clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean",
           "clip_ratio/low_min", "clip_ratio/high_max", "cispo_clip_ratio", "policy_loss"]


@pytest.mark.parametrize("loss_type,beta,extra", CASES,
                         ids=[f"{c[0]}-beta{c[1]}{'-' + '-'.join(c[2]) if c[2] else ''}" for c in CASES])
def test_fused_loss_equals_trl_on_the_same_inputs(model_dir, tmp_path, monkeypatch, loss_type, beta, extra):
    from trl import GRPOTrainer

    import gccpo.integrations.trl as integration
    from gccpo.integrations.trl import GCCPOGRPOTrainer

    # 1. the real GRPOTrainer, 2 optimizer steps, recording what it trains on
    trl_trainer = _trainer(GRPOTrainer, model_dir, _args(tmp_path / "trl", loss_type, beta, **extra))
    records = _record_micro_batches(trl_trainer)
    trl_trainer.train()
    assert trl_trainer.state.global_step == 2
    spg = trl_trainer.args.steps_per_generation
    assert len(records) == 4 and all(r["accumulation"] == 2 for r in records)
    clip_key = "cispo_clip_ratio" if loss_type == "cispo" else "clip_ratio/region_mean"
    assert any(r["metrics"][clip_key] > 0 for r in records), "no clipping: the test lost its point"
    assert any(bool((r["inputs"]["completion_mask"] == 0).any()) for r in records), "completions all full length"

    # 2. GCCPOGRPOTrainer from the same GRPOConfig trains 2 optimizer steps on the fused path
    ours = _trainer(GCCPOGRPOTrainer, model_dir, _args(tmp_path / "ours", loss_type, beta, **extra))
    assert ours.gccpo_loss_path == "fused" and ours.gccpo_fallback_reason is None
    assert ours.args.steps_per_generation == spg
    calls = []
    fused = integration.fused_linear_policy_loss
    monkeypatch.setattr(integration, "fused_linear_policy_loss", lambda *a, **k: calls.append(1) or fused(*a, **k))
    ours.train()
    assert ours.state.global_step == 2 and len(calls) == 4
    first_trl, first_ours = trl_trainer.state.log_history[0], ours.state.log_history[0]
    for key in ("reward", "entropy", clip_key):  # same seed, same weights: the same first step
        assert first_ours[key] == pytest.approx(first_trl[key], rel=1e-5, abs=1e-6), key

    # 3. on every recorded micro-batch: our loss, gradients and metrics equal TRL's, with the
    # CPU pass's statistics from the torch ops and (where built) from the compiled kernel
    from gccpo_kernels import _native

    params = [p for p in ours.model.parameters() if p.requires_grad]
    modes = {"torch": TOL} | ({"compiled": TOL_COMPILED} if _native.available() else {})
    worst = {mode: [0.0, 0.0] for mode in modes}
    for rec in records:
        for mode in modes:
            monkeypatch.setenv(_native.ENV_VAR, "0" if mode == "torch" else "1")
            ours.model.load_state_dict(rec["state"])
            ours.model.train()
            ours.current_gradient_accumulation_steps = rec["accumulation"]
            before = {k: len(v) for k, v in ours._metrics["train"].items()}
            loss = ours.compute_loss(ours.model, rec["inputs"])
            grads = torch.autograd.grad(loss, params, allow_unused=True, materialize_grads=True)
            worst[mode][0] = max(worst[mode][0], _scaled_diff(loss.detach(), rec["loss"]))
            worst[mode][1] = max(worst[mode][1], max(_scaled_diff(g, t) for g, t in zip(grads, rec["grads"])))
            logged = {k: v[-1] for k, v in ours._metrics["train"].items() if len(v) > before.get(k, 0)}
            for key in METRICS:
                if key in rec["metrics"]:
                    assert key in logged, key
                    assert logged[key] == pytest.approx(rec["metrics"][key], rel=1e-5, abs=1e-6, nan_ok=True), key
    for mode, (worst_loss, worst_grad) in worst.items():
        print(f"{loss_type} beta={beta} {extra} [{mode} statistics]: max scaled |loss diff| "
              f"{worst_loss:.2e}, max scaled |grad diff| {worst_grad:.2e}")
        assert worst_loss <= modes[mode] and worst_grad <= modes[mode], (mode, worst_loss, worst_grad)


@pytest.mark.parametrize("option,value,reason", [
    ("loss_type", "sapo", "loss_type='sapo'"),
    ("loss_type", "luspo", "loss_type='luspo'"),
    ("loss_type", "vespo", "loss_type='vespo'"),
    ("off_policy_mask_threshold", 0.5, "off_policy_mask_threshold"),
    ("top_entropy_quantile", 0.5, "top_entropy_quantile"),
    ("use_adaptive_entropy", True, "use_adaptive_entropy"),
])
def test_unsupported_options_fail_or_fall_back_to_trl(model_dir, tmp_path, option, value, reason):
    from gccpo.integrations.trl import GCCPOGRPOTrainer

    extra = {option: value}
    loss_type = extra.pop("loss_type", "dapo")
    args = _args(tmp_path, loss_type, 0.0, **extra)
    with pytest.raises(ValueError, match=reason):
        _trainer(GCCPOGRPOTrainer, model_dir, args, gccpo_on_unsupported="error")
    with pytest.warns(UserWarning, match=reason):
        trainer = GCCPOGRPOTrainer(model=model_dir, reward_funcs=reward_digits_and_length, args=args,
                                   train_dataset=_dataset(), processing_class=char_tokenizer())
    assert trainer.gccpo_loss_path == "trl" and reason in trainer.gccpo_fallback_reason
    assert trainer.gccpo_loss_config is None


def test_trainer_option_errors(model_dir, tmp_path):
    from gccpo.integrations.trl import GCCPOGRPOTrainer

    with pytest.raises(ValueError, match="gccpo_on_unsupported"):
        _trainer(GCCPOGRPOTrainer, model_dir, _args(tmp_path, "dapo", 0.0), gccpo_on_unsupported="ignore")
    with pytest.raises(ValueError, match="gccpo_causal_reward=True"):
        _trainer(GCCPOGRPOTrainer, model_dir, _args(tmp_path, "dapo", 0.0), gccpo_reward=object())
    with pytest.raises(TypeError, match="RewardConfig"):
        _trainer(GCCPOGRPOTrainer, model_dir, _args(tmp_path, "dapo", 0.0), gccpo_causal_reward=True,
                 gccpo_reward=dict(eta=1.0))
    with pytest.raises(ValueError, match="delta"):  # TRL takes any delta; the loss needs a cap > 1
        _trainer(GCCPOGRPOTrainer, model_dir, _args(tmp_path, "dapo", 0.0, delta=0.5))
    from gccpo.config import RewardConfig

    for name in ("paper", "info_gain"):  # they read what TRL's batch does not carry
        with pytest.raises(ValueError, match="computes 'spec' and 'mi_floor'"):
            _trainer(GCCPOGRPOTrainer, model_dir, _args(tmp_path, "dapo", 0.0), gccpo_causal_reward=True,
                     gccpo_reward=RewardConfig(formulation=name))
    # without a RewardConfig the integration runs spec (the trainer's default, paper, is refused)
    trainer = _trainer(GCCPOGRPOTrainer, model_dir, _args(tmp_path, "dapo", 0.0), gccpo_causal_reward=True)
    assert trainer.gccpo_reward.formulation == "spec"


def test_drop_in_fused_lm_head_matches_trl(model_dir):
    """add_gccpo_fused_lm_head vs TRL's add_fused_lm_head on the same model and labels: log-probs,
    entropy, loss and parameter gradients, with temperature and padding."""
    from transformers import AutoModelForCausalLM
    from trl.trainer.utils import add_fused_lm_head

    from gccpo.integrations.trl import add_gccpo_fused_lm_head

    torch.manual_seed(1)
    ids = torch.randint(3, 46, (3, 10))
    attention = torch.ones_like(ids)
    attention[0, :3] = 0
    labels = ids.masked_fill(attention == 0, -100)
    labels[:, :4] = -100
    results = []
    for patch in (add_fused_lm_head, add_gccpo_fused_lm_head):
        model = AutoModelForCausalLM.from_pretrained(model_dir)
        patch(model, temperature=0.8, outputs=("log_probs", "entropy"))
        out = model(input_ids=ids, attention_mask=attention, labels=labels, fused_lm_head=True)
        objective = out.loss + 0.3 * out.entropy.sum()
        params = [p for p in model.parameters() if p.requires_grad]
        grads = torch.autograd.grad(objective, params, allow_unused=True, materialize_grads=True)
        results.append((out.log_probs.detach(), out.entropy.detach(), out.loss.detach(), grads))
        plain = model(input_ids=ids, attention_mask=attention)  # without fused_lm_head: the original forward
        assert plain.logits.shape == (3, 10, 64)
    (lp_t, ent_t, loss_t, g_t), (lp_o, ent_o, loss_o, g_o) = results
    torch.testing.assert_close(lp_o, lp_t, rtol=0, atol=2e-6)
    torch.testing.assert_close(ent_o, ent_t, rtol=0, atol=2e-6)
    torch.testing.assert_close(loss_o, loss_t, rtol=0, atol=1e-6)
    assert max(_scaled_diff(a, b) for a, b in zip(g_o, g_t)) <= TOL
    assert bool((lp_o[:, :3] == 0).all())  # labels -100: zero


def test_drop_in_rejects_unsupported_outputs(model_dir):
    from transformers import AutoModelForCausalLM

    from gccpo.integrations.trl import add_gccpo_fused_lm_head

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    with pytest.raises(ValueError, match="is_top1"):
        add_gccpo_fused_lm_head(model, outputs=("log_probs", "is_top1"))
    with pytest.raises(ValueError, match="temperature"):
        add_gccpo_fused_lm_head(model, temperature=0.0)
    add_gccpo_fused_lm_head(model)
    with pytest.raises(ValueError, match="labels"):
        model(input_ids=torch.ones(1, 4, dtype=torch.long), fused_lm_head=True)


@pytest.mark.parametrize("loss_type", ["dapo", "cispo"])
def test_trl_loss_on_gccpo_logprobs(model_dir, tmp_path, loss_type):
    """gccpo_fused_loss=False: TRL's own loss (any loss type) on this library's log-prob kernel."""
    from trl import GRPOTrainer

    from gccpo.integrations.trl import GCCPOGRPOTrainer

    args = _args(tmp_path / "trl", loss_type, 0.04)
    trl_trainer = _trainer(GRPOTrainer, model_dir, args)
    records = _record_micro_batches(trl_trainer)
    trl_trainer.train()
    ours = _trainer(GCCPOGRPOTrainer, model_dir, _args(tmp_path / "ours", loss_type, 0.04), gccpo_fused_loss=False)
    assert ours.gccpo_loss_path == "trl-loss-gccpo-logprobs"
    params = [p for p in ours.model.parameters() if p.requires_grad]
    for rec in records:
        ours.model.load_state_dict(rec["state"])
        ours.model.train()
        ours.current_gradient_accumulation_steps = rec["accumulation"]
        loss = ours.compute_loss(ours.model, rec["inputs"])
        grads = torch.autograd.grad(loss, params, allow_unused=True, materialize_grads=True)
        assert _scaled_diff(loss.detach(), rec["loss"]) <= TOL
        assert max(_scaled_diff(g, t) for g, t in zip(grads, rec["grads"])) <= TOL
    ours.train()
    assert ours.state.global_step == 2


def test_causal_reward_token_advantages(model_dir, tmp_path, monkeypatch):
    """gccpo_causal_reward=True: token-level advantages = TRL's outcome advantage + eta * process
    advantage; eta = 0 gives TRL's advantages exactly; both readouts train 2 optimizer steps."""
    from gccpo.config import RewardConfig
    from gccpo.episodes import EpisodeConfig
    from gccpo.integrations.trl import GCCPOGRPOTrainer

    episodes = EpisodeConfig(delimiter="tokens", tokens_per_episode=3)
    seen = {}
    spec = dict(formulation="spec")  # gccpo-train's default, paper, is refused here (see above)
    for name, reward in (("eta0", RewardConfig(eta=0.0, readout="boundary", **spec)),
                         ("probe", RewardConfig(eta=1.0, readout="probe", probe_text="=?", process_gate="none", **spec)),
                         ("boundary", RewardConfig(eta=1.0, readout="boundary", perturbation="sibling", **spec)),
                         ("mi_floor", RewardConfig(eta=1.0, readout="boundary", formulation="mi_floor",
                                                   mi_threshold=10.0, process_gate="none"))):
        trainer = _trainer(GCCPOGRPOTrainer, model_dir, _args(tmp_path / name, "grpo", 0.0),
                           gccpo_causal_reward=True, gccpo_reward=reward, gccpo_episodes=episodes)
        original = trainer._gccpo_token_advantages
        captured = []

        def capture(batch, _original=original, _captured=captured):
            outcome = batch["advantages"].clone()
            out = _original(batch)
            _captured.append((outcome, out, batch["completion_mask"].clone()))
            return out

        monkeypatch.setattr(trainer, "_gccpo_token_advantages", capture)
        trainer.train()
        assert trainer.state.global_step == 2 and captured
        outcome, token_adv, mask = captured[0]
        assert token_adv.shape == mask.shape
        assert bool((token_adv[mask == 0] == 0).all())
        if name == "eta0":
            expected = torch.where(mask != 0, outcome[:, None].expand_as(token_adv), 0.0)
            torch.testing.assert_close(token_adv, expected, rtol=0, atol=0)
        else:
            process = torch.where(mask != 0, token_adv - outcome[:, None], 0.0)
            assert float(process.abs().max()) > 1e-3  # the causal reward moved the advantages
            assert torch.isfinite(token_adv).all()
            logged = trainer.state.log_history[0]
            assert "gccpo/robustness" in logged and logged["gccpo/robustness"] <= 0
            if name == "mi_floor":  # the penalty below a floor no episode reaches, and its information share
                assert logged["gccpo/effectiveness"] < 0 and "gccpo/mi_contribution" in logged
            else:
                assert "gccpo/effectiveness" in logged and logged["gccpo/effectiveness"] >= 0
        seen[name] = token_adv
    assert not torch.equal(seen["probe"], seen["boundary"])
