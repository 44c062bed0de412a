"""Issue 18: the fused policy loss computes its gradient in the forward (6NVD GEMM FLOPs, not
8NVD) on the torch backend (the triton backend's pass: tests/kernels/test_loss_epilogue.py),
equal to the composed path (forward, then a backward that recomputes the logits) and to
materialized float64 logits, for every token-level aggregation; the composed path stays for what
is not elementwise in the tokens (GSPO's sequence-level ratio) and for the backends without an
in-forward pass. FLOPs are counted by a dispatch mode (tests/kernels/_flops.py)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import gccpo_kernels.loss_in_forward as lif
from gccpo_kernels import fused_linear_logprobs
from gccpo_kernels.chunked.loss_grad import forward_with_grad
from gccpo_kernels.policy_loss import PolicyLossConfig, fused_linear_policy_loss, policy_loss
from gccpo_kernels._logits import LogitParams
from tests.kernels._flops import GemmFlops

F64 = torch.float64


def _configs() -> list[PolicyLossConfig]:
    trl = [PolicyLossConfig.from_trl(t, beta=0.04, epsilon_high=0.28,
                                     **({"max_completion_length": 9} if t == "dr_grpo" else {}))
           for t in ("grpo", "bnpo", "dr_grpo", "dapo")]
    verl = [PolicyLossConfig.from_verl(m, clip_ratio_c=3.0)
            for m in ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")]
    extra = [dataclasses.replace(trl[0], entropy_coef=0.01),
             dataclasses.replace(trl[3], entropy_coef=0.02, entropy_agg="seq-mean-token-mean"),
             dataclasses.replace(trl[3], delta=1.5, kl_bias_correction=True)]
    return trl + verl + extra


CONFIGS = _configs()


def _inputs(b=3, t=7, d=16, v=300, dtype=F64, seed=1, bias=True):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(b, t, d, generator=g, dtype=F64).to(dtype).requires_grad_()
    w = (torch.randn(v, d, generator=g, dtype=F64) * 0.4).to(dtype).requires_grad_()
    bb = (torch.randn(v, generator=g, dtype=F64) * 0.3).to(dtype).requires_grad_() if bias else None
    y = torch.randint(0, v, (b, t), generator=g)
    mask = torch.rand(b, t, generator=g) > 0.25
    if b > 1:
        mask[1] = False  # an empty row
    adv = torch.randn(b, generator=g, dtype=F64)
    old = torch.randn(b, t, generator=g, dtype=F64) * 0.3 - 5.7
    ref = torch.randn(b, t, generator=g, dtype=F64) * 0.3 - 5.7
    return dict(h=h, w=w, b=bb, y=y, mask=mask, adv=adv, old=old, ref=ref)


def _run(x, cfg, *, in_forward: bool, monkeypatch, scale: float = 1.7, **kw):
    """(loss, dh, dW, db, logp, entropy, metrics); the composed path forced when not in_forward."""
    calls = []
    real = lif.fused_loss_in_forward

    def spy(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(lif, "fused_loss_in_forward", spy)
    if not in_forward:
        monkeypatch.setattr(lif, "eligible", lambda *a: False)
    for t in (x["h"], x["w"], x["b"]):
        if t is not None:
            t.grad = None
    out = fused_linear_policy_loss(x["h"], x["w"], x["y"], x["adv"], x["mask"], old_logp=x["old"],
                                   ref_logp=x["ref"], bias=x["b"], config=cfg, backend="torch",
                                   temperature=0.8, **kw)
    (out.loss * scale).backward()
    monkeypatch.undo()
    assert bool(calls) == in_forward
    db = x["b"].grad if x["b"] is not None else None
    return out.loss.detach(), x["h"].grad, x["w"].grad, db, out.logp, out.entropy, out.metrics


@pytest.mark.parametrize("softcap", [None, 20.0])
@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"{c.loss_agg}-ent{c.entropy_coef}-d{c.delta}")
def test_equals_the_composed_path_float64(cfg, softcap, monkeypatch):
    x = _inputs()
    a = _run(x, cfg, in_forward=True, monkeypatch=monkeypatch, softcap=softcap)
    c = _run(x, cfg, in_forward=False, monkeypatch=monkeypatch, softcap=softcap)
    for got, want in zip(a[:6], c[:6]):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
    assert a[6].keys() == c[6].keys()
    for k in a[6]:
        torch.testing.assert_close(a[6][k], c[6][k], rtol=1e-12, atol=1e-14, msg=k)


@pytest.mark.parametrize("scale", [1.0, -1.0, 0.0])
def test_upstream_gradient_of_one_and_others(scale, monkeypatch):
    """loss.backward() (an upstream gradient of exactly 1, whose scaling pass is skipped on the
    CPU), -1 and 0: the composed path's gradients to 1e-12."""
    x = _inputs()
    a = _run(x, CONFIGS[3], in_forward=True, monkeypatch=monkeypatch, scale=scale)
    c = _run(x, CONFIGS[3], in_forward=False, monkeypatch=monkeypatch, scale=scale)
    for got, want in zip(a[1:4], c[1:4]):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)


