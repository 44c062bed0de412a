"""Guarantee: numerical extremes, on every backend and op where they apply.

- logits of magnitude 1e4 (temperature 1e-3): finite, logp <= 0, entropy in [0, log V], close to
  the float64 reference in proportion to the logits' size;
- hidden states near the bfloat16 limits: exact where the logits are representable (|h| ~ 1e38
  against |W| ~ 1e-37); a clear error (validate=True) where the float32 logits overflow;
- V = 1 (every log-prob and entropy 0, every divergence 0, zero gradients); a single row;
- 2^31 < N * V: a torch-backend run on the CPU (N = 2^16 + 1, D = 8, V = 2^15 + 1), and, for the
  Triton kernels, a shape-only check of their index arithmetic: the real kernels run in Triton's
  interpreter for their last program at N * V, N * D and V * D above 2^31, on *virtual* buffers
  (addresses that are never dereferenced; loads answer with a fill value), and every address they
  form must fall inside its buffer and reach its last element. A 32-bit offset that wrapped would
  land outside, or short of the end (test_index_probe_catches_int32_offsets shows it does).
"""

from __future__ import annotations

import contextlib
import math
import time

import numpy as np
import pytest
import torch

import gccpo_kernels as gk
from gccpo_kernels import reference as ref
from gccpo_kernels.policy_loss import PolicyLossConfig
from tests.conftest import DEVICE, available_backends, lm_head
from tests.kernels.test_advantages import make_batch, on

BACKENDS = available_backends()
FAST = [b for b in BACKENDS if b != "reference"]
F64 = torch.float64


def head(n: int, d: int, v: int, *, seed: int = 0, dtype: torch.dtype = torch.float32, wscale: float = 2.0):
    """Hidden rows and an LM head (no bias) from the shared generator of tests/conftest.py."""
    return lm_head(n, d, v, seed=seed, dtype=dtype, wscale=wscale)[:2]


def dtype_for(backend: str) -> torch.dtype:
    return torch.float32 if backend == "triton" else F64


