"""Divergences by name (issue 22): the registry is the one list of divergences, and a divergence
added as one entry (here a toy: the squared Hellinger distance, with torch and reference pieces
and no Triton kernel branch) runs end to end through ``counterfactual_divergence`` on the torch
and reference backends, vocabulary-parallel too, and is refused by the triton backend.

Tolerances: float64 torch against the float64 reference, rounding only (1e-9 relative + 1e-14
absolute, as tests/kernels/test_divergence.py); float32 inputs, SPEC §3's |error| <= 2e-3 * D + 2e-8.
"""

from __future__ import annotations

import math
import typing

import pytest
import torch

from gccpo.config import ConfigError, RewardConfig
from gccpo_kernels import counterfactual_divergence
from gccpo_kernels import reference as ref
from gccpo_kernels._backend import triton_unavailable_reason
from gccpo_kernels.divergence import KINDS
from gccpo_kernels.divergences import DIVERGENCES, Divergence, register_divergence, triton_codes
from tests._gloo import run_gloo
from tests.conftest import DEVICE
from tests.kernels.test_divergence import deltas_for, realistic, ref64, within_spec

F64 = torch.float64
TOY = "hellinger2_test"
NO_TRITON = triton_unavailable_reason()


# ---------------------------------------------------------------------------------------------
# the toy entry: squared Hellinger H^2(q, q~) = sum (sqrt q - sqrt q~)^2 / 2, in [0, 1]
# ---------------------------------------------------------------------------------------------


def _hellinger_terms(x, lq, q, out):
    """(sqrt q - sqrt q~)^2 = q expm1(x/2)^2 with x = log q~ - log q: the expm1 form below
    |x| = 1/2 (relative accuracy where q~ ~ q), the difference of square roots above (no overflow
    of e^x where q underflows)."""
    return torch.where(x.abs() < 0.5, torch.expm1(0.5 * x).square_().mul_(q),
                       (torch.exp(0.5 * lq) - torch.exp(0.5 * (lq + x))).square_())


def _hellinger_reference(lq, lq_pert):
    return 0.5 * (lq.exp().sqrt() - lq_pert.exp().sqrt()).square().sum(-1)


def _register_toy() -> Divergence:
    return register_divergence(Divergence(TOY, "squared Hellinger distance, in [0, 1]", _hellinger_reference,
                                          terms=_hellinger_terms, scale=0.5, upper=1.0))


@pytest.fixture
def toy():
    entry = _register_toy()
    try:
        yield entry
    finally:
        del DIVERGENCES[TOY]


# ---------------------------------------------------------------------------------------------
# one list
# ---------------------------------------------------------------------------------------------


def test_the_registry_is_the_single_list_of_divergences():
    names = tuple(DIVERGENCES)
    assert TOY not in names and len(names) >= 3
    assert tuple(KINDS) == names
    # gccpo.config writes the built-in names out (gccpo uses only the public kernel API): equal
    assert typing.get_args(typing.get_type_hints(RewardConfig)["divergence"]) == names
    for name in names:
        assert RewardConfig(divergence=name).divergence == name
    with pytest.raises(ConfigError, match="divergence"):
        RewardConfig(divergence="kld")
    # every built-in divergence has a Triton kernel branch, under distinct codes
    assert tuple(triton_codes()) == names
    assert len(set(triton_codes().values())) == len(names)
    # the reference computes exactly the registered names
    h, w, _ = realistic(3, 8, 20)
    dl = deltas_for(h, 2, 0.1)
    for name in names:
        assert ref.counterfactual_divergence(h, w, dl, kind=name).shape == (3, 2)
    with pytest.raises(ValueError, match=r"kind must be one of \('kl', 'js', 'tv'\), got 'kld'"):
        ref.counterfactual_divergence(h, w, dl, kind="kld")


@pytest.mark.skipif(NO_TRITON is not None, reason=f"{NO_TRITON}")
def test_triton_codes_and_compile_cases_come_from_the_registry():
    from gccpo_kernels.triton import divergence as tdv

    assert tdv.KIND_CODES == triton_codes()
    for arch in ("sm90", "sm80"):
        cases = [c.name for c in tdv.compile_cases(arch)]
        for name in triton_codes():
            assert any(c.startswith(f"integrand-{name}-") for c in cases), (arch, name)


def test_registration_is_checked():
    before = dict(DIVERGENCES)
    ok = dict(reference=_hellinger_reference, terms=_hellinger_terms)
    bad = [
        (Divergence("kl", "again", **ok), "already registered"),
        (Divergence(TOY, "no torch terms", _hellinger_reference), "needs its torch terms"),
        (Divergence(TOY, "taken code", **ok, triton_code=triton_codes()["js"]), "triton_code"),
        (Divergence(TOY, "bool code", **ok, triton_code=True), "triton_code"),
        (Divergence(TOY, "block", **ok, triton_block_r="BLOCK_V"), "triton_block_r"),
        (Divergence(TOY, "scale", **ok, scale=0.0), "scale and upper"),
        (Divergence("", "no name", **ok), "non-empty name"),
    ]
    for entry, match in bad:
        with pytest.raises(ValueError, match=match):
            register_divergence(entry)
    with pytest.raises(TypeError, match="takes a Divergence"):
        register_divergence(TOY)
    assert DIVERGENCES == before


# ---------------------------------------------------------------------------------------------
# a divergence added as one entry
# ---------------------------------------------------------------------------------------------


