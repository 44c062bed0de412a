"""Guarantee: exactness. Every public op on every backend against the float64 reference, on inputs
drawn by hypothesis (shapes with primes, V = 1, V below and above the kernels' blocks, V > 2^16;
dtypes; temperatures, scales and soft caps; ignored rows and masks; group layouts).

Each op's result is compared with the float64 reference evaluated on the *same rounded inputs*
(a bf16 input is upcast exactly to float64), so the comparison measures the op's arithmetic only.
Tolerances, and why (also in docs/guarantees.md):

- float64 (torch backend): rounding only, 1e-9 relative (1e-10 for advantages).
- float32 / bfloat16 / float16 inputs: the ops compute in float32; products of 16-bit inputs are
  exact in float32, so all three share one bound. §1 log-probs and entropy 5e-5 x max(1, |ref|)
  (logits carry ~1e-7 relative error per product summed over D); gradients 1e-4 relative to their
  largest entry in float32, 2e-2 in 16-bit (the logit gradient and dh are rounded to the input
  dtype, as in every 16-bit LM). §3 divergences: SPEC §3's bound 2e-3 |D| + 2e-8. §4 statistics
  2e-5 absolute + 1e-4 relative. §6 advantages 1e-4 x max(1, |A|) (two normalizations by stds of
  order 1 in float32). The fused policy loss 1e-5 relative (1e-10 in float64).

Hypothesis runs derandomized (the same examples on every run and every machine) with few examples
per test; the interpreter runs the Triton kernels on the CPU, so their shapes stay small.
"""

from __future__ import annotations

import math
import random

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import gccpo_kernels as gk
from gccpo_kernels import reference as ref
from tests.conftest import DEVICE, available_backends
from tests.kernels.test_advantages import make_batch, on, reference64
from tests.kernels.test_divergence import realistic
from tests.kernels.test_policy_loss import FUSED_CONFIGS, fused_problem, materialized

BACKENDS = available_backends()
FAST = [b for b in BACKENDS if b != "reference"]
F64 = torch.float64
LOW = (torch.float32, torch.bfloat16, torch.float16)


