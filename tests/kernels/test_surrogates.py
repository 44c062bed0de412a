"""Issue 22: policy-loss surrogates by name (gccpo_kernels.surrogates), and CISPO added that way.

- the registry: the fast and the float64 reference registries hold the same names; a name is
  registered once; a config names a registered surrogate and sets only the options it reads, with
  one-line errors; a surrogate registered from outside works through ``policy_loss`` unchanged;
- CISPO (TRL 1.16's ``loss_type="cispo"``): ``policy_loss`` against the row-by-row float64
  reference (every aggregation, both ratio levels, per-sequence and per-token advantages, with KL,
  importance weights and entropy), against a by-hand gradient, and against TRL's own
  ``GRPOTrainer._compute_loss`` on a stub trainer (loss, gradient, ``cispo_clip_ratio``, ``kl``,
  ``entropy``); ``fused_linear_policy_loss`` with CISPO on the torch backend (its in-forward
  gradient path and the composed path), the reference backend and the triton backend
  (interpreter), against materialized float64 logits.
"""

from __future__ import annotations

import dataclasses
import importlib.util

import pytest
import torch

import gccpo_kernels.loss_in_forward as lif
from gccpo_kernels import reference as R
from gccpo_kernels import surrogates as S
from gccpo_kernels._backend import triton_unavailable_reason
from gccpo_kernels.policy_loss import LOSS_AGGS, PolicyLossConfig, fused_linear_policy_loss, policy_loss, reduce_metrics
from tests.kernels.test_loss_epilogue import LOGIT, _close, _inputs, _reference, _triton_run
from tests.kernels.test_policy_loss import TOL, _trl_compute_loss, assert_match, make_batch, run_both

F64 = torch.float64
CISPO = PolicyLossConfig(surrogate="cispo", eps_high=1.2, entropy_coef=0.01, beta=0.05, kl_bias_correction=True)


# ------------------------------------------------------------------------------------------------
# the registry
# ------------------------------------------------------------------------------------------------

def test_fast_and_reference_registries_hold_the_same_names():
    assert set(S.SURROGATES) == set(R.SURROGATES) >= {"clip", "cispo"}
    assert S.get_surrogate("cispo").fn is S.cispo_surrogate
    assert S.SURROGATES["clip"].options == {"delta", "dual_clip"} and S.SURROGATES["cispo"].options == set()


def test_config_names_a_registered_surrogate_and_only_its_options():
    assert PolicyLossConfig().surrogate == "clip"
    assert PolicyLossConfig.from_verl().surrogate == "clip"
    for kwargs, match in [(dict(surrogate="sapo"), r"surrogate must be one of \('clip', 'cispo'"),
                          (dict(surrogate=None), "surrogate must be the name"),
                          (dict(surrogate="cispo", delta=2.0), "delta=2.0 is not read by surrogate='cispo'"),
                          (dict(surrogate="cispo", dual_clip=3.0), "set dual_clip=None")]:
        with pytest.raises(ValueError, match=match) as err:
            PolicyLossConfig(**kwargs)
        assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="already registered"):
        S.register_surrogate("cispo")(S.cispo_surrogate)
    with pytest.raises(ValueError, match="options must be among"):
        S.register_surrogate("other", options=("beta",))