def test_matches_materialized_float64_logits(monkeypatch):
    """Against the textbook loss on full float64 logits, through policy_loss's autograd."""
    cfg = dataclasses.replace(CONFIGS[3], entropy_coef=0.01)
    x = _inputs()
    got = _run(x, cfg, in_forward=True, monkeypatch=monkeypatch, scale=1.0, softcap=20.0)
    h, w, b = (t.detach().clone().requires_grad_() for t in (x["h"], x["w"], x["b"]))
    u = (h @ w.T + b) / 0.8
    z = 20.0 * torch.tanh(u / 20.0)
    lsm = torch.log_softmax(z, -1)
    logp = lsm.gather(-1, x["y"][..., None]).squeeze(-1)
    ent = -(lsm.exp() * lsm).sum(-1)
    loss, _ = policy_loss(logp, x["old"], x["adv"], x["mask"], ref_logp=x["ref"], entropy=ent, config=cfg)
    loss.backward()
    for g, want in zip(got[:4], (loss.detach(), h.grad, w.grad, b.grad)):
        torch.testing.assert_close(g, want, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-5), (torch.bfloat16, 2e-2)])
def test_low_precision_close_to_the_composed_path(dtype, tol, monkeypatch):
    x = _inputs(dtype=dtype)
    a = _run(x, CONFIGS[3], in_forward=True, monkeypatch=monkeypatch)
    c = _run(x, CONFIGS[3], in_forward=False, monkeypatch=monkeypatch)
    for got, want in zip(a[:6], c[:6]):
        assert got.dtype == want.dtype
        err = (got.double() - want.double()).abs().max() / want.double().abs().max().clamp(min=1e-30)
        assert err <= tol, err


def test_normalizer_loss_scale_and_importance_weights(monkeypatch):
    x = _inputs()
    isw = torch.rand(3, 7, generator=torch.Generator().manual_seed(5), dtype=F64) + 0.5
    kw = dict(normalizer=torch.tensor(11.0, dtype=F64), loss_scale=0.25, is_weights=isw)
    a = _run(x, CONFIGS[3], in_forward=True, monkeypatch=monkeypatch, **kw)
    c = _run(x, CONFIGS[3], in_forward=False, monkeypatch=monkeypatch, **kw)
    for got, want in zip(a[:6], c[:6]):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)


def test_frozen_head_and_frozen_hidden(monkeypatch):
    """Only the gradients asked for are computed (and equal the composed path's)."""
    for frozen in ("w", "h"):
        x = _inputs()
        x[frozen].requires_grad_(False)
        a = _run(x, CONFIGS[0], in_forward=True, monkeypatch=monkeypatch)
        x2 = _inputs()
        x2[frozen].requires_grad_(False)
        c = _run(x2, CONFIGS[0], in_forward=False, monkeypatch=monkeypatch)
        for got, want in zip(a[:4], c[:4]):
            assert (got is None) == (want is None)
            if got is not None:
                torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)


def test_the_composed_path_stays_where_it_must(monkeypatch):
    """GSPO (sequence-level ratio), no_grad, the reference backend: the in-forward path is not
    taken (the triton backend has its own: tests/kernels/test_loss_epilogue.py)."""
    x = _inputs()
    gspo = dataclasses.replace(CONFIGS[0], importance_sampling_level="sequence")
    _run(x, gspo, in_forward=False, monkeypatch=monkeypatch)  # asserts the spy was not called
    assert not lif.eligible(CONFIGS[0], "reference", None, (True, True, False))
    assert not lif.eligible(CONFIGS[0], "torch", object(), (True, True, False))
    assert not lif.eligible(CONFIGS[0], "torch", None, (False, False, False))
    with torch.no_grad():
        assert not lif.eligible(CONFIGS[0], "torch", None, (True, True, False))


def test_empty_batch_and_all_masked(monkeypatch):
    for b, t, all_masked in ((0, 5, False), (3, 0, False), (3, 4, True)):
        x = _inputs(b=max(b, 1), t=max(t, 1))
        x = {k: (v[:b, :t] if k in ("y", "mask", "old", "ref") else v) for k, v in x.items()}
        x["adv"] = x["adv"][:b]
        x["h"] = x["h"].detach()[:b, :t].clone().requires_grad_()
        if all_masked:
            x["mask"] = torch.zeros_like(x["mask"])
        out = _run(x, CONFIGS[3], in_forward=True, monkeypatch=monkeypatch)
        assert out[0].item() == 0.0
        assert not out[1].any() and not out[2].any()


