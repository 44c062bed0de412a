"""Issue 18 on the triton backend: the fused policy loss's in-forward gradient with cuBLAS-shaped
GEMMs (``gccpo_kernels._gemm``) and two Triton kernels (``gccpo_kernels.triton.loss_epilogue``:
the row statistics, the logit gradient in place), run here in the Triton interpreter.

- against the float64 reference (``gccpo_kernels.reference``: materialized logits, the loss one
  row at a time, autograd) for the loss value, d hidden, d weight, d bias, logp and entropy, for
  every TRL / verl aggregation of tests/kernels/test_loss_in_forward.py, with bias, temperature,
  logit scale, soft cap, masked tokens, another ignore_index, and chunks whose last one is padded;
- the kernel pass alone (``forward_with_grad``) against the torch backend's in float64, with
  out-of-range targets, bf16 / fp16 heads and frozen parameters;
- bitwise batch invariance: a row's logp, entropy and d hidden do not depend on which rows share
  its call (alone, in a slice, permuted, at another position of its chunk);
- GEMM FLOPs (tests/kernels/_flops.py): 6 N V D, N rounded up to the fixed chunk of R rows.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

import gccpo_kernels.loss_in_forward as lif
from gccpo_kernels import reference as ref_impl
from gccpo_kernels._backend import triton_unavailable_reason
from gccpo_kernels._logits import LogitParams
from gccpo_kernels.chunked.loss_grad import forward_with_grad as torch_forward_with_grad
from gccpo_kernels.policy_loss import PolicyLossConfig, fused_linear_policy_loss
from tests.conftest import DEVICE
from tests.kernels._flops import GemmFlops
from tests.kernels.test_loss_in_forward import CONFIGS

pytestmark = pytest.mark.skipif(triton_unavailable_reason() is not None,
                                reason=f"{triton_unavailable_reason()}")

F64 = torch.float64
LOGIT = dict(temperature=0.8, logit_scale=1.3)


def _epilogue():
    from gccpo_kernels.triton import loss_epilogue

    return loss_epilogue


def _budget_mb(rows: int, v: int, d: int, dtype: torch.dtype = torch.float32) -> str:
    """GCCPO_WORKSPACE_MB for which the triton path's chunk holds exactly ``rows`` rows."""
    elem = torch.finfo(dtype).bits // 8
    per_row = v * (4 + (elem if dtype == torch.bfloat16 else 0)) + d * (elem + 4)
    mb = (rows * per_row + per_row // 2) / (1 << 20)
    assert _epilogue().chunk_rows(v, d, dtype, DEVICE, int(mb * (1 << 20))) == rows
    return repr(mb)


def _inputs(b=3, t=7, d=16, v=300, dtype=torch.float32, seed=1, bias=True):
    """float64 masters (drawn in a fixed order) and their ``dtype`` copies on DEVICE."""
    g = torch.Generator().manual_seed(seed)
    x = dict(h=torch.randn(b, t, d, generator=g, dtype=F64),
             w=torch.randn(v, d, generator=g, dtype=F64) * 0.4,
             b=torch.randn(v, generator=g, dtype=F64) * 0.3 if bias else None,
             y=torch.randint(0, v, (b, t), generator=g),
             mask=torch.rand(b, t, generator=g) > 0.25,
             adv=torch.randn(b, generator=g, dtype=F64),
             old=torch.randn(b, t, generator=g, dtype=F64) * 0.3 - 5.7,
             ref=torch.randn(b, t, generator=g, dtype=F64) * 0.3 - 5.7)
    if b > 1:
        x["mask"][1] = False  # an empty row
    x = {k: None if val is None else val.to(DEVICE) for k, val in x.items()}
    # the policy's rows in the tested dtype, rounded back to float64 for the reference
    for k in ("h", "w", "b"):
        if x[k] is not None:
            x[k] = x[k].to(dtype).to(F64)
    return x, dtype


def _triton_run(x, dtype, cfg, monkeypatch, *, scale=1.0, **kw):
    """(loss, dh, dW, db, logp, entropy) from the triton backend; asserts the in-forward triton
    pass ran (once per call)."""
    ep = _epilogue()
    calls = []
    real = ep.forward_with_grad

    def spy(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(ep, "forward_with_grad", spy)
    h, w = (x[k].to(dtype).requires_grad_() for k in ("h", "w"))
    b = None if x["b"] is None else x["b"].to(dtype).requires_grad_()
    out = fused_linear_policy_loss(h, w, x["y"], x["adv"].float(), x["mask"],
                                   old_logp=x["old"].float(), ref_logp=x["ref"].float(), bias=b,
                                   config=cfg, backend="triton", **LOGIT, **kw)
    (out.loss * scale).backward()
    monkeypatch.setattr(ep, "forward_with_grad", real)
    assert calls == [1]
    return (out.loss.detach(), h.grad, w.grad, None if b is None else b.grad, out.logp,
            out.entropy)


def _reference(x, cfg, *, scale=1.0, softcap=None, ignore_index=-100, normalizer=None,
               loss_scale=1.0, is_weights=None):
    """The same quantities in float64 from gccpo_kernels.reference (materialized logits)."""
    h, w = (x[k].clone().requires_grad_() for k in ("h", "w"))
    b = None if x["b"] is None else x["b"].clone().requires_grad_()
    y = x["y"].masked_fill(~x["mask"], ignore_index)
    logp, ent = ref_impl.linear_logprobs(h, w, y, bias=b, softcap=softcap,
                                         ignore_index=ignore_index, **LOGIT)
    loss, _ = ref_impl.policy_loss(logp, x["old"], x["adv"], x["mask"], cfg, ref_logp=x["ref"],
                                   entropy=ent, is_weights=is_weights, normalizer=normalizer,
                                   loss_scale=loss_scale)
    (loss * scale).backward()
    return (loss.detach(), h.grad, w.grad, None if b is None else b.grad, logp.detach(),
            ent.detach())


NAMES = ("loss", "d hidden", "d weight", "d bias", "logp", "entropy")


def _close(got, want, tol):
    """Each quantity within ``tol`` of the reference, relative to the reference's largest entry
    (float32 logits of O(5) carry ~1e-6 relative rounding into every quantity)."""
    for name, a, c in zip(NAMES, got, want):
        assert (a is None) == (c is None), name
        if a is None:
            continue
        assert a.shape == c.shape, name
        err = (a.double() - c).abs().max().item() if a.numel() else 0.0
        assert err <= tol * max(c.abs().max().item() if c.numel() else 0.0, 1e-3), (name, err)


@pytest.mark.parametrize("softcap", [None, 20.0])
@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"{c.loss_agg}-ent{c.entropy_coef}-d{c.delta}")
def test_matches_the_float64_reference(cfg, softcap, monkeypatch):
    """Every token-level aggregation, float32 operands, default workspace (one padded chunk)."""
    x, dtype = _inputs()
    got = _triton_run(x, dtype, cfg, monkeypatch, scale=1.7, softcap=softcap)
    _close(got, _reference(x, cfg, scale=1.7, softcap=softcap), 2e-5)


@pytest.mark.parametrize("rows", [1, 4, 8])
def test_several_chunks_and_a_padded_last_one(rows, monkeypatch):
    """Chunks of 1, 4 and 8 rows over the 11 kept tokens (11, 3 and 2 chunks; the last one
    padded with 0, 1 and 5 zero rows), with a soft cap and the entropy bonus in the gradient."""
    x, dtype = _inputs()
    assert int(x["mask"].sum()) == 11
    monkeypatch.setenv("GCCPO_WORKSPACE_MB", _budget_mb(rows, 300, 16))
    cfg = dataclasses.replace(CONFIGS[3], entropy_coef=0.02)
    got = _triton_run(x, dtype, cfg, monkeypatch, softcap=15.0)
    _close(got, _reference(x, cfg, softcap=15.0), 2e-5)


def test_other_ignore_index_normalizer_scale_and_weights(monkeypatch):
    x, dtype = _inputs(b=4, t=9, v=257, seed=4)
    isw = torch.rand(4, 9, generator=torch.Generator().manual_seed(5), dtype=F64).to(DEVICE) + 0.5
    cfg = CONFIGS[1]
    got = _triton_run(x, dtype, cfg, monkeypatch, ignore_index=-7, normalizer=11.0,
                      loss_scale=0.25, is_weights=isw.float(), softcap=9.0)
    want = _reference(x, cfg, ignore_index=-7, normalizer=11.0, loss_scale=0.25, is_weights=isw,
                      softcap=9.0)
    _close(got, want, 2e-5)


def test_without_bias(monkeypatch):
    x, dtype = _inputs(bias=False, seed=7)
    cfg = dataclasses.replace(CONFIGS[0], entropy_coef=0.01)
    _close(_triton_run(x, dtype, cfg, monkeypatch), _reference(x, cfg), 2e-5)


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 1.5e-2), (torch.float16, 2e-3)])
def test_sixteen_bit_heads(dtype, tol, monkeypatch):
    """bf16: the gradient GEMMs read the kernel's bf16 copy of G (bf16 rounding of the logit
    gradient, 2^-9 relative); fp16: G stays float32. Logits are float32 either way. The
    reference runs in float64 on the same (rounded) operands."""
    x, _ = _inputs(dtype=dtype, seed=2)
    monkeypatch.setenv("GCCPO_WORKSPACE_MB", _budget_mb(4, 300, 16, dtype))
    cfg = dataclasses.replace(CONFIGS[3], entropy_coef=0.01)
    got = _triton_run(x, dtype, cfg, monkeypatch, softcap=20.0)
    for name, g in zip(NAMES[1:4], got[1:4]):
        assert g.dtype == dtype, name
    want = _reference(x, cfg, softcap=20.0)
    # logp and entropy are float32 results from float32 logits: tight whatever the head's dtype
    _close(got[4:], want[4:], 2e-5)
    _close(got[:4], want[:4], tol)


