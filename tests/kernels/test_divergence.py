"""SPEC §3: perturb_latents and counterfactual_divergence on every backend against the reference.

Tolerances say what they are for:
- float64 (torch backend): rounding only; the reference's textbook forms are exact to ~1e-15
  absolute in float64 at these logit sizes, so 1e-9 relative + 1e-14 absolute.
- float32 and bfloat16 inputs: SPEC §3's accuracy target |error| <= 2e-3 * D + 2e-8, against the
  float64 reference evaluated on the same (rounded) input values, at realistic perturbation sizes on
  peaked answer distributions (max probability ~0.5..0.9). The same bound is applied to JS and TV.
  bf16 products are exact in float32, so bf16 is held to the float32 bound.
"""

from __future__ import annotations

import math

import pytest
import torch

from gccpo_kernels import counterfactual_divergence, perturb_latents
from gccpo_kernels import reference as ref
from tests.conftest import DEVICE, available_backends

FAST = [b for b in available_backends() if b != "reference"]
KINDS = ("kl", "js", "tv")
F64 = torch.float64


def realistic(r: int, d: int, v: int, *, seed: int = 0, bias: bool = False):
    """A peaked LM head: each row's latent leans on one token's W row, so the answer distribution
    puts ~0.5..0.9 on that token, like a trained head reading an answer position."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(v, d, generator=g, dtype=F64) / d ** 0.5
    t = torch.randint(0, v, (r,), generator=g)
    lean = 6.5 + 3.0 * torch.rand(r, generator=g, dtype=F64)
    unit = w[t] / w[t].norm(dim=1, keepdim=True)
    h = torch.randn(r, d, generator=g, dtype=F64) + lean[:, None] * unit / w[t].norm(dim=1, keepdim=True)
    b = 0.3 * torch.randn(v, generator=g, dtype=F64) if bias else None
    return h.to(DEVICE), w.to(DEVICE), None if b is None else b.to(DEVICE)


def to(t, dtype):
    return None if t is None else t.to(dtype).to(DEVICE)


def ref64(h, w, dl, b=None, **kw):
    """The reference on float64 copies of the (possibly rounded) inputs."""
    return ref.counterfactual_divergence(h.double(), w.double(), dl.double(),
                                         bias=None if b is None else b.double(), **kw)


def deltas_for(h, m, sigma, seed=1, **kw):
    g = torch.Generator(device=h.device).manual_seed(seed)
    return perturb_latents(h, m, sigma=sigma, generator=g, **kw)


def within_spec(out, expected):
    err = (out.double() - expected).abs()
    tol = 2e-3 * expected.abs() + 2e-8
    return bool((err <= tol).all()), float((err / tol).max())


def test_fixture_is_realistic():
    h, w, b = realistic(64, 48, 301, bias=True)
    top = torch.softmax(h @ w.T + b, dim=-1).amax(dim=-1)
    assert 0.4 < float(top.median()) < 0.95, top.median()


# ---------------------------------------------------------------------------------------------
# accuracy against the reference
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("opts", [dict(), dict(bias=True, temperature=0.7, logit_scale=1.3),
                                  dict(softcap=6.0, bias=True)])
def test_float64_torch_matches_reference(kind, opts):
    opts = dict(opts)
    h, w, b = realistic(13, 37, 211, seed=3, bias=opts.pop("bias", False))
    for m, sigma in ((1, 0.01), (8, 0.3)):
        dl = deltas_for(h, m, sigma)
        out = counterfactual_divergence(h, w, dl, bias=b, kind=kind, backend="torch", **opts)
        expected = ref64(h, w, dl, b, kind=kind, **opts)
        assert out.dtype == F64 and out.shape == (13, m)
        torch.testing.assert_close(out, expected, rtol=1e-9, atol=1e-14)


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("opts", [dict(), dict(bias=True, softcap=8.0, temperature=0.8)])
def test_low_precision_meets_spec_accuracy(backend, dtype, opts):
    """Realistic sigma on peaked distributions: KL spans ~1e-6..1e-3; every kind within SPEC §3."""
    opts = dict(opts)
    h, w, b = realistic(16, 72, 263, seed=5, bias=opts.pop("bias", False))
    h, w, b = to(h, dtype), to(w, dtype), to(b, dtype)
    kls = []
    for m, sigma in ((1, 0.002), (3, 0.01), (8, 0.05)):
        dl = deltas_for(h, m, sigma, seed=m)
        for kind in KINDS:
            out = counterfactual_divergence(h, w, dl, bias=b, kind=kind, backend=backend, **opts)
            assert out.dtype == torch.float32 and out.shape == (16, m)
            expected = ref64(h, w, dl, b, kind=kind, **opts)
            ok, worst = within_spec(out, expected)
            assert ok, f"{kind} m={m} sigma={sigma}: error / tolerance = {worst:.3f}"
            if kind == "kl":
                kls.append(expected.flatten())
    kls = torch.cat(kls)
    # the case exercises SPEC §3's regime, where the textbook float32 forms fail (see below)
    assert float(kls.min()) < 3e-6 and float(((kls > 1e-6) & (kls < 1e-4)).float().mean()) > 0.3


def test_textbook_float32_form_would_fail_the_bound():
    """The bound above is not vacuous: sum q (z - z~) - lse + lse~ in float32 violates it."""
    h, w, _ = realistic(21, 72, 333, seed=5)
    h32, w32 = h.float(), w.float()
    dl = deltas_for(h32, 3, 0.01)
    z = h32 @ w32.T
    zt = (h32.unsqueeze(1) + dl) @ w32.T
    lq = torch.log_softmax(z, -1).unsqueeze(1)
    textbook = (lq.exp() * (lq - torch.log_softmax(zt, -1))).sum(-1)
    ok, worst = within_spec(textbook, ref64(h32, w32, dl))
    assert not ok and worst > 5


@pytest.mark.parametrize("backend", FAST)
def test_odd_shapes_many_splits_and_perturbation_chunks(backend):
    """V spans several vocabulary splits with a ragged tail, D is not a block multiple, M = 9 is
    processed in several launches on triton; float32 with bias, against the reference."""
    h, w, b = realistic(19, 67, 297, seed=11, bias=True)
    h, w, b = h.float(), w.float(), b.float()
    dl = deltas_for(h, 9, 0.02)
    for kind in KINDS:
        out = counterfactual_divergence(to(h, torch.float32), to(w, torch.float32), to(dl, torch.float32),
                                        bias=to(b, torch.float32), kind=kind, backend=backend)
        ok, worst = within_spec(out, ref64(h, w, dl, b, kind=kind))
        assert ok, (kind, worst)


# the interpreter evaluates both branches of tl.where in numpy: the unused one may overflow
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("backend", FAST)
def test_large_perturbations_and_ranges(backend):
    """Big shifts (sigma up to 3): the closed-form branches; KL >= 0, JS in [0, ln 2], TV in [0, 1]."""
    h, w, b = realistic(12, 40, 150, seed=2, bias=True)
    h, w, b = h.float(), w.float(), b.float()
    dl = torch.cat([deltas_for(h, 2, 0.5), deltas_for(h, 2, 3.0, seed=4)], dim=1)
    for kind, hi in (("kl", math.inf), ("js", math.log(2)), ("tv", 1.0)):
        out = counterfactual_divergence(h, w, dl, bias=b, kind=kind, backend=backend, softcap=10.0)
        expected = ref64(h, w, dl, b, kind=kind, softcap=10.0)
        assert bool((out >= 0).all()) and bool((out <= hi).all())
        torch.testing.assert_close(out.double(), expected, rtol=2e-5, atol=2e-7)
    tv = counterfactual_divergence(h, w, 30 * dl, bias=b, kind="tv", backend=backend)
    assert bool((tv <= 1.0).all()) and float(tv.max()) > 0.5


@pytest.mark.parametrize("backend", FAST)
def test_strided_bias_and_weight(backend):
    """A bias view with stride 2 and a non-contiguous weight give the dense result."""
    h, w, b = realistic(6, 64, 200, seed=4, bias=True)
    h, w, b = h.float(), w.float(), b.float()
    dl = deltas_for(h, 2, 0.05)
    bs = torch.stack([b, -b], dim=1)[:, 0]
    ws = w.T.contiguous().T
    assert not (bs.is_contiguous() or ws.is_contiguous())
    dense = counterfactual_divergence(h, w, dl, bias=b, backend=backend)
    strided = counterfactual_divergence(h, ws, dl, bias=bs, backend=backend)
    torch.testing.assert_close(strided, dense, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("backend", FAST)
def test_zero_delta_gives_zero(backend):
    h, w, b = realistic(9, 33, 130, seed=7, bias=True)
    h, w, b = h.float(), w.float(), b.float()
    zero = torch.zeros(9, 3, 33, device=DEVICE)
    for cap in (None, 5.0):
        for kind in KINDS:
            out = counterfactual_divergence(h, w, zero, bias=b, kind=kind, softcap=cap, backend=backend)
            assert torch.equal(out, torch.zeros(9, 3, device=DEVICE)), (kind, cap, out.abs().max())


@pytest.mark.parametrize("backend", FAST)
def test_js_and_tv_are_symmetric(backend):
    """D(q(h) || q(h + delta)) = D(q(h + delta) || q(h)) for JS and TV (not for KL)."""
    h, w, _ = realistic(10, 40, 170, seed=9)
    dl = deltas_for(h, 2, 0.05)
    back = (h.unsqueeze(1) + dl)                                     # [R, 2, D] perturbed latents
    for kind in ("js", "tv"):
        fwd = counterfactual_divergence(h.float(), w.float(), dl.float(), kind=kind, backend=backend)
        rev = torch.stack([counterfactual_divergence(back[:, j].float(), w.float(), -dl[:, j:j + 1].float(),
                                                     kind=kind, backend=backend)[:, 0] for j in range(2)], 1)
        torch.testing.assert_close(fwd, rev, rtol=2e-3, atol=1e-7)
    kl_f = counterfactual_divergence(h, w, dl, backend="torch")
    kl_r = torch.stack([counterfactual_divergence(back[:, j], w, -dl[:, j:j + 1], backend="torch")[:, 0]
                        for j in range(2)], 1)
    assert float((kl_f - kl_r).abs().max()) > 1e-3 * float(kl_f.abs().max())


@pytest.mark.parametrize("backend", FAST)
def test_answer_token_restriction(backend):
    h, w, b = realistic(11, 36, 257, seed=13, bias=True)
    h, w, b = h.float(), w.float(), b.float()
    ids = torch.tensor([5, 200, 17, 3, 99, 256, 128, 64, 31, 7, 250], device=DEVICE)
    dl = deltas_for(h, 2, 0.05)
    for kind in KINDS:
        out = counterfactual_divergence(h, w, dl, bias=b, kind=kind, answer_token_ids=ids, backend=backend)
        expected = ref64(h, w, dl, b, kind=kind, answer_token_ids=ids)
        manual = ref64(h, w[ids], dl, b[ids], kind=kind)             # renormalized over the ids
        torch.testing.assert_close(expected, manual)
        ok, worst = within_spec(out, expected)
        assert ok, (kind, worst)
    full = counterfactual_divergence(h, w, dl, bias=b, backend=backend)
    assert not torch.allclose(full, counterfactual_divergence(h, w, dl, bias=b, answer_token_ids=ids,
                                                              backend=backend))


@pytest.mark.parametrize("backend", [*FAST, "reference"])
def test_empty_inputs(backend):
    w = torch.randn(70, 16, device=DEVICE)
    empty = counterfactual_divergence(torch.zeros(0, 16, device=DEVICE), w, torch.zeros(0, 3, 16, device=DEVICE),
                                      backend=backend)
    assert empty.shape == (0, 3)
    no_deltas = counterfactual_divergence(torch.randn(4, 16, device=DEVICE), w,
                                          torch.zeros(4, 0, 16, device=DEVICE), backend=backend)
    assert no_deltas.shape == (4, 0)


def test_default_backend_and_output_dtypes():
    h, w, _ = realistic(4, 16, 80)
    dl = deltas_for(h, 2, 0.05)
    assert counterfactual_divergence(h, w, dl).dtype == F64
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        assert counterfactual_divergence(h.to(dtype), w.to(dtype), dl.to(dtype), backend="torch").dtype == torch.float32
    torch.testing.assert_close(counterfactual_divergence(h, w, dl, backend="reference"), ref64(h, w, dl))


# ---------------------------------------------------------------------------------------------
# forward-only contract and bad inputs
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", [*FAST, "reference"])
def test_requires_grad_inputs_are_read_detached(backend):
    h, w, b = realistic(5, 24, 90, bias=True)
    h, w, b = h.float().requires_grad_(), w.float().requires_grad_(), b.float().requires_grad_()
    dl = deltas_for(h.detach(), 2, 0.05).requires_grad_()
    out = counterfactual_divergence(h, w, dl, bias=b, backend=backend)
    assert not out.requires_grad and out.grad_fn is None
    with pytest.raises(RuntimeError):
        out.sum().backward()
    assert w.grad is None and h.grad is None
    assert not perturb_latents(h, 2).requires_grad


def test_bad_inputs():
    h, w = torch.randn(4, 16), torch.randn(50, 16)
    dl = torch.zeros(4, 2, 16)
    cases = [
        (dict(deltas=torch.zeros(3, 2, 16)), ValueError, "deltas must be"),
        (dict(deltas=torch.zeros(4, 2, 15)), ValueError, "deltas must be"),
        (dict(deltas=torch.zeros(4, 16)), ValueError, "deltas must be"),
        (dict(deltas=dl.double()), TypeError, "dtype"),
        (dict(kind="kld"), ValueError, "kind"),
        (dict(answer_token_ids=torch.tensor([1, 50])), ValueError, r"\[0, 50\)"),
        (dict(answer_token_ids=torch.tensor([-1, 2])), ValueError, r"\[0, 50\)"),
        (dict(answer_token_ids=torch.tensor([3, 3])), ValueError, "distinct"),
        (dict(answer_token_ids=torch.tensor([], dtype=torch.long)), ValueError, "non-empty"),
        (dict(answer_token_ids=torch.tensor([1.0])), TypeError, "int64"),
        (dict(hidden=torch.randn(2, 2, 16)), ValueError, r"\[R, D\]"),
        (dict(hidden=torch.full((4, 16), float("nan"))), ValueError, "non-finite"),
        (dict(deltas=torch.full((4, 2, 16), float("inf"))), ValueError, "non-finite"),
        (dict(weight=torch.randn(16, 50)), ValueError, "weight"),
        (dict(temperature=0.0), ValueError, "temperature"),
        (dict(backend="cuda"), ValueError, "not a backend"),
    ]
    for override, exc, match in cases:
        kw = dict(hidden=h, weight=w, deltas=dl)
        kw.update(override)
        args = (kw.pop("hidden"), kw.pop("weight"), kw.pop("deltas"))
        with pytest.raises(exc, match=match):
            counterfactual_divergence(*args, **kw)


# ---------------------------------------------------------------------------------------------
# perturbations
# ---------------------------------------------------------------------------------------------


def test_gaussian_perturbations_are_tangent_and_scaled():
    g = torch.Generator().manual_seed(0)
    r, m, d, sigma = 64, 8, 96, 0.05
    h = torch.randn(r, d, generator=g, dtype=F64) * torch.linspace(0.1, 10, r, dtype=F64)[:, None]
    dl = perturb_latents(h, m, sigma=sigma, generator=g)
    assert dl.shape == (r, m, d) and dl.dtype == F64
    hn = h.norm(dim=1)
    cos = (dl * h.unsqueeze(1)).sum(-1) / (dl.norm(dim=-1) * hn.unsqueeze(1))
    assert float(cos.abs().max()) < 1e-12                                   # orthogonal to h
    ratio = dl.square().sum(-1) / (sigma ** 2 * hn.square().unsqueeze(1) * (d - 1) / d)
    # ||P xi||^2 ~ chi^2_{D-1}: the mean over 512 draws is 1 +- 0.007 (1 sd), each row scales with ||h||
    assert abs(float(ratio.mean()) - 1.0) < 0.03
    assert abs(float(ratio[:32].mean()) - float(ratio[32:].mean())) < 0.05
    # the perturbation keeps the norm to first order: ||h + delta||^2 = ||h||^2 + ||delta||^2
    torch.testing.assert_close((h.unsqueeze(1) + dl).norm(dim=-1) ** 2,
                               hn.square().unsqueeze(1) + dl.square().sum(-1))
    # directions are isotropic in the tangent space: components have unit variance once scaled
    comp = dl / (sigma * hn[:, None, None] / d ** 0.5)
    assert abs(float(comp.var()) - (d - 1) / d) < 0.02


def test_perturbations_are_reproducible():
    h = torch.randn(10, 32)
    a = perturb_latents(h, 4, generator=torch.Generator().manual_seed(5))
    b = perturb_latents(h, 4, generator=torch.Generator().manual_seed(5))
    c = perturb_latents(h, 4, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)
    ids = torch.tensor([0, 0, 1, 1, 1, 2, 3, 3, 3, 3])
    s1 = perturb_latents(h, 4, mode="sibling", group_index=ids, generator=torch.Generator().manual_seed(5))
    s2 = perturb_latents(h, 4, mode="sibling", group_index=ids, generator=torch.Generator().manual_seed(5))
    assert torch.equal(s1, s2)
    assert a.dtype == torch.float32
    assert perturb_latents(h.bfloat16(), 2).dtype == torch.bfloat16
    assert torch.equal(perturb_latents(torch.zeros(2, 8), 3), torch.zeros(2, 3, 8))


def test_sibling_perturbations():
    g = torch.Generator().manual_seed(1)
    r, m, d, alpha = 12, 300, 8, 0.5
    h = torch.randn(r, d, generator=g, dtype=F64)
    ids = torch.tensor([2, 0, 2, 1, 0, 2, 5, 2, 0, 1, 3, 2])                 # group 3 and 5 alone
    dl = perturb_latents(h, m, mode="sibling", alpha=alpha, group_index=ids, sigma=0.05, generator=g)
    target = h.unsqueeze(1) + dl / alpha                                     # = h_j
    dist = (target.unsqueeze(2) - h.view(1, 1, r, d)).norm(dim=-1)           # [R, M, R]
    j = dist.argmin(dim=-1)
    for i in range(r):
        members = (ids == ids[i]).nonzero().squeeze(1)
        if members.numel() == 1:                                             # lone: gaussian
            cos = (dl[i] @ h[i]) / (dl[i].norm(dim=-1) * h[i].norm())
            assert float(cos.abs().max()) < 1e-12
            assert float(dl[i].norm(dim=-1).mean()) < 0.2 * float(h[i].norm())
            continue
        assert float(dist[i].gather(1, j[i].unsqueeze(1)).max()) < 1e-12    # an exact row of hidden
        picked = j[i]
        assert bool((ids[picked] == ids[i]).all()) and bool((picked != i).all())
        # uniform over the other members: each is drawn ~ m / (n - 1) times
        counts = torch.bincount(picked, minlength=r)[members[members != i]].double()
        expect = m / (members.numel() - 1)
        assert float((counts - expect).abs().max()) < 5 * math.sqrt(expect)


def test_perturbation_bad_inputs():
    h = torch.randn(4, 8)
    with pytest.raises(ValueError, match="group_index"):
        perturb_latents(h, 2, mode="sibling")
    with pytest.raises(ValueError, match="group_index"):
        perturb_latents(h, 2, mode="sibling", group_index=torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="non-negative"):
        perturb_latents(h, 2, mode="sibling", group_index=torch.tensor([0, -1, 0, 1]))
    with pytest.raises(ValueError, match="num_perturbations"):
        perturb_latents(h, 0)
    with pytest.raises(ValueError, match="mode"):
        perturb_latents(h, 2, mode="uniform")
    with pytest.raises(ValueError, match="sigma"):
        perturb_latents(h, 2, sigma=-1.0)
    with pytest.raises(ValueError, match=r"\[R, D\]"):
        perturb_latents(torch.randn(2, 3, 4), 2)


def test_divergence_of_generated_perturbations_grows_with_sigma():
    h, w, _ = realistic(16, 32, 120)
    kl = [float(counterfactual_divergence(h, w, deltas_for(h, 4, s)).mean()) for s in (0.01, 0.02, 0.04)]
    # KL ~ Var_q(Delta)/2 is quadratic in sigma for small sigma
    assert 3.5 < kl[1] / kl[0] < 4.5 and 3.5 < kl[2] / kl[1] < 4.5
