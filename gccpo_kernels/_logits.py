"""The logit transform of SPEC §1, shared by every op that reads the LM head.

u = s * (W h + b) / tau, then z = c * tanh(u / c) with a soft cap c, else z = u.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ._validation import check_logit_params


@dataclass(frozen=True)
class LogitParams:
    """temperature tau > 0, logit_scale s > 0, softcap c > 0 or None."""

    temperature: float = 1.0
    logit_scale: float = 1.0
    softcap: float | None = None

    @classmethod
    def of(cls, temperature: float, logit_scale: float, softcap: float | None) -> "LogitParams":
        """Validated parameters from a public op's arguments (errors name the bad value)."""
        check_logit_params(temperature, logit_scale, softcap)
        return cls(float(temperature), float(logit_scale), None if softcap is None else float(softcap))

    @property
    def scale(self) -> float:
        """The factor s / tau applied to W h + b."""
        return float(self.logit_scale) / float(self.temperature)

    def apply_(self, u: torch.Tensor) -> torch.Tensor:
        """In place: scale raw ``W h + b`` and apply the soft cap. Returns ``u``."""
        if self.scale != 1.0:
            u.mul_(self.scale)
        if self.softcap is not None:
            u.div_(self.softcap).tanh_().mul_(self.softcap)
        return u


def restrict_head(weight: torch.Tensor, bias: torch.Tensor | None,
                  answer_token_ids: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The LM head restricted to ``answer_token_ids`` ([K, D], [K]): a gather of K rows of W."""
    if answer_token_ids is None:
        return weight, bias
    ids = answer_token_ids.long()
    return weight.index_select(0, ids), (None if bias is None else bias.index_select(0, ids))
