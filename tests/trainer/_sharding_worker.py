"""Workers for tests/trainer/test_sharding.py: one trainer step under FSDP / ZeRO-3 in a gloo
process, on this process's half of the fixed batch (spawned by tests._gloo.run_gloo)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

import torch

#: the cases: (name, tie_word_embeddings, optimizer): AdamW is the trainer's own; SGD makes the
#: update proportional to the (clipped) gradient, so a wrong reduction or norm shows in the weights
CASES = (("untied-adamw", False, "adamw"), ("tied-sgd", True, "sgd"))
ZERO3_CASES = (("untied", False), ("tied", True))  # with the trainer's AdamW (the engine wraps it)
# seq-mean-token-mean: each process divides by its own rows, and the mean over the 2 processes of
# those means is the whole batch's (GRPO: groups never straddle processes, so advantages agree)
ARGS = ("--algo", "grpo", "--loss.loss_agg", "seq-mean-token-mean", "--optim.max_grad_norm", "0.05",
        "--rollout.temperature", "0.7", "--model.device", "cpu")


def build(tmp: Path, tied: bool, optimizer: str, *extra: str) -> Any:
    """A trainer on the tiny model (tied or not) with the comparison's config; SGD swapped in."""
    from tests.trainer.test_trainer import tiny_config, tiny_model, tiny_tokenizer

    from gccpo.trainer import Trainer

    tok = tiny_tokenizer()
    model = tiny_model(tok)
    if tied:
        model.config.tie_word_embeddings = True
        model.lm_head.weight = model.model.embed_tokens.weight
    trainer = Trainer(tiny_config(tmp, *ARGS, *extra), model=model, tokenizer=tok)
    if optimizer == "sgd":
        if trainer.zero3 is not None:
            raise ValueError("the ZeRO-3 engine is built with the trainer's AdamW")
        trainer.optimizer = torch.optim.SGD(trainer.model.parameters(), lr=0.5)
        trainer.scheduler = torch.optim.lr_scheduler.LambdaLR(trainer.optimizer, lambda s: 1.0)
    return trainer


def half(trainer: Any, rank: int, world: int) -> tuple[list[Any], Any]:
    """This process's slice of the fixed batch, as DataParallel would split it (whole groups)."""
    from tests.trainer.test_trainer import _fixed_batch

    problems, rollout, _ = _fixed_batch(trainer)
    mine = trainer.dp.shard(list(range(len(problems))))
    rows = (rollout.group_index.unsqueeze(1) == torch.tensor(mine).unsqueeze(0)).any(1).nonzero().squeeze(1)
    part = rollout.select(rows)
    part.group_index = part.group_index - mine[0]
    return [problems[i] for i in mine], part


def step_watching_fused_loss(trainer: Any, rank: int, world: int,
                             record: Callable[[torch.Tensor], Any]) -> tuple[dict[str, float], list[Any]]:
    """One ``train_on`` step on this rank's half of the fixed batch, with ``record(weight)`` taken
    at every call of the fused policy loss (what the LM-head weight looks like inside it)."""
    import gccpo_kernels as gk

    calls: list[Any] = []
    original = gk.fused_linear_policy_loss

    def spy(h, weight, *args, **kwargs):
        calls.append(record(weight))
        return original(h, weight, *args, **kwargs)

    gk.fused_linear_policy_loss = spy
    try:
        problems, rollout = half(trainer, rank, world)
        metrics = trainer.train_on(problems, rollout)
    finally:
        gk.fused_linear_policy_loss = original
    return metrics, calls


