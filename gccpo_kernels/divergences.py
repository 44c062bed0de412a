"""Divergences by name (SPEC §3): one :class:`Divergence` entry per divergence, in :data:`DIVERGENCES`.

An entry carries every backend's piece of its divergence D(q || q~), q = softmax(z),
q~ = softmax(z + Delta):

- **torch** (``chunked/divergence.py``): ``terms(x, lq, q, out)``, the per-token integrand
  q_v f(x_v) at x = log q~ - log q = Delta - L (L = lse(z~) - lse(z) = c + KL, known after the
  first pass), written with relative accuracy (no cancellation at divergences ~1e-6 in float32);
  the backend sums it over the vocabulary and ``finish`` scales and clamps the sum:
  D = clamp(scale * sum_v q_v f(x_v), 0, upper). The KL entry alone has ``terms=None``: the KL is
  the first pass's own result, log1p(E_q[phi(Delta - c)]) (docs/counterfactual.md).
- **triton** (``triton/divergence.py``): ``triton_code``, the ``KIND`` constexpr of
  ``_cf_integrand_kernel``, which branches on it (a Triton kernel cannot call a function held in a
  Python object, so that branch is the one place outside this entry); ``triton_block_r``, the
  configuration key of the integrand's row block (``"BLOCK_R_JS"``: the smaller block of the
  integrand that needs the most registers). ``triton_code=None``: no kernel branch, and the triton
  backend refuses the divergence with a ``ValueError``. The host combination is ``finish`` (the KL:
  log1p of the integrand sum at x = Delta - c).
- **reference** (``reference.py``): ``reference(lq, lq_pert)``, the textbook formula on log q
  ``[R, 1, V]`` and log q~ ``[R, M, V]`` (float64), summed over the tokens it is given -> ``[R, M]``.
  Written independently of the torch piece (no stable rewriting), so that the tests compare two
  derivations; every divergence here is a sum over tokens, so a rank of the vocabulary-parallel
  reference sums its own tokens and the ranks' shares add up.

``divergence.KINDS``, the triton backend's ``KIND_CODES`` and the reference's names are this
registry; ``gccpo.config.RewardConfig.divergence`` lists the built-in names in its ``Literal``
(gccpo uses only the public kernel API), and tests/kernels/test_divergence_registry.py keeps it
equal to them. Adding a divergence: docs/CONTRIBUTING.md.

This module is a leaf: it imports torch only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

LN2 = math.log(2.0)
#: the integrand's row-block keys a Triton configuration has (triton/divergence.py CONFIGS)
TRITON_BLOCKS = ("BLOCK_R", "BLOCK_R_JS")

Terms = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]
Reference = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Divergence:
    """One divergence D(q || q~) and its piece for each backend (see the module docstring).

    Attributes:
        name: the ``kind=`` of :func:`gccpo_kernels.counterfactual_divergence`.
        summary: one line for the docs and error messages.
        reference: ``(lq [R, 1, V], lq_pert [R, M, V]) -> [R, M]``, the textbook formula summed
            over the given tokens, in the inputs' dtype (float64 in the reference).
        terms: torch backend, ``(x [C, M, V], lq [C, 1, V], q [C, 1, V], out) -> [C, M, V]``, the
            per-token q_v f(x_v) at x = Delta - L; ``out`` is a free [C, M, V] buffer the function
            may write into, or None. May overwrite ``x``. None only for the KL (see above).
        scale, upper: D = clamp(scale * sum_v q_v f(x_v), 0, upper) (``finish``).
        triton_code: the ``KIND`` constexpr of the Triton integrand kernel, or None (no branch).
        triton_block_r: which row block of the Triton configuration the integrand runs with.
    """

    name: str
    summary: str
    reference: Reference
    terms: Terms | None = None
    scale: float = 1.0
    upper: float = math.inf
    triton_code: int | None = None
    triton_block_r: str = "BLOCK_R"

    @property
    def needs_shift(self) -> bool:
        """Whether its integrand is at x = Delta - L, so that L = c + KL is needed first (the
        Triton statistics then accumulate the re-centred E, and the torch vocabulary-parallel path
        takes a second pass). False for the KL alone, whose Triton integrand is at Delta - c."""
        return self.terms is not None

    def finish(self, total: torch.Tensor) -> torch.Tensor:
        """The integrand sum sum_v q_v f(x_v) [R, M] -> D = clamp(scale * sum, 0, upper), in place."""
        if self.scale != 1.0:
            total.mul_(self.scale)
        return total.clamp_(0.0, self.upper)


#: name -> entry, in registration order (the built-ins: kl, js, tv)
DIVERGENCES: dict[str, Divergence] = {}


def register_divergence(entry: Divergence) -> Divergence:
    """Add ``entry`` to :data:`DIVERGENCES` after checking it; returns it.

    Raises ValueError for a name already registered, a second entry without torch ``terms``
    (that is the KL's alone), a Triton code already taken, an unknown ``triton_block_r``, or a
    non-positive ``scale`` / ``upper``.
    """
    if not isinstance(entry, Divergence):
        raise TypeError(f"register_divergence takes a Divergence, got {type(entry).__name__}")
    name = entry.name
    if not isinstance(name, str) or not name:
        raise ValueError(f"a divergence needs a non-empty name, got {name!r}")
    if name in DIVERGENCES:
        raise ValueError(f"divergence {name!r} is already registered")
    if not callable(entry.reference):
        raise ValueError(f"divergence {name!r}: reference must be a function (lq, lq_pert) -> [R, M]")
    if entry.terms is None and any(not e.needs_shift for e in DIVERGENCES.values()):
        raise ValueError(f"divergence {name!r} needs its torch terms: terms=None is the KL's (computed "
                         "from the first pass), and the KL is registered")
    codes = {e.triton_code: e.name for e in DIVERGENCES.values() if e.triton_code is not None}
    if entry.triton_code is not None and (isinstance(entry.triton_code, bool)
                                          or not isinstance(entry.triton_code, int)
                                          or entry.triton_code in codes):
        raise ValueError(f"divergence {name!r}: triton_code {entry.triton_code!r} must be an int not "
                         f"taken (taken: {codes})")
    if entry.triton_block_r not in TRITON_BLOCKS:
        raise ValueError(f"divergence {name!r}: triton_block_r must be one of {TRITON_BLOCKS}, got "
                         f"{entry.triton_block_r!r}")
    if not (entry.scale > 0 and entry.upper > 0):
        raise ValueError(f"divergence {name!r}: scale and upper must be > 0, got {entry.scale}, {entry.upper}")
    DIVERGENCES[name] = entry
    return entry


def divergence_entry(kind: str) -> Divergence:
    """The registered entry named ``kind`` (ValueError naming the registered ones otherwise)."""
    entry = DIVERGENCES.get(kind) if isinstance(kind, str) else None
    if entry is None:
        raise ValueError(f"kind must be one of {tuple(DIVERGENCES)}, got {kind!r}")
    return entry


def triton_codes() -> dict[str, int]:
    """name -> the Triton integrand kernel's ``KIND`` code, for the entries that have one."""
    return {e.name: e.triton_code for e in DIVERGENCES.values() if e.triton_code is not None}


# ---------------------------------------------------------------------------------------------
# KL(q || q~) = E_q[log q - log q~]
# ---------------------------------------------------------------------------------------------


def _kl_reference(lq: torch.Tensor, lq_pert: torch.Tensor) -> torch.Tensor:
    return (lq.exp() * (lq - lq_pert)).sum(-1)


# ---------------------------------------------------------------------------------------------
# JS(q, q~) = (KL(q || m) + KL(q~ || m)) / 2, m = (q + q~) / 2  (natural log, in [0, ln 2])
# ---------------------------------------------------------------------------------------------

# psi(x) = (x e^x - (1 + e^x) log((1 + e^x)/2)) / 2 = x^2/8 * sum_k JS_SERIES[k] x^k: below
# JS_SERIES_BELOW the closed form loses ~eps/x^2 relative accuracy, the series (to x^12) does not.
JS_SERIES_BELOW = 0.25
JS_SERIES = (1.0, 1.0 / 2, 1.0 / 8, 1.0 / 48, 1.0 / 288, 1.0 / 1440, 1.0 / 11520, -1.0 / 483840,
             -1.0 / 4838400, 11.0 / 14515200, 11.0 / 174182400)


def js_integrand(x: torch.Tensor, lq: torch.Tensor) -> torch.Tensor:
    """q * psi(x) for log q = lq (broadcast) and x = log q~ - log q, stable for every x.

    |x| < JS_SERIES_BELOW: the Taylor series psi(x) = x^2/8 * sum_k JS_SERIES[k] x^k (truncation
    ~1e-14 relative). Otherwise the mixture form 0.5[q (ln2 - softplus(x)) + q~ (ln2 - softplus(-x))],
    q~ = e^(lq + x), whose two terms cancel by at most a factor ~10 there.
    """
    small = x.abs() < JS_SERIES_BELOW
    xs = torch.where(small, x, 0.0)
    poly = torch.full_like(xs, JS_SERIES[-1])
    for coef in reversed(JS_SERIES[:-1]):
        poly.mul_(xs).add_(coef)
    series = poly.mul_(xs.square()).mul_(0.125).mul_(torch.exp(lq))
    direct = 0.5 * (torch.exp(lq) * (LN2 - F.softplus(x)) + torch.exp(lq + x) * (LN2 - F.softplus(-x)))
    return torch.where(small, series, direct)


def _js_terms(x: torch.Tensor, lq: torch.Tensor, q: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    return js_integrand(x, lq)


def _js_reference(lq: torch.Tensor, lq_pert: torch.Tensor) -> torch.Tensor:
    q, q_pert = lq.exp(), lq_pert.exp()
    lmix = torch.logaddexp(lq, lq_pert) - LN2
    return 0.5 * (q * (lq - lmix)).sum(-1) + 0.5 * (q_pert * (lq_pert - lmix)).sum(-1)


# ---------------------------------------------------------------------------------------------
# TV(q, q~) = sum |q - q~| / 2  (in [0, 1])
# ---------------------------------------------------------------------------------------------


def _tv_terms(x: torch.Tensor, lq: torch.Tensor, q: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    """|q~ - q| = q |expm1(x)|; for |x| >= 1/2 as |e^(log q + x) - q| (no overflow where q = 0)."""
    return torch.where(x.abs() < 0.5, torch.expm1(x, out=out).abs_().mul_(q),
                       torch.exp(lq + x).sub_(q).abs_())


def _tv_reference(lq: torch.Tensor, lq_pert: torch.Tensor) -> torch.Tensor:
    return 0.5 * (lq.exp() - lq_pert.exp()).abs().sum(-1)


register_divergence(Divergence("kl", "KL(q || q~)", _kl_reference, triton_code=0))
register_divergence(Divergence("js", "Jensen-Shannon, natural log, in [0, ln 2]", _js_reference,
                               terms=_js_terms, upper=LN2, triton_code=2, triton_block_r="BLOCK_R_JS"))
register_divergence(Divergence("tv", "total variation, in [0, 1]", _tv_reference, terms=_tv_terms,
                               scale=0.5, upper=1.0, triton_code=1))