def test_toy_reference_is_the_textbook_hellinger(toy):
    """The toy's reference piece agrees with the other textbook form 1 - sum sqrt(q q~) (large
    perturbations, where that form is accurate)."""
    h, w, b = realistic(6, 20, 90, seed=2, bias=True)
    dl = deltas_for(h, 3, 1.0)
    q = torch.softmax(h @ w.T + b, -1).unsqueeze(1)
    qt = torch.softmax((h.unsqueeze(1) + dl) @ w.T + b, -1)
    want = 1.0 - (q * qt).sqrt().sum(-1)
    torch.testing.assert_close(ref64(h, w, dl, b, kind=TOY), want, rtol=1e-10, atol=1e-14)
    assert TOY in KINDS                                     # the live view of the registry


@pytest.mark.parametrize("opts", [dict(), dict(bias=True, softcap=6.0, temperature=0.7, logit_scale=1.3)])
def test_toy_runs_on_torch_and_reference(toy, opts):
    opts = dict(opts)
    h, w, b = realistic(13, 37, 211, seed=3, bias=opts.pop("bias", False))
    ids = torch.tensor([5, 200, 17, 3, 99, 128, 64, 31], device=DEVICE)
    for m, sigma, extra in ((1, 0.01, {}), (8, 0.3, {}), (3, 3.0, {}), (2, 0.05, dict(answer_token_ids=ids))):
        dl = deltas_for(h, m, sigma)
        kw = dict(opts, **extra)
        expected = ref64(h, w, dl, b, kind=TOY, **kw)
        assert float(expected.min()) > 0 and float(expected.max()) <= 1.0
        for backend in ("torch", "reference"):
            out = counterfactual_divergence(h, w, dl, bias=b, kind=TOY, backend=backend, **kw)
            assert out.dtype == F64 and out.shape == (13, m)
            torch.testing.assert_close(out, expected, rtol=1e-9, atol=1e-14)
    zero = counterfactual_divergence(h, w, torch.zeros(13, 2, 37, dtype=F64, device=DEVICE), bias=b,
                                     kind=TOY, backend="torch", **opts)
    assert torch.equal(zero, torch.zeros_like(zero))


def test_toy_meets_the_float32_bound_and_clamp(toy):
    """Float32 on the torch backend at KL-sized values: within SPEC §3's bound, through the
    registry's terms; huge perturbations stay in [0, upper]."""
    h, w, b = realistic(16, 72, 263, seed=5, bias=True)
    h, w, b = h.float(), w.float(), b.float()
    values = []
    for m, sigma in ((1, 0.002), (3, 0.01), (8, 0.05)):
        dl = deltas_for(h, m, sigma, seed=m)
        out = counterfactual_divergence(h, w, dl, bias=b, kind=TOY, backend="torch")
        expected = ref64(h, w, dl, b, kind=TOY)
        assert out.dtype == torch.float32
        ok, worst = within_spec(out, expected)
        assert ok, f"m={m} sigma={sigma}: error / tolerance = {worst:.3f}"
        values.append(expected.flatten())
    assert float(torch.cat(values).min()) < 1e-6                # the regime where cancellation shows
    big = counterfactual_divergence(h, w, 40 * deltas_for(h, 2, 3.0), bias=b, kind=TOY, backend="torch")
    assert bool((big >= 0).all()) and bool((big <= 1.0).all()) and float(big.max()) > 0.5


@pytest.mark.skipif(NO_TRITON is not None, reason=f"{NO_TRITON}")
def test_toy_is_refused_by_triton(toy):
    h, w, _ = realistic(4, 16, 80)
    dl = deltas_for(h.float(), 2, 0.05)
    with pytest.raises(ValueError, match=f"divergence '{TOY}' has no Triton kernel.*backend='torch'"):
        counterfactual_divergence(h.float(), w.float(), dl, kind=TOY, backend="triton")


def test_unregistered_toy_is_refused():
    h, w, _ = realistic(4, 16, 80)
    with pytest.raises(ValueError, match=f"kind must be one of .*got '{TOY}'"):
        counterfactual_divergence(h, w, deltas_for(h, 2, 0.05), kind=TOY, backend="torch")


def _sharded_worker(rank: int, world: int, sizes: list[int], expected: torch.Tensor) -> None:
    _register_toy()                                         # a fresh process: its own registry
    offset = sum(sizes[:rank])
    h, w, b = realistic(9, 24, sum(sizes), seed=7, bias=True)
    dl = deltas_for(h, 3, 0.2)
    cut = slice(offset, offset + sizes[rank])
    for backend in ("torch", "reference"):
        got = counterfactual_divergence(h, w[cut], dl, bias=b[cut], kind=TOY, backend=backend,
                                        process_group=True)
        torch.testing.assert_close(got.cpu(), expected, rtol=1e-9, atol=1e-14, msg=lambda s: f"{backend}: {s}")


def test_toy_vocab_parallel(toy):
    """The torch backend's second pass over each slice (the entry's terms with the global lse and
    L) and the reference's per-rank sums, on 2 gloo ranks with uneven slices."""
    sizes = [71, 52]
    h, w, b = realistic(9, 24, sum(sizes), seed=7, bias=True)
    expected = ref64(h, w, deltas_for(h, 3, 0.2), b, kind=TOY).cpu()
    assert float(expected.min()) > 1e-5
    run_gloo(_sharded_worker, 2, sizes, expected)


def test_toy_entry_uses_its_scale_and_upper(toy):
    assert toy.needs_shift and toy.triton_code is None
    total = torch.tensor([[0.5, 3.0, -1e-9, math.nan]], dtype=F64)
    torch.testing.assert_close(toy.finish(total.clone()), torch.tensor([[0.25, 1.0, 0.0, math.nan]], dtype=F64),
                               equal_nan=True)
