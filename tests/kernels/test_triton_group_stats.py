"""The triton backend's SPEC §4 group statistics as issue 18 designs it (gccpo_kernels/triton/
group_stats.py): whole groups packed into chunks, one GEMM per chunk (one read of W), the row
statistics, mixture and row-KL passes over the float32 chunk; a group larger than a chunk
streamed alone (two passes over W).

Checked here: how groups are packed; the GEMM FLOPs (2 C V D per chunk of packed groups, 4 C V D
per chunk of a streamed group, none for empty groups); float64 agreement with packed, empty and streamed groups, bias
and soft cap, fp32 and bf16; bitwise batch invariance of a group's statistics across chunk
layouts (alone, after other groups, streamed or not).
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

D, V = 32, 500
# groups of 3, 0, 5, 12, 1 and 25 rows: with 18-row chunks, [3, 0, 5] pack, [12, 1] pack, 25 streams
OFFSETS = [0, 3, 3, 8, 20, 21, 46]


def _rows_for(monkeypatch, dtype, rows: int = 18) -> int:
    from gccpo_kernels.triton import logit_epilogues as E

    per_row = V * 4 + D * (torch.finfo(dtype).bits // 8 + 4)  # as chunk_rows counts it
    monkeypatch.setenv("GCCPO_WORKSPACE_MB", repr((rows * per_row + per_row // 2) / (1 << 20)))
    got = E.chunk_rows(V, D, dtype, DEVICE, gradient=False)
    assert got == rows, got
    return got


def test_plan_packs_whole_groups_and_streams_big_ones():
    from gccpo_kernels.triton.group_stats import plan_chunks

    assert plan_chunks(OFFSETS, 18) == [(0, 3), (3, 5), (5, 6)]
    assert plan_chunks([0, 0, 0], 4) == [(0, 2)]
    assert plan_chunks([0, 4, 8], 4) == [(0, 1), (1, 2)]
    assert plan_chunks([0, 9, 10], 4) == [(0, 1), (1, 2)]


def test_flops_one_gemm_per_packed_chunk(monkeypatch):
    rows = _rows_for(monkeypatch, torch.float32)
    h, w, b = lm_head(OFFSETS[-1], D, V)
    with GemmFlops() as f:
        gk.group_distribution_stats(h, w, group_offsets=torch.tensor(OFFSETS, device=DEVICE), bias=b,
                                    backend="triton")
    streamed_chunks = -(-25 // rows)
    assert f.flops == 2 * rows * V * D * (2 + 2 * streamed_chunks), f.flops / (2 * rows * V * D)


def test_empty_groups_cost_no_gemm(monkeypatch):
    """Chunks holding only empty groups (before, between or after a streamed group) run no GEMM,
    and their groups' statistics are zeros."""
    rows = _rows_for(monkeypatch, torch.float32)
    h, w, b = lm_head(30, D, V)
    counts = []
    for cuts in ([0, 30], [0, 0, 30], [0, 0, 0, 30, 30]):
        with GemmFlops() as f:
            out = gk.group_distribution_stats(h, w, group_offsets=torch.tensor(cuts, device=DEVICE),
                                              bias=b, backend="triton")
        counts.append(f.flops)
        sizes = torch.tensor(cuts).diff()
        for per_group in out[2:]:
            assert torch.equal(per_group[(sizes == 0).to(per_group.device)].cpu(),
                               torch.zeros(int((sizes == 0).sum())))
    assert counts == [2 * rows * V * D * 2 * -(-30 // rows)] * 3, counts


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("softcap", [None, 9.0])
def test_packed_and_streamed_groups_match_float64(monkeypatch, dtype, softcap):
    _rows_for(monkeypatch, dtype)
    h, w, b = lm_head(OFFSETS[-1], D, V, dtype=dtype, seed=2)
    off = torch.tensor(OFFSETS, device=DEVICE)
    got = gk.group_distribution_stats(h, w, group_offsets=off, bias=b, backend="triton",
                                      softcap=softcap, temperature=0.8)
    ref = gk.group_distribution_stats(h.double(), w.double(), group_offsets=off, bias=b.double(),
                                      backend="reference", softcap=softcap, temperature=0.8)
    for name, a, r in zip(("row_entropy", "row_kl", "mixture_entropy", "mean_entropy", "js"), got, ref):
        err = ((a.double() - r).abs() / (r.abs() + 1e-6)).max()
        assert err < 2e-5, (name, float(err))


def test_a_group_is_the_same_in_any_chunk_layout(monkeypatch):
    """The 12-row group alone, after other groups (a different packing and position), and the
    25-row streamed group alone: bitwise the same statistics."""
    _rows_for(monkeypatch, torch.float32)
    h, w, b = lm_head(OFFSETS[-1], D, V, seed=4)

    def stats(lo, hi, cuts):
        off = torch.tensor([0, *cuts, hi - lo], device=DEVICE)
        return gk.group_distribution_stats(h[lo:hi], w, group_offsets=off, bias=b, backend="triton")

    full = stats(0, 46, OFFSETS[1:-1])
    alone = stats(8, 20, [])
    for i, (a, f) in enumerate(zip(alone, full)):
        want = f[8:20] if a.shape[0] == 12 else f[3:4]
        assert torch.equal(a, want), i
    moved = stats(3, 21, [5, 17])  # groups of 5, 12, 1: the 12-row group now starts at row 5
    assert torch.equal(moved[1][5:17], full[1][8:20]) and torch.equal(moved[4][1], full[4][3])
    big = stats(21, 46, [])
    assert torch.equal(big[1], full[1][21:46]) and torch.equal(big[4][0], full[4][5])
