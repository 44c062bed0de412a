"""Hostile-input suite: every public op fed random combinations of bad values, checked against
the documented outcome (docs/guarantees.md §5, "Hostile-input matrix").

:data:`MATRIX` holds one row per (op, argument, hostile input, outcome); the docs table holds
exactly the same rows (``test_the_documented_matrix_is_the_suite``). Each row is a test case;
hypothesis draws a backend (torch and reference mostly, the triton interpreter for about one example in
eight), small shapes and a seed, builds clean inputs, applies the hostile input and checks:

- ``TypeError "…"`` / ``ValueError "…"``: that exception, its message matching the regex and
  naming the argument (``*`` rows: each tensor argument of the op in turn, the drawn one named).
- ``reference``: the result equals the float64 reference's answer on the clean inputs (the bad
  value sits where the op does not read it).
- ``dense``: bitwise the result of the same call on dense copies (strided or stride-0 views).
- ``empty``: the documented empty result: outputs of the right (empty) shape; a loss of exactly
  0 with zero gradients of the inputs' shapes; group statistics 0 for every (empty) group.
- ``NaN in the bad row's deltas only`` (perturb_latents, no validate switch): the bad row's
  deltas are non-finite, rows that cannot draw it are bitwise the clean deltas.
- ``NaN passed through`` (episode_rewards, elementwise): non-finite exactly where the input is,
  the reference's answer elsewhere.

Everything runs with ``validate=True`` (the default). Hypothesis is derandomized (the same
examples on every run) with a bounded number of examples: about a minute on 2 CPU cores.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import gccpo_kernels as gk
from gccpo_kernels import reference as ref
from tests.conftest import DEVICE, available_backends, lm_head
from tests.kernels.test_advantages import make_batch, on

F64 = torch.float64
NONFINITE = (math.nan, math.inf, -math.inf)
# backends drawn per example: the triton interpreter for about one in eight
BACKENDS = (["torch"] * 4 + ["reference"] * 3 + (["triton"] if "triton" in available_backends() else []))
SETTINGS = settings(max_examples=25, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

ERR = "TypeError naming it"
VERR = "ValueError naming it"
VIEWS = "strided / expanded view"
# (op, argument, hostile input, outcome): docs/guarantees.md lists exactly these rows
MATRIX: list[tuple[str, str, str, str]] = [
    # §1
    ("fused_linear_logprobs", "hidden", "NaN / ±inf", 'ValueError "hidden holds"'),
    ("fused_linear_logprobs", "weight", "NaN", 'ValueError "weight holds NaN or inf"'),
    ("fused_linear_logprobs", "bias", "NaN / ±inf", 'ValueError "bias holds"'),
    ("fused_linear_logprobs", "targets", "out of range (≥ V, < 0 but not ignore_index, 2^40)", 'ValueError "targets hold"'),
    ("fused_linear_logprobs", "shape", "N = 0", "empty"),
    ("fused_linear_logprobs", "shape", "D = 0", 'ValueError "D = 0"'),
    ("fused_linear_logprobs", "shape", "V = 0", 'ValueError "V >= 1"'),
    ("fused_linear_logprobs", "*", "wrong dtype", ERR),
    ("fused_linear_logprobs", "*", "other device", VERR),
    ("fused_linear_logprobs", "*", "wrong shape", VERR),
    ("fused_linear_logprobs", "*", VIEWS, "dense"),
    # §2, plain
    ("policy_loss", "logp", "NaN / ±inf", 'ValueError "logp holds"'),
    ("policy_loss", "old_logp", "NaN / ±inf", 'ValueError "old_logp holds"'),
    ("policy_loss", "ref_logp", "NaN / ±inf", 'ValueError "ref_logp holds"'),
    ("policy_loss", "entropy", "NaN / ±inf", 'ValueError "entropy holds"'),
    ("policy_loss", "is_weights", "NaN / ±inf", 'ValueError "is_weights holds"'),
    ("policy_loss", "advantages", "NaN / ±inf", 'ValueError "advantages hold"'),
    ("policy_loss", "*", "NaN / ±inf on a masked token (a row without tokens for [B] values)", "reference"),
    ("policy_loss", "mask", "values other than 0 / 1", 'ValueError "mask must hold only 0 and 1"'),
    ("policy_loss", "normalizer", "≤ 0, NaN or ±inf (number or tensor)", 'ValueError "normalizer must be"'),
    ("policy_loss", "loss_scale", "NaN or ±inf (number or tensor)", 'ValueError "loss_scale must be"'),
    ("policy_loss", "shape", "B = 0", "empty"),
    ("policy_loss", "shape", "T = 0", "empty"),
    ("policy_loss", "*", "wrong dtype", ERR),
    ("policy_loss", "*", "other device", VERR),
    ("policy_loss", "*", "wrong shape", VERR),
    ("policy_loss", "*", VIEWS, "dense"),
    # §2, fused
    ("fused_linear_policy_loss", "hidden", "NaN / ±inf", 'ValueError "hidden holds"'),
    ("fused_linear_policy_loss", "weight", "NaN", 'ValueError "weight holds NaN or inf"'),
    ("fused_linear_policy_loss", "bias", "NaN / ±inf", 'ValueError "bias holds"'),
    ("fused_linear_policy_loss", "old_logp", "NaN / ±inf", 'ValueError "old_logp holds"'),
    ("fused_linear_policy_loss", "ref_logp", "NaN / ±inf", 'ValueError "ref_logp holds"'),
    ("fused_linear_policy_loss", "is_weights", "NaN / ±inf", 'ValueError "is_weights holds"'),
    ("fused_linear_policy_loss", "advantages", "NaN / ±inf", 'ValueError "advantages hold"'),
    ("fused_linear_policy_loss", "*", "NaN / ±inf on a masked token (a row without tokens for [B] values)", "reference"),
    ("fused_linear_policy_loss", "targets", "out of range", 'ValueError "targets hold"'),
    ("fused_linear_policy_loss", "targets", "out of range on a masked token", "reference"),
    ("fused_linear_policy_loss", "mask", "values other than 0 / 1", 'ValueError "mask must hold only 0 and 1"'),
    ("fused_linear_policy_loss", "shape", "B = 0", "empty"),
    ("fused_linear_policy_loss", "shape", "T = 0", "empty"),
    ("fused_linear_policy_loss", "shape", "D = 0", 'ValueError "D = 0"'),
    ("fused_linear_policy_loss", "*", "wrong dtype", ERR),
    ("fused_linear_policy_loss", "*", "other device", VERR),
    ("fused_linear_policy_loss", "*", "wrong shape", VERR),
    ("fused_linear_policy_loss", "*", VIEWS, "dense"),
    # §3
    ("perturb_latents", "hidden", "NaN / ±inf", "NaN in the bad row's deltas only"),
    ("perturb_latents", "group_index", "negative", 'ValueError "group_index must hold non-negative"'),
    ("perturb_latents", "shape", "R = 0", "empty"),
    ("perturb_latents", "shape", "D = 0", 'ValueError "D >= 1"'),
    ("perturb_latents", "*", "wrong dtype", ERR),
    ("perturb_latents", "*", "other device", VERR),
    ("perturb_latents", "*", "wrong shape", VERR),
    ("perturb_latents", "*", VIEWS, "dense"),
    ("counterfactual_divergence", "hidden", "NaN / ±inf", 'ValueError "hidden holds"'),
    ("counterfactual_divergence", "deltas", "NaN / ±inf", 'ValueError "deltas holds"'),
    ("counterfactual_divergence", "weight", "NaN", 'ValueError "weight holds NaN or inf"'),
    ("counterfactual_divergence", "bias", "NaN / ±inf", 'ValueError "bias holds"'),
    ("counterfactual_divergence", "answer_token_ids", "out of range or repeated", 'ValueError "answer_token_ids must"'),
    ("counterfactual_divergence", "shape", "R = 0", "empty"),
    ("counterfactual_divergence", "shape", "M = 0", "empty"),
    ("counterfactual_divergence", "shape", "D = 0", 'ValueError "D = 0"'),
    ("counterfactual_divergence", "*", "wrong dtype", ERR),
    ("counterfactual_divergence", "*", "other device", VERR),
    ("counterfactual_divergence", "*", "wrong shape", VERR),
    ("counterfactual_divergence", "*", VIEWS, "dense"),
    # §4
    ("group_distribution_stats", "hidden", "NaN / ±inf", 'ValueError "hidden holds"'),
    ("group_distribution_stats", "weight", "NaN", 'ValueError "weight holds NaN or inf"'),
    ("group_distribution_stats", "bias", "NaN / ±inf", 'ValueError "bias holds"'),
    ("group_distribution_stats", "group_offsets", "not from 0 to R, decreasing", 'ValueError "group_offsets must"'),
    ("group_distribution_stats", "group_ids", "negative, ≥ num_groups", 'ValueError "group_ids must be"'),
    ("group_distribution_stats", "answer_token_ids", "out of range or repeated", 'ValueError "answer_token_ids must"'),
    ("group_distribution_stats", "shape", "R = 0 (G ≥ 0 empty groups)", "empty"),
    ("group_distribution_stats", "shape", "D = 0", 'ValueError "D = 0"'),
    ("group_distribution_stats", "*", "wrong dtype", ERR),
    ("group_distribution_stats", "*", "other device", VERR),
    ("group_distribution_stats", "*", "wrong shape", VERR),
    ("group_distribution_stats", "*", VIEWS, "dense"),
    # §5-§6
    ("episode_rewards", "*", "NaN / ±inf", "NaN passed through"),
    ("episode_rewards", "shape", "B = 0 or K = 0", "empty"),
    ("episode_rewards", "*", "wrong dtype", ERR),
    ("episode_rewards", "*", "other device", VERR),
    ("episode_rewards", "*", "wrong shape", VERR),
    ("episode_rewards", "*", VIEWS, "dense"),
    ("token_advantages", "outcome_rewards", "NaN / ±inf", 'ValueError "outcome_rewards hold"'),
    ("token_advantages", "old_logp", "NaN / ±inf on an episode token", 'ValueError "old_logp holds"'),
    ("token_advantages", "episode_rewards", "NaN / ±inf on an episode the completion has", 'ValueError "episode_rewards hold"'),
    ("token_advantages", "*", "NaN / ±inf where not read (masked token, episode beyond the count)", "reference"),
    ("token_advantages", "episode_ids", "outside [-1, K) inside the mask", 'ValueError "episode_ids hold"'),
    ("token_advantages", "episode_ids", "out of range outside the mask", "reference"),
    ("token_advantages", "group_index", "any integers (negative, huge)", "reference"),
    ("token_advantages", "mask", "values other than 0 / 1", 'ValueError "mask must hold only 0 and 1"'),
    ("token_advantages", "shape", "B = 0 or T = 0", "empty"),
    ("token_advantages", "shape", "K = 0", "reference"),
    ("token_advantages", "*", "wrong dtype", ERR),
    ("token_advantages", "*", "other device", VERR),
    ("token_advantages", "*", "wrong shape", VERR),
    ("token_advantages", "*", VIEWS, "dense"),
]

OPS = ("fused_linear_logprobs", "policy_loss", "fused_linear_policy_loss", "perturb_latents",
       "counterfactual_divergence", "group_distribution_stats", "episode_rewards", "token_advantages")


def rows_of(op: str) -> list[tuple[str, str, str]]:
    return [(a, i, o) for o_, a, i, o in MATRIX if o_ == op]


def row_id(row: tuple[str, str, str]) -> str:
    arg, inp, _ = row
    ascii_inp = inp.replace("±", "+-").replace("≤", "<=").replace("≥", ">=")
    return f"{arg}:{ascii_inp}"


# ---------------------------------------------------------------------------------------------
# the docs hold exactly this matrix
# ---------------------------------------------------------------------------------------------

DOCS = Path(__file__).resolve().parents[2] / "docs" / "guarantees.md"


def documented_matrix() -> list[tuple[str, str, str, str]]:
    text = DOCS.read_text()
    block = text.split("<!-- hostile-matrix -->")[1].split("<!-- /hostile-matrix -->")[0]
    rows = []
    for line in block.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 4 or cells[0] in ("op", "") or set(cells[0]) <= {"-"}:
            continue
        rows.append(tuple(c.strip("`") if c.startswith("`") and c.endswith("`") else c for c in cells))
    return rows


def test_the_documented_matrix_is_the_suite():
    assert documented_matrix() == MATRIX
    assert {op for op, *_ in MATRIX} == set(OPS)


# ---------------------------------------------------------------------------------------------
# hostile transformations of one argument
# ---------------------------------------------------------------------------------------------


def strided(t: torch.Tensor) -> torch.Tensor:
    """A non-contiguous view with t's values (every other element of a doubled last dim)."""
    filler = torch.full_like(t, 1234.5) if t.is_floating_point() else t
    out = torch.stack([t, filler], dim=-1)[..., 0]
    assert t.dim() == 0 or t.numel() <= 1 or not out.is_contiguous()
    return out


