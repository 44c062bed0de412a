"""Hostile input to the trainer and its CLI: every user error is one line with exit code 2 before
the model loads, and checkpoints are trusted only after checking (checksums, weights-only state,
fallback to the previous complete checkpoint, no leftovers after an interrupted save)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

import gccpo.trainer as trainer_module  # noqa: E402
from gccpo import cli  # noqa: E402
from gccpo.config import ConfigError, format_config  # noqa: E402
from gccpo.checkpoint import MANIFEST, CheckpointError, write_manifest  # noqa: E402
from gccpo.trainer import Trainer  # noqa: E402
from tests.trainer.test_config import BAD_OPTIONS  # noqa: E402
from tests.trainer.test_trainer import make_trainer, tiny_args, tiny_config  # noqa: E402

FAST = ("--train.eval_before", "false", "--train.plots", "false", "--task.eval_size", "1",
        "--task.ood_eval_size", "1")


def _saved_run(tmp: Path, steps: int, *extra: str) -> Path:
    """A run directory with ``checkpoint-1`` .. ``checkpoint-<steps>`` of the tiny model."""
    trainer = make_trainer(tiny_config(tmp, *FAST, *extra))
    for _ in range(steps):
        trainer._log(trainer.train_step())  # as Trainer.train does: the history is saved too
        trainer.save()
    return tmp / "run"


def _resume(tmp: Path, target: Path, *extra: str) -> Trainer:
    return Trainer(tiny_config(tmp, *FAST, *extra, "--resume", str(target)))


def _cli(capsys, args: list[str]) -> tuple[int, str]:
    capsys.readouterr()  # only what the CLI prints
    code = cli.main(args)
    return code, capsys.readouterr().err


def _assert_one_line(err: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gccpo-train: error: "), err
    assert "Traceback" not in err


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail the test if the CLI gets as far as loading a model."""
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the user error was reported")

    monkeypatch.setattr(trainer_module, "load_model", refuse)


# ---- item 1: resume never runs pickled code -------------------------------------------------------


