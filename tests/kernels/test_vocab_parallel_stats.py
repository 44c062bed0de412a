"""Vocabulary parallelism for SPEC §3 (counterfactual_divergence) and §4 (group_distribution_stats).

Each rank of a gloo group holds every row and a contiguous slice of the LM head (and bias); the
sharded op must give every rank the unsharded op's result. Two spawns (2 and 4 processes; ~10 s
of imports each here), every backend and case inside one worker per world size. The unsharded
expectations are computed once, in the test process, and passed to the workers.

Layouts: V = 203 (not divisible by 2 or 4), slices [120, 83] and [60, 0, 90, 53] (rank 1 of 4
holds no vocabulary at all); the answer ids avoid [60, 150), so rank 2 of 4 (and rank 0 of 2 for
part of them) holds none of them.

Tolerances say what they are for:
- reference and torch in float64: the sharded and unsharded ops sum the same terms in another
  order (and the torch backend combines slices through exact identities), so rounding only:
  1e-9 relative + 1e-13 absolute (the textbook float64 KL of the reference cancels to ~1e-12
  relative at these sizes).
- float32 (triton; torch as well): the vocabulary splits differ from the unsharded op's (the
  other ranks' tokens are other splits), so the float32 rounding differs: divergences within
  1e-4 relative + 1e-9 absolute of the unsharded result of the same backend (observed ~2e-6)
  and within SPEC §3's bound 2e-3 * D + 2e-8 of the float64 reference; §4 statistics within
  2e-6 * (1 + |x|) of the unsharded result (entropies of size ~1 to ~5 in float32; observed ~7e-7).
- every rank's outputs are bitwise the same (checked with one all-gather of all of them).
"""

from __future__ import annotations

import pytest
import torch

from gccpo_kernels import counterfactual_divergence, group_distribution_stats
from gccpo_kernels import reference as ref
from tests._gloo import run_gloo
from tests.conftest import DEVICE, available_backends

V, D, R = 203, 16, 9
LAYOUTS = {2: [120, 83], 4: [60, 0, 90, 53]}
ANSWER_IDS = [3, 170, 7, 59, 0, 201, 155]           # none in [60, 150)
F64 = torch.float64


def _inputs(seed: int, m: int, sigma: float):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(R, D, generator=g, dtype=F64)
    w = torch.randn(V, D, generator=g, dtype=F64) * 2.0 / D ** 0.5
    b = 0.3 * torch.randn(V, generator=g, dtype=F64)
    dl = sigma * torch.randn(R, m, D, generator=g, dtype=F64)
    return h.to(DEVICE), w.to(DEVICE), b.to(DEVICE), dl.to(DEVICE)


def _backends():
    """Every backend in float64 where it allows it (triton: float32), and torch in float32 too."""
    out = [(name, torch.float32 if name == "triton" else F64) for name in available_backends()]
    return out + [("torch", torch.float32)]


def _div_cases():
    """(backend, dtype, kind, M, sigma, options, use bias): every kind with and without answer
    ids and the soft cap; small perturbations (KL down to ~1e-7: where float32 cancellation
    would show); large ones (KL up to ~5 > ln 2: the other KL form); M = 5 > 4 (the triton
    backend's perturbation blocks)."""
    ids = torch.tensor(ANSWER_IDS, device=DEVICE)
    cap = dict(softcap=3.0, temperature=0.7, logit_scale=1.3)
    cases = []
    for name, dtype in _backends():
        for kind in ("kl", "js", "tv"):
            cases.append((name, dtype, kind, 3, 0.05, {}, True))
            cases.append((name, dtype, kind, 2, 0.005, dict(answer_token_ids=ids), False))
            cases.append((name, dtype, kind, 5 if kind == "kl" else 1, 0.05, cap, True))
            cases.append((name, dtype, kind, 2, 3.0, dict(answer_token_ids=ids, **cap), True))
    return cases


def _stats_cases():
    """(backend, dtype, layout kwargs, options, use bias): CSR offsets with empty groups and a
    singleton, unsorted ids, answer ids, soft cap."""
    ids = torch.tensor(ANSWER_IDS, device=DEVICE)
    offsets = dict(group_offsets=torch.tensor([0, 3, 3, 4, 9], device=DEVICE))
    unsorted = dict(group_ids=torch.tensor([2, 0, 2, 1, 0, 2, 4, 0, 2], device=DEVICE), num_groups=6)
    cap = dict(softcap=3.0, temperature=0.7, logit_scale=1.3)
    cases = []
    for name, dtype in _backends():
        cases.append((name, dtype, offsets, {}, True))
        cases.append((name, dtype, unsorted, dict(answer_token_ids=ids), False))
        cases.append((name, dtype, unsorted, cap, True))
    return cases


