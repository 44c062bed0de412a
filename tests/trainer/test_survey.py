"""gccpo-survey (gccpo/survey.py): entry parsing, the statistics by hand, exact numbers from scripted
completions, and end to end on the tiny random model (both prompt styles, ID and OOD, part reuse)."""

from __future__ import annotations

import json
import math
import re
import statistics
from pathlib import Path

import pytest
import torch

from gccpo import survey
from gccpo.config import ConfigError, load_config
from gccpo.rollout import Rollout, completion_mask
from gccpo.tasks import build_task
from tests.trainer.test_trainer import tiny_args, tiny_model, tiny_tokenizer

try:
    import tomllib  # Python >= 3.11
except ModuleNotFoundError:
    import tomli as tomllib


def _config(tmp_path: Path, *extra: str):
    return load_config(tiny_args(tmp_path / "data", "--train.progress", "false", *extra))


# ---- entries ---------------------------------------------------------------------------------------


def test_entries_parse_with_defaults_overrides_and_ood():
    plain, more, both, equations = survey.parse_tasks([
        'chain_sum,chain_sum:{"min_terms":4,"max_terms":5}',
        'basic_arithmetic:{"max_digits":3}:{"max_terms":6}', "simple_equations"])
    assert plain.params == {"min_terms": 2, "max_terms": 3, "min_digits": 1, "max_digits": 1}
    assert plain.ood_params is None
    assert more.params == {"min_terms": 4, "max_terms": 5, "min_digits": 1, "max_digits": 1}
    assert both.params["max_digits"] == 3 and both.params["operators"] == ["+", "-", "*"]
    assert both.ood_params == {"max_terms": 6}
    assert equations.name == "simple_equations"
    assert survey.split_entries('a:{"x":[1,2],"s":"p,q"}, b ,c') == ['a:{"x":[1,2],"s":"p,q"}', "b", "c"]
    defaults = survey.parse_tasks(survey.DEFAULT_TASKS)
    assert [c.name for c in defaults] == ["chain_sum", "chain_sum", "basic_arithmetic", "simple_equations",
                                          "leg_counting"]
    # the task gets the candidate's parameters, and the OOD overrides: the entry's, else --task.ood_params,
    # else the task's defaults
    config = load_config(["--task.ood_params", "{max_terms: 9}"])
    assert survey.task_config(config, both, 7).ood_params == {"max_terms": 6}
    assert survey.task_config(config, more, 7).ood_params == {"max_terms": 9}
    cfg = survey.task_config(load_config([]), more, 7)
    assert (cfg.name, cfg.params, cfg.eval_size, cfg.ood_eval_size) == ("chain_sum", more.params, 7, 7)
    assert cfg.ood_params == {"min_terms": 4, "max_terms": 5, "min_digits": 1, "max_digits": 2}


def test_default_candidates_have_out_of_distribution_ood_sets():
    config = load_config([])
    for candidate in survey.parse_tasks(survey.DEFAULT_TASKS):
        task = build_task(survey.task_config(config, candidate, 100))
        assert len(task.eval_set) == len(task.ood_set) == 100, candidate.entry
        overlap = survey.ood_overlap(task, 500)
        assert overlap["ood_in_id"] == overlap["ood_in_train"] == 0, (candidate.entry, overlap)
    # the default OOD overrides of chain_sum with 4-5 terms (1-2 digits) drew ID problems (48 of 100)
    # until the task builder excluded them (gccpo/tasks.py): none now, and none in training either
    widened = build_task(survey.task_config(config, survey.parse_candidate('chain_sum:{"min_terms":4,"max_terms":5}'),
                                            100))
    overlap = survey.ood_overlap(widened, 500)
    assert overlap["ood_in_id"] == overlap["ood_in_train"] == 0


