"""Sharded training (gccpo/sharding.py): one trainer step under FSDP (torch's ``fully_shard``) in
2 gloo CPU processes, each on its half of a fixed batch, equals the single-process step on the
whole batch (loss, global gradient norm, updated weights, the saved checkpoint), for an untied
LM head (AdamW) and a tied one (SGD); the LM-head weight is full only inside the fused calls; a
whole GCCPO run and a resume under FSDP. The same step (untied and tied, AdamW) under DeepSpeed
ZeRO-3 where DeepSpeed is installed (``DS_BUILD_OPS=0 pip install --no-build-isolation
deepspeed``); skipped otherwise."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch

from tests._gloo import run_gloo
from tests.trainer import _sharding_worker as worker

pytest.importorskip("transformers")

# float32, the same arithmetic regrouped over two processes (each process's micro-batches, the
# reduce-scatter's sum); with SGD at lr 0.5 a weight moves by up to ~0.05
ATOL = 2e-6


def _single_process(tmp_path, name: str, tied: bool, optimizer: str) -> tuple[dict, dict]:
    """The reference: the whole batch in this (unlaunched) process, replicated model."""
    from tests.trainer.test_trainer import _fixed_batch

    trainer = worker.build(tmp_path / "single" / name, tied, optimizer)
    assert not trainer.dp.enabled
    problems, rollout, _ = _fixed_batch(trainer)
    initial = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
    metrics = trainer.train_on(problems, rollout)
    state = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
    assert any(not torch.equal(state[k], initial[k]) for k in state)
    return metrics, state


def test_sharding_option_is_validated(tmp_path):
    from tests.trainer.test_trainer import tiny_config

    assert tiny_config(tmp_path).model.sharding == "none"
    assert tiny_config(tmp_path, "--model.sharding", "fsdp").model.sharding == "fsdp"
    with pytest.raises(ValueError, match="model.sharding must be"):
        tiny_config(tmp_path, "--model.sharding", "ddp")


def test_fsdp_step_matches_single_process(tmp_path):
    run_gloo(worker.fsdp_worker, 2, str(tmp_path / "fsdp"), str(tmp_path))
    ranks = [torch.load(tmp_path / f"fsdp{r}.pt", weights_only=False) for r in (0, 1)]
    from transformers import LlamaForCausalLM

    for name, tied, optimizer in worker.CASES:
        single, expected = _single_process(tmp_path, name, tied, optimizer)
        r0, r1 = ranks[0][name], ranks[1][name]

        # the LM head: sharded at rest, full inside the gathered context and inside the fused loss
        # call (the decoder layers stay sharded meanwhile), sharded again afterwards
        seen = r0["seen"]
        assert seen["at_rest"] == ("DTensor", (50, 64))  # vocabulary 100 over 2 processes
        assert seen["gathered"] == ("Parameter", (100, 64), "DTensor")
        assert seen["after_gathered"] == "DTensor"
        assert len(seen["fused_calls"]) == 2  # grad_accum = 2 micro-batches
        for weight_type, shape, unit_holds, layer in seen["fused_calls"]:
            assert (shape, unit_holds, layer) == ((100, 64), "Parameter", "DTensor")
            assert weight_type in ("Parameter", "Tensor")
        assert seen["after_step"] == ("DTensor", True)
        assert seen["tied"] == tied

        # the step: the mean of the processes' losses (each over its own rows, seq-mean-token-mean)
        # is the whole batch's; the global (clipped) gradient norm and the updated weights agree
        loss = (r0["metrics"]["loss"] + r1["metrics"]["loss"]) / 2
        assert loss == pytest.approx(single["loss"], rel=1e-5, abs=1e-7), name
        assert r0["metrics"]["optim/grad_norm"] == pytest.approx(single["optim/grad_norm"], rel=1e-5), name
        assert single["optim/grad_norm"] > 0.05  # clipping was active
        state = r0["state"]
        assert state.keys() == expected.keys()
        diff = max(float((state[k] - expected[k]).abs().max()) for k in expected)
        print(f"{name}: max |FSDP - single-process| weight difference after one step: {diff:.2e}")
        assert diff <= ATOL, (name, diff)
        if tied:
            assert torch.equal(state["lm_head.weight"], state["model.embed_tokens.weight"])

        # the checkpoint (full weights gathered from the shards) loads as a plain model
        saved = LlamaForCausalLM.from_pretrained(r0["checkpoint"]).state_dict()
        assert max(float((saved[k] - expected[k]).abs().max()) for k in expected) <= ATOL

    # a whole GCCPO run under FSDP (sampling, causal reward, one step, evaluation, checkpoint)...
    run = ranks[0]["end_to_end"]
    assert run["summary"]["steps"] == 1 and run["summary"]["after"]["eval/id_n"] == 4
    for key in ("loss", "optim/grad_norm", "causal/robustness", "causal/effectiveness"):
        assert math.isfinite(run["history"][0][key]), key
    assert (Path(run["summary"]["run_dir"]) / "checkpoint-1" / "trainer_state.pt").exists()
    # ...and resuming from its checkpoint restores the sharded AdamW state on every process
    for r in ranks:
        assert r["end_to_end"]["resumed_step"] == 1 and r["end_to_end"]["optimizer_restored"]


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                    reason="DeepSpeed is not installed (pip install deepspeed): ZeRO-3 untested here")
def test_zero3_step_matches_single_process(tmp_path):
    run_gloo(worker.zero3_worker, 2, str(tmp_path / "zero3"), str(tmp_path))
    ranks = [torch.load(tmp_path / f"zero3{r}.pt", weights_only=False) for r in (0, 1)]
    from transformers import LlamaForCausalLM

    for name, tied in worker.ZERO3_CASES:
        r0, r1 = ranks[0][name], ranks[1][name]
        single, expected = _single_process(tmp_path, f"zero3-{name}", tied, "adamw")
        # the head: partitioned (an empty placeholder) at rest and after the step, full in the
        # gathered context and inside each fused loss call, while a decoder layer stays partitioned
        assert r0["gathered"] == (100, 64) and r0["at_rest"] == 0 and r0["after"] == 0
        assert r0["calls"] == [((100, 64), 0)] * 2
        loss = (r0["metrics"]["loss"] + r1["metrics"]["loss"]) / 2
        assert loss == pytest.approx(single["loss"], rel=1e-5, abs=1e-7), name
        assert r0["metrics"]["optim/grad_norm"] == pytest.approx(single["optim/grad_norm"], rel=1e-5), name
        diff = max(float((r0["state"][k] - expected[k]).abs().max()) for k in r0["state"])
        print(f"zero3 {name}: max |ZeRO-3 - single-process| weight difference after one step: {diff:.2e}")
        assert diff <= ATOL, (name, diff)
        saved = LlamaForCausalLM.from_pretrained(r0["checkpoint"]).state_dict()
        assert max(float((saved[k] - expected[k]).abs().max()) for k in expected) <= ATOL
