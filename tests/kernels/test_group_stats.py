"""SPEC §4: group_distribution_stats on every backend against the reference.

Tolerances say what they are for:
- float64 (torch backend): rounding only, 1e-10 relative + 1e-13 absolute.
- float32 / bfloat16 inputs (reference on the same rounded values in float64): entropies and KLs
  are sums of V terms of size q |log q| with ~1e-7 relative rounding each and the logits carry
  ~1e-6 absolute error, so 2e-5 absolute + 1e-4 relative.
"""

from __future__ import annotations

import math

import pytest
import torch

from gccpo_kernels import GroupStats, group_distribution_stats
from tests.conftest import DEVICE, available_backends

FAST = [b for b in available_backends() if b != "reference"]
F64 = torch.float64


def head(r: int, d: int, v: int, *, seed: int = 0, bias: bool = False, spread: float = 1.0):
    """Peaked rows (max probability ~0.3..0.9) leaning on a few shared 'answer' tokens, so the rows
    of a group overlap but differ."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(v, d, generator=g, dtype=F64) / d ** 0.5
    t = torch.randint(0, 5, (r,), generator=g)
    lean = 4.0 + 4.0 * torch.rand(r, generator=g, dtype=F64)
    h = spread * torch.randn(r, d, generator=g, dtype=F64) + lean[:, None] * w[t] / w[t].norm(dim=1, keepdim=True) ** 2
    b = 0.3 * torch.randn(v, generator=g, dtype=F64) if bias else None
    return h.to(DEVICE), w.to(DEVICE), None if b is None else b.to(DEVICE)


def sizes_to_offsets(sizes):
    return torch.tensor([0, *torch.tensor(sizes).cumsum(0).tolist()], dtype=torch.long, device=DEVICE)


def assert_stats_close(a: GroupStats, b: GroupStats, rtol: float, atol: float):
    for name, x, y in zip(GroupStats._fields, a, b):
        assert x.shape == y.shape, name
        torch.testing.assert_close(x.double().cpu(), y.double().cpu(), rtol=rtol, atol=atol, msg=name)


def reference(h, w, b=None, **kw):
    return group_distribution_stats(h.double(), w.double(), bias=None if b is None else b.double(),
                                    backend="reference", **kw)


# groups of sizes 1..G mixed, with an empty group and singletons
SIZES = [3, 1, 5, 0, 2, 1, 7, 4]


@pytest.mark.parametrize("opts", [dict(), dict(bias=True, temperature=0.6, logit_scale=1.2),
                                  dict(bias=True, softcap=5.0)])
def test_float64_torch_matches_reference(opts):
    opts = dict(opts)
    h, w, b = head(sum(SIZES), 29, 203, seed=1, bias=opts.pop("bias", False))
    off = sizes_to_offsets(SIZES)
    out = group_distribution_stats(h, w, bias=b, group_offsets=off, backend="torch", **opts)
    assert out.row_entropy.dtype == F64 and out.group_js.shape == (len(SIZES),)
    assert_stats_close(out, reference(h, w, b, group_offsets=off, **opts), rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_matches_reference(backend, dtype):
    h, w, b = head(sum(SIZES), 72, 301, seed=2, bias=True)
    h, w, b = (t.to(dtype).to(DEVICE) for t in (h, w, b))
    off = sizes_to_offsets(SIZES).to(DEVICE)
    for cap in (None, 6.0):
        out = group_distribution_stats(h, w, bias=b, group_offsets=off, softcap=cap, backend=backend)
        assert out.row_kl_to_mixture.dtype == torch.float32
        assert_stats_close(out, reference(h, w, b, group_offsets=off, softcap=cap), rtol=1e-4, atol=2e-5)


@pytest.mark.parametrize("backend", FAST)
def test_strided_bias_and_ids(backend):
    """A stride-2 bias view, a non-contiguous weight and strided group ids give the dense result."""
    h, w, b = head(sum(SIZES), 40, 150, seed=5, bias=True)
    h, w, b = h.float(), w.float(), b.float()
    ids = torch.repeat_interleave(torch.arange(len(SIZES)), torch.tensor(SIZES)).to(DEVICE)
    bs, ws = torch.stack([b, -b], dim=1)[:, 0], w.T.contiguous().T
    ids_s = torch.stack([ids, ids], dim=1)[:, 0]
    dense = group_distribution_stats(h, w, bias=b, group_ids=ids, num_groups=len(SIZES), backend=backend)
    strided = group_distribution_stats(h, ws, bias=bs, group_ids=ids_s, num_groups=len(SIZES),
                                       backend=backend)
    assert_stats_close(strided, dense, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", FAST)
def test_ids_in_any_order_match_offsets(backend):
    """Shuffled rows with group ids give the same per-row and per-group numbers as sorted rows with
    offsets; per-row outputs follow the caller's row order."""
    h, w, _ = head(sum(SIZES), 40, 150, seed=3)
    h, w = h.float(), w.float()
    off = sizes_to_offsets(SIZES)
    ids = torch.repeat_interleave(torch.arange(len(SIZES)), torch.tensor(SIZES)).to(DEVICE)
    perm = torch.randperm(h.shape[0], generator=torch.Generator().manual_seed(0)).to(DEVICE)
    sorted_out = group_distribution_stats(h, w, group_offsets=off, backend=backend)
    shuffled = group_distribution_stats(h[perm], w, group_ids=ids[perm], num_groups=len(SIZES), backend=backend)
    torch.testing.assert_close(shuffled.row_entropy, sorted_out.row_entropy[perm], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(shuffled.row_kl_to_mixture, sorted_out.row_kl_to_mixture[perm], rtol=1e-5, atol=1e-6)
    for name in ("group_mixture_entropy", "group_mean_entropy", "group_js"):
        torch.testing.assert_close(getattr(shuffled, name), getattr(sorted_out, name), rtol=1e-5, atol=1e-6)
    assert_stats_close(shuffled, reference(h[perm], w, group_ids=ids[perm], num_groups=len(SIZES)),
                       rtol=1e-4, atol=2e-5)


@pytest.mark.parametrize("backend", FAST)
def test_singletons_and_empty_groups(backend):
    h, w, _ = head(6, 24, 100, seed=4)
    off = sizes_to_offsets([1, 0, 1, 4])
    out = group_distribution_stats(h.float(), w.float(), group_offsets=off, backend=backend)
    assert all(bool(torch.isfinite(t).all()) for t in out)
    assert out.row_kl_to_mixture[0] == 0 and out.row_kl_to_mixture[1] == 0
    assert out.group_js[0] == 0 and out.group_js[2] == 0
    assert out.group_js[1] == 0 and out.group_mixture_entropy[1] == 0 and out.group_mean_entropy[1] == 0
    # a group of one: its mixture is its distribution
    torch.testing.assert_close(out.group_mixture_entropy[0], out.row_entropy[0], rtol=1e-5, atol=1e-6)
    assert float(out.group_js[3]) > 1e-3


@pytest.mark.parametrize("backend", FAST)
def test_large_group_and_identities(backend):
    """One group spanning many row blocks (an effectiveness group holding the whole batch) and a
    second one; JS = H(mixture) - mean H = mean KL to the mixture; every KL >= 0; JS <= ln(n)."""
    r = 70 if backend == "triton" else 600
    h, w, b = head(r, 32, 130, seed=5, bias=True)
    h, w, b = h.float(), w.float(), b.float()
    off = torch.tensor([0, r - 9, r], device=DEVICE)
    out = group_distribution_stats(h, w, bias=b, group_offsets=off, backend=backend)
    assert_stats_close(out, reference(h, w, b, group_offsets=off), rtol=1e-4, atol=2e-5)
    torch.testing.assert_close(out.group_js, out.group_mixture_entropy - out.group_mean_entropy,
                               rtol=1e-4, atol=2e-5)
    assert bool((out.row_kl_to_mixture >= -1e-6).all())
    assert float(out.group_js[0]) <= math.log(r - 9)


@pytest.mark.parametrize("backend", FAST)
def test_answer_token_restriction(backend):
    h, w, b = head(12, 30, 180, seed=6, bias=True)
    h, w, b = h.float(), w.float(), b.float()
    ids = torch.tensor([0, 1, 2, 3, 4, 90, 45, 179], device=DEVICE)
    off = sizes_to_offsets([5, 1, 6])
    out = group_distribution_stats(h, w, bias=b, group_offsets=off, answer_token_ids=ids, backend=backend)
    expected = reference(h, w, b, group_offsets=off, answer_token_ids=ids)
    assert_stats_close(out, expected, rtol=1e-4, atol=2e-5)
    assert_stats_close(expected, reference(h, w[ids], b[ids], group_offsets=off), rtol=1e-12, atol=1e-14)
    assert float(out.row_entropy.max()) <= math.log(len(ids)) + 1e-5


# the interpreter computes masked-off rows in numpy too: their e^(z - lse) may overflow unused
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("backend", FAST)
def test_underflowing_probabilities_stay_finite(backend):
    """Very peaked rows: most probabilities underflow to 0 in float32 (0 log 0 terms)."""
    h, w, _ = head(8, 16, 120, seed=7, spread=0.1)
    off = torch.tensor([0, 3, 8], device=DEVICE)
    out = group_distribution_stats(h.float() * 40, w.float(), group_offsets=off, backend=backend)
    assert all(bool(torch.isfinite(t).all()) for t in out)
    assert_stats_close(out, reference(h.float() * 40, w.float(), group_offsets=off),
                       rtol=1e-4, atol=2e-5)


@pytest.mark.parametrize("backend", [*FAST, "reference"])
def test_requires_grad_inputs_are_read_detached(backend):
    h, w, b = head(5, 16, 60, bias=True)
    h, w, b = h.float().requires_grad_(), w.float().requires_grad_(), b.float().requires_grad_()
    out = group_distribution_stats(h, w, bias=b, group_ids=torch.tensor([1, 0, 1, 0, 0], device=DEVICE),
                                   backend=backend)
    assert all(not t.requires_grad and t.grad_fn is None for t in out)


@pytest.mark.parametrize("backend", [*FAST, "reference"])
def test_empty_rows(backend):
    w = torch.randn(40, 8, device=DEVICE)
    out = group_distribution_stats(torch.zeros(0, 8, device=DEVICE), w,
                                   group_offsets=torch.tensor([0, 0, 0], device=DEVICE), backend=backend)
    assert out.row_entropy.shape == (0,) and out.group_js.shape == (2,)
    assert bool((out.group_js == 0).all())


def test_bad_group_layouts():
    h, w = torch.randn(5, 8), torch.randn(30, 8)
    cases = [
        (dict(), "exactly one"),
        (dict(group_offsets=torch.tensor([0, 5]), group_ids=torch.zeros(5, dtype=torch.long)), "exactly one"),
        (dict(group_offsets=torch.tensor([0, 3, 2, 5])), "non-decreasing"),
        (dict(group_offsets=torch.tensor([1, 3, 5])), "start at 0"),
        (dict(group_offsets=torch.tensor([0, 3, 4])), "end at R"),
        (dict(group_offsets=torch.tensor([0, 3, 6])), "end at R"),
        (dict(group_offsets=torch.tensor([[0, 5]])), "1-D"),
        (dict(group_offsets=torch.tensor([0, 5]), num_groups=2), "disagrees"),
        (dict(group_ids=torch.tensor([0, 1, 0, -1, 1])), ">= 0"),
        (dict(group_ids=torch.tensor([0, 1, 0, 2, 1]), num_groups=2), "< num_groups"),
        (dict(group_ids=torch.tensor([0, 1, 0, 1])), "one id per row"),
        (dict(group_ids=torch.tensor([0.0, 1, 0, 1, 0])), "int64"),
        (dict(group_ids=torch.zeros(5, dtype=torch.long), answer_token_ids=torch.tensor([30])), r"\[0, 30\)"),
        (dict(group_ids=torch.zeros(5, dtype=torch.long), backend="gpu"), "not a backend"),
    ]
    for kw, match in cases:
        with pytest.raises((ValueError, TypeError), match=match):
            group_distribution_stats(h, w, **kw)
    with pytest.raises(ValueError, match="weight"):
        group_distribution_stats(h, torch.randn(30, 7), group_ids=torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="non-finite"):
        group_distribution_stats(torch.full((5, 8), float("inf")), w, group_ids=torch.zeros(5, dtype=torch.long))


@pytest.mark.parametrize("backend", FAST)
def test_many_small_groups(backend):
    """More groups than one program's block of groups (16 on triton), sizes 0..4 mixed."""
    g = torch.Generator().manual_seed(8)
    sizes = torch.randint(0, 5, (37,), generator=g).tolist()
    h, w, b = head(sum(sizes), 24, 90, seed=9, bias=True)
    h, w, b = h.float(), w.float(), b.float()
    off = sizes_to_offsets(sizes)
    out = group_distribution_stats(h, w, bias=b, group_offsets=off, backend=backend)
    assert_stats_close(out, reference(h, w, b, group_offsets=off), rtol=1e-4, atol=2e-5)
