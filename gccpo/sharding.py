"""Sharded training: FSDP (torch's ``fully_shard``) or DeepSpeed ZeRO-3 (``model.sharding``).

The trainer never calls the model's LM head on the training batch: it runs the backbone to the
final hidden states and hands them, with the head weight, to the fused kernels
(:func:`gccpo_kernels.fused_linear_policy_loss`, :func:`gccpo_kernels.fused_linear_logprobs`,
the causal reward). With sharded parameters each process holds only a slice of the head weight,
so the full weight is gathered for exactly those calls:

- :func:`head_call` ``(model, fn, *args)``: ``fn(weight, bias, *args)`` with the full head
  tensors, run as a *forward* of the sharded unit that owns the head weight. Under FSDP this is
  :func:`torch.distributed.fsdp.register_fsdp_forward_method`: the unit all-gathers before the
  call and frees the full weight after it, re-gathers it when autograd reaches the call's outputs
  in backward, and reduce-scatters the weight gradient into the sharded parameter's gradient
  (averaged over the processes) before freeing it again. Under ZeRO-3 DeepSpeed's module hooks do
  the same (fetch, release, fetch in backward, reduce-partition the gradient). Used for the one
  call that needs a gradient (the policy loss).
- :func:`gathered_head` ``(model)``: a no-grad context manager yielding ``(weight, bias)`` full
  tensors (FSDP ``unshard()`` / ``reshard()``; ZeRO-3
  ``deepspeed.zero.GatheredParameters(..., modifier_rank=None)``). Used for old / reference
  log-probs and the causal reward.

Both are plain calls on an unsharded model (``model.sharding = "none"``, or the frozen reference
model, which stays replicated).

FSDP layout (:func:`shard_model`): one unit per decoder layer (``model._no_split_modules``), one
for the backbone (embeddings, final norm: the backbone is called directly by the trainer, so it
must carry its own FSDP hooks), one for an untied LM head, and the whole model as the root (no
parameters of its own; it makes every unit share one FSDP context). A tied head weight (SmolLM2,
Qwen2.5-0.5B) is the input embedding's parameter: it stays in the backbone unit, the head module
points at the same sharded parameter, and the head's forward (used by ``generate``) is routed
through the backbone unit so that the tie holds and the weight is gathered for it. Every unit
reshards after forward. Gradients are reduced by FSDP (so
:meth:`gccpo.distributed.DataParallel.average_gradients` skips sharded parameters), gradient
clipping uses the global norm over the shards (:func:`clip_grad_norm`), AdamW runs on the shards.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from typing import Any, Callable, Iterator

import torch

from .probes import PACKED_ATTENTION, backbone_of

#: ``model.sharding`` values.
SHARDING_MODES = ("none", "fsdp", "zero3")
#: the name of the forward method registered on the unit that owns the head weight.
_HEAD_METHOD = "gccpo_head_call"


@dataclasses.dataclass(frozen=True)
class ShardingPlan:
    """How a sharded model's LM head is reached (stored on the model as ``_gccpo_sharding``).

    ``unit``: qualified name of the module whose forward gathers the head (``""`` is the model);
    ``weight`` / ``bias``: qualified names of the head's tensors *inside* that unit (``bias`` None
    when the head has none); ``mode``: ``"fsdp"`` or ``"zero3"``.
    """

    mode: str
    unit: str
    weight: str
    bias: str | None


def plan_of(model: Any) -> ShardingPlan | None:
    """The model's :class:`ShardingPlan`, or None when it is not sharded."""
    return getattr(model, "_gccpo_sharding", None)


# --------------------------------------------------------------------------------------------
# finding the head
# --------------------------------------------------------------------------------------------


def _name_of(root: torch.nn.Module, target: torch.nn.Module) -> str | None:
    for name, module in root.named_modules(remove_duplicate=False):
        if module is target:
            return name
    return None


