"""TRL glue: :class:`GCCPOGRPOTrainer` and a drop-in for TRL's fused log-prob head (TRL >= 1.16).

:class:`GCCPOGRPOTrainer` is built exactly like ``trl.GRPOTrainer`` (same arguments, a plain
``GRPOConfig``) and computes the loss with :func:`gccpo_kernels.fused_linear_policy_loss` from
the backbone's last hidden states and the output-embedding weight, never building
``[B, T, V]`` logits. It reproduces TRL's ``_compute_loss`` for ``loss_type`` ``grpo``,
``bnpo``, ``dr_grpo``, ``dapo`` and ``cispo`` (through :meth:`gccpo_kernels.PolicyLossConfig.from_trl`):
the normalizers, gradient-accumulation scaling and ``num_items_in_batch`` rescaling, ``epsilon``
/ ``epsilon_high``, ``delta``, ``beta`` with the k3 KL and ``use_bias_correction_kl``,
``temperature``, ``importance_sampling_level``, the static entropy bonus, ``old_per_token_logps``,
``ref_per_token_logps``, the vLLM ``importance_sampling_ratio``, ``tool_mask``, and the metrics TRL
logs (``kl``, ``entropy``, ``clip_ratio/*`` or, for cispo, ``cispo_clip_ratio``, ``policy_loss``
and ``entropy_coef`` with the entropy bonus). The forward goes through the model the trainer hands to ``compute_loss`` (the
DDP / FSDP / DeepSpeed-wrapped one): the model's ``forward`` is patched so that
``model(..., gccpo_head=fn)`` runs the backbone and calls ``fn(hidden, weight, bias)`` *inside*
the forward, where FSDP and ZeRO-3 hold the LM head's parameters.

Options the fused loss does not reproduce — loss types ``sapo``, ``luspo``, ``vespo``, ``off_policy_mask_threshold``, ``top_entropy_quantile < 1``, ``use_adaptive_entropy``,
MoE router auxiliary losses, vision-language models — make the trainer use TRL's own loss and
log-prob path unchanged, with a warning that says why (``gccpo_on_unsupported="fallback"``, the
default), or raise at construction (``"error"``). ``gccpo_fused_loss=False`` keeps TRL's loss
and replaces only TRL's log-prob + entropy kernel with this library's
(:func:`add_gccpo_fused_lm_head`).

``gccpo_causal_reward=True`` adds the GCCPO causal counterfactual reward (SPEC §3-§6): after TRL
scores a generation batch, completions are split into episodes (:mod:`gccpo.episodes`), one
no-grad forward of the policy (with the probe tokens packed in) gives the episode latents, the
kernels give robustness, effectiveness and the episode rewards (:func:`gccpo.rewards.causal_reward`),
and the advantages become token-level: TRL's outcome advantage (its ``scale_rewards`` and
``multi_objective_aggregation``) plus ``eta`` times the process advantage of
:func:`gccpo_kernels.token_advantages`. Groups are the ``num_generations`` consecutive rows TRL
makes; the effectiveness statistics use the process's local generation batch.

:func:`add_gccpo_fused_lm_head` has the signature of ``trl.trainer.utils.add_fused_lm_head``:
``model(..., labels=labels, fused_lm_head=True)`` then returns TRL's ``FusedCausalLMOutput``
with ``log_probs`` and ``entropy`` from :func:`gccpo_kernels.fused_linear_logprobs`, so any TRL
trainer that uses the fused head (GRPO, RLOO, DPO, KTO, SFT) can take this kernel.

Precision: the LM head always runs outside autocast, in the weight's dtype (hidden states are
cast to it), with float32 accumulation; under bf16 autocast with float32 weights that is a float32
head (TRL's would run in bf16 unless ``cast_lm_head_to_fp32``).
"""

from __future__ import annotations

import contextlib
import functools
import math
import types
import warnings
from typing import Any, Callable, Iterator

import torch

from gccpo_kernels import (PolicyLossConfig, PolicyLossOutput, fused_linear_logprobs, fused_linear_policy_loss,
                           reduce_metrics)

try:
    import trl
    from trl import GRPOConfig, GRPOTrainer
    from trl.trainer.utils import FusedCausalLMOutput, nanmax, nanmin