def _settings(n: int) -> settings:
    return settings(max_examples=n, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def dtypes_for(backend: str) -> list[torch.dtype]:
    """float64 only where the backend takes it (the triton kernels take 16/32-bit inputs)."""
    return list(LOW) if backend == "triton" else [F64, *LOW]


def max_rel(a: torch.Tensor, b: torch.Tensor, floor: float = 1e-30) -> float:
    """max |a - b| / max(max |b|, floor): gradient comparisons, relative to the largest entry, or to
    ``floor`` (the gradient's natural scale) where the exact gradient vanishes (V = 1: p = 1, so
    every logit gradient is 0 up to rounding)."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return ((a - b).abs().max() / b.abs().max().clamp_min(floor)).item() if b.numel() else 0.0


# SPEC §1 tolerances by input dtype: (forward, gradient)
TOL_LLP = {F64: (1e-9, 1e-9), torch.float32: (5e-5, 1e-4), torch.bfloat16: (5e-5, 2e-2),
           torch.float16: (5e-5, 2e-2)}
VOCABS = [1, 2, 3, 7, 61, 63, 64, 65, 97, 127, 257, 1009, 4099]  # primes, V < and > every block


# ---------------------------------------------------------------------------------------------
# SPEC §1: fused_linear_logprobs
# ---------------------------------------------------------------------------------------------


def _check_llp(backend: str, dtype: torch.dtype, n: int, d: int, v: int, seed: int, *,
               temperature: float, logit_scale: float, softcap: float | None, bias: bool,
               p_ignored: float, grads: bool) -> None:
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=g, dtype=F64)
    w = torch.randn(v, d, generator=g, dtype=F64) * 2.0 / math.sqrt(d)
    b = torch.randn(v, generator=g, dtype=F64) if bias else None
    y = torch.randint(0, v, (n,), generator=g)
    y[torch.rand(n, generator=g) < p_ignored] = -100
    h, w = h.to(dtype).to(DEVICE), w.to(dtype).to(DEVICE)
    b = None if b is None else b.to(dtype).to(DEVICE)
    y = y.to(DEVICE)
    kw = dict(temperature=temperature, logit_scale=logit_scale, softcap=softcap)
    ins = [t.requires_grad_() for t in (h, w, b) if t is not None] if grads else []
    logp, ent = gk.fused_linear_logprobs(h, w, y, bias=b, return_entropy=True, backend=backend, **kw)
    ins64 = [t.detach().double().requires_grad_() for t in (h, w, b) if t is not None]
    h64, w64 = ins64[0], ins64[1]
    b64 = ins64[2] if b is not None else None
    rlogp, rent = ref.linear_logprobs(h64, w64, y, bias=b64, dtype=F64, **kw)
    out_dtype = F64 if dtype == F64 else torch.float32
    assert logp.dtype == out_dtype and ent.dtype == out_dtype and logp.shape == (n,)
    fwd, bwd = TOL_LLP[dtype]
    for got, want in ((logp, rlogp), (ent, rent)):
        err = (got.detach().double().cpu() - want.detach().cpu()).abs().max().item() if n else 0.0
        scale = max(1.0, want.detach().abs().max().item()) if n else 1.0
        assert err <= fwd * scale, f"{backend} {dtype}: forward error {err:.3e} (scale {scale:.3g})"
    # the invariants hold exactly on the fast backends (the entropy is clamped to [0, log V]);
    # the reference is the textbook formula in float64, within a few ulps of them
    slack = 0.0 if backend != "reference" else 1e-12
    assert bool((logp <= slack).all()), "logp > 0"
    assert bool((ent >= -slack).all()) and bool((ent <= math.log(v) + slack).all()), "entropy out of [0, log V]"
    ignored = (y == -100).cpu()
    assert bool((logp.detach().cpu()[ignored] == 0).all()) and bool((ent.detach().cpu()[ignored] == 0).all())
    if not grads or n == 0:
        return
    gen = torch.Generator().manual_seed(seed + 1)
    gl = torch.randn(n, generator=gen, dtype=F64)
    ge = torch.randn(n, generator=gen, dtype=F64)
    ours = torch.autograd.grad((logp.double().cpu() * gl).sum() + (ent.double().cpu() * ge).sum(), ins,
                               allow_unused=True)
    theirs = torch.autograd.grad((rlogp * gl).sum() + (rent * ge).sum(), ins64, allow_unused=True)
    # the natural scale of each gradient: |g_u| <= (s / tau) (2 |g_logp| + |g_ent| |z - E z|)
    g_u = logit_scale / temperature * (2 * gl.abs().max().item() + ge.abs().max().item())
    floors = (g_u * w64.abs().max().item() * 1e-2, g_u * h64.abs().max().item() * 1e-2, g_u * 1e-2)
    for name, a, r, floor in zip(("hidden", "weight", "bias"), ours, theirs, floors):
        if r is None:
            assert a is None, name
            continue
        assert a.dtype == dtype
        err = max_rel(a, r, floor)
        assert err <= bwd, f"{backend} {dtype} d{name}: {err:.3e}"


@pytest.mark.parametrize("backend", BACKENDS)
@_settings(12)
@given(data=st.data(), n=st.sampled_from([1, 2, 3, 13, 31, 67]), d=st.sampled_from([1, 7, 16, 33, 64]),
       v=st.sampled_from(VOCABS), seed=st.integers(0, 2**16),
       temperature=st.sampled_from([0.3, 1.0, 2.5]), logit_scale=st.sampled_from([1.0, 0.7]),
       softcap=st.sampled_from([None, 5.0]), bias=st.booleans(),
       p_ignored=st.sampled_from([0.0, 0.3, 1.0]))
def test_linear_logprobs_exact(backend, data, n, d, v, seed, temperature, logit_scale, softcap, bias,
                               p_ignored):
    dtype = data.draw(st.sampled_from(dtypes_for(backend)), label="dtype")
    _check_llp(backend, dtype, n, d, v, seed, temperature=temperature, logit_scale=logit_scale,
               softcap=softcap, bias=bias, p_ignored=p_ignored, grads=backend != "reference")


@pytest.mark.parametrize("backend, dtype", [(b, dt) for b in FAST for dt in (torch.float32, torch.bfloat16)
                                             if b == "torch" or dt == torch.bfloat16])
def test_linear_logprobs_vocabulary_above_2_16(backend, dtype):
    """V = 65537 (prime, > 2^16): many vocabulary splits and tiles, the last one a single column
    (one dtype on the interpreted triton backend, whose 128 splits are slow on the CPU)."""
    _check_llp(backend, dtype, 3, 16, 65537, 7, temperature=0.8, logit_scale=1.0, softcap=None,
               bias=True, p_ignored=0.0, grads=True)


# ---------------------------------------------------------------------------------------------
# SPEC §2: fused_linear_policy_loss (the §1 primitive composed with the loss math)
# ---------------------------------------------------------------------------------------------

TOL_LOSS = {F64: (1e-10, 1e-9), torch.float32: (1e-5, 1e-4), torch.bfloat16: (1e-5, 2e-2),
            torch.float16: (1e-5, 2e-2)}


@pytest.mark.parametrize("backend", BACKENDS)
@_settings(8)
@given(data=st.data(), cfg_i=st.integers(0, len(FUSED_CONFIGS) - 1), seed=st.integers(0, 2**16),
       shape=st.sampled_from([(1, 1, 16, 1), (2, 5, 16, 97), (3, 4, 33, 257), (2, 3, 64, 65)]),
       temperature=st.sampled_from([1.0, 0.6]))
def test_fused_policy_loss_exact(backend, data, cfg_i, seed, shape, temperature):
    dtype = data.draw(st.sampled_from(dtypes_for(backend)), label="dtype")
    cfg = FUSED_CONFIGS[cfg_i]
    b, t, d, v = shape
    p = fused_problem(b, t, d, v, seed=seed, dtype=dtype)
    p64 = {k: (x.detach().double().requires_grad_() if isinstance(x, torch.Tensor) and x.is_floating_point()
               else x) for k, x in p.items()}
    dev = {k: (x.detach().to(DEVICE).requires_grad_(x.requires_grad) if isinstance(x, torch.Tensor) else x)
           for k, x in p.items()}
    params = [dev["hidden"], dev["weight"], dev["bias"]]
    out = gk.fused_linear_policy_loss(
        dev["hidden"], dev["weight"], dev["targets"], dev["adv"], dev["mask"], old_logp=dev["old"],
        ref_logp=dev["ref"] if cfg.beta else None, bias=dev["bias"], is_weights=dev["w"], config=cfg,
        temperature=temperature, backend=backend)
    grads = torch.autograd.grad(out.loss, params)
    rloss, _ = materialized(p64, cfg, dict(temperature=temperature))
    rgrads = torch.autograd.grad(rloss, [p64["hidden"], p64["weight"], p64["bias"]], allow_unused=True)
    ltol, gtol = TOL_LOSS[dtype]
    assert abs(out.loss.double().item() - rloss.item()) <= ltol * max(1.0, abs(rloss.item()))
    for name, a, r in zip(("hidden", "weight", "bias"), grads, rgrads):
        if r is None:  # the reference's graph does not reach it: ours must be zero
            assert float(a.abs().max()) == 0.0, name
            continue
        err = max_rel(a, r, 1e-6)
        assert err <= gtol, f"{backend} {dtype} d{name}: {err:.3e}"
    assert bool((out.logp <= 0).all())


# ---------------------------------------------------------------------------------------------
# SPEC §3: perturb_latents and counterfactual_divergence
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@_settings(10)
@given(data=st.data(), r=st.sampled_from([1, 2, 5, 17]), d=st.sampled_from([16, 33, 64]),
       v=st.sampled_from([2, 7, 61, 129, 1031]), m=st.sampled_from([1, 2, 3, 5]),
       kind=st.sampled_from(["kl", "js", "tv"]), sigma=st.sampled_from([1e-3, 0.05, 0.5]),
       temperature=st.sampled_from([1.0, 0.5]), softcap=st.sampled_from([None, 8.0]),
       bias=st.booleans(), answers=st.booleans(), seed=st.integers(0, 2**16))
def test_counterfactual_divergence_exact(backend, data, r, d, v, m, kind, sigma, temperature, softcap,
                                         bias, answers, seed):
    dtype = data.draw(st.sampled_from(dtypes_for(backend)), label="dtype")
    h, w, b = realistic(r, d, v, seed=seed, bias=bias)
    h, w = h.to(dtype), w.to(dtype)
    b = None if b is None else b.to(dtype)
    gen = torch.Generator(device=h.device).manual_seed(seed)
    dl = gk.perturb_latents(h, m, sigma=sigma, generator=gen)
    ids = None
    if answers and v > 2:
        ids = torch.randperm(v, generator=torch.Generator().manual_seed(seed))[: max(2, v // 3)].to(DEVICE)
    kw = dict(temperature=temperature, softcap=softcap, kind=kind, answer_token_ids=ids)
    out = gk.counterfactual_divergence(h, w, dl, bias=b, backend=backend, **kw)
    want = ref.counterfactual_divergence(h.double(), w.double(), dl.double(),
                                         bias=None if b is None else b.double(), **kw)
    assert out.shape == (r, m) and out.dtype == (F64 if dtype == F64 else torch.float32)
    err = (out.double() - want).abs().cpu()
    if dtype == F64:
        tol = 1e-9 * want.abs().cpu() + 1e-14
    else:
        tol = 2e-3 * want.abs().cpu() + 2e-8  # SPEC §3's accuracy target
    assert bool((err <= tol).all()), f"{backend} {dtype} {kind}: worst error/tolerance {float((err / tol).max()):.3g}"
    upper = {"kl": math.inf, "js": math.log(2.0), "tv": 1.0}[kind]
    assert bool((out >= 0).all()) and bool((out <= upper).all()), f"{kind} out of range"


@_settings(15)
@given(dtype=st.sampled_from([F64, *LOW]), r=st.integers(1, 12), d=st.sampled_from([1, 2, 8, 33]),
       m=st.integers(1, 4), sigma=st.sampled_from([0.0, 0.05, 1.0]), alpha=st.sampled_from([0.5, -1.0]),
       mode=st.sampled_from(["gaussian", "sibling"]), n_groups=st.integers(1, 5), seed=st.integers(0, 2**16))
def test_perturb_latents_exact(dtype, r, d, m, sigma, alpha, mode, n_groups, seed):
    """perturb_latents has no reference (it draws random numbers); its exact properties are checked
    instead: gaussian deltas are orthogonal to h with E||delta||^2 = sigma^2 ||h||^2 (D-1)/D, sibling
    deltas are alpha (h_j - h_i) for some other member j of i's group (gaussian for a lone row),
    and the same generator state gives bitwise the same deltas."""
    gen = torch.Generator().manual_seed(seed)
    h = (torch.randn(r, d, generator=gen, dtype=F64) * 3).to(dtype).to(DEVICE)
    gid = torch.randint(0, n_groups, (r,), generator=gen).to(DEVICE)
    g1 = torch.Generator(device=h.device).manual_seed(seed)
    g2 = torch.Generator(device=h.device).manual_seed(seed)
    kw = dict(sigma=sigma, mode=mode, alpha=alpha, group_index=gid)
    dl = gk.perturb_latents(h, m, generator=g1, **kw)
    assert dl.shape == (r, m, d) and dl.dtype == dtype
    assert torch.equal(dl, gk.perturb_latents(h, m, generator=g2, **kw))
    assert bool(torch.isfinite(dl).all())
    eps = {F64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3}[dtype]
    h64, dl64 = h.double().cpu(), dl.double().cpu()
    gid = gid.cpu()
    for i in range(r):
        mates = [j for j in range(r) if j != i and int(gid[j]) == int(gid[i])]
        if mode == "sibling" and mates:
            for k in range(m):
                cands = torch.stack([alpha * (h64[j] - h64[i]) for j in mates])
                best = (cands - dl64[i, k]).abs().amax(dim=1).min().item()
                assert best <= eps * max(1.0, cands.abs().max().item()), (i, k, best)
        else:  # gaussian (or a lone row): tangent to h
            dot = (dl64[i] @ h64[i]).abs().max().item()
            assert dot <= eps * max(1e-30, dl64[i].norm(dim=1).max().item() * h64[i].norm().item()) + 1e-30
            if sigma == 0.0:
                assert bool((dl64[i] == 0).all())


# ---------------------------------------------------------------------------------------------
# SPEC §4: group_distribution_stats
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@_settings(10)
@given(data=st.data(), sizes=st.lists(st.integers(0, 9), min_size=1, max_size=6),
       d=st.sampled_from([16, 40, 64]), v=st.sampled_from([1, 2, 63, 65, 300, 1031]),
       layout=st.sampled_from(["offsets", "ids", "ids+empty"]), temperature=st.sampled_from([1.0, 0.6]),
       softcap=st.sampled_from([None, 6.0]), bias=st.booleans(), seed=st.integers(0, 2**16))
def test_group_distribution_stats_exact(backend, data, sizes, d, v, layout, temperature, softcap, bias, seed):
    dtype = data.draw(st.sampled_from(dtypes_for(backend)), label="dtype")
    r = sum(sizes)
    g = torch.Generator().manual_seed(seed)
    h = (torch.randn(r, d, generator=g, dtype=F64) * 1.5).to(dtype).to(DEVICE)
    w = (torch.randn(v, d, generator=g, dtype=F64) * 2.0 / math.sqrt(d)).to(dtype).to(DEVICE)
    b = (0.3 * torch.randn(v, generator=g, dtype=F64)).to(dtype).to(DEVICE) if bias else None
    kw = dict(bias=b, temperature=temperature, softcap=softcap)
    ids = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    if layout == "offsets":
        offsets = torch.tensor([0, *torch.tensor(sizes).cumsum(0).tolist()], device=DEVICE)
        got = gk.group_distribution_stats(h, w, group_offsets=offsets, backend=backend, **kw)
        ids_any, groups = ids, len(sizes)
    else:
        perm = torch.randperm(r, generator=torch.Generator().manual_seed(seed))
        ids_any, h = ids[perm], h[perm.to(DEVICE)]
        groups = len(sizes) + (2 if layout == "ids+empty" else 0)
        extra = dict(num_groups=groups) if layout == "ids+empty" else {}
        if layout == "ids" and r == 0:
            return  # no ids, no groups: nothing to compare
        if layout == "ids":
            groups = int(ids_any.max()) + 1
        got = gk.group_distribution_stats(h, w, group_ids=ids_any.to(DEVICE), backend=backend, **extra, **kw)
    want = ref.group_distribution_stats(h.double(), w.double(), ids_any.to(DEVICE), groups,
                                        **{**kw, "bias": None if b is None else b.double()})
    rtol, atol = (1e-9, 1e-12) if dtype == F64 else (1e-4, 2e-5)
    for name, x, y in zip(gk.GroupStats._fields, got, want):
        assert x.shape == y.shape, name
        torch.testing.assert_close(x.double().cpu(), y.cpu(), rtol=rtol, atol=atol, msg=name)
    slack = 1e-12 if dtype == F64 else 2e-5
    assert bool((got.row_entropy >= -slack).all()) and bool((got.row_entropy <= math.log(v) + slack).all())
    assert bool((got.row_kl_to_mixture >= -slack).all()) and bool((got.group_js >= -slack).all())


# ---------------------------------------------------------------------------------------------
# SPEC §5-§6: episode_rewards and token_advantages
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@_settings(12)
@given(seed=st.integers(0, 10**6), B=st.integers(1, 10), T=st.integers(1, 40), K=st.integers(1, 6),
       n_groups=st.integers(1, 4), pad=st.sampled_from(["left", "right", "mixed"]),
       floats=st.sampled_from(["f64", "f32", "f32+bf16-logp"]), eta=st.sampled_from([0.0, 1.0, 0.5]),
       gamma=st.sampled_from([1.0, 0.9]), scale=st.sampled_from(["group", "batch", "none"]),
       surprise=st.booleans(), normalize=st.booleans())
def test_token_advantages_exact(backend, seed, B, T, K, n_groups, pad, floats, eta, gamma, scale, surprise,
                                normalize):
    if backend == "triton":
        assume(floats != "f64")
    rng = random.Random(seed)
    groups = [rng.randrange(n_groups) for _ in range(B)]
    batch = make_batch(seed, B, T, K, groups=groups, pad=pad, p_empty=0.2)
    dtype = F64 if floats == "f64" else torch.float32
    inputs = on(batch, backend, float_dtype=dtype)
    if floats == "f32+bf16-logp":
        inputs["old_logp"] = inputs["old_logp"].to(torch.bfloat16)
    # the reference sees exactly the rounded values the op gets
    batch = {k: (inputs[k].double().cpu() if x.is_floating_point() else x) for k, x in batch.items()}
    opts = dict(eta=eta, gamma=gamma, scale=scale, surprise_weighting=surprise, normalize_returns=normalize)
    want = reference64(batch, **opts)
    got = gk.token_advantages(**inputs, backend=backend, **opts)
    assert got.dtype == dtype and got.shape == (B, T)
    got = got.double().cpu()
    assert bool(torch.isfinite(got).all())
    tol = 1e-10 if dtype == F64 else 1e-4
    err = (got - want).abs().max().item()
    assert err <= tol * max(1.0, want.abs().max().item()), f"{backend} {floats}: error {err:.3e}"


@_settings(15)
@given(dtypes=st.sampled_from([(F64, F64), (torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                               (torch.float16, F64)]),
       shape=st.sampled_from([(0, 3), (1, 1), (4, 7)]), w_rob=st.sampled_from([0.9, -2.0, 0.0]),
       w_eff=st.sampled_from([0.8, 1e-3]), seed=st.integers(0, 2**16))
def test_episode_rewards_exact(dtypes, shape, w_rob, w_eff, seed):
    """r = w_rob R_rob + w_eff R_eff, computed in float64 when either input is, else float32: within
    one rounding of the output dtype of the float64 value."""
    g = torch.Generator().manual_seed(seed)
    rob = torch.randn(shape, generator=g, dtype=F64).to(dtypes[0])
    eff = torch.randn(shape, generator=g, dtype=F64).to(dtypes[1])
    out = gk.episode_rewards(rob, eff, w_rob=w_rob, w_eff=w_eff)
    want = ref.episode_rewards(rob.double(), eff.double(), w_rob=w_rob, w_eff=w_eff, dtype=F64)
    assert out.dtype == (F64 if F64 in dtypes else torch.float32) and out.shape == shape
    eps = torch.finfo(out.dtype).eps
    scale = rob.double().abs() * abs(w_rob) + eff.double().abs() * abs(w_eff)
    assert bool(((out.double() - want).abs() <= 2 * eps * scale + 1e-300).all())