def test_frozen_head_and_frozen_hidden(monkeypatch):
    """Only the gradients asked for are computed; the others stay None."""
    x, dtype = _inputs()
    want = _reference(x, CONFIGS[0])
    for frozen in ("w", "h"):
        h = x["h"].float().requires_grad_(frozen != "h")
        w = x["w"].float().requires_grad_(frozen != "w")
        out = fused_linear_policy_loss(h, w, x["y"], x["adv"].float(), x["mask"],
                                       old_logp=x["old"].float(), ref_logp=x["ref"].float(),
                                       bias=x["b"].float(), config=CONFIGS[0], backend="triton",
                                       **LOGIT)
        out.loss.backward()
        assert (h.grad is None) == (frozen == "h") and (w.grad is None) == (frozen == "w")
        for got, ref in ((h.grad, want[1]), (w.grad, want[2])):
            if got is not None:
                assert (got.double() - ref).abs().max() <= 2e-5 * ref.abs().max()


def test_the_triton_backend_is_eligible_and_the_others_stay():
    cfg = CONFIGS[0]
    assert lif.eligible(cfg, "triton", None, (True, True, False))
    assert lif.eligible(cfg, "torch", None, (True, False, False))
    assert not lif.eligible(cfg, "reference", None, (True, True, False))
    assert not lif.eligible(cfg, "triton", object(), (True, True, False))
    assert not lif.eligible(cfg, "triton", None, (False, False, False))
    gspo = dataclasses.replace(cfg, importance_sampling_level="sequence")
    assert not lif.eligible(gspo, "triton", None, (True, True, False))
    assert not lif.eligible(cfg, "triton", None, (True, True, False),
                            torch.zeros(2, requires_grad=True))
    with torch.no_grad():
        assert not lif.eligible(cfg, "triton", None, (True, True, False))


