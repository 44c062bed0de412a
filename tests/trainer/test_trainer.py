"""The trainer end to end on a tiny random Llama with a character-level tokenizer (no downloads)."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from gccpo.config import Config, load_config  # noqa: E402
from gccpo.rollout import Rollout  # noqa: E402
from gccpo.tasks import Problem, build_task  # noqa: E402
from gccpo.trainer import Trainer, wilson_interval  # noqa: E402

CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def tiny_tokenizer():
    """A character-level fast tokenizer (printable ASCII + newline) with chat special tokens."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<pad>", "<|im_start|>", "<|im_end|>"]
    chars = ["\n"] + [chr(c) for c in range(32, 127)]
    vocab = {t: i for i, t in enumerate(specials + chars)}
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tk.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", pad_token="<pad>",
                                  eos_token="<|im_end|>", additional_special_tokens=["<|im_start|>"])
    tok.chat_template = CHAT_TEMPLATE
    return tok


def tiny_model(tok, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=False, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                      bos_token_id=None)
    model = LlamaForCausalLM(cfg)
    model.config._attn_implementation = "sdpa"
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    return model


def write_jsonl(path, n: int, seed: int = 0) -> None:
    import random

    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            a, b = rng.randint(0, 9), rng.randint(0, 9)
            f.write(json.dumps({"question": f"{a}+{b}", "answer": str(a + b)}) + "\n")


def tiny_config(tmp_path, *extra: str) -> Config:
    return load_config(tiny_args(tmp_path, *extra))