# ---------------------------------------------------------------------------------------------
# logits of magnitude 1e4
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_logits_of_magnitude_1e4(backend):
    """temperature = 1e-3 on O(10) logits: every op stays finite and within its range; the §1
    outputs match the float64 reference to 5e-5 of the logits' size (float32 logits of 1e4 carry
    ~1e-3 absolute rounding)."""
    dtype = dtype_for(backend)
    h, w = head(24, 64, 700, dtype=dtype, wscale=3.0)
    zmax = float((h.double() @ w.double().T).abs().max()) / 1e-3
    assert zmax > 1e4
    y = torch.randint(0, 700, (24,), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    hg = h.clone().requires_grad_()
    logp, ent = gk.fused_linear_logprobs(hg, w, y, temperature=1e-3, return_entropy=True, backend=backend)
    rlogp, rent = ref.linear_logprobs(h.double(), w.double(), y, temperature=1e-3, dtype=F64)
    assert bool(torch.isfinite(logp).all() and torch.isfinite(ent).all())
    assert bool((logp <= 0).all()) and bool((ent >= 0).all()) and bool((ent <= math.log(700)).all())
    assert (logp.double().cpu() - rlogp.cpu()).abs().max().item() <= 5e-5 * zmax
    assert (ent.double().cpu() - rent.cpu()).abs().max().item() <= 5e-5 * zmax
    (dh,) = torch.autograd.grad(logp.sum(), [hg])
    assert bool(torch.isfinite(dh).all())
    out = gk.fused_linear_policy_loss(hg.reshape(4, 6, 64), w, y.reshape(4, 6), torch.randn(4).to(DEVICE),
                                      torch.ones(4, 6, dtype=torch.bool, device=DEVICE), temperature=1e-3,
                                      config=PolicyLossConfig(entropy_coef=0.01), backend=backend)
    (dh,) = torch.autograd.grad(out.loss, [hg])
    assert bool(torch.isfinite(out.loss)) and bool(torch.isfinite(dh).all())
    # divergences: shifts of the logits of ~500 (sigma = 0.05 of logits of 1e4); within SPEC §3's
    # relative bound plus the float32 rounding of the logits themselves (5e-8 of their size)
    dl = gk.perturb_latents(h, 2, sigma=0.05, generator=torch.Generator(device=h.device).manual_seed(2))
    slack = 1e-12 if backend == "reference" else 0.0
    for kind, upper in (("kl", math.inf), ("js", math.log(2)), ("tv", 1.0)):
        div = gk.counterfactual_divergence(h, w, dl, temperature=1e-3, kind=kind, backend=backend)
        want = ref.counterfactual_divergence(h.double(), w.double(), dl.double(), temperature=1e-3, kind=kind)
        assert bool(torch.isfinite(div).all()), kind
        assert bool((div >= -slack).all()) and bool((div <= upper + slack).all()), kind
        err = (div.double() - want).abs().cpu()
        assert bool((err <= 2e-3 * want.abs().cpu() + 5e-8 * zmax).all()), (kind, float(err.max()))
    # group statistics against the float64 torch backend: the reference's textbook KL takes
    # 0 * log 0 = NaN where a mixture probability underflows (it is the spec, not a product path)
    offsets = torch.tensor([0, 10, 24], device=DEVICE)
    rstats = gk.group_distribution_stats(h.double().cpu(), w.double().cpu(), group_offsets=offsets.cpu(),
                                         temperature=1e-3, backend="torch")
    if backend == "reference":
        return
    stats = gk.group_distribution_stats(h, w, group_offsets=offsets, temperature=1e-3, backend=backend)
    for name, t, r in zip(stats._fields, stats, rstats):
        assert bool(torch.isfinite(t).all()) and bool((t >= -1e-6).all()), name
        # later passes recompute the logits (float32 ulp at 1e4: ~1e-3), so ~10 ulps of the largest
        assert (t.double().cpu() - r.cpu()).abs().max().item() <= 1e-6 * zmax + 1e-4 * r.abs().max().item(), name


# ---------------------------------------------------------------------------------------------
# hidden states near the bfloat16 limits
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_hidden_near_bfloat16_limits(backend):
    """|h| ~ 1e38 (bf16 max 3.4e38) against |W| ~ 1e-37: products are exact in float32 and the
    logits are O(10), so every op matches the reference as for ordinary inputs. With an O(1)
    weight the float32 logits overflow: validate=True raises a clear error in every op; with
    validate=False the outputs are non-finite (documented)."""
    bf = torch.bfloat16
    g = torch.Generator().manual_seed(3)
    signs = lambda *shape: torch.randint(0, 2, shape, generator=g).double() * 2 - 1  # noqa: E731
    # magnitudes kept away from zero: subnormal weights (< 1.2e-38) may be flushed to zero by
    # tensor cores and some BLAS builds, which is not what this test is about
    h = (signs(10, 64) * (1 + 2 * torch.rand(10, 64, generator=g, dtype=F64)) * 1e38).to(bf).to(DEVICE)
    w = (signs(300, 64) * (1 + torch.rand(300, 64, generator=g, dtype=F64)) * 2e-38).to(bf).to(DEVICE)
    assert float(h.double().abs().max()) > 2.5e38 and float(w.double().abs().min()) > 1.18e-38
    y = torch.randint(0, 300, (10,), generator=torch.Generator().manual_seed(3)).to(DEVICE)
    logp, ent = gk.fused_linear_logprobs(h, w, y, return_entropy=True, backend=backend)
    rlogp, rent = ref.linear_logprobs(h.double(), w.double(), y, dtype=F64)
    torch.testing.assert_close(logp.double().cpu(), rlogp.cpu(), rtol=0, atol=5e-5 * max(1.0, rlogp.abs().max().item()))
    torch.testing.assert_close(ent.double().cpu(), rent.cpu(), rtol=0, atol=5e-5 * max(1.0, rent.abs().max().item()))
    dl = (h.double().unsqueeze(1) * 1e-2).to(bf).expand(10, 2, 64).contiguous()
    div = gk.counterfactual_divergence(h, w, dl, backend=backend)
    rdiv = ref.counterfactual_divergence(h.double(), w.double(), dl.double())
    assert bool(((div.double().cpu() - rdiv.cpu()).abs() <= 2e-3 * rdiv.abs().cpu() + 2e-8).all())
    offsets = torch.tensor([0, 4, 10], device=DEVICE)
    stats = gk.group_distribution_stats(h, w, group_offsets=offsets, backend=backend)
    rstats = ref.group_distribution_stats(h.double(), w.double(), torch.tensor([0] * 4 + [1] * 6, device=DEVICE), 2)
    for name, a, r in zip(stats._fields, stats, rstats):
        torch.testing.assert_close(a.double().cpu(), r.cpu(), rtol=1e-4, atol=2e-5, msg=name)
    # O(1) weight: the logits are ~1e39, beyond float32
    w_big = torch.ones(300, 64, dtype=bf, device=DEVICE) * 0.5
    if backend == "reference":
        return  # float64 logits of 1e39 are representable: the reference has nothing to reject
    dl_big = torch.zeros(10, 1, 64, dtype=bf, device=DEVICE)
    calls = {
        "linear_logprobs": lambda v: gk.fused_linear_logprobs(h, w_big, y, return_entropy=True, backend=backend,
                                                              validate=v),
        "policy_loss": lambda v: (gk.fused_linear_policy_loss(
            h.reshape(2, 5, 64), w_big, y.reshape(2, 5), torch.ones(2, dtype=bf, device=DEVICE),
            torch.ones(2, 5, dtype=torch.bool, device=DEVICE), backend=backend, validate=v).logp,),
        "divergence": lambda v: (gk.counterfactual_divergence(h, w_big, dl_big, backend=backend, validate=v),),
        "group_stats": lambda v: tuple(gk.group_distribution_stats(h, w_big, group_offsets=offsets,
                                                                   backend=backend, validate=v)),
    }
    for name, call in calls.items():
        with pytest.raises(ValueError, match="overflowed"):
            call(True)
        outs = call(False)
        assert not all(bool(torch.isfinite(t).all()) for t in outs if t is not None), name


# ---------------------------------------------------------------------------------------------
# V = 1 and a single row
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_vocabulary_of_one(backend):
    """V = 1: one token of probability 1. logp = entropy = 0 exactly, divergences 0, group
    statistics 0 (to float32 rounding), and the gradients of log-prob and entropy vanish."""
    dtype = dtype_for(backend)
    h, w = head(5, 16, 1, dtype=dtype)
    b = torch.full((1,), 0.7, dtype=dtype, device=DEVICE)
    y = torch.zeros(5, dtype=torch.long, device=DEVICE)
    hg, wg = h.clone().requires_grad_(), w.clone().requires_grad_()
    logp, ent = gk.fused_linear_logprobs(hg, wg, y, bias=b, return_entropy=True, backend=backend)
    assert torch.equal(logp, torch.zeros_like(logp)) and torch.equal(ent, torch.zeros_like(ent))
    dh, dw = torch.autograd.grad(logp.sum() + ent.sum(), [hg, wg])
    assert float(dh.abs().max()) <= 1e-12 and float(dw.abs().max()) <= 1e-12
    dl = gk.perturb_latents(h, 3, sigma=0.5, generator=torch.Generator(device=h.device).manual_seed(4))
    for kind in ("kl", "js", "tv"):
        div = gk.counterfactual_divergence(h, w, dl, bias=b, kind=kind, backend=backend)
        assert float(div.abs().max()) <= 1e-12, kind
    stats = gk.group_distribution_stats(h, w, group_offsets=torch.tensor([0, 2, 5], device=DEVICE), bias=b,
                                        backend=backend)
    # the row statistics are recomputed from the logits in later passes: 0 up to one float32
    # rounding of a recomputed logit (exactly 0 in float64)
    tol = 1e-12 if dtype == F64 else 1e-6
    for name, t in zip(stats._fields, stats):
        assert float(t.abs().max()) <= tol, name
    out = gk.fused_linear_policy_loss(hg.reshape(1, 5, 16), wg, y.reshape(1, 5), torch.ones(1, dtype=dtype,
                                      device=DEVICE), torch.ones(1, 5, dtype=torch.bool, device=DEVICE),
                                      backend=backend)
    assert torch.equal(out.logp, torch.zeros_like(out.logp))


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_single_row(backend):
    """N = R = B = 1 for every op: the group of one has KL = JS = 0; the outcome advantage of a
    group of one is 0, leaving eta * the process advantage."""
    dtype = dtype_for(backend)
    h, w = head(1, 33, 257, dtype=dtype)
    y = torch.tensor([200], device=DEVICE)
    logp, ent = gk.fused_linear_logprobs(h, w, y, return_entropy=True, backend=backend)
    rlogp, rent = ref.linear_logprobs(h.double(), w.double(), y, dtype=F64)
    assert abs(logp.item() - rlogp.item()) <= 5e-5 * max(1.0, abs(rlogp.item()))
    assert abs(ent.item() - rent.item()) <= 5e-5 * max(1.0, abs(rent.item()))
    dl = gk.perturb_latents(h, 2, mode="sibling", group_index=torch.zeros(1, dtype=torch.long, device=DEVICE),
                            generator=torch.Generator(device=h.device).manual_seed(5))
    div = gk.counterfactual_divergence(h, w, dl, backend=backend)
    rdiv = ref.counterfactual_divergence(h.double(), w.double(), dl.double())
    assert bool(((div.double().cpu() - rdiv.cpu()).abs() <= 2e-3 * rdiv.abs().cpu() + 2e-8).all())
    stats = gk.group_distribution_stats(h, w, group_ids=torch.zeros(1, dtype=torch.long, device=DEVICE),
                                        backend=backend)
    assert float(stats.row_kl_to_mixture.abs().max()) == 0.0 and float(stats.group_js.abs().max()) == 0.0
    batch = on(make_batch(6, B=1, T=12, K=3, p_empty=0.0), backend, float_dtype=dtype)
    adv = gk.token_advantages(**batch, eta=0.0, backend=backend)
    assert float(adv.abs().max()) == 0.0


# ---------------------------------------------------------------------------------------------
# 2^31 < N * V on the torch backend
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_torch_backend_beyond_2_31_logits(monkeypatch):
    """N = 2^16 + 1 rows, V = 2^15 + 1, D = 8: N * V = 2^31 + 98305 logits, never held at once
    (a 128 MiB workspace, an eighth of the CUDA default). Forward and backward run through; rows
    around the flat index 2^31 match the float64 reference, every row is finite and in range. Measured
    25-60 s forward + backward on 2 shared CPU cores (load-dependent); memory O(N + V*D) plus the
    workspace."""
    monkeypatch.setenv("GCCPO_WORKSPACE_MB", "128")
    n, d, v = 2**16 + 1, 8, 2**15 + 1
    assert n * v > 2**31
    g = torch.Generator().manual_seed(7)
    h = torch.randn(n, d, generator=g).requires_grad_()
    w = (torch.randn(v, d, generator=g) * 0.5).requires_grad_()
    y = torch.randint(0, v, (n,), generator=g)
    start = time.perf_counter()
    logp, ent = gk.fused_linear_logprobs(h, w, y, return_entropy=True, backend="torch")
    dh, dw = torch.autograd.grad(logp.sum() + 0.5 * ent.sum(), [h, w])
    elapsed = time.perf_counter() - start
    assert bool(torch.isfinite(logp).all() and torch.isfinite(ent).all())
    assert bool((logp <= 0).all()) and bool((ent >= 0).all()) and bool((ent <= math.log(v)).all())
    assert bool(torch.isfinite(dh).all() and torch.isfinite(dw).all())
    # rows 65534..65536 hold the flat logit index 2^31 (65535 * V > 2^31 > 65534 * V)
    rows = torch.tensor([0, 1, 2**31 // v - 1, 2**31 // v, 2**31 // v + 1, n - 2, n - 1])
    h64 = h.detach()[rows].double().requires_grad_()
    rlogp, rent = ref.linear_logprobs(h64, w.detach().double(), y[rows], dtype=F64)
    (rdh,) = torch.autograd.grad(rlogp.sum() + 0.5 * rent.sum(), [h64])
    torch.testing.assert_close(logp.detach()[rows].double(), rlogp, rtol=0, atol=5e-5 * max(1.0, rlogp.abs().max().item()))
    torch.testing.assert_close(ent.detach()[rows].double(), rent, rtol=0, atol=5e-5 * max(1.0, rent.abs().max().item()))
    torch.testing.assert_close(dh[rows].double(), rdh, rtol=1e-4, atol=1e-5)
    print(f"\n2^31 < N*V torch forward+backward: {elapsed:.1f} s")


# ---------------------------------------------------------------------------------------------
# 2^31 < N * V for the Triton kernels: index arithmetic on virtual buffers
# ---------------------------------------------------------------------------------------------

pytestmark_triton = pytest.mark.skipif("triton" not in BACKENDS, reason="triton is not importable here")
SPACING = 1 << 52  # virtual buffers sit at (i + 1) * 2^52: far from real memory and from each other


class Virtual:
    """A buffer of ``numel`` elements that exists only as an address range."""

    def __init__(self, numel: int, dtype: torch.dtype, fill: float | int = 0) -> None:
        self.numel, self.dtype, self.fill = int(numel), dtype, fill
        self.itemsize = torch.empty((), dtype=dtype).element_size()


class IndexProbe:
    """Run chosen programs of an interpreted Triton kernel with virtual buffers; record, per buffer,
    the first and last element each load and store touches, and count addresses outside every
    buffer. Real tensors (small index arrays the kernel reads, such as group offsets) are passed
    through and read for real."""

    def __init__(self, buffers: dict[str, Virtual | torch.Tensor]) -> None:
        self.buffers = buffers
        self.ranges: dict[str, tuple[int, int, Virtual]] = {}
        for i, (name, buf) in enumerate((k, b) for k, b in buffers.items() if isinstance(b, Virtual)):
            lo = (i + 1) * SPACING
            self.ranges[name] = (lo, lo + buf.numel * buf.itemsize, buf)
        self.touched: dict[str, tuple[int, int]] = {}
        self.outside = 0

    def _owner(self, addrs: np.ndarray) -> str | None:
        """The virtual buffer holding all of ``addrs``, '<outside>' if none does, None if real."""
        if addrs.size == 0 or addrs.max() < SPACING // 2:
            return None
        for name, (lo, hi, _) in self.ranges.items():
            if addrs.min() >= lo and addrs.max() < hi:
                return name
        return "<outside>"

    def _record(self, name: str, addrs: np.ndarray) -> None:
        if name == "<outside>":
            self.outside += int(addrs.size)
            return
        lo, _, buf = self.ranges[name]
        first, last = int(addrs.min() - lo) // buf.itemsize, int(addrs.max() - lo) // buf.itemsize
        old = self.touched.get(name, (first, last))
        self.touched[name] = (min(first, old[0]), max(last, old[1]))

    @contextlib.contextmanager
    def _patched(self):
        from triton.runtime import interpreter as interp

        builder = interp.interpreter_builder
        real_load, real_store = builder.create_masked_load, builder.create_masked_store

        def load(ptrs, mask, other, cache_policy, is_volatile):
            addrs = ptrs.data[mask.data.astype(bool)]
            name = self._owner(addrs)
            if name is None:
                return real_load(ptrs, mask, other, cache_policy, is_volatile)
            self._record(name, addrs)
            fill = self.ranges[name][2].fill if name in self.ranges else 0
            ty = ptrs.get_element_ty()
            np_type = interp._get_np_dtype(ty)
            # masked-off lanes read ``other``, as a real load does (kernels rely on it, e.g. -1 ids)
            rest = np.zeros(ptrs.data.shape, dtype=np_type) if other is None else other.data
            values = np.where(mask.data.astype(bool), np.asarray(fill, dtype=np_type), rest)
            return interp.TensorHandle(values.astype(np_type), ty)

        def store(ptrs, value, mask, cache_policy):
            addrs = ptrs.data[mask.data.astype(bool)]
            name = self._owner(addrs)
            if name is None:
                return real_store(ptrs, value, mask, cache_policy)
            self._record(name, addrs)

        builder.create_masked_load, builder.create_masked_store = load, store
        try:
            yield
        finally:
            builder.create_masked_load, builder.create_masked_store = real_load, real_store

    def run(self, kernel, grid: tuple[int, ...], pids: list[tuple[int, ...]], scalars: dict,
            constexprs: dict) -> "IndexProbe":
        import triton.language as tl
        from triton.runtime import interpreter as interp

        tl_types = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16,
                    torch.int64: tl.int64, torch.int32: tl.int32, torch.uint8: tl.uint8}
        fn = kernel.rewrite()
        args = {}
        for name in kernel.arg_names:
            if name in constexprs:
                args[name] = constexprs[name]
            elif name in self.ranges:
                ty = tl.pointer_type(tl_types[self.ranges[name][2].dtype])
                handle = interp.TensorHandle(np.array([self.ranges[name][0]], dtype=np.uint64), ty)
                args[name] = tl.core.tensor(handle, ty)
            elif name in self.buffers:
                args[name] = interp._implicit_cvt(self.buffers[name])
            else:
                args[name] = interp._implicit_cvt(scalars[name])
        scope = interp._patch_lang(fn)
        try:
            with self._patched():
                interp.interpreter_builder.set_grid_dim(*grid, *(1,) * (3 - len(grid)))
                for pid in pids:
                    interp.interpreter_builder.set_grid_idx(*pid, *(0,) * (3 - len(pid)))
                    fn(**args)
        finally:
            scope.restore()
        return self

    def assert_reaches_every_end(self, names: list[str] | None = None) -> None:
        """No address outside the buffers, and each buffer's last element was touched."""
        assert self.outside == 0, f"{self.outside} addresses outside every buffer (a wrapped offset)"
        for name in names or list(self.ranges):
            numel = self.ranges[name][2].numel
            assert name in self.touched, f"{name} never touched"
            assert self.touched[name][1] == numel - 1, (name, self.touched[name], numel)


def _interp_cfg(module, key):
    return module.CONFIGS["interpreter"][key]


@pytestmark_triton
def test_index_probe_catches_int32_offsets():
    """The probe sees a wrapped 32-bit offset: a kernel indexing rows * dim in int32 fails it, the
    same kernel with an int64 row index passes."""
    import triton
    import triton.language as tl

    @triton.jit
    def rows_times_dim(X, OUT, dim, WIDE: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        if WIDE:
            row = row.to(tl.int64)
        cols = tl.arange(0, BLOCK)
        x = tl.load(X + row * dim + cols, mask=cols < dim, other=0.0)
        tl.store(OUT + row, tl.sum(x, axis=0))

    n, dim = 2**26 + 3, 64
    for wide, ok in ((False, False), (True, True)):
        probe = IndexProbe({"X": Virtual(n * dim, torch.float32), "OUT": Virtual(n, torch.float32)})
        probe.run(rows_times_dim, (n,), [(n - 1,)], dict(dim=dim), dict(WIDE=wide, BLOCK=64))
        if ok:
            probe.assert_reaches_every_end()
        else:
            with pytest.raises(AssertionError):
                probe.assert_reaches_every_end()


@pytestmark_triton
@pytest.mark.parametrize("kernel", ["row_stats", "logit_grad"])
def test_triton_logit_epilogues_index_arithmetic_beyond_2_31(kernel):
    """The two epilogues every LM-head op of the triton backend runs over a float32 chunk of raw
    logits (SPEC §1 forward and backward, the in-forward loss): a chunk of R = 2^16 + 3 rows by
    V = 2^15 + 17 columns (R*V > 2^31 elements, float32: byte offsets past 2^33), the gradient
    written into a bf16 copy and kept over U in float32 (a bias gradient's sums). The last
    program of each grid, every flag on."""
    import triton

    from gccpo_kernels.triton import logit_epilogues as E

    r, v = 2**16 + 3, 2**15 + 17
    assert r * v > 2**31
    f32, bf = torch.float32, torch.bfloat16
    common = {"U": Virtual(r * v, f32), "B": Virtual(v, bf), "Y": Virtual(r, torch.int64, fill=v - 1),
              "LSE": Virtual(r, f32), "ENT": Virtual(r, f32)}
    flags = dict(HAS_BIAS=True, HAS_CAP=True)
    if kernel == "row_stats":
        cfg = _interp_cfg(E, "stats")
        grid = (triton.cdiv(r, cfg["BLOCK_N"]),)
        probe = IndexProbe({**common, "ZY": Virtual(r, f32)}).run(
            E._row_stats_kernel, grid, [(grid[0] - 1,)],
            dict(n_rows=r, vocab=v, stride_u=v, scale=1.0, softcap=30.0, log_vocab=10.0),
            dict(**flags, BLOCK_N=cfg["BLOCK_N"], BLOCK_V=cfg["BLOCK_V"]))
    else:
        cfg = _interp_cfg(E, "grad")
        grid = (triton.cdiv(r, cfg["BLOCK_N"]), triton.cdiv(v, cfg["BLOCK_V"]))
        probe = IndexProbe({**common, "G": Virtual(r * v, bf), "GL": Virtual(r, f32, fill=1.0),
                            "GE": Virtual(r, f32, fill=1.0)}).run(
            E._logit_grad_kernel, grid, [(grid[0] - 1, grid[1] - 1)],
            dict(n_rows=r, vocab=v, stride_u=v, stride_g=v, scale=1.0, softcap=30.0),
            dict(**flags, HAS_GE=True, KEEP_F32=True, BLOCK_N=cfg["BLOCK_N"],
                 BLOCK_V=cfg["BLOCK_V"]))
    probe.assert_reaches_every_end()


@pytestmark_triton
@pytest.mark.parametrize("kind", ["kl", "js"])
def test_triton_divergence_index_arithmetic_beyond_2_31(kind):
    """§3 on one chunk of C = 2^16 + 3 rows, M = 4, V = 2^15 + 1: the chunk's raw products
    C*V > 2^31 (base) and C*M*V > 2^33 (perturbations) float32 elements, split partials S*C*M.
    The statistics kernel (with the L accumulators for JS) and the integrand, each for its last
    program and the last vocabulary split."""
    import triton

    from gccpo_kernels.triton import divergence as Dv

    f32, bf = torch.float32, torch.bfloat16
    r, m, v = 2**16 + 3, 4, 2**15 + 1
    assert r * v > 2**31
    cfg = Dv.CONFIGS["interpreter"][("16", 4)]
    s = triton.cdiv(v, cfg["V_SPLIT"])
    last_tiles = triton.cdiv(v - (s - 1) * cfg["V_SPLIT"], cfg["BLOCK_V"])
    head_bufs = {"UZ": Virtual(r * v, f32), "UD": Virtual(r * m * v, f32), "B": Virtual(v, bf)}
    sizes = dict(n_rows=r, vocab=v, n_pert=m, stride_z=v, stride_dr=m * v, stride_dm=v,
                 scale=1.0, softcap=30.0, split_offset=s - 1, n_tiles=last_tiles)
    consts = dict(HAS_BIAS=True, HAS_CAP=True, MP=4, BLOCK_V=cfg["BLOCK_V"], V_SPLIT=cfg["V_SPLIT"])
    stats = {**head_bufs, "PM": Virtual(s * r, f32), "PS": Virtual(s * r, f32),
             **{k: Virtual(s * r * m, f32) for k in ("PC", "PK", "PT", "PSH", "PE")}}
    grid = (triton.cdiv(r, cfg["BLOCK_R"]), 1)
    IndexProbe(stats).run(Dv._cf_stats_kernel, grid, [(grid[0] - 1, 0)], sizes,
                          dict(consts, NEED_L=kind != "kl", BLOCK_R=cfg["BLOCK_R"])).assert_reaches_every_end(
        ["UZ", "UD", "B", "PM", "PS", "PC", "PK", "PT", *(["PSH", "PE"] if kind != "kl" else [])])
    block_r = cfg["BLOCK_R_JS" if kind == "js" else "BLOCK_R"]
    integ = {**head_bufs, "LSE": Virtual(r, f32), "SHIFT": Virtual(r * m, f32),
             "PF": Virtual(s * r * m, f32)}
    grid = (triton.cdiv(r, block_r), 1)
    IndexProbe(integ).run(Dv._cf_integrand_kernel, grid, [(grid[0] - 1, 0)], sizes,
                          dict(consts, KIND=Dv.KIND_CODES[kind], BLOCK_R=block_r)).assert_reaches_every_end()


@pytestmark_triton
def test_triton_group_stats_index_arithmetic_beyond_2_31():
    """§4 on one chunk of C = 2^16 + 3 rows, G = 2^17 groups, V = 2^15 + 1: C*V > 2^31 float32
    elements of the chunk, G*V = 2^32 (the [G, V] mixtures). The mixture kernel for the last
    group (its rows at the end of the chunk), the row-KL kernel for the last rows (of the last
    group) and last split, the segment sum over the flattened G*V mixture terms for the last
    group."""
    import triton

    from gccpo_kernels.triton import group_stats as Gs

    f32, bf = torch.float32, torch.bfloat16
    r, v, g = 2**16 + 3, 2**15 + 1, 2**17
    cfg = Gs.CONFIGS["interpreter"]
    offsets = torch.zeros(g + 1, dtype=torch.int64)
    offsets[-2:] = torch.tensor([r - 40, r])  # empty groups, a big group, the last group of 40 rows
    common = dict(HAS_BIAS=True, HAS_CAP=True, BLOCK_R=cfg["BLOCK_R"], BLOCK_V=cfg["BLOCK_V"])
    head_bufs = {"U": Virtual(r * v, f32), "B": Virtual(v, bf), "LSE": Virtual(r, f32)}
    n_vt = triton.cdiv(v, cfg["BLOCK_V"])
    IndexProbe({**head_bufs, "OFF": offsets, "MIX": Virtual(g * v, f32)}).run(
        Gs._mixture_kernel, (g, n_vt), [(g - 1, n_vt - 1)],
        dict(vocab=v, stride_u=v, stride_mix=v, scale=1.0, softcap=30.0),
        common).assert_reaches_every_end()
    s = triton.cdiv(v, cfg["V_SPLIT"])
    last_tiles = triton.cdiv(v - (s - 1) * cfg["V_SPLIT"], cfg["BLOCK_V"])
    IndexProbe({**head_bufs, "GID": Virtual(r, torch.int32, fill=g - 1), "LMIX": Virtual(g * v, f32),
                "PK": Virtual(s * r, f32)}).run(
        Gs._row_kl_kernel, (triton.cdiv(r, cfg["BLOCK_R"]), 1), [(triton.cdiv(r, cfg["BLOCK_R"]) - 1, 0)],
        dict(n_rows=r, vocab=v, stride_u=v, stride_mix=v, scale=1.0, softcap=30.0,
             split_offset=s - 1, n_tiles=last_tiles),
        dict(common, V_SPLIT=cfg["V_SPLIT"])).assert_reaches_every_end()
    seg = torch.arange(g + 1, dtype=torch.int64) * v
    IndexProbe({"X": Virtual(g * v, f32), "OFF": seg, "OUT": Virtual(g, f32)}).run(
        Gs._segment_sum_kernel, (g,), [(g - 1,)], {}, dict(BLOCK=Gs.SEGMENT_BLOCK)).assert_reaches_every_end()


@pytestmark_triton
def test_triton_advantages_index_arithmetic_beyond_2_31():
    """§6 at B = 2^16 completions of T = 2^15 + 1 tokens (B*T = 2^31 + 2^16): the program of the
    last group (a single completion, the last row) reads and writes the end of the [B, T] tensors."""
    from gccpo_kernels.triton import advantages as A

    b, t, k = 2**16, 2**15 + 1, 2
    cfg = A.CONFIGS["interpreter"]
    real = {"order_ptr": torch.arange(b), "group_ptr": torch.arange(b), "outcome_ptr": torch.rand(b),
            "reward_ptr": torch.randn(b, k), "surp_ptr": torch.zeros(b, k), "size_ptr": torch.zeros(b, k),
            "ret_ptr": torch.zeros(b, k), "cnt_ptr": torch.zeros(b, dtype=torch.int32)}
    virtual = {"ids_ptr": Virtual(b * t, torch.int64, fill=0), "logp_ptr": Virtual(b * t, torch.float32, fill=-1.0),
               "mask_ptr": Virtual(b * t, torch.uint8, fill=1), "out_ptr": Virtual(b * t, torch.float32)}
    assert b * t > 2**31
    IndexProbe({**real, **virtual}).run(
        A._token_advantages_kernel, (b,), [(b - 1,)],
        dict(B=b, T=t, K=k, eta=1.0, gamma=1.0, eps=1e-4, scale_mode=0, surprise=1, normalize=1, norm_rewards=1),
        dict(BLOCK_T=cfg["BLOCK_T"], BLOCK_K=cfg["BLOCK_K"], BLOCK_R=cfg["BLOCK_R"])).assert_reaches_every_end()