# ---------------------------------------------------------------------------------------------
# the kernel pass alone, against the torch backend's in float64
# ---------------------------------------------------------------------------------------------


def _pass_inputs(n=37, d=24, v=291, seed=3):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=g, dtype=F64)
    w = torch.randn(v, d, generator=g, dtype=F64) * 0.5
    b = torch.randn(v, generator=g, dtype=F64) * 0.3
    y = torch.randint(0, v, (n,), generator=g)
    y[3], y[10] = -1, v  # out of range (validate=False upstream): logit 0, no one-hot term
    gl = torch.randn(n, generator=g, dtype=F64)
    ge = torch.randn(n, generator=g, dtype=F64) * 0.1
    return [t.to(DEVICE) for t in (h, w, b, y, gl, ge)]


@pytest.mark.parametrize("with_entropy", [False, True])
@pytest.mark.parametrize("params", [LogitParams(), LogitParams(0.7, 1.2, 6.0)],
                         ids=["plain", "scaled-capped"])
def test_pass_equals_the_torch_pass_in_float64(params, with_entropy):
    h, w, b, y, gl, ge = _pass_inputs()

    def grads(r0, r1, lp, ent):
        return gl[r0:r1].to(lp.dtype), (ge[r0:r1].to(lp.dtype) if with_entropy else None)

    needs = (True, True, True)
    want = torch_forward_with_grad(h, w, b, y, params, grads, needs)
    # 10 rows per chunk: four chunks, the last padded with 3 zero rows
    got = _epilogue().forward_with_grad(h.float(), w.float(), b.float(), y, params, grads, needs,
                                        budget=10 * (291 * 4 + 24 * 8))
    for name, a, c in zip(("logp", "entropy", "d hidden", "d weight", "d bias"), got, want):
        assert a.dtype == torch.float32, name
        err = (a.double() - c).abs().max().item()
        assert err <= 2e-5 * max(1.0, c.abs().max().item()), (name, err)