def expanded(t: torch.Tensor) -> torch.Tensor:
    """A stride-0 view repeating t's first row (element) along dim 0."""
    return t[:1].expand(t.shape) if t.shape[0] > 0 else t


def wrong_dtype(t: torch.Tensor) -> torch.Tensor:
    if t.dtype == torch.bool:
        return t.to(torch.complex64)
    if t.is_floating_point():
        return t.round().to(torch.int64)
    return t.to(torch.float32)


def wrong_shape(name: str, t: torch.Tensor) -> torch.Tensor:
    if name in ("advantages",) and t.dim() == 1:
        return torch.cat([t, t[:1]])  # [B] -> [B + 1]: [B, 1] would be valid
    return t.unsqueeze(-1)


def poison(t: torch.Tensor, index: tuple, value: float) -> torch.Tensor:
    t = t.detach().clone()
    t[index] = value
    return t


def check_error(exc_info, arg: str, regex: str | None) -> None:
    msg = str(exc_info.value)
    if regex is not None:
        assert re.search(regex, msg), f"{msg!r} does not match {regex!r}"
    if arg not in ("*", "shape"):
        assert arg in msg, f"the error does not name {arg!r}: {msg!r}"


def expect_error(kind: str, arg: str, regex: str | None, call) -> None:
    exc = {"TypeError": TypeError, "ValueError": ValueError}[kind]
    with pytest.raises(exc) as info:
        call()
    check_error(info, arg, regex)