@pytest.mark.parametrize("entry, message", [
    ('chain_sum:{"min_terms":4', "PARAMS must be a JSON object"),
    ("chain_sum:[4, 5]", "got list"),
    ('chain_sum:{"min_terms":4}x', "unexpected 'x'"),
    ('chain_sum:{}:{"a":', "OOD must be a JSON object"),
    ("chain sum", "task name of letters"),
    (":{}", "task name of letters"),
    ('jsonl:{"a":1}', "takes no parameters"),
])
def test_bad_entries_are_config_errors(entry, message):
    with pytest.raises(ConfigError, match=re.escape(message)) as info:
        survey.parse_tasks([entry])
    assert "\n" not in str(info.value) and entry in str(info.value)


def test_cli_errors_are_one_line_before_any_model_loads(monkeypatch, capsys, tmp_path):
    def no_model(*args, **kwargs):
        raise AssertionError("the model must not load for a bad option")

    monkeypatch.setattr("gccpo.models.load_model", no_model)
    cases = [["--tasks", 'chain_sum:{"min_terms":'], ["--tasks", "no_such_task", "--out", str(tmp_path)],
             ["--tasks", 'chain_sum:{"no_such_option":1}', "--out", str(tmp_path)], ["--n", "0"],
             ["--samples", "two"], ["--tasks"], ["--direct_prompt", "no placeholder"], ["--rollout.top_p", "2"]]
    for args in cases:
        assert survey.main(args) == 2, args
        err = capsys.readouterr().err
        assert err.startswith("gccpo-survey: error: ") and err.count("\n") == 1, (args, err)
    assert survey.main(["--tasks", "no_such_task", "--out", str(tmp_path)]) == 2
    assert "'no_such_task'" in capsys.readouterr().err
    assert not (tmp_path / "parts").exists()


def test_console_script_and_help(capsys):
    project = tomllib.loads((Path(__file__).resolve().parents[2] / "pyproject.toml").read_text())["project"]
    assert project["scripts"]["gccpo-survey"] == "gccpo.survey:main"
    assert survey.main(["--help"]) == 0
    assert "pass@S" in capsys.readouterr().out


# ---- statistics --------------------------------------------------------------------------------------


def test_summary_numbers_by_hand():
    # 6 problems x 2 samples: correct counts 2, 1, 1, 0, 2, 1
    correct = [1, 1, 1, 0, 0, 1, 0, 0, 1, 1, 0, 1]
    rows = {"correct": correct, "score": [float(c) for c in correct], "episodes": [1, 2, 3, 1, 0, 2] * 2,
            "length": [10, 20] * 6, "truncated": [0, 0, 1] * 4}
    s = survey.summarize_rows(rows, 2, sampled=True)
    acc = [1, 0.5, 0.5, 0, 1, 0.5]
    half = 2.571 * statistics.stdev(acc) / math.sqrt(6)  # t975 with 5 degrees of freedom
    assert s["per_problem"] == [2, 1, 1, 0, 2, 1]
    assert s["accuracy"] == pytest.approx(7 / 12)
    assert (s["ci_low"], s["ci_high"]) == pytest.approx((7 / 12 - half, 7 / 12 + half))
    assert s["pass_at"] == pytest.approx(5 / 6)
    assert s["pass_ci_low"] < 5 / 6 < s["pass_ci_high"]
    assert (s["episodes_mean"], s["multi_episode_frac"]) == pytest.approx((1.5, 0.5))
    assert (s["length_mean"], s["truncated_frac"], s["n_problems"], s["completions"]) == (15, 1 / 3, 6, 12)
    g = survey.summarize_rows({k: v[:4] for k, v in rows.items()}, 1, sampled=False)
    assert g["accuracy"] == 0.75 and "pass_at" not in g
    assert (g["ci_low"], g["ci_high"]) == pytest.approx((0.3006, 0.9544), abs=1e-3)  # Wilson, 3 of 4
    low = survey.summarize_rows({k: v[:4] for k, v in rows.items()} | {"correct": [0, 0, 0, 1]}, 2, sampled=True)
    assert low["ci_low"] == 0.0 and low["ci_high"] <= 1.0  # the t-interval is clipped to [0, 1]
    with pytest.raises(ValueError):
        survey.summarize_rows({k: v[:3] for k, v in rows.items()}, 2, sampled=True)


