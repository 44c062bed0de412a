"""A training process for tests/trainer/test_faults.py that can be killed at a chosen point.

    python -m tests.trainer._crash_worker TMP STEPS [--crash optimize:N | --crash save:N] [--resume]

Trains the tiny model of tests/trainer/test_trainer.py, saving a checkpoint after every step. With
``--crash optimize:N`` the process dies (``os._exit``, no cleanup, like a SIGKILL) in the middle of
step N, after its rollout and rewards, before the optimizer step; with ``--crash save:N`` it dies
while writing step N's checkpoint, after the model files and before the trainer state. Writes the
final weights to ``<run>/final.pt`` when it finishes.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

from tests.trainer.test_trainer import tiny_config, tiny_model, tiny_tokenizer


def main(argv: list[str]) -> None:
    from gccpo.trainer import Trainer

    tmp, steps = Path(argv[0]), argv[1]
    crash = argv[argv.index("--crash") + 1] if "--crash" in argv else None
    extra = ["--train.eval_before", "false", "--train.steps", steps, "--train.save_every", "1",
             "--train.plots", "false", "--task.eval_size", "1", "--task.ood_eval_size", "1"]
    if "--resume" in argv:
        trainer = Trainer(tiny_config(tmp, *extra, "--resume", str(tmp / "run")))
    else:
        tok = tiny_tokenizer()
        trainer = Trainer(tiny_config(tmp, *extra), model=tiny_model(tok), tokenizer=tok)
    if crash:
        where, at = crash.split(":")
        at = int(at)
        if where == "optimize":
            original = trainer.optimize

            def optimize(*args, **kw):
                if trainer.step + 1 == at:
                    os._exit(3)
                return original(*args, **kw)

            trainer.optimize = optimize
        else:
            real_save = torch.save

            def save(obj, f, *args, **kw):
                if str(f).endswith("trainer_state.pt") and trainer.step == at:
                    os._exit(4)
                return real_save(obj, f, *args, **kw)

            torch.save = save
    trainer.train()
    torch.save({k: v.clone() for k, v in trainer.model.state_dict().items()}, tmp / "run" / "final.pt")


if __name__ == "__main__":
    main(sys.argv[1:])
