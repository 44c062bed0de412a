"""csrc/row_stats.c through gccpo_kernels._native: the row statistics and the in-place
exponentials against float64, the edges (tails under 16 columns, strided rows, underflow, NaN,
thread splits), the switch; and the fused loss's CPU pass that uses them (native statistics, and
for a log-prob-only loss the per-row scale folded into the GEMMs) against float64 autograd."""

from __future__ import annotations

import ctypes
import math
import os
import pathlib
import shlex
import subprocess
import sysconfig

import pytest
import torch

from gccpo_kernels import _native
from gccpo_kernels._logits import LogitParams
from gccpo_kernels.chunked import loss_grad
from tests._strict import STRICT

F64 = torch.float64
ULP = 2.0 ** -23
FLUSHED = math.exp(-87.3) * 1.0001  # the largest e^x the kernel writes as 0 (x < -87.3)

needs_native = pytest.mark.skipif(
    not _native.available(),
    reason="the compiled row statistics (csrc/row_stats.c) are not built: `pip install -e .` "
           "with a C compiler builds them")


def test_built_under_the_test_command():
    """tests/run.sh installs the package with a C compiler present: the library must load (else
    every float32 CPU loss would quietly take the slower torch passes)."""
    if not STRICT:
        pytest.skip("checked under tests/run.sh only (GCCPO_TEST_STRICT=1), which must build it")
    assert _native.available(), "gccpo_kernels._row_stats did not build or load"
    assert _native.isa() in _native.ISA_NAMES.values()


def _variants() -> list[str]:
    """Every instruction-set variant this CPU runs (the dispatcher picks the best; the others are
    forced, so that each is tested where it can run)."""
    best = _native.isa()
    order = ["generic", "avx2", "avx512"]
    return order[: order.index(best) + 1] if best else ["generic"]


@pytest.fixture(params=_variants())
def variant(request):
    """Run the test under one instruction-set variant, then give the dispatcher back."""
    if not _native.available():
        pytest.skip("the compiled row statistics (csrc/row_stats.c) are not built: `pip install "
                    "-e .` with a C compiler builds them")
    assert _native.force_isa(request.param) == request.param
    yield request.param
    _native.force_isa(None)


def _ulp(x: torch.Tensor) -> torch.Tensor:
    """float32's spacing at each float64 value (the gap above its float32 rounding)."""
    f = x.float().abs()
    return (torch.nextafter(f, torch.tensor(float("inf"))) - f).double()


def test_log_sum_exp_is_correctly_rounded(variant):
    """The double-lane sums make lse float32's correctly rounded value in all but rare rows
    (the float32 differences z - m the exponentials read are rounded, as in torch's passes).
    Measured on these 512 rows: 100 % (AVX-512, AVX2), 99.8 % (generic); torch's passes 91 %."""
    z = torch.randn(512, 32000, generator=torch.Generator().manual_seed(11)) * 3
    want = torch.logsumexp(z.double(), dim=1).float()
    lse, _, _ = _native.row_stats(z.clone())
    exact = float((lse[:, 0] == want).double().mean())
    assert exact >= 0.98, exact