def fsdp_worker(rank: int, world: int, tmp: str, out: str) -> None:
    from torch.distributed.tensor import DTensor

    from gccpo.sharding import gathered_head, plan_of

    results: dict[str, Any] = {}
    for name, tied, optimizer in CASES:
        trainer = build(Path(tmp) / name / f"rank{rank}", tied, optimizer, "--model.sharding", "fsdp")
        model, plan = trainer.model, plan_of(trainer.model)
        unit = model.get_submodule(plan.unit)
        head = lambda: unit.get_parameter(plan.weight)  # noqa: E731  the head weight as the unit holds it now
        layer_weight = lambda: model.model.layers[0].mlp.up_proj.weight  # noqa: E731
        seen: dict[str, Any] = {"at_rest": (type(head()).__name__, tuple(head().to_local().shape))}
        with gathered_head(model) as (w, _):
            seen["gathered"] = (type(w).__name__, tuple(w.shape), type(layer_weight()).__name__)
        seen["after_gathered"] = type(head()).__name__

        # what the fused call sees, and the rest of the model
        metrics, seen["fused_calls"] = step_watching_fused_loss(
            trainer, rank, world, lambda weight: (type(weight).__name__, tuple(weight.shape), type(head()).__name__,
                                                  type(layer_weight()).__name__))
        seen["after_step"] = (type(head()).__name__, all(isinstance(p, DTensor) for p in model.parameters()))
        seen["tied"] = model.get_output_embeddings().weight is model.get_input_embeddings().weight
        full = {k: v.full_tensor() for k, v in model.state_dict().items()}  # collective
        ckpt = trainer.save()  # collective: full weights gathered, written by rank 0
        results[name] = {"metrics": metrics, "seen": seen, "state": full if rank == 0 else None,
                         "checkpoint": str(ckpt)}
    results["end_to_end"] = end_to_end(Path(tmp) / "e2e", rank)
    torch.save(results, os.path.join(out, f"fsdp{rank}.pt"))


def end_to_end(tmp: Path, rank: int) -> dict[str, Any]:
    """A whole GCCPO run (sampling with the tied head routed through its unit, the packed probe
    forward, the causal reward, one step, evaluation, checkpoint) under FSDP, then a resume from
    its checkpoint: the summary, and whether the resumed AdamW state equals the one saved."""
    from tests.trainer.test_trainer import tiny_config, tiny_model, tiny_tokenizer

    from gccpo.trainer import Trainer

    def trainer_with(*extra: str) -> Trainer:
        tok = tiny_tokenizer()
        model = tiny_model(tok)
        model.config.tie_word_embeddings = True
        model.lm_head.weight = model.model.embed_tokens.weight
        config = tiny_config(tmp / f"rank{rank}", "--model.sharding", "fsdp", "--train.plots", "false",
                             "--model.device", "cpu", "--train.output_dir", str(tmp / "run"), *extra)
        return Trainer(config, model=model, tokenizer=tok)

    trainer = trainer_with("--train.steps", "1")
    summary = trainer.train()
    resumed = trainer_with("--train.resume", str(tmp / "run"))
    same = [torch.equal(trainer.optimizer.state[p][k].to_local(), resumed.optimizer.state[q][k].to_local())
            for p, q in zip(trainer.model.parameters(), resumed.model.parameters()) for k in ("exp_avg", "exp_avg_sq")]
    return {"summary": summary, "history": trainer.history, "resumed_step": resumed.step,
            "optimizer_restored": bool(same) and all(same)}


def zero3_worker(rank: int, world: int, tmp: str, out: str) -> None:
    os.environ["LOCAL_RANK"] = str(rank)
    import deepspeed

    from gccpo.sharding import gathered_head

    results: dict[str, Any] = {}
    for name, tied in ZERO3_CASES:
        trainer = build(Path(tmp) / name / f"rank{rank}", tied, "adamw", "--model.sharding", "zero3")
        head = trainer.model.get_output_embeddings()
        with gathered_head(trainer.model) as (w, _):
            gathered = tuple(w.shape)
        at_rest = head.weight.numel()  # ZeRO-3: an empty placeholder outside a gather
        metrics, calls = step_watching_fused_loss(
            trainer, rank, world,
            lambda weight: (tuple(weight.shape), trainer.model.model.layers[0].mlp.up_proj.weight.numel()))
        full = {}
        for k, p in trainer.model.named_parameters():
            with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
                full[k] = p.detach().clone()
        ckpt = trainer.save()  # collective: full weights gathered, written by rank 0
        results[name] = {"metrics": metrics, "state": full, "gathered": gathered, "at_rest": at_rest,
                         "calls": calls, "after": head.weight.numel(), "checkpoint": str(ckpt)}
    torch.save(results, os.path.join(out, f"zero3{rank}.pt"))