def _head_layout(model: torch.nn.Module) -> tuple[bool, str, str, str | None]:
    """``(tied, unit, weight, bias)``: where the head weight lives (see :class:`ShardingPlan`)."""
    head = model.get_output_embeddings()
    if head is None or getattr(head, "weight", None) is None:
        raise ValueError(f"{type(model).__name__} has no output embeddings (LM head) to shard")
    backbone = backbone_of(model)
    backbone_name = _name_of(model, backbone)
    embed = model.get_input_embeddings()
    tied = embed is not None and getattr(embed, "weight", None) is head.weight
    bias = getattr(head, "bias", None)
    if tied:
        embed_name = _name_of(backbone, embed)
        if embed_name is None or backbone_name is None:
            raise ValueError("a tied LM head needs its input embeddings inside the backbone "
                             f"({type(model).__name__}): cannot shard it")
        if bias is not None:
            raise NotImplementedError("a tied LM head with a bias is not supported by model.sharding")
        return True, backbone_name, f"{embed_name}.weight" if embed_name else "weight", None
    head_name = _name_of(model, head)
    if head_name is None or head_name.startswith(f"{backbone_name}."):
        raise ValueError(f"cannot locate the LM head of {type(model).__name__} outside its backbone")
    return False, head_name, "weight", "bias" if bias is not None else None


def _decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The transformer blocks: modules whose class transformers marks as not to be split
    (``_no_split_modules``), else the children of the backbone's ``layers`` list."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    backbone = backbone_of(model)
    layers, taken = [], []
    for name, m in backbone.named_modules():
        if m is not backbone and type(m).__name__ in names and not any(name.startswith(t + ".") for t in taken):
            layers.append(m)  # outermost matches only: one unit per block
            taken.append(name)
    if not layers:
        stack = getattr(backbone, "layers", None)
        layers = list(stack) if isinstance(stack, torch.nn.ModuleList) else []
    if not layers:
        raise ValueError(f"cannot find the decoder layers of {type(model).__name__} to shard "
                         "(no _no_split_modules, no backbone.layers)")
    return layers


# --------------------------------------------------------------------------------------------
# wrapping
# --------------------------------------------------------------------------------------------


def shard_model(model: torch.nn.Module, mode: str, device: torch.device | None = None) -> torch.nn.Module:
    """Shard ``model`` in place over the default process group and return it.

    ``mode``: ``"none"`` (returned as is), ``"fsdp"`` (torch's ``fully_shard``; needs an
    initialized process group, e.g. from ``accelerate launch --multi_gpu`` / ``torchrun``) or
    ``"zero3"`` (see :class:`Zero3`: the DeepSpeed engine is built with the optimizer, so this
    only records the plan). Build the optimizer *after* this call (FSDP replaces the
    parameters by sharded ones).
    """
    if mode not in SHARDING_MODES:
        raise ValueError(f"model.sharding must be one of {SHARDING_MODES}, got {mode!r}")
    if mode == "none":
        return model
    if mode == "zero3":
        # DeepSpeed fetches a module's own parameters around its forward: the unit is the module
        # that holds the weight directly (the input embedding when tied, else the head)
        tied, unit, weight, bias = _head_layout(model)
        if tied:
            unit, weight = f"{unit}.{weight}".lstrip(".").rsplit(".", 1)
        model._gccpo_sharding = ShardingPlan("zero3", unit, weight, bias)
        return model
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("model.sharding=fsdp needs several processes: launch with "
                           "`accelerate launch --multi_gpu --num_processes N -m gccpo.train ...` or torchrun")
    device = device or next(model.parameters()).device
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    tied, unit, weight, bias = _head_layout(model)
    head = model.get_output_embeddings()
    backbone = backbone_of(model)
    shard = functools.partial(fully_shard, mesh=mesh, reshard_after_forward=True)
    for layer in _decoder_layers(model):
        shard(layer)
    if not tied:
        shard(head)
    shard(backbone)
    unit_module = model.get_submodule(unit)
    setattr(unit_module, _HEAD_METHOD, _call_with_head(unit_module, weight, bias))
    register_fsdp_forward_method(unit_module, _HEAD_METHOD)
    ignored = None
    if tied:
        # the backbone unit replaced the embedding's parameter by its sharded version: point the
        # head at the same one (one parameter, one optimizer state), keep the root off it, and
        # route the head's own forward (generate) through the backbone unit
        head.weight = unit_module.get_parameter(weight)
        ignored = {head.weight}
        head.forward = functools.partial(getattr(unit_module, _HEAD_METHOD), _linear)
    shard(model, ignored_params=ignored)
    model._gccpo_sharding = ShardingPlan("fsdp", unit, weight, bias)
    # FSDP takes the first module to run forward as its root: run the whole model once now, so
    # that the root is the model even though the trainer calls the backbone directly
    with torch.no_grad():
        model(input_ids=torch.zeros(1, 1, dtype=torch.long, device=device), use_cache=False)
    return model


