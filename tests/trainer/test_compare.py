"""gccpo-compare (gccpo/compare.py): the statistics by hand, and a 2-arm x 2-seed comparison end to
end on the tiny random model (1 step per run)."""

from __future__ import annotations

import json
import math

import pytest

from gccpo.compare import ARMS, main, mean_se, paired, paired_problems, t975

pytest.importorskip("transformers")


def test_statistics_by_hand():
    m, se = mean_se([0.2, 0.3, 0.4])
    assert m == pytest.approx(0.3) and se == pytest.approx(0.1 / math.sqrt(3))
    p = paired([0.5, 0.6, 0.7], [0.4, 0.4, 0.4])  # differences 0.1, 0.2, 0.3
    assert p["mean"] == pytest.approx(0.2)
    assert p["half_width"] == pytest.approx(4.303 * 0.1 / math.sqrt(3))
    assert p["ci_low"] < 0.2 < p["ci_high"]
    assert math.isnan(paired([0.5], [0.4])["half_width"])  # one seed: no seed-level interval
    assert t975(1) == pytest.approx(12.706) and t975(1000) == pytest.approx(1.96, abs=0.01)
    q = paired_problems([[1, 0, 1, 1], [1, 1, 0, 1]], [[0, 0, 1, 1], [1, 0, 0, 1]])
    assert q["mean"] == pytest.approx((0.5 + 0.5 + 0 + 0) / 4) and q["n_problems"] == 4


def test_bad_arguments_fail_before_loading(capsys):
    assert main(["--arms", "grpo,nope"]) == 2
    assert "unknown arms" in capsys.readouterr().err
    assert main(["--seeds", "x"]) == 2
    assert main(["--reward.nope", "1"]) == 2
    assert set(ARMS) >= {"grpo", "gccpo", "rob_only", "eff_only", "js", "sibling"}


def test_two_arms_two_seeds_end_to_end(tmp_path):
    from gccpo.compare import run
    from tests.trainer.test_trainer import tiny_args, tiny_model, tiny_tokenizer

    shared = tiny_args(tmp_path / "data", "--rollout.num_generations", "2", "--rollout.max_new_tokens", "6",
                       "--rollout.eval_max_new_tokens", "4", "--episodes.tokens_per_episode", "3",
                       "--train.steps", "1", "--train.plots", "false")
    tok = tiny_tokenizer()
    out = tmp_path / "cmp"
    report = run(["grpo", "gccpo"], [0, 1], out, shared, model=tiny_model(tok), tokenizer=tok)
    for name in ("before.json", "compare.json", "compare.md", "compare.png"):
        assert (out / name).exists(), name
    assert report["before"]["id"]["n"] == 4 and report["before"]["ood"]["n"] == 3
    for arm in ("grpo", "gccpo"):
        for split in ("id", "ood"):
            assert len(report["after"][arm][split]["per_seed"]) == 2
        assert (out / f"{arm}-seed1" / "metrics.jsonl").exists()
        assert not list((out / f"{arm}-seed1").glob("checkpoint-*"))  # compare runs keep no checkpoints
    p = report["paired"]["gccpo"]["id"]
    per_seed = [report["after"]["gccpo"]["id"]["per_seed"][i] - report["after"]["grpo"]["id"]["per_seed"][i]
                for i in range(2)]
    assert p["seed_level"]["mean"] == pytest.approx(sum(per_seed) / 2)
    assert report["cost"]["gccpo"]["causal_kernels_share"] > 0 and report["cost"]["grpo"]["causal_kernels_share"] == 0
    # the same seed gives both arms the same questions: the first step's prompts agree
    rows = {a: json.loads((out / f"{a}-seed0" / "result.json").read_text())["history"][0] for a in ("grpo", "gccpo")}
    assert rows["grpo"]["step"] == rows["gccpo"]["step"] == 1
    # a second call reuses the finished runs (nothing retrained)
    stamp = (out / "grpo-seed0" / "result.json").stat().st_mtime
    again = run(["grpo", "gccpo"], [0, 1], out, shared, model=tiny_model(tok), tokenizer=tok)
    assert (out / "grpo-seed0" / "result.json").stat().st_mtime == stamp
    assert again["after"] == report["after"]