def test_a_surrogate_registered_from_outside_runs_through_policy_loss():
    """Plain REINFORCE with an importance weight, ``-r A``, registered here: the loss needs no
    other change, and its options are checked like the built-in ones."""

    def weighted_pg(ratio, logp, advantages, cfg):
        capped = ratio if cfg.delta is None else ratio.clamp(max=cfg.delta)
        never = torch.zeros_like(capped * advantages, dtype=torch.bool)
        return S.SurrogateTerms(-capped * advantages, never, never)

    S.register_surrogate("test_weighted_pg", options=("delta",))(weighted_pg)
    try:
        batch = make_batch(seed=5)
        cfg = PolicyLossConfig(surrogate="test_weighted_pg", delta=1.5, loss_agg="token-sum")
        loss, metrics = policy_loss(batch["logp"], batch["old"], batch["adv"], batch["mask"], config=cfg)
        m = batch["mask"]
        r = torch.exp(torch.where(m, batch["logp"] - batch["old"], 0.0)).clamp(max=1.5)
        want = torch.where(m, -r * batch["adv"][:, None], 0.0).sum()
        torch.testing.assert_close(loss, want, **TOL)
        assert reduce_metrics(metrics)["clip_frac_region"] == 0.0
        with pytest.raises(ValueError, match="not read by surrogate='test_weighted_pg'"):
            PolicyLossConfig(surrogate="test_weighted_pg", dual_clip=3.0)
    finally:
        del S.SURROGATES["test_weighted_pg"]


# ------------------------------------------------------------------------------------------------
# CISPO: policy_loss against the float64 reference, by hand, and against TRL
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("loss_agg", LOSS_AGGS)
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("adv_per_token", [False, True])
def test_cispo_matches_the_reference(loss_agg, level, adv_per_token):
    seed = 300 + LOSS_AGGS.index(loss_agg) + 10 * (level == "sequence") + 100 * adv_per_token
    batch = make_batch(adv_per_token=adv_per_token, seed=seed, spread=1.2 if level == "sequence" else 0.6)
    batch["adv"][0] = batch["adv"][0].abs() + 0.1  # a row with positive advantages (row 0 has tokens)
    cfg = dataclasses.replace(CISPO, importance_sampling_level=level, loss_agg=loss_agg,
                              eps_high=0.3 if level == "sequence" else 1.0)
    ours, ref = run_both(batch, cfg)
    assert_match(ours, ref)
    assert ours[3]["clip_frac_high"] > 0 and ours[3]["clip_frac_low"] == 0.0  # the cap is exercised
    assert ours[1].abs().sum() > 0


@pytest.mark.parametrize("flags", [dict(use_old=False), dict(use_ref=False, use_ent=False, use_w=False)])
def test_cispo_on_policy_and_bare(flags):
    batch = make_batch(seed=31)
    cfg = dataclasses.replace(CISPO, eps_high=0.5)
    if not flags.get("use_ref", True):
        cfg = dataclasses.replace(cfg, beta=0.0, entropy_coef=0.0)
    ours, ref = run_both(batch, cfg, **flags)
    assert_match(ours, ref)


def test_cispo_by_hand():
    """token-sum, no KL: loss = sum -min(r, eps_high) A logp; d loss / d logp = -min(r, eps_high) A
    (the weight is detached); clip_frac_high counts r > eps_high with A > 0."""
    batch = make_batch(seed=33, adv_per_token=True, spread=0.8)
    lp, old, adv, m = batch["logp"], batch["old"], batch["adv"], batch["mask"]
    cfg = PolicyLossConfig(surrogate="cispo", eps_high=1.3, loss_agg="token-sum")
    loss, metrics = policy_loss(lp, old, adv, m, config=cfg)
    (g,) = torch.autograd.grad(loss, lp)
    r = torch.exp(lp.detach() - old)
    weight = r.clamp(max=1.3)
    torch.testing.assert_close(loss, torch.where(m, -weight * adv * lp.detach(), 0.0).sum(), **TOL)
    torch.testing.assert_close(g, torch.where(m, -weight * adv, 0.0), **TOL)
    high = ((r > 1.3) & (adv > 0) & m).sum() / m.sum()
    assert high > 0
    assert reduce_metrics(metrics)["clip_frac_high"] == pytest.approx(float(high), rel=1e-12)