def _linear(weight: torch.Tensor, bias: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.linear(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype))


def _call_with_head(unit: torch.nn.Module, weight: str, bias: str | None) -> Callable[..., Any]:
    """The unit's extra forward method: ``fn(weight, bias, *args)`` with the unit's current
    (inside the FSDP forward: full) head tensors."""

    def call(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return fn(unit.get_parameter(weight), unit.get_parameter(bias) if bias else None, *args, **kwargs)

    return call


# --------------------------------------------------------------------------------------------
# the gathered head
# --------------------------------------------------------------------------------------------


def _plain_head(model: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    head = model.get_output_embeddings()
    return head.weight, getattr(head, "bias", None)


def head_call(model: Any, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``fn(weight, bias, *args, **kwargs)`` with the model's full LM-head weight and bias.

    Sharded: run as a forward of the unit owning the head, so the weight is gathered for the call
    (and again in its backward) and its gradient lands reduced in the sharded parameter's grad.
    Tensors that need a gradient must reach ``fn`` through ``args`` / ``kwargs`` (not a closure),
    and ``fn`` must return tensors in tuples / lists / dicts / named tuples (FSDP hooks the
    backward of the outputs it finds there)."""
    plan = plan_of(model)
    if plan is None:
        weight, bias = _plain_head(model)
        return fn(weight, bias, *args, **kwargs)
    unit = model.get_submodule(plan.unit)
    if plan.mode == "fsdp":
        return getattr(unit, _HEAD_METHOD)(fn, *args, **kwargs)
    # ZeRO-3: DeepSpeed hooks every submodule's forward (fetch its parameters before, release
    # after, fetch again in backward, reduce-partition the gradient); a forward swapped in for
    # this one call makes the fused call such a forward
    call = _call_with_head(unit, plan.weight, plan.bias)
    original = unit.__dict__.get("forward")
    unit.forward = lambda *a, **k: call(fn, *a, **k)
    try:
        return unit(*args, **kwargs)
    finally:
        if original is None:
            del unit.forward
        else:
            unit.forward = original


@contextlib.contextmanager
def gathered_head(model: Any) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
    """No-grad: ``with gathered_head(model) as (weight, bias):`` the full LM-head tensors, gathered
    on entry and freed (resharded) on exit. Use :func:`head_call` when a gradient must flow."""
    plan = plan_of(model)
    if plan is None:
        yield _plain_head(model)
        return
    unit = model.get_submodule(plan.unit)
    get = lambda: (unit.get_parameter(plan.weight), unit.get_parameter(plan.bias) if plan.bias else None)  # noqa: E731
    with torch.no_grad():
        if plan.mode == "fsdp":
            unit.unshard()
            try:
                yield get()
            finally:
                unit.reshard()
        else:
            deepspeed = _deepspeed()
            weight, bias = get()
            with deepspeed.zero.GatheredParameters([p for p in (weight, bias) if p is not None], modifier_rank=None):
                yield weight, bias


# --------------------------------------------------------------------------------------------
# lock-step: every process must run each sharded unit the same number of times
# --------------------------------------------------------------------------------------------


def all_agree(model: Any, flag: bool) -> bool:
    """True when ``flag`` holds on every process (one tiny all-reduce when ``model`` is sharded,
    ``flag`` itself otherwise): for choices that change how many forwards a step runs (every
    gather is a collective, so all processes must take the same path)."""
    if plan_of(model) is None:
        return flag
    import torch.distributed as dist

    backend = dist.get_backend()
    device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
    t = torch.tensor([1 if flag else 0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def check_lock_step(config: Any, model: Any, eval_sizes: list[int], world: int) -> None:
    """Refuse sharded runs whose processes would run a different number of forwards (a hang):
    the per-batch probe forwards of ``reward.readout=probe`` without a packed-mask attention
    (their count follows each process's episode count), and evaluation splits whose slices need
    different numbers of ``generate`` batches."""
    if plan_of(model) is None:
        return
    attn = getattr(model.config, "_attn_implementation", "sdpa")
    if config.causal and config.reward.readout == "probe" and attn not in PACKED_ATTENTION:
        raise ValueError(f"model.sharding={config.model.sharding} with reward.readout=probe needs the packed probe "
                         f"forward (attention {PACKED_ATTENTION}, got {attn!r}): pass --model.attn_implementation "
                         "sdpa, or --reward.readout boundary")
    bs = config.rollout.eval_batch_size
    for n in eval_sizes:
        slices = [n * (r + 1) // world - n * r // world for r in range(world)]
        calls = {(-(-k // bs) if bs else 1) if k else 0 for k in slices}
        if len(calls) > 1:
            raise ValueError(f"model.sharding={config.model.sharding}: an evaluation set of {n} problems splits into "
                             f"slices {slices}, which need different numbers of generate batches of "
                             f"{bs} on different processes; use an evaluation size that is a multiple of "
                             f"{world * (bs or 1)}")


# --------------------------------------------------------------------------------------------
# gradients and state
# --------------------------------------------------------------------------------------------


def is_sharded_param(p: torch.Tensor) -> bool:
    """A parameter whose gradient its sharding reduces (FSDP's DTensor, ZeRO-3's partitioned)."""
    from torch.distributed.tensor import DTensor

    return isinstance(p, DTensor) or hasattr(p, "ds_id")


def _full(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def clip_grad_norm(params: list[torch.nn.Parameter], max_norm: float | None) -> float:
    """The global L2 norm of the gradients (over every shard of every process), and, when
    ``max_norm`` is set, scale them to at most ``max_norm`` (as
    :func:`torch.nn.utils.clip_grad_norm_`, which handles FSDP's DTensor gradients: their norms
    are reduced over the shards). Returns the norm before clipping; inf / NaN when non-finite."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return 0.0
    if max_norm:
        total = torch.nn.utils.clip_grad_norm_(params, max_norm)
    else:
        total = torch.nn.utils.get_total_norm(grads) if hasattr(torch.nn.utils, "get_total_norm") else \
            torch.linalg.vector_norm(torch.stack([_full(torch.linalg.vector_norm(g.float())) for g in grads]))
    return float(_full(total))


def full_state_dict(model: Any) -> dict[str, torch.Tensor] | None:
    """Collective when sharded (every process must call it): the full, unsharded model state dict
    on the CPU, meaningful on the main process (FSDP leaves the others an empty dict); None when
    the model is not sharded (``save_pretrained`` then reads the model itself)."""
    plan = plan_of(model)
    if plan is None:
        return None
    if plan.mode == "zero3":
        deepspeed = _deepspeed()
        out: dict[str, torch.Tensor] = {}
        for name, t in model.state_dict(keep_vars=True).items():
            with deepspeed.zero.GatheredParameters([t] if hasattr(t, "ds_id") else [], modifier_rank=None):
                out[name] = t.detach().cpu().clone()
        return out
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def optimizer_state_dict(model: Any, optimizer: torch.optim.Optimizer) -> dict[str, Any] | None:
    """Collective under FSDP: the optimizer state with full (unsharded) tensors, keyed by
    parameter name (meaningful on the main process); ``optimizer.state_dict()`` unsharded; None
    under ZeRO-3 (its state lives in DeepSpeed's partitions and is not checkpointed: a resumed
    ZeRO-3 run restarts AdamW's moments)."""
    plan = plan_of(model)
    if plan is None:
        return optimizer.state_dict()
    if plan.mode == "zero3":
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer,
                                    options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_optimizer_state_dict(model: Any, optimizer: torch.optim.Optimizer, state: dict[str, Any] | None) -> None:
    """Inverse of :func:`optimizer_state_dict` (every process passes the full state it read;
    None, from a ZeRO-3 run, leaves the optimizer fresh)."""
    plan = plan_of(model)
    if state is None or (plan is not None and plan.mode == "zero3"):
        return
    if plan is None:
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, optim_state_dict=state,
                             options=StateDictOptions(full_state_dict=True))


# --------------------------------------------------------------------------------------------
# ZeRO-3
# --------------------------------------------------------------------------------------------


def _deepspeed() -> Any:
    try:
        import deepspeed
    except ImportError:
        raise ImportError("model.sharding=zero3 needs DeepSpeed: pip install deepspeed (and launch with "
                          "`accelerate launch --config_file <deepspeed zero-3 config> -m gccpo.train ...`)") from None
    return deepspeed


def zero3_config(max_grad_norm: float | None, environ: dict[str, str] | None = None) -> dict[str, Any]:
    """The DeepSpeed config for ``model.sharding=zero3``: the JSON file ``accelerate launch`` names
    (``deepspeed_config_file`` in its config: ``ACCELERATE_DEEPSPEED_CONFIG_FILE``), else ZeRO
    stage 3 with accelerate's offload settings (``ACCELERATE_DEEPSPEED_OFFLOAD_*_DEVICE``).
    The trainer owns the batch, the optimizer and the schedule: ``train_micro_batch_size_per_gpu``
    and ``gradient_accumulation_steps`` are 1 (the trainer marks the accumulation boundary
    itself), ``gradient_clipping`` is ``optim.max_grad_norm`` (DeepSpeed clips by the global
    norm over the partitions), and a config ``optimizer`` / ``scheduler`` section is an error."""
    import json
    import os

    env = os.environ if environ is None else environ
    path = env.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    if path and path.lower() != "none":
        with open(path) as f:
            config = json.load(f)
    else:
        zero: dict[str, Any] = {"stage": int(env.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3"))}
        for key, name in (("offload_optimizer", "OPTIMIZER"), ("offload_param", "PARAM")):
            device = env.get(f"ACCELERATE_DEEPSPEED_OFFLOAD_{name}_DEVICE", "none")
            if device != "none":
                zero[key] = {"device": device}
        config = {"zero_optimization": zero}
    stage = config.get("zero_optimization", {}).get("stage")
    if stage != 3:
        raise ValueError(f"model.sharding=zero3 needs a DeepSpeed ZeRO stage-3 config, got stage {stage!r}")
    for section in ("optimizer", "scheduler"):
        if section in config:
            raise ValueError(f"remove the '{section}' section of the DeepSpeed config: the trainer's AdamW and "
                             "warm-up schedule (optim.*) are used")
    config.update(train_micro_batch_size_per_gpu=1, gradient_accumulation_steps=1,
                  gradient_clipping=float(max_grad_norm or 0.0), zero_allow_untested_optimizer=True)
    config.pop("train_batch_size", None)
    for precision in ("bf16", "fp16"):  # "auto" (accelerate's placeholder): the trainer's autocast decides
        if isinstance(config.get(precision), dict) and config[precision].get("enabled") == "auto":
            config[precision]["enabled"] = False
    return config


class Zero3:
    """The DeepSpeed ZeRO-3 engine around the trainer's model and optimizer.

    The model object stays the trainer's (DeepSpeed partitions its parameters and hooks every
    submodule's forward, so the backbone and :func:`head_call` fetch what they use); backward
    and the optimizer step go through the engine: :meth:`backward` per micro-batch, :meth:`step`
    once per optimizer step (clipping by the global norm inside DeepSpeed)."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, max_grad_norm: float | None) -> None:
        deepspeed = _deepspeed()
        config = zero3_config(max_grad_norm)
        try:  # kept alive: tells transformers ZeRO-3 is on (generate then keeps the processes in step)
            from transformers.integrations import HfDeepSpeedConfig

            self._hf_config = HfDeepSpeedConfig(config)
        except ImportError:
            self._hf_config = None
        self.engine, self.optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)

    def backward(self, loss: torch.Tensor, *, last: bool) -> None:
        """Back-propagate one micro-batch; ``last``: the step's last one (gradients are reduced
        into the partitions at the boundary)."""
        # what engine.forward() does first (the trainer calls the model, not the engine): recent
        # DeepSpeed counts a finished micro-batch there, and without it the next micro-batch's
        # gradients would overwrite, not accumulate onto, the previous one's
        clear = getattr(self.engine.optimizer, "clear_backward_seen_flag", None)
        if clear is not None:
            clear()
        self.engine.set_gradient_accumulation_boundary(last)
        self.engine.backward(loss)

    def step(self, finite_loss: bool) -> float:
        """Apply the accumulated gradients (skipped, and the gradients dropped, when the loss was
        not finite); returns the global gradient norm (NaN when skipped)."""
        if not finite_loss:
            self.engine.zero_grad()
            return float("nan")
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")
