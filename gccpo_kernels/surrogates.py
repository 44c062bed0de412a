"""SPEC §2's policy term by name: the registry of loss surrogates.

A surrogate turns the importance ratio, the log-probs and the advantages into the per-token policy
loss (before importance weights, the KL and the entropy bonus, which :func:`gccpo_kernels.policy_loss`
adds the same way for every surrogate) and says which tokens count as clipped in the metrics.
:class:`gccpo_kernels.PolicyLossConfig` names one (``surrogate="clip"`` by default); the loss
looks it up in :data:`SURROGATES`.

Registered here:

- ``"clip"``: the PPO / GRPO clipped surrogate (every TRL loss type grpo / bnpo / dr_grpo / dapo,
  verl's ``vanilla``, GSPO with a sequence-level ratio), with clip-higher (``eps_high``), TRL's
  ``delta`` cap and verl's dual clip.
- ``"cispo"``: TRL's CISPO (MiniMax-M1): the importance weight clipped at ``eps_high`` and
  detached, times the advantage, times the log-prob.

Adding a surrogate is one function here, decorated with :func:`register_surrogate`, plus its
float64 twin in :mod:`gccpo_kernels.reference` (registered there under the same name) and a test
against that twin (docs/policy_loss.md, "Adding a loss surrogate").
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Protocol

import torch


class SurrogateOptions(Protocol):
    """The config fields a surrogate may read; :class:`gccpo_kernels.PolicyLossConfig` has them
    (this module does not import it: the config validates names against this registry)."""

    @property
    def eps_low(self) -> float: ...

    @property
    def clip_high(self) -> float: ...

    @property
    def delta(self) -> float | None: ...

    @property
    def dual_clip(self) -> float | None: ...


class SurrogateTerms(NamedTuple):
    """What a surrogate returns. Shapes broadcast with the ratio and advantages it was given:
    ``[B, T]``, or ``[B, 1]`` for a sequence-level ratio with per-sequence advantages.

    Attributes:
        loss: the per-token policy loss (differentiable in ``logp`` / the ratio), before the
            importance weights, KL and entropy terms.
        clipped_low: bool, the tokens counted in ``clip_frac_low`` (and ``clip_frac_region``).
        clipped_high: bool, the tokens counted in ``clip_frac_high`` (and ``clip_frac_region``).
        clipped_dual: bool where a dual-clip bound is active (``clip_frac_dual``); None: the
            surrogate has no such bound and the metric is not reported.
    """

    loss: torch.Tensor
    clipped_low: torch.Tensor
    clipped_high: torch.Tensor
    clipped_dual: torch.Tensor | None = None


#: ``fn(ratio, logp, advantages, config) -> SurrogateTerms``: ``ratio`` ``[B, T]`` or ``[B, 1]``
#: (sequence level), ``logp`` ``[B, T]`` (differentiable), ``advantages`` ``[B, T]`` or
#: ``[B, 1]``, all in the loss's compute dtype (float32 / float64). Masked tokens hold ratio 1 and
#: advantage 0 (never padding garbage); the caller masks the result. Token i's loss must read only
#: token i's ratio, log-prob and advantage (the in-forward gradient of the fused loss
#: differentiates the surrogate on row chunks); a sequence-level ratio arrives already averaged.
SurrogateFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, SurrogateOptions], SurrogateTerms]


class Surrogate(NamedTuple):
    """A registry entry: the function and the optional config fields it reads (``delta``,
    ``dual_clip``): setting one that the named surrogate does not read is a config error."""

    name: str
    fn: SurrogateFn
    options: frozenset[str]


#: Optional config fields that only some surrogates read (None: off).
SURROGATE_OPTIONS: tuple[str, ...] = ("delta", "dual_clip")
#: name -> :class:`Surrogate`.
SURROGATES: dict[str, Surrogate] = {}


def register_surrogate(name: str, *, options: tuple[str, ...] = ()) -> Callable[[SurrogateFn], SurrogateFn]:
    """Decorator: register ``fn`` as the surrogate ``name`` (``PolicyLossConfig(surrogate=name)``).

    ``options``: which of :data:`SURROGATE_OPTIONS` the function reads. A name is registered once.
    """
    unknown = set(options) - set(SURROGATE_OPTIONS)
    if unknown:
        raise ValueError(f"register_surrogate({name!r}): options must be among {SURROGATE_OPTIONS}, "
                         f"got {sorted(unknown)}")

    def decorate(fn: SurrogateFn) -> SurrogateFn:
        if name in SURROGATES:
            raise ValueError(f"a surrogate named {name!r} is already registered ({SURROGATES[name].fn.__qualname__})")
        SURROGATES[name] = Surrogate(name, fn, frozenset(options))
        return fn

    return decorate


def get_surrogate(name: str) -> Surrogate:
    """The registered surrogate ``name``; a one-line ValueError naming the registered ones otherwise."""
    entry = SURROGATES.get(name)
    if entry is None:
        raise ValueError(f"surrogate must be one of {tuple(SURROGATES)} (gccpo_kernels.surrogates."
                         f"register_surrogate adds one), got {name!r}")
    return entry


@register_surrogate("clip", options=("delta", "dual_clip"))
def clipped_surrogate(ratio: torch.Tensor, logp: torch.Tensor, advantages: torch.Tensor,
                      cfg: SurrogateOptions) -> SurrogateTerms:
    """PPO's clipped surrogate: ``-min(r' A, clip(r, 1 - eps_low, 1 + eps_high) A)``.

    ``r' = min(r, delta)`` when ``cfg.delta`` is set (TRL: the unclipped branch only); with
    ``cfg.dual_clip = c`` and ``A < 0`` the loss is at most ``c |A|`` (verl's ``clip_ratio_c``).
    Clipped tokens: low ``r' < 1 - eps_low`` with ``A < 0``, high ``r' > 1 + eps_high`` with
    ``A > 0`` (TRL's definitions); dual: ``A < 0`` where the dual bound is below the clipped loss.
    ``logp`` is not read (the ratio carries its gradient). Shapes: those of ``ratio * advantages``.
    """
    clipped = ratio.clamp(1.0 - cfg.eps_low, 1.0 + cfg.clip_high)
    capped = ratio if cfg.delta is None else ratio.clamp(max=cfg.delta)
    loss = -torch.min(capped * advantages, clipped * advantages)
    low = (capped < 1.0 - cfg.eps_low) & (advantages < 0)
    high = (capped > 1.0 + cfg.clip_high) & (advantages > 0)
    if cfg.dual_clip is None:
        return SurrogateTerms(loss, low, high)
    bound = -advantages * cfg.dual_clip
    dual = (loss > bound) & (advantages < 0)
    return SurrogateTerms(torch.where(advantages < 0, torch.min(loss, bound), loss), low, high, dual)


@register_surrogate("cispo")
def cispo_surrogate(ratio: torch.Tensor, logp: torch.Tensor, advantages: torch.Tensor,
                    cfg: SurrogateOptions) -> SurrogateTerms:
    """CISPO (MiniMax-M1) as TRL 1.16 computes it: ``-sg(min(r, eps_high)) A logp``.

    The importance weight is clipped from above at ``eps_high`` itself (TRL's ``epsilon_high``,
    ScaleRL's ε_max: an absolute cap on the ratio, 5.0 recommended; ``eps_low`` is not read) and
    detached, so every token keeps a gradient ``-min(r, eps_high) A`` on its log-prob. Clipped
    tokens (TRL's ``cispo_clip_ratio``): ``r > eps_high`` with ``A > 0``, reported as
    ``clip_frac_high``; nothing is clipped low. Shapes: ``loss`` ``[B, T]`` (``logp``'s),
    flags those of ``ratio * advantages``.
    """
    weight = ratio.clamp(max=cfg.clip_high).detach()
    high = (ratio > cfg.clip_high) & (advantages > 0)
    return SurrogateTerms(-weight * advantages * logp, torch.zeros_like(high), high)
