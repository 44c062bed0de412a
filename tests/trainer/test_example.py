"""examples/train_gccpo.py, the whole method in one file, runs end to end on the embedded model
(one tiny step and the held-out evaluation; issue 19 made it share the trainer's shaping path)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")


def test_the_example_runs_a_step_and_evaluates():
    from tests.trainer.test_episodes import _smollm2_gguf

    path, why = _smollm2_gguf()
    if path is None:
        pytest.skip(why)
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, str(root / "examples" / "train_gccpo.py"), "--steps", "1", "--questions", "1",
                          "--G", "2", "--max-new-tokens", "8"], cwd=root, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "step   1  reward" in out.stdout and "held-out greedy accuracy:" in out.stdout, out.stdout[-2000:]
