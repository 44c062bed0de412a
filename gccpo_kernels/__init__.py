"""gccpo_kernels: fused kernels for GRPO-family RL on LLMs, without full-vocabulary logits.

The public API, and nothing else. Names are resolved lazily so that ``import gccpo_kernels`` stays
light: triton is imported only when the triton backend runs, and each op's module only on first
use.

- :func:`fused_linear_logprobs`, :class:`FusedLinearLogprobs`  (SPEC §1)
- :class:`PolicyLossConfig`, :func:`policy_loss`, :func:`fused_linear_policy_loss`,
  :class:`FusedLinearPolicyLoss`, :class:`PolicyLossOutput`, :func:`reduce_metrics`  (SPEC §2)
- :func:`perturb_latents`, :func:`counterfactual_divergence`  (SPEC §3)
- :func:`group_distribution_stats`, :class:`GroupStats`  (SPEC §4)
- :func:`episode_rewards`, :func:`token_advantages`  (SPEC §5-§6)
- :func:`explain_backends`, :data:`BACKENDS`
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS: dict[str, str] = {
    "fused_linear_logprobs": "linear_logprobs",
    "FusedLinearLogprobs": "linear_logprobs",
    "PolicyLossConfig": "policy_loss",
    "policy_loss": "policy_loss",
    "fused_linear_policy_loss": "policy_loss",
    "FusedLinearPolicyLoss": "policy_loss",
    "PolicyLossOutput": "policy_loss",
    "reduce_metrics": "policy_loss",
    "perturb_latents": "divergence",
    "counterfactual_divergence": "divergence",
    "group_distribution_stats": "group_stats",
    "GroupStats": "group_stats",
    "episode_rewards": "advantages",
    "token_advantages": "advantages",
    "BACKENDS": "_backend",
}

__all__ = sorted([*_EXPORTS, "explain_backends", "__version__"])

# The submodule gccpo_kernels.policy_loss shares its name with the function policy_loss: importing
# the submodule (by anyone) would bind the package attribute to the module. Import it now and
# rebind the name to the function, once; the module is light (torch only, no triton).
from .policy_loss import policy_loss  # noqa: E402
from ._backend import explain as _explain  # noqa: E402


def explain_backends() -> str:
    """Versions, devices, usable backends and the automatic choice (``python -m gccpo_kernels``)."""
    return _explain()


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'gccpo_kernels' has no attribute {name!r}")
    mod = importlib.import_module(f".{module}", __name__)
    for exported, home in _EXPORTS.items():  # bind every name of that module at once
        if home == module:
            globals()[exported] = getattr(mod, exported)
    return globals()[name]


def __dir__() -> list[str]:
    return __all__