class _Payload:
    """Unpickling this runs a shell command (what a hostile trainer_state.pt would hold)."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def test_trainer_state_is_plain_data_with_a_manifest(tmp_path):
    ckpt = _saved_run(tmp_path, 1) / "checkpoint-1"
    state = torch.load(ckpt / "trainer_state.pt", weights_only=True)  # no pickled code needed
    assert state["step"] == 1 and isinstance(state["config"], dict) and state["history"]
    files = {p.relative_to(ckpt).as_posix() for p in ckpt.rglob("*") if p.is_file()} - {MANIFEST}
    assert set(__import__("json").loads((ckpt / MANIFEST).read_text())) == files
    assert "model.safetensors" in files and "trainer_state.pt" in files


@pytest.mark.parametrize("manifest,target", [("stale", "checkpoint"), ("rewritten", "checkpoint"),
                                             ("rewritten", "run")])
def test_resume_from_a_tampered_checkpoint_runs_nothing(tmp_path, capsys, manifest, target):
    """A trainer_state.pt whose history holds an object that runs ``touch`` when unpickled: the
    resume is refused (checksum mismatch, or weights-only refusal when the manifest was rewritten
    to match) with exit code 2 and one line, and the command never runs."""
    run = _saved_run(tmp_path, 2)
    ckpt = run / "checkpoint-2"
    marker = tmp_path / "pwned"
    state = torch.load(ckpt / "trainer_state.pt", weights_only=True)
    state["history"].append({"loss": _Payload(f"touch {marker}")})
    torch.save(state, ckpt / "trainer_state.pt")
    if manifest == "rewritten":
        write_manifest(ckpt)
    code, err = _cli(capsys, tiny_args(tmp_path, *FAST, "--resume", str(ckpt if target == "checkpoint" else run)))
    assert not marker.exists()
    assert code == 2
    _assert_one_line(err)
    assert "checkpoint-2" in err
    assert ("checksum mismatch" if manifest == "stale" else "pickled code to load") in err


# ---- item 3: optimizer overrides on resume are applied, or refused ------------------------------------


def test_resume_applies_optimizer_overrides(tmp_path):
    run = _saved_run(tmp_path, 1, "--optim.weight_decay", "0.05", "--optim.warmup_steps", "3")
    resumed = _resume(tmp_path, run, "--optim.lr", "5e-4", "--optim.betas", "[0.8, 0.95]",
                      "--optim.max_grad_norm", "0.5")
    group = resumed.optimizer.param_groups[0]
    warm = 2 / 3  # warm-up of 3 steps, 1 done: (1 + 1) / 3
    assert group["lr"] == pytest.approx(5e-4 * warm) and resumed.scheduler.get_last_lr()[0] == group["lr"]
    assert group["betas"] == (0.8, 0.95)
    # not given on resume: the checkpoint's values, in the optimizer and in config.yaml alike
    assert group["weight_decay"] == 0.05 and resumed.config.optim.weight_decay == 0.05
    assert resumed.config.optim.warmup_steps == 3 and resumed.config.optim.max_grad_norm == 0.5
    assert "lr: 0.0005" in format_config(resumed.config)
    resumed.train_step()
    assert group["lr"] == pytest.approx(5e-4) and group["betas"] == (0.8, 0.95)
    again = _resume(tmp_path, run, "--optim.weight_decay", "0.1")
    assert again.optimizer.param_groups[0]["weight_decay"] == 0.1
    assert again.optimizer.param_groups[0]["lr"] == pytest.approx(1e-3 * warm)


def test_resume_refuses_options_it_cannot_apply(tmp_path, capsys, no_model_load):
    run = _saved_run(tmp_path, 1)
    with pytest.raises(ConfigError, match="train.seed 7 cannot change on resume"):
        Trainer(tiny_config(tmp_path, *FAST, "--train.seed", "7", "--resume", str(run)))
    code, err = _cli(capsys, tiny_args(tmp_path, *FAST, "--reward.seed", "9", "--resume", str(run)))
    assert code == 2 and "reward.seed" in err
    _assert_one_line(err)


# ---- item 6: user errors are one line, exit code 2, before the model loads -----------------------------


def _bad_jsonl(tmp: Path) -> list[str]:
    bad = tmp / "bad.jsonl"
    bad.write_text('{"question": "1+1", "answer": "2"}\n\n{"question": "2+2", "answer": \n')
    return ["--task.train_file", str(bad)]


@pytest.mark.parametrize("case,expect", [
    # every option error of the config tests, through the CLI (but "task.name jsonl without a
    # train file": the tiny run's arguments give it one)
    *[case for case in BAD_OPTIONS if case[1] != "task.train_file"],
    ("yaml", "run.yaml:3: invalid YAML"),
    ("config_dir", "is a directory"),
    ("config_missing", "no such file"),
    ("jsonl", "bad.jsonl:3: not valid JSON"),
    ("jsonl_missing", "task.eval_file"),
])
def test_user_errors_are_one_line_with_exit_code_2(tmp_path, capsys, no_model_load, case, expect):
    extra = case
    if case == "yaml":
        (tmp_path / "run.yaml").write_text("optim:\n  lr: [1e-4\nreward: {}\n")
        extra = ["--config", str(tmp_path / "run.yaml")]
    elif case == "config_dir":
        extra = ["--config", str(tmp_path)]
    elif case == "config_missing":
        extra = ["--config", str(tmp_path / "nope.yaml")]
    elif case == "jsonl":
        extra = _bad_jsonl(tmp_path)
    elif case == "jsonl_missing":
        extra = ["--task.eval_file", str(tmp_path / "missing.jsonl")]
    code, err = _cli(capsys, tiny_args(tmp_path, *FAST, *extra))
    assert code == 2
    _assert_one_line(err)
    assert expect in err


def test_bad_options_are_refused_before_training(tmp_path):
    """max_grad_norm < 0 would scale gradients by a negative factor (gradient ascent)."""
    with pytest.raises(ConfigError, match="optim.max_grad_norm must be None or a finite number >= 0"):
        tiny_config(tmp_path, "--optim.max_grad_norm", "-1")


# ---- item 7: resume edge cases ------------------------------------------------------------------------


def test_resume_ignores_folders_that_are_not_step_checkpoints(tmp_path):
    run = _saved_run(tmp_path, 1)
    shutil.copytree(run / "checkpoint-1", run / "checkpoint-final")
    assert _resume(tmp_path, run).step == 1


def _corrupt(file: Path, n: int = 64) -> None:
    """Overwrite ``n`` bytes of a safetensors file's tensor data with 0xFF (float32 NaNs)."""
    data = bytearray(file.read_bytes())
    start = 8 + int.from_bytes(data[:8], "little") + 256
    data[start:start + n] = b"\xff" * n
    file.write_bytes(bytes(data))