def test_a_second_backward_is_refused(monkeypatch):
    x = _inputs()
    out = fused_linear_policy_loss(x["h"], x["w"], x["y"], x["adv"], x["mask"], old_logp=x["old"],
                                   ref_logp=x["ref"], config=CONFIGS[3], backend="torch")
    out.loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="once"):
        out.loss.backward()


def _flops_of(fn) -> int:
    with GemmFlops() as f:
        fn()
    return f.flops


def test_flops_fused_loss_is_6nvd_and_the_primitive_8nvd(monkeypatch):
    """GEMM FLOPs counted on the aten products: forward + backward of the fused loss is 6nVD
    (n unmasked tokens) plus lower-order terms; the composed path and the primitive are 8nVD."""
    b, t, d, v = 4, 16, 32, 1000
    x = _inputs(b=b, t=t, d=d, v=v, dtype=torch.float32, bias=False)
    n = int(x["mask"].sum())
    nvd = n * v * d

    def fused():
        out = fused_linear_policy_loss(x["h"], x["w"], x["y"], x["adv"], x["mask"], old_logp=x["old"],
                                       ref_logp=x["ref"], config=CONFIGS[3], backend="torch")
        out.loss.backward()

    got = _flops_of(fused)
    assert 6 * nvd <= got <= 6 * nvd + 4 * n * v, (got / nvd)
    monkeypatch.setattr(lif, "eligible", lambda *a: False)
    composed = _flops_of(fused)
    assert 8 * nvd <= composed <= 8 * nvd + 4 * n * v, (composed / nvd)
    monkeypatch.undo()

    def primitive():
        y = x["y"].masked_fill(~x["mask"], -100)
        logp, ent = fused_linear_logprobs(x["h"], x["w"], y, return_entropy=True, backend="torch")
        (logp.sum() + ent.sum()).backward()

    prim = _flops_of(primitive)
    assert 8 * nvd <= prim <= 8 * nvd + 4 * n * v, (prim / nvd)


def test_flops_divergence_reads_w_once():
    """The divergence's GEMMs are one pass over W: 2 (M+1) R V D for the base and M perturbed
    latents of R rows (one GEMM of the stacked latents per chunk)."""
    from gccpo_kernels import counterfactual_divergence

    r, m, d, v = 6, 3, 16, 500
    g = torch.Generator().manual_seed(0)
    h = torch.randn(r, d, generator=g)
    w = torch.randn(v, d, generator=g) * 0.3
    deltas = torch.randn(r, m, d, generator=g) * 0.05
    got = _flops_of(lambda: counterfactual_divergence(h, w, deltas, backend="torch"))
    # plus two batched matrix-vector products over [R, M, V] (the expectations under q), O(RMV)
    assert got == 2 * (m + 1) * r * v * d + 2 * 2 * r * m * v, got / (r * v * d)