CISPO_TRL_CASES = [
    dict(epsilon_high=1.2),
    dict(),  # TRL's epsilon_high=None: the cap is epsilon (0.2), every ratio above it
    dict(epsilon_high=1.1, beta=0.04, entropy_coef=0.03, ga=2),
    dict(epsilon_high=1.2, beta=0.04, use_bias_correction_kl=False, is_weights=True, delta=1.5),
    dict(epsilon_high=1.05, level="sequence", beta=0.04),
    dict(epsilon_high=1.2, old=False, beta=0.1, ga=4),
]


@pytest.mark.skipif(importlib.util.find_spec("trl") is None, reason="trl not installed")
@pytest.mark.parametrize("case", range(len(CISPO_TRL_CASES)))
def test_cispo_from_trl_reproduces_trl(case):
    opts = dict(CISPO_TRL_CASES[case])
    ga, use_old = opts.pop("ga", 1), opts.pop("old", True)
    use_w, level = opts.pop("is_weights", False), opts.pop("level", "token")
    batch = make_batch(b=6, t=9, seed=50 + case, spread=0.5)
    spg = 2
    num_items = batch["mask"].sum().to(F64) * 3  # the generation batch: 3x this micro-batch
    old = batch["old"] if use_old else None
    is_ratio = batch["w"] if use_w else None
    trl_loss, trl_metrics = _trl_compute_loss(
        "cispo", batch["logp"], old, batch["adv"], batch["mask"], ref=batch["ref"] if opts.get("beta") else None,
        entropy=batch["entropy"], is_ratio=is_ratio, level=level, ga=ga, steps_per_generation=spg,
        num_items_in_batch=num_items, **opts)
    cfg = PolicyLossConfig.from_trl("cispo", importance_sampling_level=level, **opts)
    assert cfg.surrogate == "cispo" and cfg.delta is None  # TRL's cispo ignores delta
    loss, metrics = policy_loss(batch["logp"], old, batch["adv"], batch["mask"],
                                ref_logp=batch["ref"] if cfg.beta else None, entropy=batch["entropy"],
                                is_weights=is_ratio, config=cfg, normalizer=num_items.clamp(min=1) / spg,
                                loss_scale=1.0 / ga)
    torch.testing.assert_close(loss, trl_loss, **TOL)
    inputs = [batch["logp"], batch["entropy"]]
    g_ours = torch.autograd.grad(loss, inputs, allow_unused=True, materialize_grads=True)
    g_trl = torch.autograd.grad(trl_loss, inputs, allow_unused=True, materialize_grads=True)
    for a, b in zip(g_ours, g_trl):
        torch.testing.assert_close(a, b, **TOL)
    out = reduce_metrics(metrics)
    assert "cispo_clip_ratio" in trl_metrics
    if use_old and level == "token":  # (on-policy the ratio is 1; a row's mean ratio stays below 1.05 here)
        assert trl_metrics["cispo_clip_ratio"] > 0
    pairs = [("clip_frac_high", "cispo_clip_ratio"), ("entropy", "entropy"), ("kl_ref", "kl")]
    for ours_key, trl_key in pairs:
        if trl_key in trl_metrics:  # TRL takes the clip fraction's mean in float32 (.float())
            rel = 1e-6 if ours_key.startswith("clip") else 1e-12
            assert out[ours_key] == pytest.approx(trl_metrics[trl_key], rel=rel, abs=1e-15), ours_key


# ------------------------------------------------------------------------------------------------
# CISPO through fused_linear_policy_loss: torch (in-forward and composed), reference, triton
# ------------------------------------------------------------------------------------------------