def test_pass_computes_only_what_is_needed():
    h, w, b, y, gl, _ = _pass_inputs()
    grads = lambda r0, r1, lp, ent: (gl[r0:r1].float(), None)  # noqa: E731
    full = _epilogue().forward_with_grad(h.float(), w.float(), b.float(), y, LogitParams(), grads,
                                         (True, True, True))
    for needs in ((True, False, False), (False, True, False), (False, False, True)):
        part = _epilogue().forward_with_grad(h.float(), w.float(), b.float(), y, LogitParams(),
                                             grads, needs)
        for want, got, need in zip(full[2:], part[2:], needs):
            assert (got is None) == (not need)
            if need:
                assert torch.equal(got, want)  # the same pass: the same bits
        assert torch.equal(part[0], full[0]) and torch.equal(part[1], full[1])


def test_pass_bias_gradient_sums_the_float32_gradient():
    """A bf16 head's gradient GEMMs read the kernel's bf16 copy of G, but d bias sums the float32
    G (kept over the workspace): it equals the torch pass's (float32 G, the same float32 logits)
    to float32 rounding, where a sum of the rounded copy is off by ~2^-9 per term (~1e-3 of the
    largest entry here, with rows that cancel)."""
    h, w, b, y, gl, _ = _pass_inputs(n=40, seed=9)
    h, w, b = h.bfloat16(), w.bfloat16(), b.bfloat16()
    gl = gl.float()
    grads = lambda r0, r1, lp, ent: (gl[r0:r1], None)  # noqa: E731
    needs = (False, False, True)
    want = torch_forward_with_grad(h, w, b, y, LogitParams(), grads, needs)[4]
    got = _epilogue().forward_with_grad(h, w, b, y, LogitParams(), grads, needs,
                                        budget=16 * (291 * 6 + 24 * 6))[4]
    err = (got - want).abs().max().item()
    assert err <= 1e-5 * want.abs().max().item(), err


def test_pass_on_no_rows():
    h, w, b, y, _, _ = _pass_inputs()
    h, y = h[:0], y[:0]
    out = _epilogue().forward_with_grad(h.float(), w.float(), b.float(), y, LogitParams(),
                                        lambda *a: pytest.fail("no rows, no loss call"),
                                        (True, True, True))
    assert out[0].shape == (0,) and out[2].shape == (0, 24)
    assert not out[3].any() and not out[4].any()