def _run_div(case, seed, w_slice=None, b_slice=None, process_group=None):
    name, dtype, kind, m, sigma, opts, use_bias = case
    h, w, b, dl = _inputs(seed, m, sigma)
    if w_slice is not None:
        w, b = w_slice(w), b_slice(b)
    return counterfactual_divergence(h.to(dtype), w.to(dtype), dl.to(dtype),
                                     bias=b.to(dtype) if use_bias else None, kind=kind,
                                     backend=name, process_group=process_group, **opts)


def _run_stats(case, seed, w_slice=None, b_slice=None, process_group=None):
    name, dtype, layout, opts, use_bias = case
    h, w, b, _ = _inputs(seed, 1, 0.0)
    if w_slice is not None:
        w, b = w_slice(w), b_slice(b)
    return tuple(group_distribution_stats(h.to(dtype), w.to(dtype),
                                          bias=b.to(dtype) if use_bias else None, backend=name,
                                          process_group=process_group, **layout, **opts))


def _expected():
    """Unsharded results on the CPU (they travel to the workers): the same backend, and the
    float64 reference for the divergences."""
    div = []
    for i, case in enumerate(_div_cases()):
        name, dtype, kind, m, sigma, opts, use_bias = case
        h, w, b, dl = _inputs(i, m, sigma)
        exact = ref.counterfactual_divergence(
            h.to(dtype).double(), w.to(dtype).double(), dl.to(dtype).double(),
            bias=b.to(dtype).double() if use_bias else None, kind=kind, **opts)
        div.append((_run_div(case, i).cpu(), exact.cpu()))
    stats = [tuple(t.cpu() for t in _run_stats(case, 100 + i)) for i, case in enumerate(_stats_cases())]
    return div, stats


def _close(got, exp, rtol, atol, what, same_dtype=True):
    got = got.cpu()
    err = (got.double() - exp.double()).abs()
    tol = rtol * exp.double().abs() + atol
    assert got.shape == exp.shape, (what, got.shape, exp.shape)
    assert got.dtype == exp.dtype or not same_dtype, (what, got.dtype, exp.dtype)
    assert bool((err <= tol).all()), f"{what}: worst error / tolerance {float((err / tol).max()):.3g}"


def _worker(rank: int, world: int, sizes: list[int], expected) -> None:
    import torch.distributed as dist

    offset = sum(sizes[:rank])
    cut = slice(offset, offset + sizes[rank])
    local = dict(w_slice=lambda w: w[cut], b_slice=lambda b: b[cut], process_group=True)
    div_expected, stats_expected = expected
    outputs = []
    for i, (case, (exp, exact)) in enumerate(zip(_div_cases(), div_expected)):
        got = _run_div(case, i, **local)
        what = f"P={world} rank {rank} divergence case {case[:5]} {sorted(case[5])}"
        if case[1] == torch.float32:
            _close(got, exp, 1e-4, 1e-9, what + " vs unsharded")
            _close(got, exact, 2e-3, 2e-8, what + " vs float64 reference", same_dtype=False)
        else:
            _close(got, exp, 1e-9, 1e-13, what)
        outputs.append(got.double().flatten())
    for i, (case, exp) in enumerate(zip(_stats_cases(), stats_expected)):
        got = _run_stats(case, 100 + i, **local)
        for field, a, b in zip(("row_entropy", "row_kl", "mixture_entropy", "mean_entropy", "js"),
                               got, exp):
            what = f"P={world} rank {rank} stats case {case[0]} {sorted(case[3])} {field}"
            if case[1] == torch.float32:
                _close(a, b, 2e-6, 2e-6, what)
            else:
                _close(a, b, 1e-9, 1e-13, what)
            outputs.append(a.double().flatten())
    # every rank holds the same bits
    mine = torch.cat(outputs).cpu()
    every = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(every, mine)
    for r, theirs in enumerate(every):
        assert torch.equal(theirs, every[0]), f"rank {r}'s outputs differ from rank 0's"


@pytest.fixture(scope="module")
def expected():
    return _expected()


@pytest.mark.parametrize("world", [2, 4])
def test_sharded_ops_match_unsharded(world, expected):
    run_gloo(_worker, world, LAYOUTS[world], expected)


def test_process_group_without_distributed_raises():
    h, w, b, dl = _inputs(0, 2, 0.05)
    with pytest.raises(ValueError, match="torch.distributed is not initialised"):
        counterfactual_divergence(h, w[:50], dl, process_group=True)
    with pytest.raises(ValueError, match="torch.distributed is not initialised"):
        group_distribution_stats(h, w[:50], group_ids=torch.zeros(R, dtype=torch.long),
                                 process_group=True)
