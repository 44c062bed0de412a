"""SPEC §1: fused_linear_logprobs on every backend against the float64 reference.

Tolerances say what they are for:
- float64 (torch backend): rounding only, 1e-9 relative.
- float32: the logits carry ~1e-7 relative error per product summed over D; log-probs and entropy
  are compared at 5e-5 absolute (values are O(1..10)), gradients at 1e-4 relative to their max.
- bfloat16 inputs: compared with the reference on the same bf16 values upcast to float64, so only
  our arithmetic is measured: forward as float32 (products of bf16 are exact in fp32 accumulation),
  gradients at 2e-2 relative (the logit gradient and dh are rounded to bf16, as in every bf16 LM).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from gccpo_kernels import FusedLinearLogprobs, fused_linear_logprobs
from gccpo_kernels import reference as ref
from tests.conftest import DEVICE, available_backends

FAST_BACKENDS = [b for b in available_backends() if b != "reference"]


def make(n, d, v, dtype, *, bias=False, seed=0, scale=0.5, peaked=False):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=g, dtype=torch.float64)
    w = torch.randn(v, d, generator=g, dtype=torch.float64) * scale / d ** 0.5 * 4
    if peaked:  # a trained LM head: a few tokens dominate
        w[: max(1, v // 50)] *= 4
    b = torch.randn(v, generator=g, dtype=torch.float64) if bias else None
    y = torch.randint(0, v, (n,), generator=g)
    cast = lambda t: None if t is None else t.to(dtype).to(DEVICE)  # noqa: E731
    return cast(h), cast(w), cast(b), y.to(DEVICE)


def ref64(h, w, y, b=None, **kw):
    """Reference on float64 copies of the (possibly low-precision) inputs, with gradients."""
    h64 = h.detach().double().requires_grad_()
    w64 = w.detach().double().requires_grad_()
    b64 = None if b is None else b.detach().double().requires_grad_()
    logp, ent = ref.linear_logprobs(h64, w64, y, bias=b64, **kw)
    return logp, ent, (h64, w64, b64)


def grads(outputs, inputs, seed=1):
    logp, ent = outputs
    g = torch.Generator().manual_seed(seed)
    gl = torch.randn(logp.shape, generator=g, dtype=torch.float64).to(logp.device)
    ge = torch.randn(logp.shape, generator=g, dtype=torch.float64).to(logp.device)
    loss = (logp.double() * gl).sum() + (ent.double() * ge).sum()
    present = [t for t in inputs if t is not None]
    return torch.autograd.grad(loss, present)


def rel_err(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


TOLS = {
    torch.float64: dict(fwd=1e-9, grad=1e-9),
    torch.float32: dict(fwd=5e-5, grad=1e-4),
    torch.bfloat16: dict(fwd=5e-5, grad=2e-2),
}

SHAPES = [  # (N, D, V): N=1, D not a multiple of 16, V not a multiple of any block
    (1, 64, 1000),
    (37, 72, 1000),
    (130, 40, 257),
]


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("opts", [
    dict(),
    dict(bias=True, temperature=0.7),
    dict(bias=True, temperature=1.3, logit_scale=0.8, softcap=4.0),
])
def test_matches_reference(backend, dtype, shape, opts):
    if backend == "triton" and dtype == torch.float64:
        pytest.skip("the triton backend takes 16/32-bit inputs; float64 runs on the torch backend")
    n, d, v = shape
    opts = dict(opts)
    h, w, b = make(n, d, v, dtype, bias=opts.pop("bias", False))[:3]
    y = make(n, d, v, dtype)[3]
    if n > 3:
        y[::5] = -100  # some ignored rows
    h.requires_grad_()
    w.requires_grad_()
    if b is not None:
        b.requires_grad_()
    logp, ent = fused_linear_logprobs(h, w, y, bias=b, return_entropy=True, backend=backend, **opts)
    assert logp.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert ent.dtype == logp.dtype and logp.shape == (n,)
    rlogp, rent, rin = ref64(h, w, y, b, **opts)
    tol = TOLS[dtype]
    assert (logp.double() - rlogp).abs().max().item() <= tol["fwd"] * max(1.0, rlogp.abs().max().item())
    assert (ent.double() - rent).abs().max().item() <= tol["fwd"] * max(1.0, rent.abs().max().item())
    ignored = y == -100
    assert torch.all(logp[ignored] == 0) and torch.all(ent[ignored] == 0)
    ours = grads((logp, ent), (h, w, b))
    theirs = grads((rlogp, rent), rin)
    for name, a, r in zip(("hidden", "weight", "bias"), ours, theirs):
        assert a.dtype == dtype
        assert rel_err(a, r) <= tol["grad"], name
    if ignored.any():
        assert torch.all(ours[0][ignored] == 0), "ignored rows must get exactly zero gradient"


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_large_vocab_not_multiple_of_blocks(backend):
    """V = 50257 (GPT-2's vocabulary): splits and tiles end mid-block."""
    h, w, _, y = make(3, 64, 50257, torch.float32, peaked=True)
    h.requires_grad_()
    logp, ent = fused_linear_logprobs(h, w, y, return_entropy=True, backend=backend)
    rlogp, rent, rin = ref64(h, w, y)
    assert torch.all(logp <= 0)
    assert (logp.double() - rlogp).abs().max() < 5e-5
    assert (ent.double() - rent).abs().max() < 5e-5
    (dh,) = torch.autograd.grad(logp.sum(), [h])
    (rdh,) = torch.autograd.grad(rlogp.sum(), [rin[0]])
    assert rel_err(dh, rdh) < 1e-4


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("budget_mb", ["0.05", "0.001"])
def test_chunked_workspace_gives_same_result(backend, budget_mb, monkeypatch):
    """Tiny workspace budgets force many row and vocabulary tiles (and, at 1 KB, several forward
    launches of the triton split statistics)."""
    h, w, b, y = make(150, 64, 300, torch.float32, bias=True)
    h.requires_grad_()
    w.requires_grad_()
    out_big = fused_linear_logprobs(h, w, y, bias=b, return_entropy=True, backend=backend)
    g_big = grads(out_big, (h, w))
    monkeypatch.setenv("GCCPO_WORKSPACE_MB", budget_mb)
    out_small = fused_linear_logprobs(h, w, y, bias=b, return_entropy=True, backend=backend)
    g_small = grads(out_small, (h, w))
    for a, c in zip(out_big + g_big, out_small + g_small):
        assert rel_err(c, a) < 1e-5


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_leading_dims_and_module(backend):
    h, w, _, y = make(12, 64, 200, torch.float32)
    h3, y3 = h.reshape(3, 4, 64), y.reshape(3, 4)
    mod = FusedLinearLogprobs(temperature=0.9, return_entropy=True, backend=backend)
    logp, ent = mod(h3, w, y3)
    assert logp.shape == (3, 4) and ent.shape == (3, 4)
    flat, fent = fused_linear_logprobs(h, w, y, temperature=0.9, return_entropy=True, backend=backend)
    torch.testing.assert_close(logp.reshape(-1), flat, rtol=0, atol=1e-6)
    assert "temperature=0.9" in repr(mod)
    no_ent = fused_linear_logprobs(h, w, y, backend=backend)
    assert no_ent[1] is None


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_strided_inputs(backend):
    """Views with non-unit strides (a column of a [N, 2] id tensor, every other bias entry, a
    transposed-back weight) give the same result as dense copies."""
    h, w, b, y = make(20, 64, 300, torch.float32, bias=True)
    ys = torch.stack([y, y.flip(0)], dim=1)[:, 0]
    bs = torch.stack([b, -b], dim=1)[:, 0]
    ws = w.T.contiguous().T
    hs = torch.cat([h, h], dim=1)[:, :64]
    assert not (ys.is_contiguous() or bs.is_contiguous() or ws.is_contiguous() or hs.is_contiguous())
    dense = fused_linear_logprobs(h, w, y, bias=b, return_entropy=True, backend=backend)
    strided = fused_linear_logprobs(hs, ws, ys, bias=bs, return_entropy=True, backend=backend)
    for a, c in zip(dense, strided):
        torch.testing.assert_close(c, a, rtol=0, atol=1e-6)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_all_rows_ignored_and_empty(backend):
    h, w, _, y = make(5, 64, 100, torch.float32)
    h.requires_grad_()
    w.requires_grad_()
    y = torch.full_like(y, -100)
    logp, ent = fused_linear_logprobs(h, w, y, return_entropy=True, backend=backend)
    assert torch.all(logp == 0) and torch.all(ent == 0)
    dh, dw = torch.autograd.grad(logp.sum() + ent.sum(), [h, w])
    assert torch.all(dh == 0) and torch.all(dw == 0)
    empty = torch.empty(0, 64, device=DEVICE, requires_grad=True)
    logp, ent = fused_linear_logprobs(empty, w, y[:0], return_entropy=True, backend=backend)
    assert logp.shape == (0,) and ent.shape == (0,)
    (de,) = torch.autograd.grad(logp.sum(), [empty], allow_unused=True)
    assert de is None or de.shape == (0, 64)


@pytest.mark.skipif("triton" not in FAST_BACKENDS, reason="triton is not importable here")
def test_triton_batch_invariance():
    """A row's logp and entropy are bitwise the same alone, in a batch, and at another position."""
    h, w, b, y = make(70, 64, 600, torch.float32, bias=True)
    full = fused_linear_logprobs(h, w, y, bias=b, return_entropy=True, backend="triton")
    for i in (0, 5, 69):
        alone = fused_linear_logprobs(h[i:i + 1], w, y[i:i + 1], bias=b, return_entropy=True,
                                      backend="triton")
        assert torch.equal(alone[0], full[0][i:i + 1]) and torch.equal(alone[1], full[1][i:i + 1])
    perm = torch.randperm(70, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    shuffled = fused_linear_logprobs(h[perm], w, y[perm], bias=b, return_entropy=True,
                                     backend="triton")
    assert torch.equal(shuffled[0], full[0][perm]) and torch.equal(shuffled[1], full[1][perm])
    again = fused_linear_logprobs(h, w, y, bias=b, return_entropy=True, backend="triton")
    assert torch.equal(again[0], full[0]) and torch.equal(again[1], full[1])


def test_extreme_logits_stay_finite():
    """Temperature 1e-3 turns O(10) logits into O(1e4): log-sum-exp must stay finite and logp <= 0."""
    h, w, _, y = make(9, 64, 500, torch.float32)
    for backend in FAST_BACKENDS:
        logp, ent = fused_linear_logprobs(h, w, y, temperature=1e-3, return_entropy=True,
                                          backend=backend)
        assert torch.isfinite(logp).all() and torch.isfinite(ent).all()
        assert torch.all(logp <= 0) and torch.all(ent >= -1e-6)


# ----------------------------------------------------------------------------- input errors


def test_bad_inputs_raise_clear_errors():
    h, w, b, y = make(4, 16, 50, torch.float32, bias=True)
    with pytest.raises(ValueError, match="last dimension"):
        fused_linear_logprobs(h, w.T.contiguous(), y)
    with pytest.raises(TypeError, match="share a dtype"):
        fused_linear_logprobs(h.double(), w, y)
    with pytest.raises(TypeError, match="int64"):
        fused_linear_logprobs(h, w, y.float())
    with pytest.raises(ValueError, match="targets shape"):
        fused_linear_logprobs(h, w, y[:3])
    bad = y.clone()
    bad[1] = 50
    with pytest.raises(ValueError, match=r"outside \[0, 50\)"):
        fused_linear_logprobs(h, w, bad)
    bad[1] = -1
    with pytest.raises(ValueError, match="ignore_index"):
        fused_linear_logprobs(h, w, bad)
    nan = h.clone()
    nan[2, 3] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        fused_linear_logprobs(nan, w, y)
    fused_linear_logprobs(nan, w, y, validate=False)  # the switch skips value checks
    with pytest.raises(ValueError, match="bias must be"):
        fused_linear_logprobs(h, w, y, bias=b[:10])
    with pytest.raises(ValueError, match="temperature"):
        fused_linear_logprobs(h, w, y, temperature=0.0)
    with pytest.raises(ValueError, match="softcap"):
        fused_linear_logprobs(h, w, y, softcap=-1.0)
    with pytest.raises(ValueError, match="not a backend"):
        fused_linear_logprobs(h, w, y, backend="cuda")
    with pytest.raises(TypeError, match="float16"):
        fused_linear_logprobs(h.int(), w.int(), y)


def test_backend_environment_variable(monkeypatch):
    h, w, _, y = make(4, 16, 50, torch.float32)
    monkeypatch.setenv("GCCPO_BACKEND", "reference")
    a, _ = fused_linear_logprobs(h, w, y)
    monkeypatch.setenv("GCCPO_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="GCCPO_BACKEND"):
        fused_linear_logprobs(h, w, y)
    monkeypatch.setenv("GCCPO_BACKEND", "torch")
    b_, _ = fused_linear_logprobs(h, w, y)
    torch.testing.assert_close(a, b_)


def test_triton_refused_on_cpu_without_interpreter():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = ("import torch, gccpo_kernels as G\n"
            "h=torch.randn(2,8); w=torch.randn(5,8); y=torch.tensor([1,2])\n"
            "try:\n G.fused_linear_logprobs(h,w,y,backend='triton')\n"
            "except RuntimeError as e: print('REFUSED', e)\n")
    if torch.cuda.is_available():
        pytest.skip("CUDA present: the triton backend runs")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=300)
    assert "REFUSED" in out.stdout and "TRITON_INTERPRET" in out.stdout, out.stderr


def test_import_is_light_and_cli_reports_backends():
    code = ("import sys, gccpo_kernels\n"
            "assert 'triton' not in sys.modules, 'importing gccpo_kernels imported triton'\n"
            "print('light')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert "light" in out.stdout, out.stderr
    out = subprocess.run([sys.executable, "-m", "gccpo_kernels"], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0 and "picks" in out.stdout and "torch" in out.stdout


# ----------------------------------------------------------------------------- memory


def memory_workload(n: int, d: int, v: int):
    """Factory for benchmarks._harness.peak_rss_growth: torch backend forward + backward."""
    torch.manual_seed(0)
    h = torch.randn(n, d, requires_grad=True)
    w = (torch.randn(v, d) * 0.05).requires_grad_()
    y = torch.randint(0, v, (n,))
    w.grad = torch.zeros_like(w)  # the gradient buffers are part of the inputs' footprint
    h.grad = torch.zeros_like(h)

    def run():
        logp, ent = fused_linear_logprobs(h, w, y, return_entropy=True, backend="torch")
        (logp.sum() + ent.sum()).backward()

    return run


@pytest.mark.slow
def test_torch_backend_memory_is_bounded():
    """N=8192, D=128, V=65536 fp32 forward+backward grows peak RSS by < 20% of N*V*4 bytes."""
    from benchmarks._harness import peak_rss_growth

    n, d, v = 8192, 128, 65536
    growth = peak_rss_growth("tests.kernels.test_linear_logprobs:memory_workload", n=n, d=d, v=v)
    budget = 0.2 * n * v * 4
    assert growth < budget, f"peak RSS grew by {growth / 2**20:.0f} MiB (budget {budget / 2**20:.0f})"


@pytest.mark.parametrize("entropy,softcap", [(False, None), (True, None), (False, 20.0)])
def test_torch_backend_cpu_tiles_are_cache_sized(entropy, softcap, monkeypatch):
    """Issue 18: on the CPU the torch backend's primitive works in 512 x 512 float32 tiles at the
    default budget (32 MiB), one tile in the log-prob-only backward (the gradient formed over the
    logits in place), two more for an entropy gradient or a soft cap. Besides its outputs (d hidden
    [N, D], d weight [V, D]) no tensor it creates exceeds one tile: the per-token NLL then needs
    less memory than PyTorch's linear_cross_entropy (benchmarks/test_bench_linear_logprobs.py).
    The gradients (with a bias, and a soft cap) against the float64 reference."""
    from gccpo_kernels._workspace import recompute_tile, workspace_bytes
    from tests.kernels._flops import Creations

    monkeypatch.delenv("GCCPO_WORKSPACE_MB", raising=False)
    dev = torch.device("cpu")
    tile = 512 * 512 * 4
    assert workspace_bytes(dev) > 8 * tile
    n, d, v = 1100, 64, 3000          # 3 row tiles (512, 512, 76), 6 vocabulary tiles
    assert recompute_tile(n, v, 4, dev, 1) == (512, 512)
    assert recompute_tile(n, v, 8, dev, 1) == (512, 256)     # float64: 1 MiB per buffer
    g = torch.Generator().manual_seed(0)
    h = torch.randn(n, d, generator=g).requires_grad_()
    w = (torch.randn(v, d, generator=g) / d ** 0.5).requires_grad_()
    b = (torch.randn(v, generator=g) * 0.3).requires_grad_()
    y = torch.randint(0, v, (n,), generator=g)
    kw = dict(bias=b, softcap=softcap, temperature=0.9)
    with Creations() as fwd:
        out = fused_linear_logprobs(h, w, y, return_entropy=entropy, backend="torch", **kw)
    loss = out[0].sum() + (out[1].sum() if entropy else 0)
    with Creations() as bwd:
        loss.backward()
    outputs = {(n, d), (v, d)}
    big = [(s, nb) for s, nb in fwd.tensors + bwd.tensors if nb > 64 * 1024 and s not in outputs]
    assert big and max(nb for _, nb in big) <= tile, big
    tiles = [s for s, nb in bwd.tensors if nb == tile]
    assert len(tiles) == (3 if entropy or softcap else 1), bwd.tensors
    # and the gradients are right (float64 reference)
    ref_in = [t.detach().double().requires_grad_() for t in (h, w, b)]
    lp, ent = ref.linear_logprobs(ref_in[0], ref_in[1], y, bias=ref_in[2], softcap=softcap,
                                  temperature=0.9)
    (lp.sum() + (ent.sum() if entropy else 0)).backward()
    for got, want in zip((h, w, b), ref_in):
        torch.testing.assert_close(got.grad.double(), want.grad, rtol=1e-4, atol=1e-5)