def test_every_arm_differs_from_gccpo_only_in_its_reward_option(tmp_path):
    from gccpo.compare import _run_config

    configs = {arm: _run_config([], arm, 3, tmp_path / arm).to_dict() for arm in ARMS}
    assert configs["grpo"]["reward"]["eta"] == 0 and configs["gccpo"]["reward"]["eta"] > 0
    expected = {"rob_only": {("w_eff", 0.0)}, "eff_only": {("w_rob", 0.0)}, "js": {("divergence", "js")},
                "sibling": {("perturbation", "sibling")}, "spec": {("formulation", "spec")},
                "info_gain": {("formulation", "info_gain")}, "mi_floor": {("formulation", "mi_floor")},
                "spec_group": {("formulation", "spec"), ("term_norm", "group")}}
    # paper is the default formulation (issue 21's registered rule, docs/RESULTS.md)
    assert configs["paper"] == {**configs["gccpo"], "train": configs["paper"]["train"]}
    for arm, changes in expected.items():
        cfg, base = configs[arm], configs["gccpo"]
        for key, value in changes:
            assert cfg["reward"][key] == value != base["reward"][key], (arm, key)
        diff = {(section, k) for section in cfg if isinstance(cfg[section], dict)
                for k in cfg[section] if cfg[section][k] != base[section][k]}
        assert diff == {("reward", k) for k, _ in changes} | {("train", "output_dir")}, arm
    for cfg in configs.values():  # the same seeds for every arm
        assert (cfg["train"]["seed"], cfg["reward"]["seed"]) == (3, 1237)
        assert not cfg["train"]["eval_before"] and not cfg["train"]["save_final"]


def test_diagnostics_by_hand():
    """The per-arm diagnostics and issue 21's collapse signs, on hand-made histories."""
    from gccpo.compare import diagnostics

    def run(norms, eff, trunc, acc_after):
        hist = [{"step": i + 1, "optim/grad_norm": n, "causal/effectiveness": e, "completion/truncated": trunc,
                 "episodes/mean": 2.0, "episodes/frac_multi": 0.5, "reward/accuracy": 0.25,
                 "causal/answer_mass": 0.9} for i, (n, e) in enumerate(zip(norms, eff))]
        return {"history": hist, "after": {"eval/id_accuracy": acc_after}}

    steps = 30
    results = {"grpo": {0: run([1.0] * steps, [0.0] * steps, 0.0, 0.3)},
               "bad": {0: run([2.0] * steps, [0.1] * 5 + [0.5] * 25, 0.2, 0.1)},
               "good": {0: run([0.5] * 15 + [1.5] * 15, [0.3] * steps, 0.0, 0.35)}}
    d = diagnostics(["grpo", "bad", "good"], [0], {"metrics": {"eval/id_accuracy": 0.2}}, results, clip_at=1.0)
    assert d["grpo"]["grad_norm_median"] == 1.0 and d["grpo"]["clipped_share"] == 0.0
    assert d["good"]["grad_norm_median"] == 1.0 and d["good"]["clipped_share"] == 0.5
    assert d["bad"]["grad_norm_ratio"] == 2.0 and d["bad"]["truncated_last10"] == pytest.approx(0.2)
    assert d["bad"]["effectiveness"] == [pytest.approx(0.1), pytest.approx(0.5)]
    assert len(d["bad"]["collapse"]) == 3 and d["good"]["collapse"] == [] == d["grpo"]["collapse"]
    assert d["good"]["answer_mass"] == {"1": 0.9, "15": 0.9, "30": 0.9}
