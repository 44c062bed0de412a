"""Data-parallel training (gccpo/distributed.py): the gradient and metric reductions in 2 gloo
processes, and two optimizer steps of the trainer under ``accelerate launch --multi_gpu --num_processes 2`` on the CPU."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from gccpo.distributed import DataParallel

REPO = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_single_process_is_a_no_op():
    dp = DataParallel()
    assert not dp.enabled and dp.is_main and dp.shard([1, 2, 3]) == [1, 2, 3]
    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.full((3,), 2.0)
    dp.average_gradients([p])
    assert torch.equal(p.grad, torch.full((3,), 2.0))
    assert dp.sum([1, 2.5]) == [1.0, 2.5] and dp.mean_metrics({"a": 1.0}) == {"a": 1.0}


def _reduce_worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    dp = DataParallel.from_env()
    a = torch.nn.Parameter(torch.zeros(2, 3))
    b = torch.nn.Parameter(torch.zeros(4, dtype=torch.float64))
    c = torch.nn.Parameter(torch.zeros(1))                         # no gradient on rank 0
    a.grad = torch.full((2, 3), float(rank + 1))
    b.grad = torch.arange(4, dtype=torch.float64) * (rank + 1)
    c.grad = None if rank == 0 else torch.full((1,), 4.0)
    dp.average_gradients([a, b, c])
    metrics = dp.mean_metrics({"step": 7, "loss": float(rank), "episodes/max": float(3 * rank), "name": "x"})
    torch.save({"rank": dp.rank, "world": dp.world_size, "a": a.grad, "b": b.grad, "c": c.grad,
                "metrics": metrics, "sum": dp.sum([rank, 1]), "shard": dp.shard(list(range(5)))},
               f"{out}/r{rank}.pt")
    dp.close()
    assert not torch.distributed.is_initialized()


def test_gradient_and_metric_reductions_in_two_gloo_processes(tmp_path):
    mp.spawn(_reduce_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"r{r}.pt", weights_only=False) for r in (0, 1))
    assert (r0["rank"], r1["rank"], r0["world"]) == (0, 1, 2)
    for r in (r0, r1):
        assert torch.equal(r["a"], torch.full((2, 3), 1.5))          # mean of 1 and 2
        assert r["b"].dtype == torch.float64 and torch.equal(r["b"], torch.arange(4, dtype=torch.float64) * 1.5)
        assert torch.equal(r["c"], torch.full((1,), 2.0))            # a missing gradient counts as 0
        assert r["metrics"] == {"step": 7, "loss": 0.5, "episodes/max": 3.0, "name": "x"}
        assert r["sum"] == [1.0, 2.0]
    assert r0["shard"] + r1["shard"] == [0, 1, 2, 3, 4]


@pytest.mark.skipif(sys.platform != "linux", reason="accelerate's CPU launcher is tested on Linux")
def test_two_process_training_under_accelerate_launch(tmp_path):
    pytest.importorskip("accelerate")
    pytest.importorskip("transformers")
    env = dict(os.environ, PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
               OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)
    # --multi_gpu selects accelerate's torch-elastic launcher, which runs CPU processes too (gloo)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(_free_port()), str(REPO / "tests" / "trainer" / "_dp_worker.py"),
           str(tmp_path)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    run = tmp_path / "run"
    r0, r1 = (torch.load(run / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    assert (r0["world"], r1["world"]) == (2, 2)
    # each process trained on its own questions (2 per step each, over 2 steps)...
    assert len(r0["prompts"]) == len(r1["prompts"]) == 2 * 2
    assert r0["prompts"] != r1["prompts"]
    # ...and both hold the same weights afterwards, moved away from the shared start
    for name, w in r0["state"].items():
        assert torch.equal(w, r1["state"][name]), name
    assert any(not torch.equal(w, r0["initial"][name]) for name, w in r0["state"].items())
    # metrics written once (by the main process), averaged over the processes; eval counts summed
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2]
    evals = [r for r in rows if "eval/id_accuracy" in r]
    assert [e["step"] for e in evals] == [0, 2] and all(e["eval/id_n"] == 4 and e["eval/ood_n"] == 3 for e in evals)
    assert (run / "checkpoint-2" / "trainer_state.pt").exists() and (run / "summary.json").exists()