except ImportError as exc:  # pragma: no cover - depends on the install
    raise ImportError("gccpo.integrations.trl needs trl >= 1.16 (pip install 'gccpo[peers]'): "
                      f"importing it failed with {exc!r}") from exc
from packaging.version import Version

if Version(trl.__version__) < Version("1.16"):  # pragma: no cover - depends on the install
    raise ImportError(f"gccpo.integrations.trl needs trl >= 1.16 (its fused LM head and loss conventions), "
                      f"found {trl.__version__}")

__all__ = ["GCCPOGRPOTrainer", "GRPOConfig", "add_gccpo_fused_lm_head", "SUPPORTED_LOSS_TYPES", "logit_transform",
           "unsupported_options"]

#: TRL loss types the fused loss reproduces.
SUPPORTED_LOSS_TYPES: tuple[str, ...] = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo")
#: loss types whose denominator TRL takes from num_items_in_batch (and that TRL does not divide by
#: the accumulation steps afterwards).
_NUM_ITEMS_LOSS_TYPES: tuple[str, ...] = ("dapo", "cispo")
#: per-token outputs of TRL's FusedCausalLMOutput that this kernel computes.
SUPPORTED_OUTPUTS: tuple[str, ...] = ("log_probs", "entropy")
_MULTIMODAL_KEYS = ("pixel_values", "image_grid_thw", "pixel_attention_mask", "spatial_shapes", "image_sizes",
                    "token_type_ids", "mm_token_type_ids", "image_position_ids", "num_images", "num_tiles")
_IGNORE = -100


def _arg(args: Any, name: str, default: Any) -> Any:
    """A GRPOConfig option, or TRL's default where an older TRL lacks it."""
    return getattr(args, name, default)


# ------------------------------------------------------------------------------------------------
# the LM head: logit transform, parameters, forward patches
# ------------------------------------------------------------------------------------------------

def logit_transform(model: Any) -> tuple[float, float | None]:
    """``(logit_scale, softcap)`` of a causal LM's final logits (:func:`gccpo.models.logit_params`
    on its config, resolved as TRL's fused head does)."""
    from gccpo.models import logit_params

    return logit_params(model.config)


@contextlib.contextmanager
def _head_params(lm_head: torch.nn.Module) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
    """The LM head's full weight and bias, for a kernel that reads them directly.

    FSDP2 DTensors are gathered (differentiably). Under DeepSpeed ZeRO-3 the parameters are
    gathered for the forward and copied, because the kernel's backward recomputes the logits from
    the saved weight after ZeRO-3 has re-partitioned it (V x D extra memory; the copy's gradient
    flows to the parameter).
    """
    weight, bias = lm_head.weight, getattr(lm_head, "bias", None)
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - old torch
        DTensor = ()
    if DTensor and isinstance(weight, DTensor):
        weight = weight.full_tensor()
        bias = bias.full_tensor() if isinstance(bias, DTensor) else bias
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    if not is_deepspeed_zero3_enabled():
        yield weight, bias
        return
    from trl.trainer.utils import maybe_gather_lm_head_ctx

    with maybe_gather_lm_head_ctx(weight, bias):
        yield weight.clone(), (None if bias is None else bias.clone())


def _backbone_hidden(model: Any, args: tuple, kwargs: dict) -> torch.Tensor:
    """``[B, L, D]`` last hidden states of the backbone (no LM head, no cache)."""
    kwargs["use_cache"] = False
    out = model.base_model(*args, **kwargs)
    hidden = getattr(out, "last_hidden_state", None)
    if hidden is None:
        hidden = out[0]
    return hidden


def _install_head_hook(model: Any) -> None:
    """Patch ``model.forward``: ``model(..., gccpo_head=fn)`` returns ``fn(hidden, weight, bias)``.

    ``hidden`` is the backbone's ``[B, L, D]`` last hidden state (on the head's device), ``weight``
    / ``bias`` the LM head's full parameters (:func:`_head_params`). Without ``gccpo_head`` the
    previous forward runs (generation, TRL's fused head). Idempotent.
    """
    if getattr(model, "_gccpo_head_hook", False):
        return
    previous = model.forward

    @functools.wraps(type(model).forward)
    def forward(self, *args, gccpo_head: Callable[..., Any] | None = None, **kwargs):
        if gccpo_head is None:
            return previous(*args, **kwargs)
        hidden = _backbone_hidden(self, args, kwargs)
        lm_head = self.get_output_embeddings()
        with torch.autocast(hidden.device.type, enabled=False), _head_params(lm_head) as (weight, bias):
            return gccpo_head(hidden.to(weight.device), weight, bias)

    model.forward = types.MethodType(forward, model)
    model._gccpo_head_hook = True