def test_episode_splitter_is_the_trainers(tmp_path):
    from gccpo.trainer import Trainer

    config = _config(tmp_path, "--episodes.delimiter", "regex", "--episodes.pattern", ";",
                     "--episodes.max_episodes", "5")
    tok = tiny_tokenizer()
    trainer = Trainer(config, model=tiny_model(tok), tokenizer=tok)
    assert survey.episode_config(config) == trainer.episode_config
    assert survey.episode_config(config).max_episodes == 5


# ---- scripted completions: exact numbers ------------------------------------------------------------


def _rollout(tokenizer, prompts, num_generations, rows, max_new_tokens):
    """A Rollout of the given completions: (text, ends with EOS) per row, cut to the length cap."""
    eos = tokenizer.eos_token_id
    ids = []
    for text, ends in rows:
        tokens = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids.append(tokens[:max_new_tokens - 1] + [eos] if ends else tokens[:max_new_tokens])
    width = max(len(r) for r in ids)
    comp = torch.tensor([r + [tokenizer.pad_token_id] * (width - len(r)) for r in ids])
    mask = completion_mask(comp, [eos], torch.tensor([len(r) for r in ids]))
    enc = tokenizer(list(prompts), return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False)
    return Rollout(enc["input_ids"].repeat_interleave(num_generations, 0),
                   enc["attention_mask"].repeat_interleave(num_generations, 0).bool(), comp, mask,
                   torch.zeros(comp.shape), torch.arange(len(prompts)).repeat_interleave(num_generations))


def _scripted_generate(calls: list[dict]):
    """A stand-in for gccpo.rollout.generate that answers from a script: greedy right on the first
    two problems; samples: problem 0 both right, problem 1 the first right, problem 2 none; the
    direct style always wrong. Right answers are two sentences + EOS, wrong ones one line, no EOS."""

    def fake(model, tokenizer, prompts, *, num_generations=1, greedy=False, max_new_tokens=64, **kwargs):
        calls.append({"prompts": list(prompts), "greedy": greedy, "G": num_generations,
                      "max_new_tokens": max_new_tokens, **kwargs})
        rows = []
        for i, prompt in enumerate(prompts):
            a, b = map(int, re.search(r"(\d)\+(\d)", prompt).groups())
            for j in range(num_generations):
                right = "Give only" not in prompt and (i < 2 if greedy else (i == 0 or (i == 1 and j == 0)))
                rows.append((f"First add.\nAnswer: {a + b}", True) if right else (f"Answer: {a + b + 1}", False))
        return _rollout(tokenizer, prompts, num_generations, rows, max_new_tokens)

    return fake