def _cispo_inputs(seed: int):
    """test_loss_epilogue's inputs with old / reference log-probs near the current ones (ratios
    around 1, so that a cap of 1.2 clips some tokens)."""
    x, dtype = _inputs(seed=seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        lp, _ = R.linear_logprobs(x["h"], x["w"], x["y"], bias=x["b"], **LOGIT)
    x["old"] = lp + 0.4 * torch.randn(lp.shape, generator=g, dtype=F64)
    x["ref"] = lp + 0.3 * torch.randn(lp.shape, generator=g, dtype=F64)
    return x, dtype


def _fused(x, cfg, backend, *, in_forward, dtype=F64, **kw):
    """(loss, dh, dW, db, logp, entropy) of the fused loss; asserts which path ran."""
    calls = []
    real = lif.fused_loss_in_forward

    def spy(*a, **k):
        calls.append(1)
        return real(*a, **k)

    lif.fused_loss_in_forward = spy
    try:
        h, w, b = (x[k].detach().to(dtype).requires_grad_() for k in ("h", "w", "b"))
        out = fused_linear_policy_loss(h, w, x["y"], x["adv"].to(dtype), x["mask"], old_logp=x["old"].to(dtype),
                                       ref_logp=x["ref"].to(dtype), bias=b, config=cfg, backend=backend,
                                       **LOGIT, **kw)
        (out.loss * 1.7).backward()
    finally:
        lif.fused_loss_in_forward = real
    assert bool(calls) == in_forward
    return out.loss.detach(), h.grad, w.grad, b.grad, out.logp, out.entropy


@pytest.mark.parametrize("cfg", [
    CISPO,
    PolicyLossConfig.from_trl("cispo", epsilon_high=1.2, beta=0.04, entropy_coef=0.02),
    dataclasses.replace(CISPO, loss_agg="seq-mean-token-sum-norm", max_len=9, entropy_agg="token-mean"),
], ids=["spec", "trl", "sum-norm"])
def test_fused_cispo_torch_in_forward_float64(cfg):
    x, _ = _cispo_inputs(41)
    got = _fused(x, cfg, "torch", in_forward=True)
    _close(got, _reference(x, cfg, scale=1.7), 1e-10)


def test_fused_cispo_paths_agree_and_exercise_the_cap(monkeypatch):
    """The in-forward gradient equals the composed path's to 1e-12; the cap clips some tokens."""
    x, _ = _cispo_inputs(42)
    cfg = PolicyLossConfig.from_trl("cispo", epsilon_high=1.2, beta=0.04)
    fast = _fused(x, cfg, "torch", in_forward=True)
    monkeypatch.setattr(lif, "eligible", lambda *a: False)
    slow = _fused(x, cfg, "torch", in_forward=False)
    for name, a, b in zip(("loss", "dh", "dW", "db", "logp", "entropy"), fast, slow):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=lambda s, n=name: f"{n}: {s}")
    h, w, b = (x[k] for k in ("h", "w", "b"))
    out = fused_linear_policy_loss(h, w, x["y"], x["adv"], x["mask"], old_logp=x["old"], ref_logp=x["ref"], bias=b,
                                   config=cfg, backend="torch", **LOGIT)
    assert reduce_metrics(out.metrics)["clip_frac_high"] > 0


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_fused_cispo_sequence_level_and_reference_backend(backend):
    """A sequence-level ratio (composed path on every backend) and the reference backend."""
    x, _ = _cispo_inputs(43)
    cfg = dataclasses.replace(CISPO, importance_sampling_level="sequence", eps_high=1.0)
    got = _fused(x, cfg, backend, in_forward=False)
    _close(got, _reference(x, cfg, scale=1.7), 1e-10)


@pytest.mark.skipif(triton_unavailable_reason() is not None, reason=f"{triton_unavailable_reason()}")
def test_fused_cispo_triton_in_forward(monkeypatch):
    """The triton backend's in-forward pass (float32 operands, the Triton interpreter on a CPU)."""
    x, dtype = _cispo_inputs(44)
    cfg = PolicyLossConfig.from_trl("cispo", epsilon_high=1.2, beta=0.04, entropy_coef=0.02)
    got = _triton_run(x, dtype, cfg, monkeypatch, scale=1.7)
    _close(got, _reference(x, cfg, scale=1.7), 2e-5)
