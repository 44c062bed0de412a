"""The triton backend's SPEC §3 divergence as issue 18 designs it (gccpo_kernels/triton/
divergence.py): per chunk of C rows, one GEMM of the stacked latents and perturbations (one read
of W), then the statistics and integrand kernels over the float32 chunk.

Checked here: the GEMM FLOPs are exactly one pass over W (2 (M + 1) C_pad V D); several chunks
(the last padded) and more perturbations than one kernel launch takes (M > MAX_MP) agree with the
float64 reference for every divergence with a kernel, capped and uncapped. Batch invariance and
the index arithmetic are in test_guarantees_invariance.py / test_guarantees_extremes.py.
"""

from __future__ import annotations

import pytest
import torch

import gccpo_kernels as gk
from gccpo_kernels._backend import triton_unavailable_reason
from tests.conftest import DEVICE, lm_head
from tests.kernels._flops import GemmFlops

pytestmark = pytest.mark.skipif(triton_unavailable_reason() is not None,
                                reason=f"{triton_unavailable_reason()}")

R, D, V, M = 45, 32, 700, 6


def _problem(dtype, seed=0):
    h, w, b = lm_head(R, D, V, seed=seed, dtype=dtype)
    dl = gk.perturb_latents(h, M, sigma=0.2, generator=torch.Generator(device=h.device).manual_seed(seed + 7))
    return h, w, b, dl


def _small_budget(monkeypatch, dtype) -> int:
    from gccpo_kernels.triton import divergence as Dv

    monkeypatch.setenv("GCCPO_WORKSPACE_MB", repr((300 << 10) / (1 << 20)))
    rows = Dv.chunk_rows(V, M, D, dtype, DEVICE)
    assert rows < R, rows
    return rows


def test_flops_one_pass_over_w(monkeypatch):
    rows = _small_budget(monkeypatch, torch.float32)
    h, w, b, dl = _problem(torch.float32)
    with GemmFlops() as f:
        gk.counterfactual_divergence(h, w, dl, bias=b, kind="js", backend="triton")
    n_pad = -(-R // rows) * rows
    assert f.flops == 2 * (M + 1) * n_pad * V * D, f.flops / (2 * (M + 1) * R * V * D)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-5), (torch.bfloat16, 2e-5)])
@pytest.mark.parametrize("softcap", [None, 8.0])
def test_chunks_and_blocks_match_float64(monkeypatch, dtype, tol, softcap):
    """Several chunks (45 rows, the last one padded) and M = 6 perturbations (two kernel blocks
    of at most four) against the float64 reference on the same (rounded) inputs."""
    _small_budget(monkeypatch, dtype)
    h, w, b, dl = _problem(dtype)
    for kind in ("kl", "js", "tv"):
        got = gk.counterfactual_divergence(h, w, dl, bias=b, kind=kind, backend="triton",
                                           softcap=softcap, temperature=0.9)
        ref = gk.counterfactual_divergence(h.double(), w.double(), dl.double(), bias=b.double(),
                                           kind=kind, backend="reference", softcap=softcap,
                                           temperature=0.9)
        err = ((got.double() - ref).abs() / (ref.abs() + 1e-6)).max()
        assert err < tol, (kind, float(err))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rows_are_batch_invariant_across_chunks(monkeypatch, dtype):
    """Several chunks and two perturbation blocks: a row's M divergences are bitwise the same
    alone, in a slice that moves it to another chunk and position, or permuted (fixed-shape chunk
    GEMMs through zero-padded staging)."""
    _small_budget(monkeypatch, dtype)
    h, w, b, dl = _problem(dtype, seed=5)
    run = lambda idx: gk.counterfactual_divergence(h[idx], w, dl[idx], bias=b, kind="js",  # noqa: E731
                                                   backend="triton", softcap=8.0)
    full = run(torch.arange(R, device=h.device))
    for lo, hi in ((0, 1), (44, 45), (5, 33), (13, 15)):
        assert torch.equal(run(torch.arange(lo, hi, device=h.device)), full[lo:hi]), (lo, hi)
    perm = torch.randperm(R, generator=torch.Generator().manual_seed(6)).to(h.device)
    assert torch.equal(run(perm), full[perm])