def test_scripted_completions_give_the_exact_numbers(tmp_path, monkeypatch):
    calls: list[dict] = []
    monkeypatch.setattr(survey, "generate", _scripted_generate(calls))
    config = _config(tmp_path, "--episodes.delimiter", "sentence", "--rollout.eval_batch_size", "5")
    tok = tiny_tokenizer()
    report = survey.run(survey.parse_tasks(["jsonl"]), tmp_path / "out", config, n=3, samples=2,
                        max_new_tokens=40, model=tiny_model(tok), tokenizer=tok)
    parts = {(p["style"], p["split"]): p for p in report["parts"]}
    assert set(parts) == {("step", "id"), ("direct", "id"), ("step", "ood")}
    step, direct = parts["step", "id"], parts["direct", "id"]
    assert step["greedy"]["rows"]["correct"] == [1, 1, 0]
    assert step["greedy"]["accuracy"] == pytest.approx(2 / 3)
    assert step["sampled"]["per_problem"] == [2, 1, 0]
    assert step["sampled"]["accuracy"] == pytest.approx(0.5)
    assert step["sampled"]["pass_at"] == pytest.approx(2 / 3)
    # right: "First add." + "\nAnswer: n" + EOS = 2 episodes; wrong: 1 episode, cut by the length cap
    assert step["sampled"]["rows"]["episodes"] == [2, 2, 2, 1, 1, 1]
    assert step["sampled"]["rows"]["truncated"] == [0, 0, 0, 1, 1, 1]
    assert (step["sampled"]["episodes_mean"], step["sampled"]["multi_episode_frac"]) == pytest.approx((1.5, 0.5))
    assert step["sampled"]["truncated_frac"] == pytest.approx(0.5)
    right = len("First add.\nAnswer: 11") + 1  # a character tokenizer, + EOS
    assert step["sampled"]["rows"]["length"][0] in (right, right - 1)  # one-digit sums are one shorter
    assert direct["greedy"]["accuracy"] == 0 and direct["sampled"]["pass_at"] == 0
    assert direct["sampled"]["faults"]["unparsable"] == 0
    (pair,) = report["step_vs_direct"]
    assert pair["greedy"]["mean"] == pytest.approx(2 / 3) and pair["sampled"]["mean"] == pytest.approx(0.5)
    assert pair["in_target_band"] is False and pair["ood_step_sampled_accuracy"] == pytest.approx(0.5)
    # every part: one greedy and one sampled call, batched by rollout.eval_batch_size, at the rollout's sampling
    assert [(c["greedy"], c["G"], c["batch_size"], c["max_new_tokens"]) for c in calls] == \
        [(True, 1, 5, 40), (False, 2, 5, 40)] * 3
    assert all(c["temperature"] == config.rollout.temperature and c["top_p"] == config.rollout.top_p
               for c in calls)
    assert all("Q " in p for c in calls[:2] + calls[4:] for p in c["prompts"])
    assert all("Give only the final answer" in p for c in calls[2:4] for p in c["prompts"])
    table = (tmp_path / "out" / "survey.md").read_text()
    assert "| jsonl | - | step | id | 3 | 66.7 [" in table and "| 50.0 [" in table
    assert "+66.7 [" in table


# ---- the tiny model, end to end ---------------------------------------------------------------------


def test_end_to_end_on_the_tiny_model_and_resume(tmp_path, monkeypatch):
    config = _config(tmp_path, "--episodes.delimiter", "sentence", "--rollout.eval_batch_size", "4")
    tok = tiny_tokenizer()
    out = tmp_path / "out"
    report = survey.run(survey.parse_tasks(["jsonl"]), out, config, n=3, samples=2, model=tiny_model(tok),
                        tokenizer=tok)
    files = sorted((out / "parts").glob("*.json"))
    assert len(files) == 3 and not list((out / "parts").glob("*.tmp"))
    assert {f.name.rsplit("-", 1)[0] for f in files} == {"jsonl-step-id", "jsonl-direct-id", "jsonl-step-ood"}
    saved = json.loads((out / "survey.json").read_text())
    assert saved == json.loads(json.dumps(report))
    prompts = {p["style"]: p["prompt"] for p in saved["parts"]}
    assert prompts == {"step": "Q {question}", "direct": survey.DIRECT_PROMPT}
    for part in saved["parts"]:
        g, s = part["greedy"], part["sampled"]
        assert g["n_problems"] == s["n_problems"] == 3 and s["completions"] == 6
        for numbers in (g, s):
            assert 0 <= numbers["ci_low"] <= numbers["accuracy"] <= numbers["ci_high"] <= 1
            assert 0 <= numbers["multi_episode_frac"] <= 1 and 0 <= numbers["truncated_frac"] <= 1
            rows = numbers["rows"]
            assert all(1 <= n <= config.episodes.max_episodes for n, length in zip(rows["episodes"], rows["length"])
                       if length > 0)
            assert all(0 <= length <= config.rollout.max_new_tokens for length in rows["length"])
            # no EOS means the length cap was reached
            assert all(length == config.rollout.max_new_tokens for length, t in zip(rows["length"], rows["truncated"])
                       if t)
        assert s["accuracy"] <= s["pass_at"] and s["pass_ci_low"] <= s["pass_at"] <= s["pass_ci_high"]
        assert s["accuracy"] == pytest.approx(sum(s["rows"]["correct"]) / 6)
        assert len(part["examples"]) == 3
    table = (out / "survey.md").read_text()
    assert table.count("\n| jsonl |") == 4  # three parts + one step-vs-direct row
    # a second call reuses every part: generation must not run
    monkeypatch.setattr(survey, "generate", lambda *a, **k: pytest.fail("a part was measured again"))
    again = survey.run(survey.parse_tasks(["jsonl"]), out, config, n=3, samples=2, model=None, tokenizer=None)
    assert json.loads(json.dumps(again)) == saved
    # a changed setting is a new part, measured afresh
    calls: list[dict] = []
    monkeypatch.setattr(survey, "generate", _scripted_generate(calls))
    survey.run(survey.parse_tasks(["jsonl"]), out, config, n=3, samples=1, model=tiny_model(tok), tokenizer=tok)
    assert len(calls) == 6 and len(list((out / "parts").glob("*.json"))) == 6


