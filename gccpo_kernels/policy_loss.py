"""SPEC §2: the token-level clipped policy loss, written once, and its fused LM-head form.

Public:

- :class:`PolicyLossConfig` — every knob of the loss, with :meth:`PolicyLossConfig.from_trl` and
  :meth:`PolicyLossConfig.from_verl` reproducing those trainers' losses.
- :func:`policy_loss` — THE copy of the loss math, plain differentiable torch on padded ``[B, T]``
  log-probs. The unfused path (log-probs from any model) and the fused path below both call it.
  It composes :func:`importance_ratio`, the surrogate named by ``config.surrogate`` (looked up in
  :data:`gccpo_kernels.surrogates.SURROGATES`: ``"clip"``, ``"cispo"``, or one you register),
  :func:`kl_to_reference`, :func:`aggregate` and :func:`loss_metrics`.
- :func:`fused_linear_policy_loss` / :class:`FusedLinearPolicyLoss` — hidden states + LM-head
  weight in, loss out, never building ``[B*T, V]`` logits: composition of
  :func:`gccpo_kernels.fused_linear_logprobs` (SPEC §1) and :func:`policy_loss`.
- :func:`reduce_metrics` — turns the metrics' (sum, count) pairs into numbers, optionally
  all-reduced over a process group.

Two ways to the gradient, one copy of the math. For a token-level loss (every TRL and verl
aggregation) on the torch and triton backends, the fused loss computes its gradient in the
forward (:mod:`gccpo_kernels.loss_in_forward`): each row chunk's logits give its logp and entropy, the
per-token derivative of :func:`policy_loss` (through autograd, on the chunk's tokens) times the
aggregation weights (the loss's own aggregation differentiated on the mask) gives the logit
gradient, and d hidden / d weight follow, with no recompute: 6NVD GEMM FLOPs instead of 8NVD;
the backward only scales by ``grad_output``. Everywhere else (sequence-level importance sampling,
whose per-token gradient needs the whole row; vocabulary parallelism; torch.compile tracing; the
reference backend) the loss is composed: :func:`gccpo_kernels.fused_linear_logprobs`
(2NVD forward, 6NVD backward with one recompute of the logits) then :func:`policy_loss`, and
autograd joins them. Both give the same loss, metrics and gradients (tests/kernels/test_loss_in_forward.py:
to 1e-12 in float64); benchmarks/test_bench_policy_loss.py measures the fused form against the
naive eager loss and Liger's in-forward gradient.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch

from ._aggregation import LOSS_AGGS, aggregate
from ._backend import resolve_backend
from ._logits import LogitParams
from ._loss_checks import checked_loss_inputs, checked_mask, finite_advantages, masked_targets
from ._validation import (check_float, check_lm_head, check_logit_params, check_same_device,
                          out_dtype_for)
from .surrogates import SURROGATE_OPTIONS, SURROGATES, SurrogateTerms, get_surrogate


IS_LEVELS: tuple[str, ...] = ("token", "sequence")
#: TRL 1.16 ``loss_type`` -> (surrogate, aggregation) of :meth:`PolicyLossConfig.from_trl`.
TRL_LOSSES: dict[str, tuple[str, str]] = {
    "grpo": ("clip", "seq-mean-token-mean"),
    "bnpo": ("clip", "token-mean"),
    "dr_grpo": ("clip", "seq-mean-token-sum-norm"),
    "dapo": ("clip", "token-mean"),
    "cispo": ("cispo", "token-mean"),
}
TRL_LOSS_TYPES: tuple[str, ...] = tuple(TRL_LOSSES)
#: verl ``policy_loss.loss_mode`` -> surrogate of :meth:`PolicyLossConfig.from_verl`.
VERL_LOSS_MODES: dict[str, str] = {"vanilla": "clip"}
METRIC_NAMES: tuple[str, ...] = (
    "clip_frac_low", "clip_frac_high", "clip_frac_region", "clip_frac_dual", "approx_kl",
    "kl_ref", "entropy", "ratio_mean", "ratio_max",
)


def _finite_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


@dataclass(frozen=True)
class PolicyLossConfig:
    """The loss of SPEC §2. Defaults: PPO/GRPO clip 0.2, no KL, no entropy, ``token-mean``.

    Attributes:
        eps_low: lower clip, the clipped ratio is >= 1 - eps_low.
        eps_high: upper clip (None: eps_low); DAPO's clip-higher uses 0.28. For
            ``surrogate="cispo"`` it is the absolute cap on the importance weight (TRL's
            ``epsilon_high`` there, e.g. 5.0).
        delta: cap on the ratio of the *unclipped* branch (TRL's ``delta``, INTELLECT-2), > 1.
        dual_clip: c > 1: for A < 0 the per-token policy loss is at most c*|A| (verl's clip_ratio_c).
        beta: weight of the k3 KL to the reference, exp(ref - logp) - (ref - logp) - 1.
        entropy_coef: weight of the entropy bonus (subtracted).
        kl_bias_correction: multiply the KL by the (uncapped) ratio (TRL's use_bias_correction_kl).
        importance_sampling_level: ``"token"`` or ``"sequence"`` (GSPO: the exp of the masked
            mean log-ratio of the row, broadcast to its tokens).
        loss_agg: one of :data:`LOSS_AGGS` (SPEC §2's meanings).
        max_len: the L of ``seq-mean-token-sum-norm`` (denominator B*L); None: the padded T.
        surrogate: the policy term, by name in :data:`gccpo_kernels.surrogates.SURROGATES`:
            ``"clip"`` (PPO / GRPO / DAPO / GSPO; reads ``delta`` and ``dual_clip``) or
            ``"cispo"``; :func:`gccpo_kernels.surrogates.register_surrogate` adds one.

    Trainer-compatibility knobs (set by :meth:`from_verl`; off by default, SPEC's meaning):
        log_ratio_clamp: clamp logp - old_logp to [-c, c] before exp (verl: 20).
        kl_log_ratio_clamp: clamp ref - logp to [-c, c] inside the KL (verl low_var_kl: 20).
        kl_value_clamp: clamp the per-token KL to [-c, c] (verl low_var_kl: 10).
        skip_empty_rows: the seq-mean modes average over rows with >= 1 unmasked token instead
            of all B rows (verl).
        sum_norm_rows: ``seq-mean-token-sum-norm`` divides by rows * L (True, SPEC and TRL's
            dr_grpo) or by L alone (False, verl).
        entropy_agg: None: the entropy bonus is part of the per-token loss and aggregated with it
            (SPEC, verl); a mode name: aggregated separately that way, with its own local
            denominator and not the ``normalizer`` (TRL: ``"token-mean"``).
    """

    eps_low: float = 0.2
    eps_high: float | None = None
    delta: float | None = None
    dual_clip: float | None = None
    beta: float = 0.0
    entropy_coef: float = 0.0
    kl_bias_correction: bool = False
    importance_sampling_level: str = "token"
    loss_agg: str = "token-mean"
    max_len: int | None = None
    log_ratio_clamp: float | None = None
    kl_log_ratio_clamp: float | None = None
    kl_value_clamp: float | None = None
    skip_empty_rows: bool = False
    sum_norm_rows: bool = True
    entropy_agg: str | None = None
    surrogate: str = "clip"

    def __post_init__(self) -> None:
        if not _finite_number(self.eps_low) or not 0 <= self.eps_low <= 1:
            raise ValueError(f"eps_low must be in [0, 1] (the ratio is clipped at >= 1 - eps_low), "
                             f"got {self.eps_low!r}")
        if self.eps_high is not None and (not _finite_number(self.eps_high) or self.eps_high < 0):
            raise ValueError(f"eps_high must be None (= eps_low) or a finite number >= 0, got {self.eps_high!r}")
        if self.delta is not None and (not _finite_number(self.delta) or self.delta <= 1):
            raise ValueError(
                f"delta caps the ratio of the unclipped branch and must be > 1 (INTELLECT-2 uses "
                f"delta > 1 + eps_high, e.g. 4.0), got {self.delta!r}; set delta=None to disable it")
        if self.dual_clip is not None and (not _finite_number(self.dual_clip) or self.dual_clip <= 1):
            raise ValueError(f"dual_clip must be None or a number c > 1 (verl uses 3.0), got {self.dual_clip!r}")
        if not _finite_number(self.beta) or self.beta < 0:
            raise ValueError(f"beta must be a finite number >= 0, got {self.beta!r}")
        if not _finite_number(self.entropy_coef):
            raise ValueError(f"entropy_coef must be a finite number, got {self.entropy_coef!r}")
        if self.importance_sampling_level not in IS_LEVELS:
            raise ValueError(f"importance_sampling_level must be one of {IS_LEVELS}, "
                             f"got {self.importance_sampling_level!r}")
        if self.loss_agg not in LOSS_AGGS:
            raise ValueError(f"loss_agg must be one of {LOSS_AGGS}, got {self.loss_agg!r} "
                             "(TRL loss types: use PolicyLossConfig.from_trl; verl: from_verl)")
        if self.entropy_agg is not None and self.entropy_agg not in LOSS_AGGS:
            raise ValueError(f"entropy_agg must be None (aggregate with the loss) or one of {LOSS_AGGS}, "
                             f"got {self.entropy_agg!r}")
        if self.max_len is not None:
            if isinstance(self.max_len, bool) or not isinstance(self.max_len, int) or self.max_len < 1:
                raise ValueError(f"max_len must be None or an int >= 1, got {self.max_len!r}")
            if "seq-mean-token-sum-norm" not in (self.loss_agg, self.entropy_agg):
                raise ValueError(
                    f"max_len is only used by loss_agg='seq-mean-token-sum-norm', but loss_agg is "
                    f"{self.loss_agg!r}: drop max_len or set loss_agg='seq-mean-token-sum-norm'")
        for name in ("log_ratio_clamp", "kl_log_ratio_clamp", "kl_value_clamp"):
            value = getattr(self, name)
            if value is not None and (not _finite_number(value) or value <= 0):
                raise ValueError(f"{name} must be None or a finite number > 0, got {value!r}")
        if not isinstance(self.surrogate, str):
            raise ValueError(f"surrogate must be the name of a registered surrogate {tuple(SURROGATES)}, "
                             f"got {self.surrogate!r}")
        reads = get_surrogate(self.surrogate).options
        for name in SURROGATE_OPTIONS:
            if getattr(self, name) is not None and name not in reads:
                raise ValueError(f"{name}={getattr(self, name)!r} is not read by surrogate={self.surrogate!r} "
                                 f"(it reads {sorted(reads) or 'none of ' + str(SURROGATE_OPTIONS)}): "
                                 f"set {name}=None")

    @property
    def clip_high(self) -> float:
        """The effective upper clip epsilon (eps_high, or eps_low when eps_high is None)."""
        return self.eps_low if self.eps_high is None else float(self.eps_high)

    @classmethod
    def from_trl(cls, loss_type: str = "dapo", *, epsilon: float = 0.2, epsilon_high: float | None = None,
                 beta: float = 0.0, delta: float | None = None, max_completion_length: int | None = None,
                 use_bias_correction_kl: bool = True, importance_sampling_level: str = "token",
                 entropy_coef: float = 0.0) -> "PolicyLossConfig":
        """TRL 1.16 ``GRPOTrainer`` losses (``GRPOConfig`` names and defaults).

        The mapping is :data:`TRL_LOSSES` (loss type -> surrogate, aggregation): ``grpo`` ->
        seq-mean-token-mean, ``bnpo`` -> token-mean over the local batch, ``dr_grpo`` ->
        sum / (B * max_completion_length), ``dapo`` -> token-mean whose denominator TRL takes from
        ``num_items_in_batch``; these use the ``"clip"`` surrogate. ``cispo`` -> the ``"cispo"``
        surrogate (weight capped at ``epsilon_high``, TRL's meaning there) with dapo's
        aggregation; TRL's cispo ignores ``delta`` and ``epsilon``, and so does its config. The
        entropy bonus is TRL's: a local token mean that ignores the loss type's normalizer. To
        reproduce a trainer step call :func:`policy_loss` with ``loss_scale = 1 /
        gradient_accumulation_steps`` (1 in eval) and, for ``dapo`` and ``cispo``, ``normalizer =
        num_items_in_batch.clamp(min=1) / num_processes / steps_per_generation`` (in eval:
        ``num_items_in_batch.clamp(min=1) / num_processes``); ``is_weights`` is TRL's
        ``importance_sampling_ratio`` (vLLM correction).
        """
        if loss_type not in TRL_LOSSES:
            raise ValueError(
                f"loss_type={loss_type!r} is not a loss this config can express; supported TRL loss types: "
                f"{TRL_LOSS_TYPES} (sapo/luspo/vespo: no surrogate registered for them yet)")
        if loss_type == "dr_grpo" and max_completion_length is None:
            raise ValueError("loss_type='dr_grpo' divides by B * max_completion_length: pass max_completion_length=")
        surrogate, agg = TRL_LOSSES[loss_type]
        reads = SURROGATES[surrogate].options
        return cls(
            eps_low=epsilon, eps_high=epsilon if epsilon_high is None else epsilon_high,
            delta=delta if "delta" in reads else None,
            beta=beta, entropy_coef=entropy_coef, kl_bias_correction=bool(use_bias_correction_kl),
            importance_sampling_level=importance_sampling_level, loss_agg=agg,
            max_len=max_completion_length if loss_type == "dr_grpo" else None,
            entropy_agg="token-mean", surrogate=surrogate,
        )

    @classmethod
    def from_verl(cls, loss_agg_mode: str = "token-mean", *, clip_ratio: float = 0.2,
                  clip_ratio_low: float | None = None, clip_ratio_high: float | None = None,
                  clip_ratio_c: float = 3.0, use_kl_loss: bool = False, kl_loss_coef: float = 0.001,
                  kl_loss_type: str = "low_var_kl", entropy_coeff: float = 0.0,
                  loss_scale_factor: int | None = None, policy_loss: str = "vanilla",
                  sum_norm_divides_rows: bool = False) -> "PolicyLossConfig":
        """verl's actor loss: ``compute_policy_loss_vanilla`` + ``agg_loss`` + KL and entropy terms.

        Reproduced: dual clip with c = ``clip_ratio_c`` (3 by default, always on in verl), the
        log-ratio clamped to +-20 before exp (also in the ``ppo_kl`` metric), ``low_var_kl`` (k3 with
        ref - logp clamped to +-20 and the KL to +-10), entropy and KL aggregated with the same
        ``loss_agg_mode``, sequence means over rows with at least one token, and
        ``seq-mean-token-sum-norm`` = sum / horizon (``loss_scale_factor``, default the padded T).
        ``sum_norm_divides_rows=True`` gives the newest verl's sum-norm, which also divides by the
        number of non-empty rows. verl's ``global_batch_info`` maps onto ``normalizer``:
        ``batch_num_tokens / dp_size`` (token-mean) or ``global_batch_size / dp_size`` (seq-mean
        modes). ``rollout_is_weights`` is ``is_weights``. verl's per-row mean divides by
        ``count + 1e-8`` where this library divides by ``max(count, 1)`` (relative difference <= 1e-8).
        """
        if policy_loss not in VERL_LOSS_MODES:
            raise ValueError(f"policy_loss={policy_loss!r}: only verl's 'vanilla' clipped loss is reproduced; "
                             "for GSPO use importance_sampling_level='sequence' on a config of your own")
        if loss_agg_mode not in LOSS_AGGS or loss_agg_mode == "token-sum":
            raise ValueError(f"loss_agg_mode={loss_agg_mode!r} is not a verl mode; choose one of "
                             f"{tuple(m for m in LOSS_AGGS if m != 'token-sum')}")
        if use_kl_loss and kl_loss_type not in ("low_var_kl", "k3"):
            raise ValueError(f"kl_loss_type={kl_loss_type!r}: only verl's 'low_var_kl' (k3) KL is supported; "
                             "set kl_loss_type='low_var_kl' or use_kl_loss=False")
        low = clip_ratio if clip_ratio_low is None else clip_ratio_low
        high = clip_ratio if clip_ratio_high is None else clip_ratio_high
        sum_norm = loss_agg_mode == "seq-mean-token-sum-norm"
        return cls(
            eps_low=low, eps_high=high, dual_clip=clip_ratio_c, beta=kl_loss_coef if use_kl_loss else 0.0,
            entropy_coef=entropy_coeff, loss_agg=loss_agg_mode,
            max_len=loss_scale_factor if sum_norm else None,
            log_ratio_clamp=20.0, kl_log_ratio_clamp=20.0, kl_value_clamp=10.0,
            skip_empty_rows=True, sum_norm_rows=bool(sum_norm_divides_rows),
            surrogate=VERL_LOSS_MODES[policy_loss],
        )


class PolicyLossOutput(NamedTuple):
    """loss: scalar; logp, entropy: [B, T] detached (0 where masked); metrics: see policy_loss."""

    loss: torch.Tensor
    logp: torch.Tensor
    entropy: torch.Tensor
    metrics: dict[str, torch.Tensor]


# ------------------------------------------------------------------------------------------------
# validation
# ------------------------------------------------------------------------------------------------

def _check_bt(name: str, t: torch.Tensor | None, shape: torch.Size) -> None:
    if t is None:
        return
    check_float(name, t)
    if t.shape != shape:
        raise ValueError(f"{name} has shape {tuple(t.shape)} but logp is {tuple(shape)}; "
                         f"{name} must be [B, T] like logp")


def _check_rowwise(name: str, t: torch.Tensor | None, shape: torch.Size) -> None:
    """[B], [B, 1] or [B, T]."""
    if t is None:
        return
    check_float(name, t)
    b, n = shape
    if tuple(t.shape) not in ((b,), (b, 1), (b, n)):
        raise ValueError(f"{name} has shape {tuple(t.shape)}; it must be [B]={b}, [B, 1] or "
                         f"[B, T]={tuple(shape)} (a per-sequence value is broadcast over the row)")


def _as_mask(mask: torch.Tensor, shape: torch.Size, validate: bool) -> torch.Tensor:
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask must be a torch.Tensor, got {type(mask).__name__}")
    if mask.shape != shape:
        raise ValueError(f"mask has shape {tuple(mask.shape)} but logp is {tuple(shape)}")
    if mask.dtype == torch.bool:
        return mask
    if mask.is_complex():
        raise TypeError(f"mask must be bool or a 0/1 int/float tensor, got {mask.dtype}")
    if validate:  # the value check runs in a custom op: no graph break under torch.compile
        return checked_mask(mask)
    return mask != 0


def _check_scalar(name: str, value) -> None:
    if isinstance(value, torch.Tensor):
        if value.is_complex() or value.dtype == torch.bool:
            raise TypeError(f"{name} must be a real number or a one-element real tensor, got {value.dtype}")
        if value.numel() != 1:
            raise ValueError(f"{name} must be a number or a one-element tensor, got shape {tuple(value.shape)}")
        return
    if not _finite_number(value):
        raise ValueError(f"{name} must be a finite number or a one-element tensor, got {value!r}")


def _as_2d(t: torch.Tensor, cd: torch.dtype) -> torch.Tensor:
    t = t.to(cd)
    return t[:, None] if t.dim() == 1 else t


def _used(m: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Where a [B, T] or [B, 1] per-token/per-row input is read: unmasked tokens, or rows with one."""
    return m if t.shape[1] > 1 else m.any(1, keepdim=True)


# ------------------------------------------------------------------------------------------------
# the loss math (the one copy): ratio, surrogate (by name, gccpo_kernels.surrogates), KL,
# aggregation, metrics; policy_loss composes them
# ------------------------------------------------------------------------------------------------

def importance_ratio(logp: torch.Tensor, old_logp: torch.Tensor, m: torch.Tensor, count_rows: torch.Tensor,
                     cfg: PolicyLossConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """The importance ratio of SPEC §2.

    Args:
        logp, old_logp: ``[B, T]`` current and sampling log-probs (compute dtype; ``old_logp`` is
            ``logp.detach()`` when on-policy).
        m: ``[B, T]`` bool mask; count_rows: ``[B]`` its row sums (compute dtype).
        cfg: reads ``importance_sampling_level`` and ``log_ratio_clamp``.

    Returns:
        ``(log_ratio, ratio)``: ``log_ratio`` ``[B, T]`` is ``logp - old_logp`` where ``m`` and 0
        elsewhere (``where``, so padding garbage never leaks); ``ratio`` is its exp (clamped to
        ``±log_ratio_clamp`` first) at token level ``[B, T]``, or the exp of the row's masked mean
        log-ratio at sequence level (GSPO) ``[B, 1]``.
    """
    log_ratio = torch.where(m, logp - old_logp, logp.new_zeros(()))
    if cfg.importance_sampling_level == "sequence":
        log_w = log_ratio.sum(1, keepdim=True) / count_rows.clamp(min=1)[:, None]  # [B, 1]
    else:
        log_w = log_ratio
    if cfg.log_ratio_clamp is not None:
        log_w = log_w.clamp(-cfg.log_ratio_clamp, cfg.log_ratio_clamp)
    return log_ratio, torch.exp(log_w)


def kl_to_reference(logp: torch.Tensor, ref_logp: torch.Tensor, m: torch.Tensor, ratio: torch.Tensor,
                    cfg: PolicyLossConfig) -> torch.Tensor:
    """``[B, T]`` per-token k3 KL to the reference, ``exp(d) - d - 1`` with ``d = ref - logp``
    (0 where ``m`` is False), as it enters the loss (before ``beta``).

    ``d`` is clamped to ``±kl_log_ratio_clamp`` and the KL to ``±kl_value_clamp`` when set
    (verl's low_var_kl); with ``kl_bias_correction`` it is multiplied by the (uncapped) ``ratio``
    (``[B, T]`` or ``[B, 1]``; TRL's use_bias_correction_kl). Differentiable in ``logp``.
    """
    d = torch.where(m, ref_logp - logp, logp.new_zeros(()))
    if cfg.kl_log_ratio_clamp is not None:
        d = d.clamp(-cfg.kl_log_ratio_clamp, cfg.kl_log_ratio_clamp)
    kl = torch.exp(d) - d - 1.0
    if cfg.kl_value_clamp is not None:
        kl = kl.clamp(-cfg.kl_value_clamp, cfg.kl_value_clamp)
    if cfg.kl_bias_correction:
        kl = kl * ratio
    return kl


def _stat(x: torch.Tensor, m: torch.Tensor, mf: torch.Tensor, tokens: torch.Tensor,
          reduce: str = "sum") -> torch.Tensor:
    """[value, count] of ``x``: per token under the mask, or per row when x is [B, 1] (as TRL).

    Built from device-side ops only (no tensor from a host value), so it never synchronises.
    """
    x = x.to(mf.dtype)
    # a maximum over nothing (B = 0 or T = 0, or every token masked) is -inf with count 0
    floor = x.new_full((1,), -math.inf)
    if x.shape[1] == 1:
        value = x.sum() if reduce == "sum" else torch.cat([x.reshape(-1), floor]).amax()
        return torch.stack([value, torch.full_like(value, float(x.shape[0]))])
    xb = x.expand(m.shape)
    if reduce == "sum":
        value = torch.where(m, xb, 0.0).sum()
    else:
        value = torch.cat([torch.where(m, xb, -math.inf).reshape(-1), floor]).amax()
    return torch.stack([value, tokens])


def loss_metrics(terms: SurrogateTerms, log_ratio: torch.Tensor, ratio: torch.Tensor, kl: torch.Tensor | None,
                 entropy: torch.Tensor | None, m: torch.Tensor, cfg: PolicyLossConfig) -> dict[str, torch.Tensor]:
    """The metrics of :func:`policy_loss`: detached ``[2]`` tensors ``[sum, count]`` (``[max,
    count]`` for ``ratio_max``), no host sync.

    ``terms``: the surrogate's clip flags; ``log_ratio`` ``[B, T]`` masked, ``ratio`` ``[B, T]``
    or ``[B, 1]`` (:func:`importance_ratio`); ``kl`` ``[B, T]`` (:func:`kl_to_reference`) and
    ``entropy`` ``[B, T]``, each None when absent. A ``[B, 1]`` quantity counts once per row,
    every row included (TRL). approx_kl is k1, mean of old - new, clamped like the ratio (verl).
    """
    with torch.no_grad():
        mf = m.to(log_ratio.dtype)
        tokens = mf.sum()
        low, high = terms.clipped_low, terms.clipped_high
        metrics = {"clip_frac_low": _stat(low, m, mf, tokens), "clip_frac_high": _stat(high, m, mf, tokens),
                   "clip_frac_region": _stat(low | high, m, mf, tokens)}
        if terms.clipped_dual is not None:
            metrics["clip_frac_dual"] = _stat(terms.clipped_dual, m, mf, tokens)
        k1 = -log_ratio
        if cfg.log_ratio_clamp is not None:
            k1 = k1.clamp(-cfg.log_ratio_clamp, cfg.log_ratio_clamp)
        metrics["approx_kl"] = _stat(k1, m, mf, tokens)
        if kl is not None:
            metrics["kl_ref"] = _stat(kl, m, mf, tokens)
        if entropy is not None:
            metrics["entropy"] = _stat(entropy, m, mf, tokens)
        metrics["ratio_mean"] = _stat(ratio, m, mf, tokens)
        metrics["ratio_max"] = _stat(ratio, m, mf, tokens, reduce="max")
        return {k: v.detach() for k, v in metrics.items()}


def check_loss_arguments(logp: torch.Tensor, old_logp: torch.Tensor | None, advantages: torch.Tensor,
                         mask: torch.Tensor, ref_logp: torch.Tensor | None,
                         entropy: torch.Tensor | None, is_weights: torch.Tensor | None,
                         cfg: PolicyLossConfig, normalizer, loss_scale, validate: bool,
                         ) -> torch.Tensor:
    """Every argument check of :func:`policy_loss` that needs no loss value (types, shapes,
    dtypes, devices, required inputs, scalar arguments; the mask's 0/1 values when ``validate``).
    Returns the mask as bool. The fused loss's in-forward path calls it before its pass over the
    logits, with ``logp`` a placeholder of the right shape, dtype and device."""
    if not isinstance(cfg, PolicyLossConfig):
        raise TypeError(f"config must be a PolicyLossConfig, got {type(cfg).__name__}")
    check_float("logp", logp)
    if logp.dim() != 2:
        raise ValueError(f"logp must be [B, T], got shape {tuple(logp.shape)} (packed sequences: B = 1)")
    shape = logp.shape
    _check_bt("old_logp", old_logp, shape)
    _check_bt("ref_logp", ref_logp, shape)
    _check_bt("entropy", entropy, shape)
    _check_rowwise("advantages", advantages, shape)
    _check_rowwise("is_weights", is_weights, shape)
    check_same_device(logp=logp, old_logp=old_logp, advantages=advantages, mask=mask, ref_logp=ref_logp,
                      entropy=entropy, is_weights=is_weights)
    m = _as_mask(mask, shape, validate)
    if cfg.beta != 0 and ref_logp is None:
        raise ValueError(f"config.beta={cfg.beta} adds a KL to the reference policy: pass ref_logp= "
                         "(the reference model's log-probs) or set beta=0")
    if cfg.entropy_coef != 0 and entropy is None:
        raise ValueError(f"config.entropy_coef={cfg.entropy_coef} needs the per-token entropy: pass "
                         "entropy= (fused_linear_logprobs(..., return_entropy=True)) or set entropy_coef=0")
    if normalizer is not None:
        _check_scalar("normalizer", normalizer)
        if not isinstance(normalizer, torch.Tensor) and normalizer <= 0:
            raise ValueError(f"normalizer must be > 0, got {normalizer!r}")
        if cfg.loss_agg == "token-sum":
            raise ValueError("loss_agg='token-sum' has no denominator for normalizer to replace: use "
                             "loss_agg='token-mean' with normalizer=..., or drop normalizer")
    _check_scalar("loss_scale", loss_scale)
    return m


def policy_loss(logp: torch.Tensor, old_logp: torch.Tensor | None, advantages: torch.Tensor,
                mask: torch.Tensor, *, ref_logp: torch.Tensor | None = None,
                entropy: torch.Tensor | None = None, is_weights: torch.Tensor | None = None,
                config: PolicyLossConfig | None = None, normalizer: float | torch.Tensor | None = None,
                loss_scale: float | torch.Tensor = 1.0, validate: bool = True,
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The policy loss of SPEC §2 on padded per-token log-probs (the one copy of the math).

    ``ratio`` (:func:`importance_ratio`) -> the surrogate ``config.surrogate`` (PPO clip by
    default, CISPO, ...: :mod:`gccpo_kernels.surrogates`) -> times ``is_weights`` -> plus
    ``beta`` times :func:`kl_to_reference` -> minus the entropy bonus -> :func:`aggregate` ->
    times ``loss_scale``; metrics from :func:`loss_metrics`.

    Args:
        logp: ``[B, T]`` log-probs of the sampled tokens under the current policy (differentiable).
        old_logp: ``[B, T]`` log-probs under the sampling policy; None means on-policy: the ratio
            is exp(logp - logp.detach()) = 1 and the gradient still flows.
        advantages: ``[B]`` / ``[B, 1]`` (per sequence, broadcast) or ``[B, T]`` (per token).
        mask: ``[B, T]`` bool, or 0/1 int/float (TRL's completion_mask, verl's response_mask).
        ref_logp: ``[B, T]`` reference log-probs; required when ``config.beta != 0``.
        entropy: ``[B, T]`` per-token entropy; required when ``config.entropy_coef != 0`` (and
            differentiable then), else only reported in the metrics.
        is_weights: ``[B, T]``, ``[B]`` or ``[B, 1]`` importance weights (e.g. a vLLM sampling
            correction); they multiply the policy term only.
        config: :class:`PolicyLossConfig` (default: ``PolicyLossConfig()``).
        normalizer: replaces the aggregation's denominator (token count, row count or rows*L),
            e.g. a global token count across processes; number or one-element tensor (no sync).
        loss_scale: multiplies the result (e.g. 1 / gradient-accumulation steps).
        validate: value checks (a few host syncs, each inside a custom op: no graph break under
            torch.compile): mask values are 0/1; logp, old_logp, ref_logp, entropy, is_weights
            and advantages are finite where they are read (unmasked tokens; rows with an
            unmasked token for a per-row value); a tensor normalizer is finite and > 0, a tensor
            loss_scale finite. A failure raises ValueError naming the argument. Shapes, dtypes
            and devices are always checked.

    Empty batches (B = 0 or T = 0) give loss 0 with zero gradients and zero-count metrics, as
    a batch whose every token is masked.

    Returns:
        ``(loss, metrics)``: a scalar float32 (float64 for float64 logp) loss and a dict of
        ``[2]`` tensors ``[sum, count]`` (``[max, count]`` for ``ratio_max``) with no host sync;
        :func:`reduce_metrics` turns them into numbers, across processes if asked. Keys:
        clip_frac_low / high / region (the surrogate's clipped tokens: for "clip" TRL's
        definitions on the delta-capped ratio; for "cispo" high is TRL's cispo_clip_ratio),
        clip_frac_dual (when dual_clip: fraction where the dual clip bound is active),
        approx_kl (k1, mean of old - new), kl_ref (the per-token KL term as added to the loss,
        when ref_logp is given), entropy (when given), ratio_mean, ratio_max. Per-sequence
        quantities ([B, 1] ratio with [B] advantages) are counted once per row, as TRL does.

    Cost: O(B*T) elementwise work, no [.., V] tensor.
    """
    cfg = PolicyLossConfig() if config is None else config
    m = check_loss_arguments(logp, old_logp, advantages, mask, ref_logp, entropy, is_weights, cfg,
                             normalizer, loss_scale, validate)
    shape = logp.shape

    cd = out_dtype_for(logp.dtype)
    if isinstance(normalizer, torch.Tensor):
        normalizer = normalizer.to(device=logp.device, dtype=cd).reshape(())
    if isinstance(loss_scale, torch.Tensor):
        loss_scale = loss_scale.to(device=logp.device, dtype=cd).reshape(())
    if validate:
        # NaN / inf where the loss reads logp, old_logp, ref_logp, entropy or is_weights, and a
        # tensor normalizer <= 0 or non-finite, raise (in a custom op: no graph break when compiled)
        m = checked_loss_inputs(
            m, logp, old_logp, ref_logp, entropy, None if is_weights is None else _as_2d(is_weights, cd),
            normalizer if isinstance(normalizer, torch.Tensor) else None,
            loss_scale if isinstance(loss_scale, torch.Tensor) else None)
    zero = logp.new_zeros((), dtype=cd)
    count_rows = m.to(cd).sum(1)  # [B]
    adv = _as_2d(advantages, cd)
    # garbage (NaN/inf) on masked tokens must not reach the backward: with a [B, 1] sequence-level
    # ratio, the row's gradient sums 0 * adv over all its tokens, and 0 * NaN is NaN. With validate,
    # non-finite values where they are used raise (in a custom op: no graph break when compiled).
    if validate:
        adv = finite_advantages(adv, _used(m, adv))
    else:
        adv = torch.where(_used(m, adv), adv, zero)

    lp = logp.to(cd)
    old = lp.detach() if old_logp is None else old_logp.to(cd)
    log_ratio, ratio = importance_ratio(lp, old, m, count_rows, cfg)
    terms = get_surrogate(cfg.surrogate).fn(ratio, lp, adv, cfg)
    pg = terms.loss
    if is_weights is not None:
        w = _as_2d(is_weights, cd)
        pg = pg * torch.where(_used(m, w), w, zero)
    per_token = pg.expand(shape)

    kl = None if ref_logp is None else kl_to_reference(lp, ref_logp.to(cd), m, ratio, cfg)
    if kl is not None and cfg.beta != 0:
        per_token = per_token + cfg.beta * kl
    ent = None if entropy is None else entropy.to(cd)
    if cfg.entropy_coef != 0 and cfg.entropy_agg is None:
        per_token = per_token - cfg.entropy_coef * ent

    loss = aggregate(per_token, m, count_rows, cfg.loss_agg, normalizer, cfg)
    if cfg.entropy_coef != 0 and cfg.entropy_agg is not None:
        loss = loss - cfg.entropy_coef * aggregate(ent, m, count_rows, cfg.entropy_agg, None, cfg)
    loss = loss * loss_scale
    return loss, loss_metrics(terms, log_ratio, ratio, kl, ent, m, cfg)


def reduce_metrics(metrics: dict[str, torch.Tensor], process_group=None, *,
                   as_tensors: bool = False) -> dict[str, float | torch.Tensor]:
    """Means (sum / max(count, 1)) and maxima of :func:`policy_loss` metrics.

    With ``process_group`` (a ``torch.distributed`` group, or ``True`` for the default group) the
    sums and counts are all-reduced first (one SUM and, for maxima, one MAX collective), so the
    result is the exact global token-weighted mean. A maximum with no tokens anywhere is NaN.
    Returns floats (one host sync) or, with ``as_tensors=True``, 0-dim tensors (no sync).
    """
    if not metrics:
        return {}
    names = list(metrics)
    is_max = [k.endswith("_max") for k in names]
    stacked = torch.stack([metrics[k].detach().reshape(2) for k in names])  # [K, 2]
    if process_group is not None:
        import torch.distributed as dist

        group = None if process_group is True else process_group
        summed = stacked.clone()
        dist.all_reduce(summed, op=dist.ReduceOp.SUM, group=group)
        rows = [summed[i] for i in range(len(names))]
        max_rows = [i for i, flag in enumerate(is_max) if flag]
        if max_rows:
            maxed = torch.stack([stacked[i, 0] for i in max_rows])
            dist.all_reduce(maxed, op=dist.ReduceOp.MAX, group=group)
            for j, i in enumerate(max_rows):
                rows[i] = torch.stack([maxed[j], summed[i, 1]])
        stacked = torch.stack(rows)
    out = [torch.where(stacked[i, 1] > 0, stacked[i, 0], math.nan) if flag
           else stacked[i, 0] / stacked[i, 1].clamp(min=1) for i, flag in enumerate(is_max)]
    if as_tensors:
        return dict(zip(names, out))
    return dict(zip(names, torch.stack(out).tolist()))


# ------------------------------------------------------------------------------------------------
# the fused form: §1 primitive + the loss above
# ------------------------------------------------------------------------------------------------

def fused_linear_policy_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                             advantages: torch.Tensor, mask: torch.Tensor, *,
                             old_logp: torch.Tensor | None = None, ref_logp: torch.Tensor | None = None,
                             bias: torch.Tensor | None = None, temperature: float = 1.0,
                             logit_scale: float = 1.0, softcap: float | None = None,
                             is_weights: torch.Tensor | None = None,
                             config: PolicyLossConfig | None = None,
                             normalizer: float | torch.Tensor | None = None,
                             loss_scale: float | torch.Tensor = 1.0, backend: str | None = None,
                             ignore_index: int = -100, validate: bool = True,
                             process_group=None) -> PolicyLossOutput:
    """SPEC §2's loss straight from hidden states and the LM head, without ``[B*T, V]`` logits.

    Targets are set to ``ignore_index`` where ``mask`` is 0 (so masked tokens cost no matmul).
    On the torch and triton backends with a token-level loss and a gradient wanted, the gradients
    of hidden, weight and bias are computed in this forward, one pass over the logits
    (:mod:`gccpo_kernels.loss_in_forward`), and the backward scales them by ``grad_output``: call
    ``backward`` once per call (a second backward through the same loss raises). Otherwise the
    loss is composed: :func:`gccpo_kernels.fused_linear_logprobs` gives logp and entropy,
    :func:`policy_loss` the loss, and the primitive's backward recomputes the logits. Either way
    the loss value and metrics come from one :func:`policy_loss` call on the whole batch. The
    entropy is always computed in the forward (metrics, nearly free); its gradient is only
    formed when ``config.entropy_coef != 0``.

    Args:
        hidden: ``[B, T, D]`` last hidden states (fp16 / bf16 / fp32 / fp64).
        weight: ``[V, D]`` LM-head weight; ``bias``: optional ``[V]``.
        targets: ``[B, T]`` int64 sampled token ids (already shifted to align with hidden).
        advantages, mask, old_logp, ref_logp, is_weights, config, normalizer, loss_scale: as in
            :func:`policy_loss`.
        temperature, logit_scale, softcap: the logit transform of SPEC §1.
        backend: ``"triton"`` / ``"torch"`` / ``"reference"`` / None (automatic) for the primitive.
        validate: value checks (targets, hidden / bias finiteness, mask values, and every
            check of :func:`policy_loss`). Empty batches (B = 0 or T = 0): loss 0, empty
            ``[B, T]`` logp / entropy, zero gradients.
        process_group: vocabulary parallelism, passed to :func:`gccpo_kernels.fused_linear_logprobs`
            (docs/vocab_parallel.md): ``weight`` / ``bias`` are this rank's slice, every other
            input holds all tokens and is the same on every rank; the loss, logp, entropy and
            metrics are the unsharded values on every rank, and the backward gives the full
            d hidden and this rank's d weight / d bias slice. Not a torch.compile-traced path.

    Returns:
        :class:`PolicyLossOutput` ``(loss, logp, entropy, metrics)``; logp and entropy are
        ``[B, T]`` detached (0 where masked), e.g. to keep as ``old_logp`` for later epochs.

    Cost (n unmasked tokens): in-forward path 6·n·V·D GEMM FLOPs in the forward, none in the
    backward; composed path forward 2·n·V·D and backward 6·n·V·D; plus O(B·T) elementwise. Extra
    memory O(B·T·D + V·D) (the gradients, held from the forward to the backward on the in-forward
    path) plus a bounded [rows, V] workspace (``GCCPO_WORKSPACE_MB``).
    """
    cfg = PolicyLossConfig() if config is None else config
    if not isinstance(hidden, torch.Tensor) or hidden.dim() != 3:
        shape = tuple(hidden.shape) if isinstance(hidden, torch.Tensor) else type(hidden).__name__
        raise ValueError(f"hidden must be [B, T, D], got {shape}")
    if not isinstance(targets, torch.Tensor) or targets.shape != hidden.shape[:2]:
        shape = tuple(targets.shape) if isinstance(targets, torch.Tensor) else type(targets).__name__
        raise ValueError(f"targets must be [B, T] = {tuple(hidden.shape[:2])} like hidden's leading dims, got {shape}")
    if isinstance(mask, torch.Tensor):  # before the mask meets the targets (also inside an op)
        check_same_device(hidden=hidden, targets=targets, mask=mask)
    m = _as_mask(mask, targets.shape, validate)
    if validate:  # checked in a custom op: no graph break under torch.compile
        y = masked_targets(targets, m, ignore_index)
    else:
        y = targets.masked_fill(~m, ignore_index)
    # imported on first use, not for a cycle (neither imports this module): both import
    # torch._dynamo (torch.compiler.disable), which imports triton, and `import gccpo_kernels`
    # (which imports this module) must not
    from . import loss_in_forward
    from .linear_logprobs import fused_linear_logprobs

    needs = (hidden.requires_grad, weight.requires_grad, bias is not None and bias.requires_grad)
    if process_group is None:
        check_lm_head(hidden, weight, bias)
        name = resolve_backend(backend, hidden.device, hidden.dtype)
        # module attributes, looked up per call (tests swap them to force or spy on a path)
        if loss_in_forward.eligible(cfg, name, process_group, needs, advantages, old_logp,
                                    ref_logp, is_weights, normalizer, loss_scale):
            params = LogitParams.of(temperature, logit_scale, softcap)
            # the loss's argument checks before the pass over the logits (its value checks come
            # with the loss call at the end); logp and entropy are placeholders of their shape
            placeholder = hidden.new_empty(m.shape, dtype=out_dtype_for(hidden.dtype))
            check_loss_arguments(placeholder, old_logp, advantages, m, ref_logp, placeholder,
                                 is_weights, cfg, normalizer, loss_scale, validate)
            loss, logp, entropy, metrics = loss_in_forward.fused_loss_in_forward(
                hidden, weight, bias, y, m, advantages, old_logp, ref_logp, is_weights, cfg,
                normalizer, loss_scale, params, ignore_index, validate, needs, backend=name,
                loss_fn=policy_loss)
            return PolicyLossOutput(loss, logp, entropy, metrics)
    logp, entropy = fused_linear_logprobs(
        hidden, weight, y, bias=bias, temperature=temperature, logit_scale=logit_scale, softcap=softcap,
        ignore_index=ignore_index, return_entropy=True, backend=backend, validate=validate,
        process_group=process_group)
    ent_in = entropy if cfg.entropy_coef != 0 else entropy.detach()
    loss, metrics = policy_loss(logp, old_logp, advantages, m, ref_logp=ref_logp, entropy=ent_in,
                                is_weights=is_weights, config=cfg, normalizer=normalizer,
                                loss_scale=loss_scale, validate=validate)
    return PolicyLossOutput(loss, logp.detach(), entropy.detach(), metrics)


class FusedLinearPolicyLoss(torch.nn.Module):
    """Module form of :func:`fused_linear_policy_loss`; holds the config and logit options only.

    ``loss_fn = FusedLinearPolicyLoss(PolicyLossConfig.from_trl("dapo"))``;
    ``out = loss_fn(hidden, model.lm_head.weight, targets, advantages, mask, old_logp=old)``.
    With ``process_group=`` the weight (and bias) passed in is this rank's vocabulary slice.
    """

    def __init__(self, config: PolicyLossConfig | None = None, *, temperature: float = 1.0,
                 logit_scale: float = 1.0, softcap: float | None = None, ignore_index: int = -100,
                 backend: str | None = None, validate: bool = True, process_group=None):
        super().__init__()
        check_logit_params(temperature, logit_scale, softcap)
        self.config = PolicyLossConfig() if config is None else config
        self.temperature, self.logit_scale, self.softcap = temperature, logit_scale, softcap
        self.ignore_index, self.backend, self.validate = ignore_index, backend, validate
        self.process_group = process_group

    def forward(self, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                advantages: torch.Tensor, mask: torch.Tensor, *, old_logp: torch.Tensor | None = None,
                ref_logp: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                is_weights: torch.Tensor | None = None, normalizer: float | torch.Tensor | None = None,
                loss_scale: float | torch.Tensor = 1.0) -> PolicyLossOutput:
        return fused_linear_policy_loss(
            hidden, weight, targets, advantages, mask, old_logp=old_logp, ref_logp=ref_logp, bias=bias,
            temperature=self.temperature, logit_scale=self.logit_scale, softcap=self.softcap,
            is_weights=is_weights, config=self.config, normalizer=normalizer, loss_scale=loss_scale,
            backend=self.backend, ignore_index=self.ignore_index, validate=self.validate,
            process_group=self.process_group)

    def extra_repr(self) -> str:
        return (f"config={self.config}, temperature={self.temperature}, logit_scale={self.logit_scale}, "
                f"softcap={self.softcap}, backend={self.backend}")