def tiny_args(tmp_path, *extra: str) -> list[str]:
    """The tiny run's command line (writes its JSONL data under ``tmp_path``); later options in
    ``extra`` override earlier ones."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    write_jsonl(tmp_path / "train.jsonl", 40)
    write_jsonl(tmp_path / "eval.jsonl", 6, seed=1)
    args = ["--task.name", "jsonl", "--task.train_file", str(tmp_path / "train.jsonl"),
            "--task.eval_file", str(tmp_path / "eval.jsonl"), "--task.ood_file", str(tmp_path / "eval.jsonl"),
            "--task.eval_size", "4", "--task.ood_eval_size", "3", "--task.prompt", "Q {question}",
            "--rollout.questions_per_step", "2", "--rollout.num_generations", "4",
            "--rollout.max_new_tokens", "12", "--rollout.eval_max_new_tokens", "8",
            "--episodes.delimiter", "tokens", "--episodes.tokens_per_episode", "4",
            "--optim.lr", "1e-3", "--optim.grad_accum", "2", "--train.steps", "2",
            "--train.backend", "torch", "--train.progress", "false", "--train.plots", "true",
            "--train.output_dir", str(tmp_path / "run"), "--reward.probe_text", "\nA:",
            # the tiny random model never answers right: the default outcome gate would zero every
            # process advantage, so these tests run SPEC §6 as written (the gate has its own tests)
            "--reward.process_gate", "none", *extra]
    return args


def make_trainer(config: Config) -> Trainer:
    tok = tiny_tokenizer()
    return Trainer(config, model=tiny_model(tok), tokenizer=tok)


def _comparable(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if not k.startswith("perf/")}


def test_end_to_end_two_steps(tmp_path):
    trainer = make_trainer(tiny_config(tmp_path))
    summary = trainer.train()
    run = tmp_path / "run"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "reward/outcome" in r]
    evals = [r for r in rows if "eval/id_accuracy" in r]
    assert [r["step"] for r in steps] == [1, 2]
    assert [r["step"] for r in evals] == [0, 2]
    for r in steps:
        for key in ("loss", "causal/robustness", "causal/effectiveness", "episodes/mean", "policy/entropy",
                    "policy/clip_frac_region", "optim/grad_norm", "perf/tokens_per_s"):
            assert math.isfinite(r[key]), key
        assert r["episodes/mean"] > 1  # 12 tokens in episodes of 4
        assert r["causal/robustness"] <= 0
        # the trainer's old_logp (kernel on hidden states) equals generate's sampling log-probs
        assert r["check/old_vs_sampling_logp"] < 1e-4
    assert evals[-1]["eval/id_n"] == 4 and evals[-1]["eval/ood_n"] == 3
    assert summary["steps"] == 2 and (run / "plots.png").exists() and (run / "summary.json").exists()
    # the checkpoint is an ordinary Hugging Face checkpoint
    loaded = transformers.AutoModelForCausalLM.from_pretrained(run / "checkpoint-2")
    for (name, p), q in zip(trainer.model.named_parameters(), loaded.parameters()):
        assert torch.equal(p.detach(), q.detach()), name


def test_training_changes_the_policy(tmp_path):
    trainer = make_trainer(tiny_config(tmp_path, "--train.eval_before", "false"))
    before = copy.deepcopy(trainer.model.state_dict())
    trainer.train_step()
    changed = [k for k, v in trainer.model.state_dict().items() if not torch.equal(v, before[k])]
    assert changed, "one step with non-zero advantages must update the weights"


@pytest.mark.parametrize("gate", ["signal", "outcome"])
def test_outcome_gate_leaves_groups_without_outcome_signal_alone(tmp_path, gate):
    """With reward.process_gate signal / outcome and every completion wrong (no outcome signal in
    any group), the causal reward is still computed and logged but no advantage is non-zero, so
    the step leaves the weights as they were (test_training_changes_the_policy: with the gate off
    the same step moves them)."""
    trainer = make_trainer(tiny_config(tmp_path, "--train.eval_before", "false", "--reward.process_gate",
                                       gate, "--optim.weight_decay", "0"))
    before = copy.deepcopy(trainer.model.state_dict())
    metrics = trainer.train_step()
    assert metrics["reward/groups_with_signal"] == 0 and metrics["advantage/process_groups"] == 0
    assert metrics["advantage/abs_mean"] == 0 and metrics["advantage/process_abs_mean"] == 0
    assert math.isfinite(metrics["causal/effectiveness"])
    assert all(torch.equal(v, before[k]) for k, v in trainer.model.state_dict().items())


@pytest.mark.parametrize("beta", ["0", "0.04"])
def test_resume_gives_identical_next_step(tmp_path, beta):
    """Resume continues exactly, also with a frozen reference model (beta > 0: it is reloaded from
    the checkpoint's ``reference/``, which holds no tokenizer)."""
    opts = ("--train.eval_before", "false", "--loss.beta", beta)
    straight = make_trainer(tiny_config(tmp_path / "a", *opts))
    straight.train_step()
    expected = straight.train_step()

    first = make_trainer(tiny_config(tmp_path / "b", *opts, "--train.steps", "1"))
    first.train()
    resumed = Trainer(tiny_config(tmp_path / "b", *opts, "--resume", str(tmp_path / "b" / "run")))
    assert resumed.step == 1 and (resumed.ref_model is not None) == (beta != "0")
    got = resumed.train_step()
    assert _comparable(got) == pytest.approx(_comparable(expected), rel=1e-5, abs=1e-6)


def _fixed_batch(trainer: Trainer) -> tuple[list[Problem], Rollout, torch.Tensor]:
    tok = trainer.tokenizer
    problems = [Problem("1+2", "3"), Problem("4+4", "8")]
    prompts = [trainer.task.prompt_text(p, tok) for p in problems]
    enc = tok(prompts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False)
    texts = ["1+2=3\nA: 3", "5", "Answer: 3", "x\n\ny 9", "8", "Answer: 7", "4+4=8\nAnswer: 8", "?"]
    comp = [tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for t in texts]
    T = max(map(len, comp))
    ids = torch.full((8, T), tok.pad_token_id)
    mask = torch.zeros(8, T, dtype=torch.bool)
    for i, c in enumerate(comp):
        ids[i, :len(c)] = torch.tensor(c)
        mask[i, :len(c)] = True
    rollout = Rollout(enc["input_ids"].repeat_interleave(4, 0), enc["attention_mask"].repeat_interleave(4, 0).bool(),
                      ids, mask, None, torch.arange(2).repeat_interleave(4))
    rewards = torch.tensor([trainer.task.score(t, problems[i // 4]) for i, t in enumerate(texts)])
    return problems, rollout, rewards


@pytest.mark.parametrize("grad_accum,share_prompt", [(1, True), (3, True), (3, False)])
def test_grpo_mode_equals_hand_computed_step(tmp_path, grad_accum, share_prompt):
    config = tiny_config(tmp_path, "--algo", "grpo", "--optim.grad_accum", str(grad_accum),
                         "--optim.max_grad_norm", "0.05", "--rollout.temperature", "0.7",
                         "--train.share_prompt", str(share_prompt).lower())
    assert config.reward.eta == 0 and not config.causal
    trainer = make_trainer(config)
    problems, rollout, rewards = _fixed_batch(trainer)
    # with shared prompts whole groups stay together; without, rows are sorted by length (the
    # short ones no longer padded to the longest): both splits must give the same step
    contiguous = [rows.tolist() == list(range(int(rows[0]), int(rows[0]) + len(rows)))
                  for rows, _ in trainer._micro_batches_of(rollout)]
    assert all(contiguous) == share_prompt
    assert 0 < rewards.sum() < 8
    hand_model = copy.deepcopy(trainer.model)
    lr = 0.5
    trainer.optimizer = torch.optim.SGD(trainer.model.parameters(), lr=lr)
    trainer.scheduler = torch.optim.lr_scheduler.LambdaLR(trainer.optimizer, lambda s: 1.0)
    metrics = trainer.train_on(problems, rollout)

    # by hand: full logits from the HF model, GRPO advantage, PPO-clip token-mean loss, clip, SGD
    r = rewards.view(2, 4)
    adv = ((r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + 1e-4)).reshape(8, 1)
    P = rollout.prompt_ids.shape[1]
    am = rollout.attention_mask
    logits = hand_model(input_ids=rollout.input_ids, attention_mask=am,
                        position_ids=(am.cumsum(1) - 1).clamp_min(0)).logits[:, P - 1:-1].float()
    logp = torch.log_softmax(logits / 0.7, -1).gather(-1, rollout.completion_ids.unsqueeze(-1)).squeeze(-1)
    ratio = torch.exp(logp - logp.detach())
    per_token = -torch.minimum(ratio * adv, ratio.clamp(0.8, 1.2) * adv)
    m = rollout.completion_mask.float()
    loss = (per_token * m).sum() / m.sum()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(hand_model.parameters(), 0.05)
    with torch.no_grad():
        for p in hand_model.parameters():
            p -= lr * p.grad
    assert metrics["loss"] == pytest.approx(float(loss.detach()), abs=1e-6)
    for (name, a), b in zip(trainer.model.named_parameters(), hand_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    assert "causal/robustness" not in metrics


def test_wilson_interval():
    lo, hi = wilson_interval(40, 200)  # 0.2 with n = 200: the textbook Wilson interval
    assert (lo, hi) == pytest.approx((0.15045, 0.26086), abs=1e-4)
    assert wilson_interval(0, 10)[0] == pytest.approx(0.0, abs=1e-12)
    assert wilson_interval(10, 10)[1] == pytest.approx(1.0, abs=1e-12)


def test_jsonl_task_holds_out_eval(tmp_path):
    config = tiny_config(tmp_path)
    task = build_task(config.task)
    held = {p.question for p in task.eval_set}
    assert all(p.question not in held for p in task.next_problems(30))


def _rollout_with_lengths(lengths, prompts=2, P=5, T=12):
    B = len(lengths)
    prompt_ids = torch.arange(prompts).repeat_interleave(B // prompts).unsqueeze(1).expand(B, P).contiguous()
    mask = torch.arange(T).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)
    return Rollout(prompt_ids, torch.ones(B, P, dtype=torch.bool), torch.randint(4, 50, (B, T)), mask, None,
                   torch.arange(prompts).repeat_interleave(B // prompts))


def test_micro_batches_group_short_completions_when_cheaper():
    from gccpo.trainer import _micro_batches

    # two prompts x 4 rows, one long completion in each group: sorted by length, the short rows
    # are no longer padded to 12 (estimated tokens: 2*5 + 4*1 + 2*5 + 4*12 = 72 against the
    # contiguous split's 2 * (5 + 4*12) = 106)
    r = _rollout_with_lengths([1, 1, 1, 12, 2, 1, 1, 12])
    plan = _micro_batches(r, 2)
    assert [sorted(rows.tolist()) for rows, _ in plan] == [[0, 1, 2, 5], [3, 4, 6, 7]]
    assert [w for _, w in plan] == [1, 12]
    # equal lengths: whole groups stay together (each prompt encoded once)
    plan = _micro_batches(_rollout_with_lengths([5] * 8), 2)
    assert [rows.tolist() for rows, _ in plan] == [[0, 1, 2, 3], [4, 5, 6, 7]] and [w for _, w in plan] == [5, 5]
    # every row exactly once, whatever the split; no rows, no micro-batches
    plan = _micro_batches(_rollout_with_lengths([3, 0, 7, 1, 2, 9]), 4)
    assert sorted(torch.cat([rows for rows, _ in plan]).tolist()) == list(range(6))
    assert all(w == int(_rollout_with_lengths([3, 0, 7, 1, 2, 9]).completion_mask[rows].sum(1).max())
               for rows, w in plan)
    assert _micro_batches(_rollout_with_lengths([]), 2) == []


def test_summary_pairs_before_and_after_per_problem(tmp_path):
    from gccpo.stats import normal_interval
    from gccpo.trainer import format_summary

    trainer = make_trainer(tiny_config(tmp_path))
    before, after = [1, 0, 0, 0, 1, 0, 0, 0], [1, 1, 1, 0, 1, 0, 1, 0]
    trainer.step = 3
    trainer.eval_correct = {0: {"id": before}, 3: {"id": after}}
    ci = lambda k: {"eval/id_accuracy": k / 8, "eval/id_ci_low": 0.0, "eval/id_ci_high": 1.0, "eval/id_n": 8}
    trainer.evals = [{"step": 0, **ci(2)}, {"step": 3, **ci(5)}]
    summary = trainer.summary()
    d = [1.0 if a > b else 0.0 for a, b in zip(after, before)]   # 3 of 8 problems newly solved
    mean, sd = sum(d) / 8, (sum((x - 3 / 8) ** 2 for x in d) / 7) ** 0.5
    change = summary["change"]["id"]
    assert change["mean"] == pytest.approx(3 / 8)
    assert change["ci_low"] == pytest.approx(mean - 1.96 * sd / 8 ** 0.5)
    assert change == normal_interval(8, 3.0, 3.0)
    assert "+0.375 [" in format_summary(summary)
    assert "ood" not in summary["change"]
