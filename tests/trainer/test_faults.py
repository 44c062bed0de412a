"""Trainer fault tolerance (issue 8): killed runs resume to the same result, non-finite steps
never reach the weights, and bad completions / verifiers / rewards are handled and counted."""

from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from tests.trainer.test_trainer import make_trainer, tiny_config  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


def _run_worker(tmp: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "tests.trainer._crash_worker", str(tmp), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)


def _steps(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith("perf/")} for r in rows if "loss" in r]


@pytest.mark.parametrize("crash", ["optimize:2", "save:2"])
def test_a_killed_run_resumes_to_the_same_result(tmp_path, crash):
    """Killed mid-step (after sampling, before the optimizer step) or mid-checkpoint (model written,
    trainer state not yet): the run directory holds only complete checkpoints, and --resume
    reproduces the uninterrupted run's later steps and final weights."""
    straight = _run_worker(tmp_path / "straight", "3")
    assert straight.returncode == 0, straight.stderr[-3000:]
    killed = _run_worker(tmp_path / "killed", "3", "--crash", crash)
    assert killed.returncode == (3 if crash.startswith("optimize") else 4), killed.stderr[-3000:]
    run = tmp_path / "killed" / "run"
    complete = sorted(p.name for p in run.glob("checkpoint-*"))
    assert complete == ["checkpoint-1"], complete                     # never a half-written one
    assert all((run / c / "trainer_state.pt").exists() for c in complete)
    resumed = _run_worker(tmp_path / "killed", "3", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    want, got = _steps(tmp_path / "straight" / "run"), _steps(run)
    # the killed run logged step 1 (and, when killed in the save, step 2) before dying; the
    # resumed run logs steps 2 and 3 again
    assert [r["step"] for r in got][-2:] == [2, 3]
    # pytest.approx takes flat sequences or mappings, not a list of dicts (pytest >= 9.2 raises):
    # the same metric names each step, then each row's values compared as one mapping
    assert len(got[-2:]) == len(want[1:]) == 2
    for g, w in zip(got[-2:], want[1:]):
        assert sorted(g) == sorted(w), (sorted(g), sorted(w))
        assert g == pytest.approx(w, rel=1e-5, abs=1e-6), g["step"]
    a = torch.load(tmp_path / "straight" / "run" / "final.pt")
    b = torch.load(run / "final.pt")
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-5, atol=1e-7, msg=name)
    assert not list(run.glob(".checkpoint-*"))  # the partial folder was replaced by the re-save


def test_non_finite_gradients_never_reach_the_weights(tmp_path):
    trainer = make_trainer(tiny_config(tmp_path, "--train.eval_before", "false", "--optim.max_skipped_steps", "1"))
    first = next(p for p in trainer.model.parameters() if p.requires_grad)
    handle = first.register_hook(lambda g: g * float("nan"))
    before = copy.deepcopy(trainer.model.state_dict())
    metrics = trainer.train_step()
    assert metrics["optim/skipped"] == 1 and not math.isfinite(metrics["optim/grad_norm"])
    assert all(torch.equal(v, before[k]) for k, v in trainer.model.state_dict().items())
    assert not trainer.optimizer.state                  # AdamW moments untouched too
    assert trainer.scheduler.last_epoch == 0
    with pytest.raises(RuntimeError, match="2 optimizer steps in a row had a non-finite"):
        trainer.train_step()                            # the second in a row exceeds the limit of 1
    handle.remove()
    trainer.skipped_in_row = 0
    metrics = trainer.train_step()                      # a finite step goes through again
    assert metrics["optim/skipped"] == 0 and metrics["optim/skipped_total"] == 2
    assert any(not torch.equal(v, before[k]) for k, v in trainer.model.state_dict().items())


def test_bad_completions_verifiers_and_rewards_are_counted(tmp_path):
    """A verifier that raises or returns NaN / out-of-range values, and empty or answerless
    completions, score 0 (or are clamped) and are counted in faults/*; the step trains on."""
    trainer = make_trainer(tiny_config(tmp_path, "--train.eval_before", "false"))
    calls = {"n": 0}

    def hostile_verifier(answer, problem):
        calls["n"] += 1
        k = calls["n"] % 4
        if k == 0:
            raise ZeroDivisionError("verifier bug")
        return [float("nan"), 7.0, 0.0][k - 1]

    trainer.task._score_fn = hostile_verifier  # the task's verifier, behind Task.verify / Task.score
    metrics = trainer.train_step()
    n = calls["n"]
    assert n == 8
    assert metrics["faults/verifier_errors"] == pytest.approx(2 / 8)
    assert metrics["faults/nonfinite"] == pytest.approx(2 / 8)
    assert metrics["faults/out_of_range"] == pytest.approx(2 / 8)
    assert 0 <= metrics["faults/empty"] <= 1 and 0 <= metrics["faults/unparsable"] <= 1
    assert math.isfinite(metrics["loss"]) and metrics["reward/outcome"] == pytest.approx(2 / 8)


def test_outcome_rewards_counts_empty_and_unparsable_completions(tmp_path):
    from gccpo.tasks import outcome_rewards
    from gccpo.tasks import Problem

    trainer = make_trainer(tiny_config(tmp_path, "--train.eval_before", "false"))
    task = trainer.task
    problems = [Problem("1+2", "3")] * 4
    counts: dict[str, int] = {}
    scores = outcome_rewards(task, problems, ["", "   \n", "no digits at all", "Answer: 3"], counts)
    assert scores.tolist() == [0.0, 0.0, 0.0, 1.0]
    assert counts == {"empty": 2, "unparsable": 3, "verifier_errors": 0, "nonfinite": 0, "out_of_range": 0}