def _reference(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """float64 lse, entropy and max of each row of the float32 ``z``."""
    zd = z.double()
    m = zd.amax(dim=1)
    lse = torch.logsumexp(zd, dim=1)
    p = torch.softmax(zd, dim=1)
    ent = -(p * torch.log_softmax(zd, dim=1)).nan_to_num(0.0).sum(dim=1)
    return lse, ent, m


@pytest.mark.parametrize("rows,vocab,pad", [(1, 1, 0), (3, 15, 0), (5, 17, 3), (7, 1024, 0),
                                            (9, 1041, 5), (4, 32000, 0), (2, 5000, 64)])
@pytest.mark.parametrize("spread", [1.0, 30.0])
def test_row_stats_match_float64(rows, vocab, pad, spread, variant):
    """lse and entropy within float32 rounding of float64 (tails under 16 columns, strided rows),
    and the written e^{z - m} within 4 ulp of float64's exp of the same float32 difference."""
    g = torch.Generator().manual_seed(rows * 131 + vocab)
    base = torch.randn(rows, vocab + pad, generator=g) * spread
    z = base[:, :vocab]
    lse_ref, ent_ref, m_ref = _reference(z)
    lse, ent, m = _native.row_stats(z.clone(), write_exp=False)
    torch.testing.assert_close(m[0], m_ref.float(), rtol=0, atol=0)
    assert ((lse[:, 0].double() - lse_ref).abs() <= _ulp(lse_ref)).all()  # within 1 ulp
    assert ((ent[:, 0].double() - ent_ref).abs() <= 2e-6 * (1 + ent_ref)).all()
    assert (ent >= 0).all() and (ent <= math.log(vocab) + 1e-6).all()

    padded = base.clone()
    lse2, ent2, m2 = _native.row_stats(padded[:, :vocab], write_exp=True)
    assert torch.equal(lse2, lse) and torch.equal(ent2, ent) and torch.equal(m2, m)
    d = (z - m[0][:, None]).double()  # the same float32 difference the kernel forms
    want = torch.exp(d)
    got = padded[:, :vocab].double()
    assert ((got - want).abs() <= 4 * ULP * want + FLUSHED).all()
    assert torch.equal(padded[:, vocab:], base[:, vocab:])  # the padding is untouched


def test_exponential_over_its_whole_range(variant):
    """e^x on a dense grid of [-87.3, 0]: within 2 ulp of float64; 0 below -87.3 (no
    subnormals); a NaN row gives NaN statistics, a -inf entry gives 0."""
    x = torch.cat([torch.linspace(-87.3, 0.0, 200_001), torch.tensor([-1e-30, -0.3465736, -87.29,
                                                                      -87.31, -88.0, -103.0])])
    row = torch.cat([torch.zeros(1), x])[None].clone()  # max 0: e = exp(x) exactly as written
    _native.row_stats(row, write_exp=True)
    e, want = row[0, 1:].double(), torch.exp(x.double())
    normal = x >= -87.3
    assert ((e[normal] - want[normal]).abs() <= 2 * ULP * want[normal]).all()
    assert (e[~normal] == 0).all()

    z = torch.randn(3, 40)
    z[1, 7] = float("nan")
    z[2, :39] = float("-inf")
    only = float(z[2, 39])
    lse, ent, m = _native.row_stats(z, write_exp=True)
    assert torch.isnan(lse[1]).all() and torch.isnan(ent[1]).all() and torch.isnan(m[0, 1])
    assert torch.isfinite(lse[[0, 2]]).all()
    assert lse[2, 0] == only and ent[2, 0] == 0 and (z[2, :39] == 0).all() and z[2, 39] == 1


@pytest.mark.parametrize("threads", [2, 3, 7])
def test_each_row_is_the_same_bits_whatever_the_thread_split(threads, variant):
    z = torch.randn(13, 2049, generator=torch.Generator().manual_seed(5)) * 4
    one = _native.row_stats(z.clone(), write_exp=False, threads=1)
    many = _native.row_stats(z.clone(), write_exp=False, threads=threads)
    for a, b in zip(one, many):
        assert torch.equal(a, b)
    lone, lmany = z.clone(), z.clone()
    _native.row_stats(lone, write_exp=True, threads=1)
    _native.row_stats(lmany, write_exp=True, threads=threads)
    assert torch.equal(lone, lmany)


@needs_native
def test_what_it_refuses_and_the_switch(monkeypatch):
    assert _native.usable_for(torch.zeros(4, 8))
    for bad in (torch.zeros(4, 8, dtype=F64), torch.zeros(8, 4).T, torch.zeros(4, 0),
                torch.zeros(2, 3, 4), torch.zeros(4, 8, dtype=torch.bfloat16),
                torch.zeros(4, 8, requires_grad=True)):
        assert not _native.usable_for(bad)
        with pytest.raises(RuntimeError, match="float32 CPU matrix"):
            _native.row_stats(bad)
    lse, ent, m = _native.row_stats(torch.zeros(0, 8))
    assert lse.shape == (0, 1) and ent.shape == (0, 1) and m.shape == (1, 0)
    monkeypatch.setenv(_native.ENV_VAR, "0")
    assert not _native.available() and not _native.usable_for(torch.zeros(4, 8))
    assert _native.isa() is None


@needs_native
def test_the_build_without_openmp_gives_the_same_bits(tmp_path):
    """setup.py falls back to POSIX threads where the compiler has no OpenMP: that build (made
    here with the compiler that built the extension) gives every row the same bits."""
    cc = shlex.split(os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc")
    src = pathlib.Path(__file__).resolve().parents[2] / "csrc" / "row_stats.c"
    out = tmp_path / "row_stats_pthreads.so"
    subprocess.run([*cc, "-O3", "-Wno-psabi", "-shared", "-fPIC", "-pthread",
                    f"-I{sysconfig.get_paths()['include']}", str(src), "-o", str(out), "-lm"],
                   check=True, capture_output=True)
    lib = _native.bind(ctypes.CDLL(str(out)))
    assert not any("gomp" in line for line in
                   subprocess.run(["ldd", str(out)], capture_output=True, text=True).stdout
                   .splitlines())
    z = torch.randn(11, 3001, generator=torch.Generator().manual_seed(2)) * 6
    for write in (False, True):
        a, b = z.clone(), z.clone()
        want = _native.row_stats(a, write_exp=write, threads=3)
        got = _native.call(lib, b, write, 3)
        for x, y in zip(got, want):
            assert torch.equal(x, y)
        assert torch.equal(a, b)


# --- the fused loss's CPU pass with the compiled statistics ---------------------------------

def _problem(n=37, d=12, v=1500, *, seed=0, bias=True, wdtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=g, dtype=F64)
    w = torch.randn(v, d, generator=g, dtype=F64) * 1.5 / math.sqrt(d)
    b = 0.5 * torch.randn(v, generator=g, dtype=F64) if bias else None
    y = torch.randint(0, v, (n,), generator=g)
    y[3], y[11] = -1, v  # out-of-range ids (validate=False): no one-hot term
    a = torch.randn(n, generator=g, dtype=F64)   # d loss / d logp
    c = torch.randn(n, generator=g, dtype=F64)   # d loss / d entropy
    return h, w, b, y, a, c


def _float64_truth(h, w, b, y, a, c, params, with_entropy):
    """Gradients of sum a_i logp_i (+ sum c_i H_i) through float64 autograd on full logits."""
    h, w = h.clone().requires_grad_(), w.clone().requires_grad_()
    b = None if b is None else b.clone().requires_grad_()
    u = (h @ w.T + (0 if b is None else b)) * params.scale
    zz = u if params.softcap is None else params.softcap * torch.tanh(u / params.softcap)
    logq = torch.log_softmax(zz, dim=1)
    inside = (y >= 0) & (y < w.shape[0])
    logp = torch.where(inside, logq.gather(1, y.clamp(0, w.shape[0] - 1)[:, None])[:, 0]
                       + torch.logsumexp(zz, 1) - torch.logsumexp(zz, 1), -torch.logsumexp(zz, 1))
    ent = -(logq.exp() * logq).sum(1)
    loss = (a * logp).sum() + ((c * ent).sum() if with_entropy else 0)
    loss.backward()
    return logp.detach(), ent.detach(), h.grad, w.grad, None if b is None else b.grad


@needs_native
@pytest.mark.filterwarnings("error")  # e.g. a scratch block resized by an out= op
@pytest.mark.parametrize("case", ["logp-only", "logp-only-nobias", "entropy", "softcap",
                                  "scaled", "float16-head", "bfloat16-head", "one-row-chunks",
                                  "entropy-blocks", "softcap-blocks"])
def test_loss_pass_with_native_statistics_matches_float64(case, monkeypatch):
    """forward_with_grad at float32 on the CPU with the compiled statistics: logp, entropy and
    every gradient within float32 rounding of float64 autograd, for each way through the pass
    (the folded per-row scale for a log-prob-only loss; the torch gradient pass after native
    statistics for an entropy-reading or soft-capped loss, also over several cache blocks; a
    bfloat16 head's gradient from the exponentials, rounded to bfloat16 for its GEMMs); and the
    native pieces are the ones that ran."""
    h, w, b, y, a, c = _problem(bias=case != "logp-only-nobias")
    params = {"softcap": LogitParams(1.0, 1.0, 3.0), "softcap-blocks": LogitParams(1.0, 1.0, 3.0),
              "scaled": LogitParams(0.7, 1.3, None)}.get(case, LogitParams())
    with_entropy = case.startswith("entropy")
    if case.endswith("-blocks"):  # 64-column scratch blocks: 24 per row
        monkeypatch.setattr(loss_grad, "BLOCK_BYTES", 37 * 64 * 4)
    wdtype = {"float16-head": torch.float16, "bfloat16-head": torch.bfloat16}.get(case, torch.float32)
    if wdtype != torch.float32:  # the truth of the inputs the pass actually reads
        h, w = h.to(wdtype).double(), w.to(wdtype).double()
    budget = 1500 * 4 if case == "one-row-chunks" else None
    calls = {"stats": 0, "deferred": 0}
    real_stats, real_deferred = _native.row_stats, loss_grad._deferred_grads_
    monkeypatch.setattr(_native, "row_stats",
                        lambda *x, **k: calls.__setitem__("stats", calls["stats"] + 1)
                        or real_stats(*x, **k))
    monkeypatch.setattr(loss_grad, "_deferred_grads_",
                        lambda *x: calls.__setitem__("deferred", calls["deferred"] + 1)
                        or real_deferred(*x))
    grads = lambda r0, r1, lp, en: (a[r0:r1].float(),  # noqa: E731
                                    c[r0:r1].float() if with_entropy else None)
    out = loss_grad.forward_with_grad(
        h.to(wdtype), w.to(wdtype), None if b is None else b.float(), y, params, grads,
        (True, True, b is not None), budget=budget, reads_entropy=with_entropy)
    want = _float64_truth(h, w, b, y, a, c, params, with_entropy)
    for name, got, ref in zip(("logp", "entropy", "dh", "dw", "db"), out, want):
        if ref is None:
            assert got is None, name
            continue
        err = (got.double() - ref).abs().max() / ref.abs().max()
        # a bfloat16 head multiplies a bfloat16 copy of the logit gradient (d bias sums the
        # float32 one): 2^-9 per element
        tol = 4e-3 if wdtype == torch.bfloat16 and name in ("dh", "dw") else 2e-6
        assert err <= tol, (name, float(err))
    assert calls["stats"] == (37 if budget else 1)
    folded = not (with_entropy or params.softcap or wdtype == torch.bfloat16)
    assert calls["deferred"] == (calls["stats"] if folded else 0)


@needs_native
@pytest.mark.parametrize("needs", [(True, False, False), (False, True, False), (False, False, True)])
def test_folded_scale_for_each_gradient_alone(needs, monkeypatch):
    """The folded path gives each of d hidden, d weight, d bias alone (the others None), equal
    to the torch passes' result to float32 rounding."""
    h, w, b, y, a, _ = _problem(seed=4)
    grads = lambda r0, r1, lp, en: (a[r0:r1].float(), None)  # noqa: E731
    args = (h.float(), w.float(), b.float(), y, LogitParams(), grads, needs)
    folded = []
    real = loss_grad._deferred_grads_
    monkeypatch.setattr(loss_grad, "_deferred_grads_", lambda *x: folded.append(1) or real(*x))
    got = loss_grad.forward_with_grad(*args, reads_entropy=False)
    assert folded == [1]
    monkeypatch.setenv(_native.ENV_VAR, "0")
    want = loss_grad.forward_with_grad(*args, reads_entropy=False)
    assert folded == [1]  # switched off: the torch passes
    for k, (x, ref) in enumerate(zip(got, want)):
        if ref is None:
            assert x is None, k
        else:
            assert ((x - ref).abs().max() / ref.abs().max()) <= 2e-6, k
