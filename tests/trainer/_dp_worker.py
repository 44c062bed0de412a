"""One process of the data-parallel end-to-end test (tests/trainer/test_distributed.py), run by
``accelerate launch --multi_gpu --num_processes 2`` (CPU processes, gloo): trains the tiny model for two steps and writes this
process's final weights and what it saw to ``<run>/rank<r>.pt``."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from tests.trainer.test_trainer import tiny_config, tiny_model, tiny_tokenizer


def main(tmp: str, *extra: str) -> None:
    from gccpo.trainer import Trainer

    config = tiny_config(Path(tmp), *extra)
    tok = tiny_tokenizer()
    model = tiny_model(tok)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = Trainer(config, model=model, tokenizer=tok)
    seen = []
    original = trainer.sample

    def spy(prompts, *args, **kw):  # the training prompts this process sampled
        if not kw.get("greedy"):
            seen.extend(prompts)
        return original(prompts, *args, **kw)

    trainer.sample = spy
    summary = trainer.train()
    torch.save({"state": trainer.model.state_dict(), "initial": initial, "prompts": seen,
                "rank": trainer.dp.rank, "world": trainer.dp.world_size, "summary": summary},
               Path(config.train.output_dir) / f"rank{trainer.dp.rank}.pt")
    trainer.dp.close()


if __name__ == "__main__":
    main(*sys.argv[1:])