# ---------------------------------------------------------------------------------------------
# bitwise batch invariance
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_pass_rows_are_batch_invariant(dtype):
    """A row's logp, entropy and d hidden are bitwise the same alone, in any slice, permuted, at
    any position of its chunk (16-row chunks over 45 rows: three chunks, the last padded), with
    the loss's derivatives a function of the row alone."""
    n, d, v = 45, 32, 300
    h, w, b, y, gl, ge = _pass_inputs(n=n, d=d, v=v, seed=11)
    h, w, b = h.to(dtype), w.to(dtype), b.to(dtype)
    gl, ge = gl.float(), ge.float()
    params = LogitParams(0.9, 1.1, 12.0)
    budget = int(float(_budget_mb(16, v, d, dtype)) * (1 << 20))

    def run(idx):
        def grads(r0, r1, lp, ent):
            rows = idx[r0:r1]
            return gl[rows], ge[rows]
        logp, ent, dh, _, _ = _epilogue().forward_with_grad(h[idx], w, b, y[idx], params, grads,
                                                            (True, True, True), budget=budget)
        return logp, ent, dh

    everything = torch.arange(n, device=DEVICE)
    full = run(everything)
    for i in (0, 7, 15, 16, 31, 44):
        for lo, hi in ((i, i + 1), (max(0, i - 5), i + 1), (i, min(n, i + 20))):
            part = run(everything[lo:hi])
            for name, a, c in zip(("logp", "entropy", "d hidden"), part, full):
                assert torch.equal(a, c[lo:hi]), (name, i, lo, hi)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    for name, a, c in zip(("logp", "entropy", "d hidden"), run(perm), full):
        assert torch.equal(a, c[perm]), name
    again = run(everything)
    assert all(torch.equal(a, c) for a, c in zip(again, full))


def test_loss_rows_are_batch_invariant(monkeypatch):
    """Through fused_linear_policy_loss (token-sum: a token's loss gradient is its own): a
    sequence's logp, entropy and d hidden are bitwise the same alone or in the batch, with its
    tokens at other positions of the 8-row chunks."""
    monkeypatch.setenv("GCCPO_WORKSPACE_MB", _budget_mb(8, 300, 16))
    x, dtype = _inputs(b=4, t=9, seed=6)
    cfg = dataclasses.replace(CONFIGS[0], loss_agg="token-sum", entropy_coef=0.01,
                              entropy_agg="token-sum")

    def run(rows):
        h = x["h"][rows].float().requires_grad_()
        out = fused_linear_policy_loss(h, x["w"].float(), x["y"][rows], x["adv"][rows].float(),
                                       x["mask"][rows], old_logp=x["old"][rows].float(),
                                       ref_logp=x["ref"][rows].float(), bias=x["b"].float(),
                                       config=cfg, backend="triton", softcap=10.0, **LOGIT)
        out.loss.backward()
        return out.logp, out.entropy, h.grad

    full = run(slice(0, 4))
    for lo, hi in ((0, 1), (2, 3), (3, 4), (2, 4)):
        part = run(slice(lo, hi))
        for name, a, c in zip(("logp", "entropy", "d hidden"), part, full):
            assert torch.equal(a, c[lo:hi]), (name, lo, hi)


# ---------------------------------------------------------------------------------------------
# GEMM FLOPs
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rows", [64, 40])
def test_flops_are_6nvd_on_the_triton_backend(rows, monkeypatch):
    """GEMM FLOPs of forward + backward (counted on the aten products, tests/kernels/_flops.py):
    exactly 6 N_pad V D, N_pad the n kept tokens rounded up to the chunk's R rows: 6 n V D when
    R divides n (R = 64, n = 64), one padded chunk's worth more otherwise (R = 40: two chunks).
    The Triton kernels do no GEMM work; the backward does none at all."""
    b, t, d, v = 4, 16, 32, 1000
    x, dtype = _inputs(b=b, t=t, d=d, v=v, bias=False)
    x["mask"] = torch.ones_like(x["mask"])
    n = b * t
    monkeypatch.setenv("GCCPO_WORKSPACE_MB", _budget_mb(rows, v, d))
    h, w = x["h"].float().requires_grad_(), x["w"].float().requires_grad_()
    with GemmFlops() as fwd:
        out = fused_linear_policy_loss(h, w, x["y"], x["adv"].float(), x["mask"],
                                       old_logp=x["old"].float(), ref_logp=x["ref"].float(),
                                       config=CONFIGS[3], backend="triton")
    with GemmFlops() as bwd:
        out.loss.backward()
    n_pad = -(-n // rows) * rows
    assert fwd.flops == 6 * n_pad * v * d, fwd.flops / (n * v * d)
    assert bwd.flops == 0
    if rows == 64:
        assert fwd.flops == 6 * n * v * d