def test_corrupt_latest_checkpoint_falls_back_to_the_previous(tmp_path, capsys):
    run = _saved_run(tmp_path, 2)
    _corrupt(run / "checkpoint-2" / "model.safetensors")
    capsys.readouterr()
    resumed = _resume(tmp_path, run)
    out = capsys.readouterr()
    said = out.out + out.err
    assert resumed.step == 1
    assert "skipping checkpoint-2" in said and "checksum mismatch" in said and "checkpoint-1" in said
    assert all(torch.isfinite(p).all() for p in resumed.model.parameters())
    with pytest.raises(CheckpointError, match="checksum mismatch"):  # asked for that one: refused
        _resume(tmp_path, run / "checkpoint-2")


def test_non_finite_weights_are_refused_even_with_a_matching_manifest(tmp_path):
    run = _saved_run(tmp_path, 1)
    _corrupt(run / "checkpoint-1" / "model.safetensors")
    write_manifest(run / "checkpoint-1")
    with pytest.raises(CheckpointError, match="16 non-finite values"):
        _resume(tmp_path, run)


class _Killed(Exception):
    pass


@pytest.mark.parametrize("killed_at", ["second_rename", "cleanup"])
def test_an_interrupted_swap_leaves_no_leftovers(tmp_path, monkeypatch, killed_at):
    """Re-saving a step swaps the folders: checkpoint-N -> .checkpoint-N.old, .partial -> checkpoint-N,
    then removes .old. Killed in between, the next start restores or removes the copies."""
    trainer = make_trainer(tiny_config(tmp_path, *FAST))
    trainer.train_step()
    trainer.save()
    run = tmp_path / "run"
    real_replace, real_rmtree, calls = os.replace, shutil.rmtree, []

    def replace(src, dst):
        calls.append(1)
        if killed_at == "second_rename" and len(calls) == 2:
            raise _Killed
        return real_replace(src, dst)

    def rmtree(path, *a, **kw):
        if killed_at == "cleanup" and str(path).endswith(".old"):
            raise _Killed
        return real_rmtree(path, *a, **kw)

    monkeypatch.setattr(trainer_module.os, "replace", replace)
    monkeypatch.setattr(trainer_module.shutil, "rmtree", rmtree)
    with pytest.raises(_Killed):
        trainer.save()
    monkeypatch.undo()
    assert (run / ".checkpoint-1.old").exists()
    resumed = _resume(tmp_path, run)
    assert resumed.step == 1
    assert sorted(p.name for p in run.iterdir() if "checkpoint" in p.name) == ["checkpoint-1"]


def test_an_unwritable_output_directory_is_one_line(tmp_path, capsys, no_model_load):
    """A run directory the user cannot create: exit code 2 and one line, no traceback."""
    if os.geteuid() == 0:  # root writes anywhere: make the parent a file instead
        blocker = tmp_path / "blocker"
        blocker.write_text("")
        out = blocker / "run"
    else:
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        out = locked / "run"
    code, err = _cli(capsys, tiny_args(tmp_path, *FAST, "--train.output_dir", str(out)))
    assert code == 2
    _assert_one_line(err)