def test_kernel_chunks_equal_one_chunk():
    """forward_with_grad's result does not depend on how many rows share a tile (float64)."""
    g = torch.Generator().manual_seed(3)
    h = torch.randn(29, 8, generator=g, dtype=F64)
    w = torch.randn(120, 8, generator=g, dtype=F64)
    y = torch.randint(0, 120, (29,), generator=g)
    gl, ge = torch.randn(29, generator=g, dtype=F64), torch.randn(29, generator=g, dtype=F64)
    grads = lambda r0, r1, lp, ent: (gl[r0:r1], ge[r0:r1])  # noqa: E731
    params = LogitParams(0.9, 1.1, 7.0)
    whole = forward_with_grad(h, w, None, y, params, grads, (True, True, False), budget=1 << 30)
    tiled = forward_with_grad(h, w, None, y, params, grads, (True, True, False), budget=120 * 8 * 3 * 4)
    for a, c in zip(whole, tiled):
        if a is not None:
            torch.testing.assert_close(a, c, rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("softcap,cfg", [(30.0, CONFIGS[3]), (None, CONFIGS[3]),
                                         (None, CONFIGS[-2])], ids=["cap", "logp-only", "entropy"])
@pytest.mark.parametrize("direction", [1.0, -1.0], ids=["rising", "falling"])
def test_many_vocabulary_blocks_float64(softcap, cfg, direction, monkeypatch):
    """V above the GEMM block (4096) and a workspace small enough for several row chunks and
    column blocks: still equal to the composed path to 1e-12 (without a cap and an entropy term,
    the gradient from the statistics pass's exponentials, each block at its own max, the blocks
    combined at the end), with block maxima rising or falling by e^24 across the vocabulary."""
    from gccpo_kernels.chunked import loss_grad

    monkeypatch.setenv("GCCPO_WORKSPACE_MB", "0.5")
    monkeypatch.setattr(loss_grad, "BLOCK_BYTES", 4096)  # 256-column blocks: 36 per row chunk
    x = _inputs(b=4, t=9, d=8, v=9000)
    x["b"].data += torch.linspace(-12, 12, 9000, dtype=F64) * direction  # block maxima apart
    from_exp = []
    real = loss_grad._grad_from_exp_
    monkeypatch.setattr(loss_grad, "_grad_from_exp_", lambda *a: from_exp.append(1) or real(*a))
    a = _run(x, cfg, in_forward=True, monkeypatch=monkeypatch, softcap=softcap)
    # the gradient from the statistics pass's exponentials exactly when the loss reads no entropy
    assert bool(from_exp) == (softcap is None and cfg.entropy_coef == 0)
    monkeypatch.setenv("GCCPO_WORKSPACE_MB", "0.5")
    monkeypatch.setattr(loss_grad, "BLOCK_BYTES", 4096)
    c = _run(x, cfg, in_forward=False, monkeypatch=monkeypatch, softcap=softcap)
    for got, want in zip(a[:6], c[:6]):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)


def test_float16_gradients_survive_a_large_loss_scale(monkeypatch):
    """fp16 with a GradScaler-like factor: the stored gradients are float32 until the backward has
    scaled them, so small logit gradients are not flushed to zero before the scale arrives."""
    x = _inputs(dtype=torch.float16)
    scale = 65536.0
    a = _run(x, CONFIGS[3], in_forward=True, monkeypatch=monkeypatch, scale=scale)
    c = _run(x, CONFIGS[3], in_forward=False, monkeypatch=monkeypatch, scale=scale)
    for got, want in zip(a[1:4], c[1:4]):
        assert got.dtype == torch.float16 and torch.isfinite(got).all()
        err = (got.double() - want.double()).abs().max() / want.double().abs().max()
        assert err <= 2e-3, err
        # as many nonzero entries as the composed path (no flush to zero)
        assert int((got != 0).sum()) >= 0.99 * int((want != 0).sum())


def test_inputs_that_need_a_gradient_take_the_composed_path(monkeypatch):
    """Advantages (or old / reference log-probs, weights, a tensor normalizer) that require grad
    get their gradient: the composed path runs."""
    x = _inputs()
    x["adv"] = x["adv"].clone().requires_grad_()
    _run(x, CONFIGS[3], in_forward=False, monkeypatch=monkeypatch)  # asserts: no in-forward call
    assert x["adv"].grad is not None and x["adv"].grad.abs().sum() > 0


def test_one_element_normalizer_of_any_shape(monkeypatch):
    x = _inputs()
    kw = dict(normalizer=torch.tensor([11.0], dtype=F64), loss_scale=torch.tensor([[0.5]], dtype=F64))
    a = _run(x, CONFIGS[3], in_forward=True, monkeypatch=monkeypatch, **kw)
    c = _run(x, CONFIGS[3], in_forward=False, monkeypatch=monkeypatch, **kw)
    for got, want in zip(a[:6], c[:6]):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)


def test_unchecked_bad_targets_match_the_composed_path(monkeypatch):
    """validate=False: an out-of-range target reads logit 0 and an unmasked ignore_index token
    gets logp 0, on both paths alike."""
    x = _inputs()
    x["y"] = x["y"].clone()
    x["y"][0, 0], x["y"][0, 1], x["y"][2, 3] = 10_000, -7, -100
    x["mask"] = x["mask"].clone()
    x["mask"][0, :2] = True
    x["mask"][2, 3] = True
    a = _run(x, CONFIGS[3], in_forward=True, monkeypatch=monkeypatch, validate=False)
    c = _run(x, CONFIGS[3], in_forward=False, monkeypatch=monkeypatch, validate=False)
    for got, want in zip(a[:6], c[:6]):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)


def test_double_backward_is_refused():
    x = _inputs()
    out = fused_linear_policy_loss(x["h"], x["w"], x["y"], x["adv"], x["mask"], old_logp=x["old"],
                                   ref_logp=x["ref"], config=CONFIGS[3], backend="torch")
    (gh,) = torch.autograd.grad(out.loss, x["h"], create_graph=True)
    with pytest.raises(RuntimeError):
        gh.sum().backward()