def add_gccpo_fused_lm_head(model: Any, temperature: float = 1.0, cast_lm_head_to_fp32: bool = False,
                            outputs: tuple[str, ...] = ("log_probs",), *, backend: str | None = None) -> None:
    """Drop-in for ``trl.trainer.utils.add_fused_lm_head`` on this library's kernel.

    After it, ``model(..., labels=labels, fused_lm_head=True)`` (or ``shift_labels=``, already
    shifted) runs the backbone and returns TRL's ``FusedCausalLMOutput`` with ``log_probs`` and,
    if asked, ``entropy`` (``[B, L - 1]``, or the shape of ``shift_labels``; 0 where the label is
    -100), ``label_mask``, and ``loss`` = -sum(log_probs) / ``num_items_in_batch`` (the label
    count when not passed). Other calls run the previous forward, so generation is unchanged.
    ``[B, L, V]`` logits are never built.

    Args:
        model: a ``transformers`` causal LM (for PEFT, its base model, before wrapping).
        temperature: divides the logits.
        cast_lm_head_to_fp32: run the head in float32 (hidden states and weight upcast).
        outputs: among :data:`SUPPORTED_OUTPUTS`; TRL's ``log_sum_sq_probs``, ``mean_logits`` and
            ``is_top1`` are not computed by this kernel and raise here.
        backend: this library's backend (None: automatic).

    Raises:
        ValueError: an unsupported output, or a Mixture-of-Experts model whose config asks for
            router logits (the auxiliary loss is TRL's; keep ``add_fused_lm_head`` there).

    (67 lines, kept whole: the patched forward must close over the head's parameters and the
    transform resolved here.)
    """
    unknown = [o for o in outputs if o not in SUPPORTED_OUTPUTS]
    if unknown:
        raise ValueError(f"outputs {unknown} are not computed by the gccpo kernel (it gives {SUPPORTED_OUTPUTS}); "
                         "use trl.trainer.utils.add_fused_lm_head for them")
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    if getattr(model.config.get_text_config(), "output_router_logits", False):
        raise ValueError(f"{type(model).__name__} returns router logits for a MoE auxiliary loss, which this head "
                         "does not compute; use trl.trainer.utils.add_fused_lm_head")
    previous = model.forward
    scale, softcap = logit_transform(model)
    want_entropy = "entropy" in outputs

    @functools.wraps(type(model).forward)
    def forward(self, *args, fused_lm_head: bool = False, labels=None, shift_labels=None,
                num_items_in_batch=None, **kwargs):
        if not fused_lm_head:
            for key, value in (("labels", labels), ("shift_labels", shift_labels),
                               ("num_items_in_batch", num_items_in_batch)):
                if value is not None:
                    kwargs[key] = value
            return previous(*args, **kwargs)
        if labels is None and shift_labels is None:
            raise ValueError("fused_lm_head=True needs labels= (or shift_labels=): the tokens to score")
        hidden = _backbone_hidden(self, args, kwargs)
        if shift_labels is None:
            hidden, targets = hidden[:, :-1], labels[:, 1:]
        else:
            targets = shift_labels
        lm_head = self.get_output_embeddings()
        with torch.autocast(hidden.device.type, enabled=False), _head_params(lm_head) as (weight, bias):
            if cast_lm_head_to_fp32:
                weight, bias = weight.float(), (None if bias is None else bias.float())
            targets = targets.to(weight.device)
            logp, entropy = fused_linear_logprobs(
                hidden.to(device=weight.device, dtype=weight.dtype), weight, targets, bias=bias,
                temperature=temperature, logit_scale=scale, softcap=softcap, ignore_index=_IGNORE,
                return_entropy=want_entropy, backend=backend)
        mask = targets != _IGNORE
        denominator = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
        return FusedCausalLMOutput(loss=-logp.sum() / denominator, log_probs=logp, entropy=entropy,
                                   label_mask=mask)

    model.forward = types.MethodType(forward, model)


