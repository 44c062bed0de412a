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


#: (arguments, the option the error must name): every option is type- and range-checked
BAD_OPTIONS = [
    (["--optim.max_grad_norm", "-1"], "optim.max_grad_norm"),
    (["--optim.lr", "0"], "optim.lr"),
    (["--optim.betas", "[1.5, 0.9]"], "optim.betas"),
    (["--optim.weight_decay", "-0.1"], "optim.weight_decay"),
    (["--rollout.max_new_tokens", "0"], "rollout.max_new_tokens"),
    (["--rollout.temperature", "inf"], "rollout.temperature"),
    (["--reward.num_perturbations", "0"], "reward.num_perturbations"),
    (["--reward.sigma", "-1"], "reward.sigma"),
    (["--reward.eta", "nan"], "reward.eta"),
    (["--train.backend", "foo"], "train.backend"),
    (["--train.steps", "-1"], "train.steps"),
    (["--task.eval_size", "-1"], "task.eval_size"),
    (["--model.autocast", "foo"], "model.autocast"),
    (["--model.device", "gpu"], "model.device"),
    (["--episodes.delimiter", "regex", "--episodes.pattern", "("], "episodes.pattern"),
    (["--loss.eps_low", "2"], "loss.eps_low"),
    (["--task.name", "jsonl"], "task.train_file"),
]


@pytest.mark.parametrize("args,name", BAD_OPTIONS)
def test_every_option_is_range_checked_with_its_name(args, name):
    from gccpo.config import ConfigError

    with pytest.raises(ConfigError, match=name.replace(".", r"\.")):
        load_config(args)


def test_given_options_are_recorded(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("optim:\n  lr: 1.0e-4\n")
    c = load_config(["--config", str(path), "--train.seed", "3"])
    assert c.given == {"optim.lr", "train.seed"} and c.is_given("optim.lr") and not c.is_given("optim.betas")
    assert Config().is_given("optim.betas")  # built in code: every value counts as given


def test_resume_config_applies_given_and_keeps_saved_values():
    from gccpo.config import ConfigError, resume_config

    saved = load_config(["--optim.lr", "1e-3", "--optim.weight_decay", "0.05", "--train.seed", "4"]).to_dict()
    c = load_config(["--optim.lr", "5e-4"])
    assert resume_config(c, saved, "ckpt") == ["optim.lr 0.001 -> 0.0005"]
    assert c.optim.lr == 5e-4 and c.optim.weight_decay == 0.05 and c.train.seed == 4
    with pytest.raises(ConfigError, match="train.seed 5 cannot change on resume"):
        resume_config(load_config(["--train.seed", "5"]), saved, "ckpt")


def test_resume_keeps_every_option_not_given_again():
    """A resume without repeating --algo, loss.* or reward.* continues the run as configured; a
    value given again wins; the run location is never taken from the checkpoint; betas given as
    the same numbers in another container are no override."""
    from gccpo.config import resume_config

    saved = load_config(["--algo", "grpo", "--loss.beta", "0.04", "--task.eval_size", "50",
                         "--train.steps", "7", "--optim.betas", "[0.8, 0.9]"]).to_dict()
    saved["train"]["output_dir"] = "/somewhere/else"
    saved["optim"]["betas"] = (0.8, 0.9)  # a tuple, as a restored state may hold it
    c = load_config(["--train.steps", "9", "--optim.betas", "[0.8, 0.9]"])
    notes = resume_config(c, saved, "ckpt")
    assert notes == []
    assert c.algo == "grpo" and c.loss.beta == 0.04 and c.task.eval_size == 50
    assert c.train.steps == 9 and c.train.output_dir != "/somewhere/else"


def test_resume_of_a_checkpoint_without_a_new_option_keeps_its_old_behaviour():
    """reward.term_norm came with a new default (auto); a checkpoint saved before it ran with raw
    terms, so resuming it keeps them unless the option is given again."""
    from gccpo.config import resume_config

    saved = load_config([]).to_dict()
    del saved["reward"]["term_norm"]
    c = load_config([])
    resume_config(c, saved, "ckpt")
    assert c.reward.term_norm == "none"
    c = load_config(["--reward.term_norm", "group"])
    resume_config(c, saved, "ckpt")
    assert c.reward.term_norm == "group"
    c = load_config([])
    resume_config(c, load_config(["--reward.term_norm", "group"]).to_dict(), "ckpt")  # a new one: its own value
    assert c.reward.term_norm == "group"


def test_resume_of_a_checkpoint_missing_fixed_or_applied_options():
    """A checkpoint written before an option existed resumes (it was a KeyError for fixed and
    applied options): the option keeps this run's value."""
    from gccpo.config import RESUME_APPLIED, RESUME_FIXED, resume_config

    saved = load_config([]).to_dict()
    for dotted in [next(iter(RESUME_FIXED)), next(iter(RESUME_APPLIED))]:
        section, key = dotted.split(".")
        del saved[section][key]
    c = load_config([])
    assert resume_config(c, saved, "ckpt") == []