def test_a_reasoning_gym_candidate_with_its_ood_split(tmp_path, monkeypatch):
    entry = 'chain_sum:{"min_terms":4,"max_terms":5}'
    task = build_task(survey.task_config(_config(tmp_path), survey.parse_candidate(entry), 3))
    answers = {p.question: p.answer for p in task.eval_set + task.ood_set}
    # reasoning-gym items are a function of seed + index: the OOD stream (seed + 2, 1-2 digits) repeats ID
    # items (seed + 1, 1 digit) shifted by one wherever it draws 1-digit numbers; the task builder skips them
    assert not {p.question for p in task.ood_set} & {q.question for q in task.eval_set}

    def fake(model, tokenizer, prompts, *, num_generations=1, max_new_tokens=64, **kwargs):
        rows = [(f"Answer: {answers[q]}", True) for prompt in prompts for q in answers if q in prompt
                for _ in range(num_generations)]
        assert len(rows) == len(prompts) * num_generations
        return _rollout(tokenizer, prompts, num_generations, rows, max_new_tokens)

    monkeypatch.setattr(survey, "generate", fake)
    tok = tiny_tokenizer()
    report = survey.run(survey.parse_tasks([entry]), tmp_path / "out", _config(tmp_path), n=3, samples=2,
                        max_new_tokens=40, model=tiny_model(tok), tokenizer=tok)
    assert [(p["style"], p["split"]) for p in report["parts"]] == list(survey.PARTS)
    ood = report["parts"][2]
    assert ood["ood_params"] == {"min_terms": 4, "max_terms": 5, "min_digits": 1, "max_digits": 2}
    assert {e["question"] for e in ood["examples"]} == {p.question for p in task.ood_set}
    for part in report["parts"]:  # the verifier is reasoning-gym's own
        assert part["greedy"]["accuracy"] == 1 and part["sampled"]["accuracy"] == 1
        assert part["sampled"]["pass_at"] == 1 and part["sampled"]["truncated_frac"] == 0
    table = (tmp_path / "out" / "survey.md").read_text()
    assert '| chain_sum | {"min_terms":4,"max_terms":5,"min_digits":1,"max_digits":1} | step | id | 3 |' in table
    assert '| ood {"min_terms":4,"max_terms":5,"min_digits":1,"max_digits":2} | step | ood |' in table
    assert "| 100.0 [" in table and "| no |" in table  # 100 % is outside the 10-40 % band
    assert report["ood_overlap"][entry] == {"ood_in_id": 0.0, "ood_in_train": 0.0,
                                            "train_checked": survey.TRAIN_CHECKED}
    assert f"- `{entry}`:" not in table  # no overlap to list