# ------------------------------------------------------------------------------------------------
# the trainer
# ------------------------------------------------------------------------------------------------

def unsupported_options(trainer: GRPOTrainer) -> list[str]:
    """Why the fused loss cannot reproduce this GRPOTrainer's loss (empty: it can)."""
    reasons = []
    if trainer.loss_type not in SUPPORTED_LOSS_TYPES:
        reasons.append(f"loss_type={trainer.loss_type!r} (the fused loss covers {SUPPORTED_LOSS_TYPES})")
    if getattr(trainer, "off_policy_mask_threshold", None) is not None:
        reasons.append("off_policy_mask_threshold (off-policy sequence masking)")
    if getattr(trainer, "top_entropy_quantile", 1.0) < 1.0:
        reasons.append(f"top_entropy_quantile={trainer.top_entropy_quantile} (high-entropy token masking)")
    if getattr(trainer, "use_adaptive_entropy", False):
        reasons.append("use_adaptive_entropy (the adaptive entropy-coefficient controller)")
    if getattr(trainer, "aux_loss_enabled", False):
        reasons.append("a MoE router auxiliary loss (router_aux_loss_coef)")
    if getattr(trainer, "_is_vlm", False):
        reasons.append("a vision-language model (image inputs)")
    return reasons


def _row_clip_fractions(logp: torch.Tensor, old: torch.Tensor, adv: torch.Tensor, mask: torch.Tensor,
                        cfg: PolicyLossConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """TRL's per-sequence clip diagnostics (``clip_ratio/low_min``, ``high_max`` before the
    min/max): per row, the fraction of tokens clipped low / high; NaN for a row without tokens;
    the row's value itself for sequence-level ratios with per-sequence advantages."""
    m = mask != 0
    log_ratio = torch.where(m, logp.double() - old.double(), 0.0)
    if cfg.importance_sampling_level == "sequence":
        log_ratio = log_ratio.sum(1, keepdim=True) / m.sum(1, keepdim=True).clamp(min=1)
    ratio = torch.exp(log_ratio)
    if cfg.delta is not None:
        ratio = ratio.clamp(max=cfg.delta)
    a = adv.double()
    a = a[:, None] if a.dim() == 1 else a
    low = (ratio < 1 - cfg.eps_low) & (a < 0)
    high = (ratio > 1 + cfg.clip_high) & (a > 0)
    if low.shape[1] == 1:
        return low[:, 0].float(), high[:, 0].float()
    count = m.sum(1).float()
    return (low & m).sum(1).float() / count, (high & m).sum(1).float() / count


def trl_process_advantages(causal: Any, outcome: torch.Tensor, group_index: torch.Tensor, episode_ids: torch.Tensor,
                           old_logp: torch.Tensor, mask: torch.Tensor, config: Any,
                           backend: str | None) -> torch.Tensor:
    """``[B, T]`` the process-only advantages (SPEC §6 on zero outcome rewards, eta = 1) of the
    formulation's episode rewards ``causal`` after the gate, with the token-advantage options the
    trainer uses (:func:`gccpo.shaping.advantage_options`). TRL's per-sequence advantages
    ``outcome`` [B] decide the ``"signal"`` gate: a group's advantages are all equal iff its rewards
    are, so they stand in for the rewards."""
    import gccpo_kernels as gk
    from gccpo.shaping import advantage_options, gate_episodes

    rewards = gate_episodes(causal.reward, outcome, group_index, config)
    return gk.token_advantages(torch.zeros(outcome.shape[0], device=outcome.device), group_index, episode_ids,
                               rewards, old_logp, mask, eta=1.0, backend=backend,
                               **advantage_options(config, causal))


def trl_token_advantages(outcome: torch.Tensor, process: torch.Tensor, mask: torch.Tensor,
                         config: Any) -> torch.Tensor:
    """``[B, T]`` token advantages from TRL's per-sequence outcome advantage ``outcome`` [B] and
    the process-only advantages ``process`` [B, T] (token_advantages on zero outcome rewards with
    eta = 1), through the trainer's one shaping path (:func:`gccpo.shaping.shape_advantages`:
    eta, the gate and the bound), 0 where ``mask`` is 0."""
    from gccpo.shaping import shape_advantages

    base = outcome.to(process.dtype)[:, None].expand_as(process)
    shaped = shape_advantages(lambda eta: base + eta * process if eta else base, config.eta, config)
    total = shaped.total
    return torch.where(mask != 0, total, torch.zeros((), dtype=total.dtype, device=total.device))


class GCCPOGRPOTrainer(GRPOTrainer):
    """``trl.GRPOTrainer`` whose loss is :func:`gccpo_kernels.fused_linear_policy_loss`.

    Built like ``GRPOTrainer`` (every positional and keyword argument is passed on; every option
    is read from the ``GRPOConfig``), plus keyword-only options:

    Args:
        gccpo_fused_loss: True (default): the fused loss from hidden states (see the module
            docstring); False: TRL's own loss on this library's log-prob + entropy kernel.
        gccpo_causal_reward: add the GCCPO causal reward and token-level advantages.
        gccpo_reward: a :class:`gccpo.config.RewardConfig` (eta, weights, readout, perturbations,
            divergence, effectiveness, process gate, token-advantage options) with formulation
            ``"spec"`` or ``"mi_floor"`` (the ones TRL's batch carries what they read); default
            ``RewardConfig(formulation="spec")`` (gccpo-train's default, ``"paper"``, needs each
            row's outcome reward inside the causal reward). ``answer_tokens="digits"`` restricts
            the answer distribution to digit and minus tokens; ``"auto"`` and ``"full"`` use the whole vocabulary.
        gccpo_episodes: a :class:`gccpo.episodes.EpisodeConfig` (default: blank-line episodes).
        gccpo_backend: the kernels' backend (None: automatic).
        gccpo_on_unsupported: ``"fallback"`` (TRL's own loss, with a warning) or ``"error"``
            when the config uses an option the fused loss does not reproduce
            (:func:`unsupported_options`).

    Attributes:
        gccpo_loss_path: ``"fused"``, ``"trl-loss-gccpo-logprobs"`` or ``"trl"`` (fallback).
        gccpo_fallback_reason: why ``"trl"`` was chosen (None otherwise).
        gccpo_loss_config: the :class:`gccpo_kernels.PolicyLossConfig` of the fused loss.
    """

    def __init__(self, *args: Any, gccpo_fused_loss: bool = True, gccpo_causal_reward: bool = False,
                 gccpo_reward: Any = None, gccpo_episodes: Any = None, gccpo_backend: str | None = None,
                 gccpo_on_unsupported: str = "fallback", **kwargs: Any):
        if gccpo_on_unsupported not in ("fallback", "error"):
            raise ValueError(f"gccpo_on_unsupported must be 'fallback' or 'error', got {gccpo_on_unsupported!r}")
        self._gccpo_causal = bool(gccpo_causal_reward)
        if self._gccpo_causal:
            from gccpo.config import RewardConfig
            from gccpo.episodes import EpisodeConfig

            gccpo_reward = RewardConfig(formulation="spec") if gccpo_reward is None else gccpo_reward
            gccpo_episodes = EpisodeConfig() if gccpo_episodes is None else gccpo_episodes
            if not isinstance(gccpo_reward, RewardConfig):
                raise TypeError(f"gccpo_reward must be a gccpo.config.RewardConfig, got {type(gccpo_reward).__name__}")
            if not isinstance(gccpo_episodes, EpisodeConfig):
                raise TypeError("gccpo_episodes must be a gccpo.episodes.EpisodeConfig, got "
                                f"{type(gccpo_episodes).__name__}")
        elif gccpo_reward is not None or gccpo_episodes is not None:
            raise ValueError("gccpo_reward / gccpo_episodes configure the causal reward: set gccpo_causal_reward=True")
        self.gccpo_reward, self.gccpo_episodes = gccpo_reward, gccpo_episodes
        self._gccpo_backend = gccpo_backend
        super().__init__(*args, **kwargs)

        base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        self._gccpo_logit_scale, self._gccpo_softcap = logit_transform(base)
        self.gccpo_fallback_reason = None
        self.gccpo_loss_config = None
        reasons = unsupported_options(self) if gccpo_fused_loss else []
        if reasons:
            message = ("GCCPOGRPOTrainer: the fused loss does not reproduce " + "; ".join(reasons))
            if gccpo_on_unsupported == "error":
                raise ValueError(message + ". Remove these options, or pass gccpo_on_unsupported='fallback' to "
                                 "train with TRL's own loss")
            warnings.warn(message + ": training with TRL's own loss and log-prob kernel instead", stacklevel=2)
            self.gccpo_fallback_reason = "; ".join(reasons)
            self.gccpo_loss_path = "trl"
        elif gccpo_fused_loss:
            self.gccpo_loss_path = "fused"
            self.gccpo_loss_config = PolicyLossConfig.from_trl(
                self.loss_type, epsilon=self.epsilon_low, epsilon_high=self.epsilon_high, beta=self.beta,
                delta=_arg(self.args, "delta", None), max_completion_length=self.max_completion_length,
                use_bias_correction_kl=_arg(self.args, "use_bias_correction_kl", True),
                importance_sampling_level=self.importance_sampling_level, entropy_coef=self.entropy_coef)
        else:
            self.gccpo_loss_path = "trl-loss-gccpo-logprobs"
        if self.gccpo_loss_path != "trl":
            # old / ref / current log-probs from one kernel, so a first-iteration ratio is exactly 1
            cast = _arg(self.args, "cast_lm_head_to_fp32", False)
            add_gccpo_fused_lm_head(base, temperature=self.temperature, cast_lm_head_to_fp32=cast,
                                    outputs=("log_probs", "entropy"), backend=gccpo_backend)
            if self.ref_model is not None:
                add_gccpo_fused_lm_head(self.ref_model, temperature=self.temperature, cast_lm_head_to_fp32=cast,
                                        backend=gccpo_backend)
        _install_head_hook(base)
        if self._gccpo_causal:
            self._gccpo_check_causal(base)

    # -------------------------------------------------------------------------------------------
    # loss
    # -------------------------------------------------------------------------------------------

    def _compute_loss(self, model: Any, inputs: dict[str, Any]) -> torch.Tensor:
        if self.gccpo_loss_path != "fused":
            return super()._compute_loss(model, inputs)
        present = [k for k in _MULTIMODAL_KEYS if inputs.get(k) is not None]
        if present:
            raise ValueError(f"the fused loss takes text inputs only, got {present}")
        prompt_ids, prompt_mask = inputs["prompt_ids"], inputs["prompt_mask"]
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]
        n = completion_ids.size(1)
        mode = "train" if self.model.training else "eval"
        accumulation = self.current_gradient_accumulation_steps if mode == "train" else 1
        normalizer = None
        if self.loss_type in _NUM_ITEMS_LOSS_TYPES:  # num_items_in_batch spans the generation batch of all processes
            normalizer = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
            if mode == "train":
                normalizer = normalizer / self.args.steps_per_generation
        is_weights = None
        if self.use_vllm and self.vllm_importance_sampling_correction:
            is_weights = inputs["importance_sampling_ratio"]
        ref = inputs["ref_per_token_logps"] if self.beta != 0.0 else None
        old = inputs.get("old_per_token_logps")
        advantages = inputs["advantages"]

        def head(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> PolicyLossOutput:
            h = hidden[:, -n - 1:-1]  # the states that predict the completion tokens
            return fused_linear_policy_loss(
                h.to(weight.dtype), weight, completion_ids.to(weight.device), advantages, mask, old_logp=old,
                ref_logp=ref, bias=bias, temperature=self.temperature, logit_scale=self._gccpo_logit_scale,
                softcap=self._gccpo_softcap, is_weights=is_weights, config=self.gccpo_loss_config,
                normalizer=normalizer, loss_scale=1.0 / accumulation, backend=self._gccpo_backend)

        with self.accelerator.autocast():
            out = model(input_ids=torch.cat([prompt_ids, completion_ids], 1),
                        attention_mask=torch.cat([prompt_mask, completion_mask], 1), gccpo_head=head)
        self._gccpo_log_loss_metrics(out, old, advantages, mask, mode, accumulation)
        return out.loss

    def _gccpo_log_loss_metrics(self, out: PolicyLossOutput, old: torch.Tensor | None, advantages: torch.Tensor,
                                mask: torch.Tensor, mode: str, accumulation: int) -> None:
        """The metrics TRL's ``_compute_loss`` logs, under its names (plus ``gccpo/*`` extras)."""
        cfg = self.gccpo_loss_config
        group = True if self.accelerator.num_processes > 1 else None
        values = reduce_metrics(out.metrics, process_group=group)
        log = self._metrics[mode]
        if self._entropy_bonus_enabled:
            # TRL's policy_loss: the policy term before the entropy bonus (and, except for dapo and
            # cispo, before the 1 / accumulation scaling); its entropy term is a local token mean
            ent_sum, ent_count = out.metrics["entropy"].tolist()
            bonus = self.entropy_coef * ent_sum / max(ent_count, 1.0) / accumulation
            policy = out.loss.detach() + bonus
            if self.loss_type not in _NUM_ITEMS_LOSS_TYPES:
                policy = policy * accumulation
            log["policy_loss"].append(self.accelerator.gather(policy.reshape(1)).nanmean().item())
            if mode == "train" and self.accelerator.sync_gradients:
                log["entropy_coef"].append(self.entropy_coef)
        if self.beta != 0.0:
            log["kl"].append(values["kl_ref"])
        log["entropy"].append(values["entropy"])
        if cfg.surrogate == "cispo":  # TRL logs one clip metric for cispo: r > epsilon_high with A > 0
            log["cispo_clip_ratio"].append(values["clip_frac_high"])
        else:
            log["clip_ratio/low_mean"].append(values["clip_frac_low"])
            log["clip_ratio/high_mean"].append(values["clip_frac_high"])
            log["clip_ratio/region_mean"].append(values["clip_frac_region"])
            low_rows, high_rows = _row_clip_fractions(out.logp, out.logp if old is None else old, advantages, mask,
                                                      cfg)
            log["clip_ratio/low_min"].append(nanmin(self.accelerator.gather(low_rows)).item())
            log["clip_ratio/high_max"].append(nanmax(self.accelerator.gather(high_rows)).item())
        log["gccpo/approx_kl"].append(values["approx_kl"])
        log["gccpo/ratio_max"].append(values["ratio_max"])

    # -------------------------------------------------------------------------------------------
    # causal reward
    # -------------------------------------------------------------------------------------------

    def _gccpo_check_causal(self, base: Any) -> None:
        from gccpo.probes import PACKED_ATTENTION, probe_token_ids
        from gccpo.rewards import answer_token_ids

        rc = self.gccpo_reward
        rc.check()  # its allowed values, checked once in the dataclass (it may have been changed since)
        if rc.readout == "probe":
            impl = getattr(base.config, "_attn_implementation", "sdpa")
            if impl not in PACKED_ATTENTION:
                raise ValueError(f"the probe readout packs every probe into one forward with a 4D attention mask, "
                                 f"which {impl!r} attention does not take: use attn_implementation in "
                                 f"{PACKED_ATTENTION} or RewardConfig(readout='boundary')")
            self._gccpo_probe_ids = probe_token_ids(self._tokenizer, rc)
        if rc.formulation not in ("spec", "mi_floor"):
            raise ValueError(f"RewardConfig.formulation={rc.formulation!r}: the TRL integration computes 'spec' and "
                             "'mi_floor' (info_gain needs each row's reference answer and paper its outcome "
                             "reward, which TRL's batch does not carry; use gccpo-train)")
        self._gccpo_answer_ids = answer_token_ids(self._tokenizer, "digits") if rc.answer_tokens == "digits" else None
        self._gccpo_generator = None

    def _generate_and_score_completions(self, inputs: list[dict[str, Any]]) -> dict[str, Any]:
        output = super()._generate_and_score_completions(inputs)
        if self._gccpo_causal and self.model.training:
            output["advantages"] = self._gccpo_token_advantages(output)
        return output

    @torch.no_grad()
    def _gccpo_token_advantages(self, batch: dict[str, Any]) -> torch.Tensor:
        """``[B, T]`` TRL's outcome advantage + eta * the causal process advantage (SPEC §6).

        (75 lines, kept whole: it follows TRL's batch layout step by step — episodes, the packed
        probe forward through the model's own forward hook, the formulation, the shaping — and the
        pieces share that layout's locals.)"""
        from gccpo.episodes import split_episodes
        from gccpo.formulations import FORMULATION_REGISTRY, Readouts
        from gccpo.probes import EpisodeIndex, packed_probe_mask

        rc = self.gccpo_reward
        prompt_ids, prompt_mask = batch["prompt_ids"], batch["prompt_mask"]
        completion_ids, completion_mask = batch["completion_ids"], batch["completion_mask"]
        mask = completion_mask if "tool_mask" not in batch else completion_mask * batch["tool_mask"]
        outcome = batch["advantages"]
        if outcome.dim() != 1:
            raise ValueError(f"expected TRL's per-sequence advantages [B], got {tuple(outcome.shape)}")
        b, n = completion_ids.shape
        g = self.num_generations
        if b % g:
            raise ValueError(f"the local generation batch has {b} rows, not a multiple of num_generations={g}: "
                             "the causal reward needs whole groups on each process (make per_device_train_batch_"
                             "size * steps_per_generation a multiple of num_generations)")
        device = completion_ids.device
        group_index = torch.arange(b, device=device) // g
        episodes = split_episodes(completion_ids, mask, self._tokenizer, self.gccpo_episodes).to(device)
        k = max(episodes.num_episodes, 1)
        ends = episodes.episode_ends
        if ends.shape[1] < k:
            ends = torch.cat([ends, ends.new_full((b, k - ends.shape[1]), -1)], 1)
        index = EpisodeIndex.of(episodes)
        p = prompt_ids.shape[1]
        s = p + n
        input_ids = torch.cat([prompt_ids, completion_ids], 1)
        attention_mask = torch.cat([prompt_mask, completion_mask], 1)
        if self._gccpo_generator is None or self._gccpo_generator.device != device:
            self._gccpo_generator = torch.Generator(device=device).manual_seed(rc.seed)
        probe = rc.readout == "probe"
        if probe:
            n_probe = len(self._gccpo_probe_ids)
            base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
            dtype = None if base.config._attn_implementation == "sdpa" else next(base.parameters()).dtype
            mask4d, positions = packed_probe_mask(attention_mask, ends, p, n_probe, dtype)
            probe_t = torch.tensor(self._gccpo_probe_ids, dtype=torch.long, device=device)
            kwargs = dict(input_ids=torch.cat([input_ids, probe_t.repeat(k).unsqueeze(0).expand(b, -1)], 1),
                          attention_mask=mask4d, position_ids=positions)
        else:
            kwargs = dict(input_ids=input_ids, attention_mask=attention_mask)
        targets = completion_ids.masked_fill(mask == 0, _IGNORE)

        def head(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
            logp, _ = fused_linear_logprobs(hidden[:, p - 1:s - 1].to(weight.dtype), weight, targets.to(weight.device),
                                            bias=bias, temperature=self.temperature,
                                            logit_scale=self._gccpo_logit_scale, softcap=self._gccpo_softcap,
                                            backend=self._gccpo_backend)
            if probe:
                at = s + torch.arange(k, device=hidden.device) * n_probe + (n_probe - 1)
                per_row = hidden[:, at]
            else:
                per_row = hidden[torch.arange(b, device=hidden.device)[:, None], p + ends.clamp_min(0)]
            latents = per_row[index.rows, index.ks]
            readouts = Readouts(latents, index, group_index, (b, k), weight, bias, rc,
                                logit_scale=self._gccpo_logit_scale, softcap=self._gccpo_softcap,
                                answer_ids=self._gccpo_answer_ids, generator=self._gccpo_generator,
                                backend=self._gccpo_backend)
            causal = FORMULATION_REGISTRY[rc.formulation](readouts)
            return logp, causal

        with self.accelerator.autocast():
            logp, causal = self.model(gccpo_head=head, **kwargs)
        old = batch.get("old_per_token_logps")
        old = logp if old is None else old
        process = trl_process_advantages(causal, outcome, group_index, episodes.episode_ids, old.float(), mask, rc,
                                         self._gccpo_backend)
        mode = "train" if self.model.training else "eval"
        for key, value in causal.metrics().items():
            self._metrics[mode]["gccpo/" + key.split("/", 1)[-1]].append(value)
        self._metrics[mode]["gccpo/episodes_per_completion"].append(float(episodes.episode_counts.float().mean()))
        return trl_token_advantages(outcome, process, mask, rc)

