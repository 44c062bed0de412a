"""Config defaults, YAML loading and command-line overrides."""

from __future__ import annotations

import pytest

from gccpo.config import Config, format_config, load_config, parse_overrides


def test_defaults():
    c = load_config([])
    assert c.algo == "gccpo" and c.causal and c.reward.eta == 0.25 and c.reward.process_gate == "outcome"
    assert (c.reward.w_rob, c.reward.w_eff, c.reward.readout, c.reward.probe_text) == (0.9, 0.8, "probe", "\nAnswer:")
    assert c.model.name == "smollm2" and c.task.name == "chain_sum" and c.task.eval_size >= 200


def test_overrides_are_typed():
    c = load_config(["--reward.w_rob", "0.5", "--optim.lr=1e-4", "--rollout.num_generations", "4",
                     "--task.params", "{min_terms: 3, max_terms: 4}", "--loss.eps_high", "null",
                     "--train.progress", "false", "--reward.sigma", "1", "--model.name", "some/model"])
    assert c.reward.w_rob == 0.5 and c.optim.lr == 1e-4 and isinstance(c.reward.sigma, float)
    assert c.rollout.num_generations == 4 and c.task.params == {"min_terms": 3, "max_terms": 4}
    assert c.loss.eps_high is None and c.train.progress is False and c.model.name == "some/model"


def test_text_options_are_kept_verbatim():
    c = load_config(["--reward.probe_text", "\nFinal: 1", "--task.prompt", "{question} -- 42"])
    assert c.reward.probe_text == "\nFinal: 1" and c.task.prompt == "{question} -- 42"


@pytest.mark.parametrize("args,match", [
    (["--reward.nope", "1"], "reward has"),
    (["--nosection.key", "1"], "unknown option"),
    (["--rollout.num_generations", "two"], "expects int"),
    (["--optim.grad_accum", "1.5"], "expects int"),
    (["--reward.readout", "middle"], "readout"),
    (["--algo", "ppo"], "algo"),
    (["--rollout.decoder", "fast"], "rollout.decoder"),
    (["--rollout.eval_batch_size", "0"], "eval_batch_size"),
    (["--reward.process_bound", "-0.5"], "process_bound"),
    (["positional"], "unexpected argument"),
])
def test_bad_options_fail_early(args, match):
    with pytest.raises(ValueError, match=match):
        load_config(args)


def test_yaml_then_command_line(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("algo: gccpo\nreward:\n  w_rob: 0.25\n  sigma: 0.1\noptim:\n  lr: 3.0e-6\n")
    c = load_config(["--config", str(path), "--reward.sigma", "0.2"])
    assert c.reward.w_rob == 0.25 and c.reward.sigma == 0.2 and c.optim.lr == 3e-6
    # a written config loads back to the same values
    out = tmp_path / "back.yaml"
    out.write_text(format_config(c))
    assert load_config(["--config", str(out)]).to_dict() == c.to_dict()


def test_grpo_is_gccpo_without_the_causal_reward(tmp_path):
    c = load_config(["--algo", "grpo"])
    assert c.reward.eta == 0.0 and not c.causal
    path = tmp_path / "g.yaml"
    path.write_text("reward:\n  eta: 2.0\n")
    assert load_config(["--config", str(path), "--algo", "grpo"]).reward.eta == 0.0
    with pytest.raises(ValueError, match="eta"):
        load_config(["--algo", "grpo", "--reward.eta", "0.5"])
    assert not load_config(["--reward.eta", "0"]).causal


def test_parse_overrides_flags():
    path, pairs = parse_overrides(["--config", "x.yaml", "--train.plots", "--resume", "runs/a"])
    assert path == "x.yaml" and pairs == [("train.plots", True), ("train.resume", "runs/a")]
    assert isinstance(Config().to_dict()["reward"], dict)