def parse_outcome(outcome: str) -> tuple[str, str | None]:
    m = re.fullmatch(r'(TypeError|ValueError) "(.*)"', outcome)
    if m:
        return m.group(1), re.escape(m.group(2))
    if outcome == ERR:
        return "TypeError", None
    if outcome == VERR:
        return "ValueError", None
    return outcome, None


def close(got, want, dtype: torch.dtype) -> None:
    """got (the op) against want (the float64 reference), per output."""
    tol = 1e-9 if dtype == F64 else 2e-3
    for g, w in zip(got, want):
        assert g.shape == w.shape, (g.shape, w.shape)
        if g.numel() == 0:
            continue
        g, w = g.detach().double().cpu(), w.detach().double().cpu()
        assert bool(torch.isfinite(g).all()), "a non-finite result where the reference is finite"
        scale = max(1.0, float(w.abs().max()))
        torch.testing.assert_close(g, w, rtol=tol, atol=tol * scale)


def bitwise(got, want) -> None:
    for g, w in zip(got, want):
        assert torch.equal(g, w), "a view gave another result than its dense copy"


def dense_copy(kw: dict) -> dict:
    return {k: (v.contiguous() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}


def as64(kw: dict) -> dict:
    return {k: (v.detach().to(F64) if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
            for k, v in kw.items()}


def apply_generic(inp: str, arg: str, kw: dict, data, no_expand: frozenset = frozenset()) -> dict:
    """The ``*`` rows: wrong dtype / other device / wrong shape / a view of ``arg`` (strided, or
    stride-0 unless ``arg`` is in ``no_expand`` or :data:`NO_EXPAND`)."""
    t = kw[arg]
    if inp == "wrong dtype":
        kw[arg] = wrong_dtype(t)
    elif inp == "other device":
        kw[arg] = t.to("meta")
    elif inp == "wrong shape":
        kw[arg] = wrong_shape(arg, t)
    elif inp == VIEWS:
        view = data.draw(st.sampled_from(["strided", "expanded"]), label="view")
        keep = arg in NO_EXPAND or arg in no_expand
        kw[arg] = expanded(t) if view == "expanded" and not keep else strided(t)
    else:
        raise AssertionError(inp)
    return kw


# expanding these (one value repeated) would make the input invalid
NO_EXPAND = {"group_offsets", "answer_token_ids"}


def grad_leaf(t: torch.Tensor) -> torch.Tensor:
    """A detached leaf that requires grad (a float tensor; other dtypes are passed as they are,
    for the op to reject)."""
    return t.detach().requires_grad_() if t.is_floating_point() else t


def dtype_of(backend: str) -> torch.dtype:
    return torch.float32 if backend == "triton" else F64


def backends() -> st.SearchStrategy[str]:
    return st.sampled_from(BACKENDS)


# ---------------------------------------------------------------------------------------------
# §1 fused_linear_logprobs
# ---------------------------------------------------------------------------------------------


def lp_inputs(seed: int, n: int, d: int, v: int, dtype: torch.dtype) -> dict:
    h, w, b = lm_head(n, d, v, seed=seed, dtype=dtype)
    y = torch.randint(0, v, (n,), generator=torch.Generator().manual_seed(seed)).to(DEVICE)
    if n > 2:
        y[n - 1] = -100  # an ignored row (row 0 is always read)
    return dict(hidden=h, weight=w, targets=y, bias=b)


def lp_call(kw: dict, backend: str, grads: bool = False):
    kw = dict(kw)
    if grads:
        kw["hidden"], kw["weight"] = grad_leaf(kw["hidden"]), grad_leaf(kw["weight"])
    logp, ent = gk.fused_linear_logprobs(kw.pop("hidden"), kw.pop("weight"), kw.pop("targets"),
                                         **kw, return_entropy=True, backend=backend)
    return logp, ent


@pytest.mark.parametrize("row", rows_of("fused_linear_logprobs"), ids=row_id)
@SETTINGS
@given(backend=backends(),
       seed=st.integers(0, 2**16), n=st.integers(1, 7), d=st.integers(2, 9), v=st.integers(1, 40),
       data=st.data())
def test_fused_linear_logprobs_hostile(row, backend, seed, n, d, v, data):
    arg, inp, outcome = row
    dtype = dtype_of(backend)
    kw = lp_inputs(seed, n, d, v, dtype)
    kind, regex = parse_outcome(outcome)
    bad = data.draw(st.sampled_from(NONFINITE), label="value")
    if arg == "*":
        arg = data.draw(st.sampled_from(["hidden", "weight", "targets", "bias"]), label="argument")
        kw = apply_generic(inp, arg, kw, data)
    elif arg == "hidden":
        kw["hidden"] = poison(kw["hidden"], (data.draw(st.integers(0, n - 1)), 0), bad)
    elif arg == "weight":
        kw["weight"] = poison(kw["weight"], (data.draw(st.integers(0, v - 1)), 0), math.nan)
    elif arg == "bias":
        kw["bias"] = poison(kw["bias"], (data.draw(st.integers(0, v - 1)),), bad)
    elif arg == "targets":
        kw["targets"] = poison(kw["targets"], (0,), data.draw(st.sampled_from([v, v + 7, -1, -(2**40), 2**40])))
    elif inp == "N = 0":
        kw = lp_inputs(seed, 0, d, v, dtype)
        lead = (0,) if n <= 3 else (n, 0)  # [0, D] or [n, 0, D]
        kw["hidden"], kw["targets"] = kw["hidden"].reshape(*lead, d), kw["targets"].reshape(lead)
    elif inp == "D = 0":
        kw = lp_inputs(seed, n, d, v, dtype)
        kw["hidden"], kw["weight"] = kw["hidden"][:, :0], kw["weight"][:, :0]
    elif inp == "V = 0":
        kw["weight"], kw["bias"] = kw["weight"][:0], kw["bias"][:0]
    if kind in ("TypeError", "ValueError"):
        expect_error(kind, arg, regex, lambda: lp_call(kw, backend))
    elif kind == "dense":
        bitwise(lp_call(kw, backend), lp_call(dense_copy(kw), backend))
    elif kind == "empty":
        h = kw["hidden"].detach().requires_grad_()
        w = kw["weight"].detach().requires_grad_()
        logp, ent = gk.fused_linear_logprobs(h, w, kw["targets"], bias=kw["bias"], return_entropy=True,
                                             backend=backend)
        assert logp.shape == ent.shape == kw["targets"].shape and logp.numel() == 0
        (logp.sum() + ent.sum()).backward()
        assert h.grad.shape == h.shape and w.grad.shape == w.shape and not bool(w.grad.any())
    else:
        raise AssertionError(outcome)


# ---------------------------------------------------------------------------------------------
# §2 policy_loss (plain) and fused_linear_policy_loss
# ---------------------------------------------------------------------------------------------

PL_CONFIGS = [gk.PolicyLossConfig(beta=0.05, entropy_coef=0.01),
              gk.PolicyLossConfig(beta=0.05, entropy_coef=0.01, importance_sampling_level="sequence",
                                  loss_agg="seq-mean-token-mean"),
              gk.PolicyLossConfig(beta=0.05, entropy_coef=0.01, loss_agg="seq-mean-token-sum-norm",
                                  dual_clip=3.0)]
PL_FLOATS = ["logp", "old_logp", "ref_logp", "entropy", "is_weights", "advantages"]


def pl_inputs(seed: int, b: int, t: int, dtype: torch.dtype = F64) -> dict:
    """b >= 2 rows: row 0 fully unmasked, row b - 1 fully masked, random mask between."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.rand(*s, generator=g, dtype=F64).to(dtype).to(DEVICE)  # noqa: E731
    logp = -2 * r(b, t)
    mask = torch.rand(b, t, generator=g) < 0.7
    if b > 0:
        mask[0], mask[-1] = True, False
    return dict(logp=logp, old_logp=logp + 0.3 * (r(b, t) - 0.5), ref_logp=logp + 0.3 * (r(b, t) - 0.5),
                entropy=2 * r(b, t), is_weights=0.5 + r(b, t), advantages=2 * r(b) - 1,
                mask=mask.to(DEVICE))


def pl_call(kw: dict, cfg):
    kw = dict(kw)
    logp, ent = grad_leaf(kw.pop("logp")), grad_leaf(kw.pop("entropy"))
    loss, _ = gk.policy_loss(logp, kw.pop("old_logp"), kw.pop("advantages"), kw.pop("mask"), entropy=ent,
                             config=cfg, **kw)
    g_logp, g_ent = torch.autograd.grad(loss, (logp, ent), allow_unused=False)
    return loss, g_logp, g_ent


def pl_reference(kw: dict, cfg):
    kw = as64(kw)
    logp = kw["logp"].clone().requires_grad_()
    ent = kw["entropy"].clone().requires_grad_()
    norm = kw.get("normalizer")
    loss, _ = ref.policy_loss(logp, kw["old_logp"], kw["advantages"], kw["mask"], cfg, ref_logp=kw["ref_logp"],
                              entropy=ent, is_weights=kw["is_weights"],
                              normalizer=None if norm is None else float(norm),
                              loss_scale=float(kw.get("loss_scale", 1.0)))
    # the loop reference builds no graph from an empty batch (B = 0 or T = 0)
    grads = torch.autograd.grad(loss, (logp, ent), allow_unused=True) if loss.requires_grad else (None, None)
    return (loss, *(torch.zeros_like(x) if g is None else g for g, x in zip(grads, (logp, ent))))


@pytest.mark.parametrize("row", rows_of("policy_loss"), ids=row_id)
@SETTINGS
@given(seed=st.integers(0, 2**16), b=st.integers(2, 5),
       t=st.integers(1, 7), cfg=st.sampled_from(PL_CONFIGS), data=st.data())
def test_policy_loss_hostile(row, seed, b, t, cfg, data):
    arg, inp, outcome = row
    kw = pl_inputs(seed, b, t)
    clean = dict(kw)
    kind, regex = parse_outcome(outcome)
    bad = data.draw(st.sampled_from(NONFINITE), label="value")
    row_arg = lambda name: kw[name].dim() == 1  # noqa: E731
    unmasked = (0, data.draw(st.integers(0, t - 1), label="token"))
    masked = (b - 1, data.draw(st.integers(0, t - 1), label="masked token"))
    if arg == "*" and inp.startswith("NaN"):
        arg = data.draw(st.sampled_from(PL_FLOATS), label="argument")
        kw[arg] = poison(kw[arg], masked[:1] if row_arg(arg) else masked, bad)
    elif arg == "*":
        arg = data.draw(st.sampled_from(PL_FLOATS + ["mask"]), label="argument")
        kw = apply_generic(inp, arg, kw, data)
    elif arg in PL_FLOATS:
        kw[arg] = poison(kw[arg], unmasked[:1] if row_arg(arg) else unmasked, bad)
    elif arg == "mask":
        m = kw["mask"].to(F64)
        m[unmasked] = data.draw(st.sampled_from([0.5, 2.0, -1.0]))
        kw["mask"] = m
    elif arg in ("normalizer", "loss_scale"):
        values = [0.0, -5.0, *NONFINITE] if arg == "normalizer" else list(NONFINITE)
        value = data.draw(st.sampled_from(values), label=arg)
        kw[arg] = torch.tensor(value, dtype=F64) if data.draw(st.booleans(), label="tensor") else value
        cfg = gk.PolicyLossConfig(beta=0.05, entropy_coef=0.01)  # token-mean (takes a normalizer)
    elif inp in ("B = 0", "T = 0"):
        kw = pl_inputs(seed, 0 if inp == "B = 0" else b, 0 if inp == "T = 0" else t)
    if kind in ("TypeError", "ValueError"):
        expect_error(kind, arg, regex, lambda: pl_call(kw, cfg))
    elif kind == "reference":
        close(pl_call(kw, cfg), pl_reference(clean, cfg), F64)
    elif kind == "dense":
        bitwise(pl_call(kw, cfg), pl_call(dense_copy(kw), cfg))
    elif kind == "empty":
        loss, g_logp, g_ent = pl_call(kw, cfg)
        assert loss.item() == 0.0 and g_logp.shape == kw["logp"].shape and g_ent.shape == kw["entropy"].shape
        assert not bool(g_logp.any()) and not bool(g_ent.any())
        assert pl_reference(kw, cfg)[0].item() == 0.0
    else:
        raise AssertionError(outcome)


FPL_FLOATS = ["old_logp", "ref_logp", "is_weights", "advantages"]


def fpl_inputs(seed: int, b: int, t: int, d: int, v: int, dtype: torch.dtype) -> dict:
    h, w, bias = lm_head(b * t, d, v, seed=seed, dtype=dtype)
    kw = pl_inputs(seed, b, t, dtype)
    del kw["logp"], kw["entropy"]
    y = torch.randint(0, v, (b, t), generator=torch.Generator().manual_seed(seed + 1)).to(DEVICE)
    return dict(kw, hidden=h.reshape(b, t, d), weight=w, bias=bias, targets=y)


FPL_CFG = gk.PolicyLossConfig(beta=0.05, entropy_coef=0.01)


def fpl_call(kw: dict, backend: str):
    kw = dict(kw)
    h, w = grad_leaf(kw.pop("hidden")), grad_leaf(kw.pop("weight"))
    out = gk.fused_linear_policy_loss(h, w, kw.pop("targets"), kw.pop("advantages"), kw.pop("mask"), **kw,
                                      config=FPL_CFG, backend=backend)
    dh, dw = torch.autograd.grad(out.loss, (h, w))
    return out.loss, out.logp, out.entropy, dh, dw


@pytest.mark.parametrize("row", rows_of("fused_linear_policy_loss"), ids=row_id)
@SETTINGS
@given(backend=backends(), seed=st.integers(0, 2**16),
       b=st.integers(2, 4), t=st.integers(1, 5), d=st.integers(2, 8), v=st.integers(1, 30), data=st.data())
def test_fused_linear_policy_loss_hostile(row, backend, seed, b, t, d, v, data):
    arg, inp, outcome = row
    dtype = dtype_of(backend)
    kw = fpl_inputs(seed, b, t, d, v, dtype)
    clean = dict(kw)
    kind, regex = parse_outcome(outcome)
    bad = data.draw(st.sampled_from(NONFINITE), label="value")
    unmasked = (0, data.draw(st.integers(0, t - 1), label="token"))
    masked = (b - 1, data.draw(st.integers(0, t - 1), label="masked token"))
    if arg == "*" and inp.startswith("NaN"):
        arg = data.draw(st.sampled_from(FPL_FLOATS), label="argument")
        kw[arg] = poison(kw[arg], masked[:1] if kw[arg].dim() == 1 else masked, bad)
    elif arg == "*":
        arg = data.draw(st.sampled_from(["hidden", "weight", "bias", "targets", "mask"] + FPL_FLOATS),
                        label="argument")
        kw = apply_generic(inp, arg, kw, data)
    elif arg in FPL_FLOATS:
        kw[arg] = poison(kw[arg], unmasked[:1] if kw[arg].dim() == 1 else unmasked, bad)
    elif arg == "hidden":
        kw["hidden"] = poison(kw["hidden"], (*masked, 0), bad)  # hidden is scanned whole
    elif arg == "weight":
        kw["weight"] = poison(kw["weight"], (data.draw(st.integers(0, v - 1)), 0), math.nan)
    elif arg == "bias":
        kw["bias"] = poison(kw["bias"], (data.draw(st.integers(0, v - 1)),), bad)
    elif arg == "targets":
        where = masked if "masked" in inp else unmasked
        kw["targets"] = poison(kw["targets"], where, data.draw(st.sampled_from([v, -1, 2**40])))
    elif arg == "mask":
        m = kw["mask"].to(dtype)
        m[unmasked] = data.draw(st.sampled_from([0.5, 2.0]))
        kw["mask"] = m
    elif inp in ("B = 0", "T = 0"):
        kw = fpl_inputs(seed, 0 if inp == "B = 0" else b, 0 if inp == "T = 0" else t, d, v, dtype)
    elif inp == "D = 0":
        kw["hidden"], kw["weight"] = kw["hidden"][..., :0], kw["weight"][:, :0]
    if kind in ("TypeError", "ValueError"):
        expect_error(kind, arg, regex, lambda: fpl_call(kw, backend))
    elif kind == "reference":
        close(fpl_call(kw, backend), fpl_call(as64(clean), "reference"), dtype)
    elif kind == "dense":
        bitwise(fpl_call(kw, backend), fpl_call(dense_copy(kw), backend))
    elif kind == "empty":
        loss, logp, ent, dh, dw = fpl_call(kw, backend)
        assert loss.item() == 0.0 and logp.shape == ent.shape == kw["targets"].shape
        assert dh.shape == kw["hidden"].shape and dw.shape == kw["weight"].shape and not bool(dw.any())
    else:
        raise AssertionError(outcome)


# ---------------------------------------------------------------------------------------------
# §3 perturb_latents and counterfactual_divergence
# ---------------------------------------------------------------------------------------------


def pert_call(kw: dict, seed: int):
    kw = dict(kw)
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    return (gk.perturb_latents(kw.pop("hidden"), 3, sigma=0.1, generator=gen, **kw),)


@pytest.mark.parametrize("row", rows_of("perturb_latents"), ids=row_id)
@SETTINGS
@given(seed=st.integers(0, 2**16), r=st.integers(1, 7),
       d=st.integers(2, 6), mode=st.sampled_from(["gaussian", "sibling"]), data=st.data())
def test_perturb_latents_hostile(row, seed, r, d, mode, data):
    arg, inp, outcome = row
    h, _, _ = lm_head(r, d, 1, seed=seed, dtype=F64)
    groups = torch.randint(0, 3, (r,), generator=torch.Generator().manual_seed(seed)).to(DEVICE)
    kind, regex = parse_outcome(outcome)
    if arg == "*" or arg == "group_index":
        mode = "sibling"
    kw = dict(hidden=h, mode=mode) if mode == "gaussian" else dict(hidden=h, mode=mode, group_index=groups)
    if arg == "*":
        choices = ["group_index"] if inp == "other device" else ["hidden", "group_index"]
        arg = data.draw(st.sampled_from(choices), label="argument")
        kw = apply_generic(inp, arg, kw, data)
    elif arg == "group_index":
        kw["group_index"] = poison(groups, (data.draw(st.integers(0, r - 1)),), -1)
    elif inp == "R = 0":
        kw["hidden"] = h[:0]
        if mode == "sibling":
            kw["group_index"] = groups[:0]
    elif inp == "D = 0":
        kw["hidden"] = h[:, :0]
    if kind in ("TypeError", "ValueError"):
        expect_error(kind, arg, regex, lambda: pert_call(kw, seed))
    elif kind == "dense":
        bitwise(pert_call(kw, seed), pert_call(dense_copy(kw), seed))
    elif kind == "empty":
        (out,) = pert_call(kw, seed)
        assert out.shape == (0, 3, d)
    elif kind == "NaN in the bad row's deltas only":
        i = data.draw(st.integers(0, r - 1), label="row")
        (clean,) = pert_call(kw, seed)
        kw["hidden"] = poison(h, (i, data.draw(st.integers(0, d - 1))), data.draw(st.sampled_from(NONFINITE)))
        (out,) = pert_call(kw, seed)
        assert not bool(torch.isfinite(out[i]).all())
        # rows that cannot draw row i: every other row (gaussian), the other groups (sibling)
        safe = torch.arange(r, device=DEVICE) != i
        if mode == "sibling":
            safe &= groups != groups[i]
        assert torch.equal(out[safe], clean[safe])
    else:
        raise AssertionError(outcome)


def div_inputs(seed: int, r: int, m: int, d: int, v: int, dtype: torch.dtype) -> dict:
    h, w, b = lm_head(r, d, v, seed=seed, dtype=dtype)
    deltas = 0.1 * torch.randn(r, m, d, generator=torch.Generator().manual_seed(seed), dtype=F64)
    kw = dict(hidden=h, weight=w, deltas=deltas.to(dtype).to(DEVICE), bias=b)
    if v >= 3:
        kw["answer_token_ids"] = torch.tensor([v - 1, 0, v // 2], device=DEVICE)
    return kw


def div_call(kw: dict, backend: str, kind: str):
    kw = dict(kw)
    return (gk.counterfactual_divergence(kw.pop("hidden"), kw.pop("weight"), kw.pop("deltas"), **kw,
                                         kind=kind, backend=backend),)


@pytest.mark.parametrize("row", rows_of("counterfactual_divergence"), ids=row_id)
@SETTINGS
@given(backend=backends(), seed=st.integers(0, 2**16),
       r=st.integers(1, 6), m=st.integers(1, 3), d=st.integers(2, 8), v=st.integers(3, 40),
       kind=st.sampled_from(["kl", "js", "tv"]), data=st.data())
def test_counterfactual_divergence_hostile(row, backend, seed, r, m, d, v, kind, data):
    arg, inp, outcome = row
    dtype = dtype_of(backend)
    kw = div_inputs(seed, r, m, d, v, dtype)
    out_kind, regex = parse_outcome(outcome)
    bad = data.draw(st.sampled_from(NONFINITE), label="value")
    if arg in ("weight",):
        kw.pop("answer_token_ids")  # a NaN row outside the answer ids would not be read
    if arg == "*":
        arg = data.draw(st.sampled_from(["hidden", "weight", "deltas", "bias", "answer_token_ids"]), label="argument")
        kw = apply_generic(inp, arg, kw, data)
    elif arg == "hidden":
        kw["hidden"] = poison(kw["hidden"], (data.draw(st.integers(0, r - 1)), 0), bad)
    elif arg == "deltas":
        kw["deltas"] = poison(kw["deltas"], (data.draw(st.integers(0, r - 1)), m - 1, 0), bad)
    elif arg == "weight":
        kw["weight"] = poison(kw["weight"], (data.draw(st.integers(0, v - 1)), 0), math.nan)
    elif arg == "bias":
        kw["bias"] = poison(kw["bias"], (data.draw(st.integers(0, v - 1)),), bad)
    elif arg == "answer_token_ids":
        ids = [v, -1, 0]  # out of range, negative, repeated (0 is already an id)
        kw["answer_token_ids"] = poison(kw["answer_token_ids"], (2,), data.draw(st.sampled_from(ids)))
    elif inp == "R = 0":
        kw["hidden"], kw["deltas"] = kw["hidden"][:0], kw["deltas"][:0]
    elif inp == "M = 0":
        kw["deltas"] = kw["deltas"][:, :0]
    elif inp == "D = 0":
        kw["hidden"], kw["weight"], kw["deltas"] = kw["hidden"][:, :0], kw["weight"][:, :0], kw["deltas"][..., :0]
    if out_kind in ("TypeError", "ValueError"):
        expect_error(out_kind, arg, regex, lambda: div_call(kw, backend, kind))
    elif out_kind == "dense":
        got = div_call(kw, backend, kind)
        bitwise(got, div_call(dense_copy(kw), backend, kind))
        close(got, div_call(as64(dense_copy(kw)), "reference", kind), dtype)
    elif out_kind == "empty":
        (out,) = div_call(kw, backend, kind)
        assert out.shape == kw["deltas"].shape[:2] and out.numel() == 0
    else:
        raise AssertionError(outcome)


# ---------------------------------------------------------------------------------------------
# §4 group_distribution_stats
# ---------------------------------------------------------------------------------------------


def gs_call(kw: dict, backend: str):
    kw = dict(kw)
    return tuple(gk.group_distribution_stats(kw.pop("hidden"), kw.pop("weight"), **kw, backend=backend))


@pytest.mark.parametrize("row", rows_of("group_distribution_stats"), ids=row_id)
@SETTINGS
@given(backend=backends(), seed=st.integers(0, 2**16),
       r=st.integers(1, 7), d=st.integers(2, 8), v=st.integers(3, 40), by_ids=st.booleans(), data=st.data())
def test_group_distribution_stats_hostile(row, backend, seed, r, d, v, by_ids, data):
    arg, inp, outcome = row
    dtype = dtype_of(backend)
    h, w, b = lm_head(r, d, v, seed=seed, dtype=dtype)
    kind, regex = parse_outcome(outcome)
    bad = data.draw(st.sampled_from(NONFINITE), label="value")
    ids = torch.randint(0, 3, (r,), generator=torch.Generator().manual_seed(seed)).to(DEVICE)
    cut = r // 2
    kw = dict(hidden=h, weight=w, bias=b)
    if arg == "group_ids" or (arg != "group_offsets" and by_ids):
        kw["group_ids"] = ids
    else:
        kw["group_offsets"] = torch.tensor([0, cut, cut, r], device=DEVICE)
    if v >= 3 and arg != "weight" and data.draw(st.booleans(), label="answer ids"):
        kw["answer_token_ids"] = torch.tensor([v - 1, 0, v // 2], device=DEVICE)
    if arg == "*":
        arg = data.draw(st.sampled_from(sorted(kw)), label="argument")
        kw = apply_generic(inp, arg, kw, data)
    elif arg == "hidden":
        kw["hidden"] = poison(h, (data.draw(st.integers(0, r - 1)), 0), bad)
    elif arg == "weight":
        kw["weight"] = poison(w, (data.draw(st.integers(0, v - 1)), 0), math.nan)
    elif arg == "bias":
        kw["bias"] = poison(b, (data.draw(st.integers(0, v - 1)),), bad)
    elif arg == "group_offsets":
        kw["group_offsets"] = torch.tensor(data.draw(st.sampled_from(
            [[1, r], [0, r + 1], [0, r - 1] if r > 1 else [0, 2], [0, r, cut, r] if cut < r else [-1, r]])),
            device=DEVICE)
    elif arg == "group_ids":
        if data.draw(st.booleans(), label="negative"):
            kw["group_ids"] = poison(ids, (0,), -1)
        else:
            kw["num_groups"] = int(ids.max())  # an id == num_groups
    elif arg == "answer_token_ids":
        kw["answer_token_ids"] = torch.tensor([v - 1, data.draw(st.sampled_from([v, -1, v - 1]))], device=DEVICE)
    elif inp.startswith("R = 0"):
        kw["hidden"] = h[:0]
        layout = data.draw(st.sampled_from(["offsets0", "offsets3", "ids", "ids+num_groups"]), label="layout")
        kw.pop("group_ids", None), kw.pop("group_offsets", None)
        if layout.startswith("offsets"):
            kw["group_offsets"] = torch.zeros(1 if layout == "offsets0" else 3, dtype=torch.long, device=DEVICE)
        else:
            kw["group_ids"] = ids[:0]
            if layout == "ids+num_groups":
                kw["num_groups"] = 2
    elif inp == "D = 0":
        kw["hidden"], kw["weight"] = h[:, :0], w[:, :0]
    if kind in ("TypeError", "ValueError"):
        expect_error(kind, arg, regex, lambda: gs_call(kw, backend))
    elif kind == "dense":
        got = gs_call(kw, backend)
        bitwise(got, gs_call(dense_copy(kw), backend))
        close(got, gs_call(as64(dense_copy(kw)), "reference"), dtype)
    elif kind == "empty":
        out = gs_call(kw, backend)
        groups = kw["group_offsets"].numel() - 1 if "group_offsets" in kw else kw.get("num_groups", 0)
        assert [t.shape[0] for t in out] == [0, 0, groups, groups, groups]
        assert not any(bool(t.any()) for t in out)
    else:
        raise AssertionError(outcome)


# ---------------------------------------------------------------------------------------------
# §5-§6 episode_rewards and token_advantages
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("row", rows_of("episode_rewards"), ids=row_id)
@SETTINGS
@given(seed=st.integers(0, 2**16), b=st.integers(1, 5),
       k=st.integers(1, 4), wide=st.booleans(), data=st.data())
def test_episode_rewards_hostile(row, seed, b, k, wide, data):
    arg, inp, outcome = row
    g = torch.Generator().manual_seed(seed)
    dtype = F64 if wide else torch.float32
    kw = dict(robustness=torch.randn(b, k, generator=g).to(dtype).to(DEVICE),
              effectiveness=torch.randn(b, k, generator=g).to(DEVICE))
    kind, regex = parse_outcome(outcome)
    call = lambda kw: (gk.episode_rewards(**kw, w_rob=0.9, w_eff=0.8),)  # noqa: E731
    want = lambda kw: (ref.episode_rewards(**as64(kw), w_rob=0.9, w_eff=0.8),)  # noqa: E731
    if arg == "*":
        arg = data.draw(st.sampled_from(["robustness", "effectiveness"]), label="argument")
    if inp == "NaN / ±inf":
        i, j = data.draw(st.integers(0, b - 1)), data.draw(st.integers(0, k - 1))
        dirty = dict(kw, **{arg: poison(kw[arg], (i, j), data.draw(st.sampled_from(NONFINITE)))})
        (out,) = call(dirty)
        assert not bool(torch.isfinite(out[i, j]))
        keep = torch.ones(b, k, dtype=torch.bool, device=DEVICE)
        keep[i, j] = False
        close((out[keep],), (want(kw)[0][keep],), dtype)
        return
    if inp.startswith("B = 0"):
        shape = data.draw(st.sampled_from([(0, k), (b, 0)]), label="shape")
        kw = {n: t.new_zeros(shape) for n, t in kw.items()}
    elif arg != "shape":
        kw = apply_generic(inp, arg, kw, data)
    if kind in ("TypeError", "ValueError"):
        expect_error(kind, arg, regex, lambda: call(kw))
    elif kind == "dense":
        got = call(kw)
        bitwise(got, call(dense_copy(kw)))
        close(got, want(dense_copy(kw)), dtype)
    elif kind == "empty":
        (out,) = call(kw)
        assert out.shape == kw["robustness"].shape and out.numel() == 0
    else:
        raise AssertionError(outcome)


TA_ARGS = ["outcome_rewards", "group_index", "episode_ids", "episode_rewards", "old_logp", "mask"]


def ta_call(kw: dict, backend: str):
    return (gk.token_advantages(**kw, backend=backend),)


def ta_reference(kw: dict):
    kw = as64(kw)
    return (ref.token_advantages(**kw, dtype=F64),)


@pytest.mark.parametrize("row", rows_of("token_advantages"), ids=row_id)
@SETTINGS
@given(backend=backends(), seed=st.integers(0, 2**16),
       b=st.integers(2, 6), t=st.integers(2, 12), k=st.integers(1, 4), data=st.data())
def test_token_advantages_hostile(row, backend, seed, b, t, k, data):
    arg, inp, outcome = row
    dtype = dtype_of(backend)
    # make_batch leaves NaN / out-of-range garbage wherever nothing is read
    kw = on(make_batch(seed, B=b, T=t, K=k, p_empty=0.2), backend, float_dtype=dtype)
    clean = dict(kw)
    kind, regex = parse_outcome(outcome)
    bad = data.draw(st.sampled_from(NONFINITE), label="value")
    inside = kw["mask"] & (kw["episode_ids"] >= 0)
    counts = torch.where(inside, kw["episode_ids"], -1).amax(dim=1) + 1
    if arg in ("old_logp", "episode_rewards", "episode_ids") and not bool(inside.any()):
        return  # nothing is read (every completion empty): no position to poison
    if arg == "*" and inp.startswith("NaN"):
        unread = [("old_logp", tuple(ij)) for ij in (~kw["mask"]).nonzero()[:1].tolist()]
        unread += [("episode_rewards", (i, c)) for i, c in enumerate(counts.tolist()) if c < k][:2]
        if not unread:
            return
        arg, where = data.draw(st.sampled_from(unread), label="unread")
        kw[arg] = poison(kw[arg], where, bad)
    elif arg == "*":
        arg = data.draw(st.sampled_from(TA_ARGS), label="argument")
        # one completion's row repeated would meet another row's mask and unread garbage
        kw = apply_generic(inp, arg, kw, data, frozenset({"episode_ids", "episode_rewards", "old_logp", "mask"}))
    elif arg == "outcome_rewards":
        kw[arg] = poison(kw[arg], (data.draw(st.integers(0, b - 1)),), bad)
    elif arg == "old_logp":
        i, j = inside.nonzero()[data.draw(st.integers(0, int(inside.sum()) - 1))].tolist()
        kw[arg] = poison(kw[arg], (i, j), bad)
    elif arg == "episode_rewards":
        i = int((counts > 0).nonzero()[0])
        kw[arg] = poison(kw[arg], (i, data.draw(st.integers(0, int(counts[i]) - 1))), bad)
    elif arg == "episode_ids" and inp.startswith("outside"):
        i, j = inside.nonzero()[0].tolist()
        kw[arg] = poison(kw[arg], (i, j), data.draw(st.sampled_from([k, -2, 2**40])))
    elif arg == "episode_ids":
        if bool((~kw["mask"]).any()):
            i, j = (~kw["mask"]).nonzero()[0].tolist()
            kw[arg] = poison(kw[arg], (i, j), data.draw(st.sampled_from([k, -2, 2**40])))
    elif arg == "group_index":
        kw[arg] = kw[arg] * data.draw(st.sampled_from([-1, 7, 2**40])) - 3
    elif arg == "mask":
        m = kw["mask"].to(dtype)
        m[0, 0] = data.draw(st.sampled_from([0.5, 2.0, -1.0]))
        kw["mask"] = m
    elif inp == "B = 0 or T = 0":
        bb, tt = data.draw(st.sampled_from([(0, t), (b, 0), (0, 0)]), label="shape")
        kw = dict(outcome_rewards=kw["outcome_rewards"][:bb], group_index=kw["group_index"][:bb],
                  episode_ids=kw["episode_ids"][:bb, :tt], episode_rewards=kw["episode_rewards"][:bb],
                  old_logp=kw["old_logp"][:bb, :tt], mask=kw["mask"][:bb, :tt])
    elif inp == "K = 0":
        kw["episode_ids"] = torch.full_like(kw["episode_ids"], -1)
        kw["episode_rewards"] = kw["episode_rewards"][:, :0]
        clean = kw
    if kind in ("TypeError", "ValueError"):
        expect_error(kind, arg, regex, lambda: ta_call(kw, backend))
    elif kind == "reference":
        if arg == "group_index":
            clean = kw
        close(ta_call(kw, backend), ta_reference(clean), dtype)
    elif kind == "dense":
        got = ta_call(kw, backend)
        bitwise(got, ta_call(dense_copy(kw), backend))
    elif kind == "empty":
        (out,) = ta_call(kw, backend)
        assert out.shape == kw["episode_ids"].shape and out.numel() == 0
    else:
        raise AssertionError(outcome)
