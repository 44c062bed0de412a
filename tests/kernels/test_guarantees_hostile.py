"""Guarantee: hostile inputs give a clear error or a documented, tested result, never garbage.
Every public op, every backend where the input reaches it.

- NaN / inf in hidden states (and deltas): ValueError with validate=True; with validate=False the
  non-finite values stay in their row (§1, §3) or their group (§4), every other result unchanged.
  perturb_latents has no validate switch: a NaN row gives NaN deltas in that row (and in rows
  that draw it as a sibling), and counterfactual_divergence rejects them.
- NaN / inf in advantages and rewards: ValueError where they are read (unmasked tokens, a
  completion's episodes, outcome rewards); ignored where the spec says they are not read.
- targets out of range: ValueError; with validate=False the fast backends never read out of
  bounds and give logp = -lse (the target logit reads as 0).
- negative group sizes / ids: ValueError (group offsets, group ids, sibling group indices); any
  integer group ids in token_advantages (documented: only equality matters).
- non-contiguous and expanded (stride-0) tensors: the same result as dense copies, bit for bit.
- mixed devices (CPU with a 'meta' tensor standing in for a second device): ValueError naming
  the devices, for every tensor argument of every op.
- policy_loss: NaN / inf in logp, old_logp, ref_logp, entropy or is_weights where read, a tensor
  normalizer <= 0 / NaN / inf, a tensor loss_scale NaN / inf: ValueError naming it (inside the op
  gccpo::checked_loss_inputs, so it compiles without graph breaks); masked garbage is ignored.
- a non-finite LM-head bias: ValueError naming the bias; D = 0: ValueError; the reference
  backend's outputs are checked as the fast backends' are; token_advantages rejects masks that
  are not 0/1 (ValueError) or complex (TypeError).
- empty inputs: the empty answer (a loss of 0 with zero gradients), never a crash.
The matrix of every op x argument x hostile input is tests/kernels/test_hostile_suite.py.
"""

from __future__ import annotations

import math

import pytest
import torch

import gccpo_kernels as gk
from gccpo_kernels import reference as ref
from tests.conftest import DEVICE, available_backends, lm_head as head
from tests.kernels.test_advantages import make_batch, on

BACKENDS = available_backends()
FAST = [b for b in BACKENDS if b != "reference"]
F64 = torch.float64


def dtype_for(backend: str) -> torch.dtype:
    return torch.float32 if backend == "triton" else F64


# ---------------------------------------------------------------------------------------------
# NaN / inf in hidden states
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_hidden(backend, bad):
    dtype = dtype_for(backend)
    h, w, b = head(12, 16, 300, dtype=dtype)
    y = torch.randint(0, 300, (12,), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    dirty = h.clone()
    dirty[4, 3] = bad
    dl = gk.perturb_latents(h, 2, sigma=0.1, generator=torch.Generator(device=h.device).manual_seed(2))
    offsets = torch.tensor([0, 3, 8, 12], device=DEVICE)  # row 4 is in group 1
    calls = {
        "linear_logprobs": lambda hh, v: gk.fused_linear_logprobs(hh, w, y, bias=b, return_entropy=True,
                                                                 backend=backend, validate=v),
        "policy_loss": lambda hh, v: (gk.fused_linear_policy_loss(
            hh.reshape(3, 4, 16), w, y.reshape(3, 4), torch.ones(3, dtype=dtype, device=DEVICE),
            torch.ones(3, 4, dtype=torch.bool, device=DEVICE), bias=b, backend=backend, validate=v).logp,),
        "divergence": lambda hh, v: (gk.counterfactual_divergence(hh, w, dl, bias=b, backend=backend, validate=v),),
        "group_stats": lambda hh, v: tuple(gk.group_distribution_stats(hh, w, group_offsets=offsets, bias=b,
                                                                       backend=backend, validate=v)),
    }
    for name, call in calls.items():
        with pytest.raises(ValueError, match="non-finite"):
            call(dirty, True)
        if backend == "reference":
            continue  # the reference is the textbook formula: it has no containment to promise
        clean, out = call(h, True), call(dirty, False)
        for c, o in zip(clean, out):
            c, o = c.reshape(c.shape[0], -1) if c.dim() else c, o.reshape(o.shape[0], -1) if o.dim() else o
            if name == "group_stats" and c.shape[0] == 3:  # per group: group 1 holds the bad row
                keep = torch.tensor([True, False, True], device=DEVICE)
            elif name == "policy_loss":
                keep = torch.tensor([True, False, True], device=DEVICE)  # row 4 is sequence 1
            elif name == "group_stats":
                keep = (torch.arange(12, device=DEVICE) < 3) | (torch.arange(12, device=DEVICE) >= 8)
            else:
                keep = torch.arange(12, device=DEVICE) != 4
            assert torch.equal(o[keep], c[keep]), f"{name}: the bad row leaked into other rows"
            assert not bool(torch.isfinite(o[~keep]).all()), f"{name}: a non-finite input gave a finite result"
    dirty_deltas = dl.clone()
    dirty_deltas[2, 1, 0] = bad
    with pytest.raises(ValueError, match="deltas holds"):
        gk.counterfactual_divergence(h, w, dirty_deltas, backend=backend)


def test_perturb_latents_propagates_a_bad_row_only_to_its_deltas():
    """No validate switch: a NaN row gives NaN deltas in its row (gaussian) or in rows that draw
    it (sibling); counterfactual_divergence then rejects the deltas."""
    h, w, _ = head(6, 8, 50, dtype=F64)
    h[2, 0] = float("nan")
    dl = gk.perturb_latents(h, 3, sigma=0.1, generator=torch.Generator(device=h.device).manual_seed(3))
    finite = torch.isfinite(dl).flatten(1).all(dim=1)
    assert finite.tolist() == [True, True, False, True, True, True]
    sib = gk.perturb_latents(h, 3, mode="sibling", group_index=torch.tensor([0, 0, 0, 1, 1, 2], device=DEVICE),
                             generator=torch.Generator(device=h.device).manual_seed(4))
    assert bool(torch.isfinite(sib[3:]).all())
    with pytest.raises(ValueError, match="non-finite"):
        gk.counterfactual_divergence(h, w, sib)


# ---------------------------------------------------------------------------------------------
# NaN / inf in advantages and rewards
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_finite_advantages_and_rewards(backend):
    dtype = dtype_for(backend)
    h, w, _ = head(12, 16, 64, dtype=dtype)
    y = torch.randint(0, 64, (3, 4), generator=torch.Generator().manual_seed(5)).to(DEVICE)
    mask = torch.ones(3, 4, dtype=torch.bool, device=DEVICE)
    mask[2, 2:] = False
    adv = torch.randn(3, 4, generator=torch.Generator().manual_seed(6), dtype=F64).to(dtype).to(DEVICE)
    run = lambda a: gk.fused_linear_policy_loss(h.reshape(3, 4, 16), w, y, a, mask, backend=backend)  # noqa: E731
    clean = run(adv)
    for bad in (float("nan"), float("inf")):
        read = adv.clone()
        read[0, 1] = bad
        with pytest.raises(ValueError, match="advantages hold"):
            run(read)
        unread = adv.clone()
        unread[2, 3] = bad  # a masked token: never read
        assert torch.equal(run(unread).loss, clean.loss)
    batch = on(make_batch(9, B=6, T=30, K=4), backend, float_dtype=dtype)  # garbage where nothing is read
    base = gk.token_advantages(**batch, backend=backend)
    assert bool(torch.isfinite(base).all())
    for key, where, match in (("outcome_rewards", (1,), "outcome_rewards hold"),
                              ("old_logp", None, "old_logp holds"),
                              ("episode_rewards", None, "episode_rewards hold")):
        poisoned = {k: v.clone() for k, v in batch.items()}
        if key == "outcome_rewards":
            poisoned[key][where] = float("nan")
        elif key == "old_logp":  # a token inside an episode
            i, t = (batch["mask"] & (batch["episode_ids"] >= 0)).nonzero()[0].tolist()
            poisoned[key][i, t] = -float("inf")
        else:  # an episode a completion has
            i = int((batch["mask"] & (batch["episode_ids"] >= 0)).any(dim=1).nonzero()[0])
            poisoned[key][i, 0] = float("nan")
        with pytest.raises(ValueError, match=match):
            gk.token_advantages(**poisoned, backend=backend)
    rob = torch.tensor([[0.5, float("nan")]])
    out = gk.episode_rewards(rob, torch.zeros(1, 2))  # elementwise: documented pass-through
    assert bool(torch.isnan(out[0, 1])) and out[0, 0].item() == pytest.approx(0.45)


# ---------------------------------------------------------------------------------------------
# targets out of range
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad_target", [300, 10**9, -1, -(2**40)])
def test_targets_out_of_range(backend, bad_target):
    dtype = dtype_for(backend)
    h, w, b = head(6, 16, 300, dtype=dtype)
    y = torch.tensor([1, 5, 299, 0, 7, 8], device=DEVICE)
    y[2] = bad_target
    with pytest.raises(ValueError, match=r"outside \[0, 300\)"):
        gk.fused_linear_logprobs(h, w, y, bias=b, backend=backend)
    mask = torch.ones(2, 3, dtype=torch.bool, device=DEVICE)
    with pytest.raises(ValueError, match=r"outside \[0, 300\)"):
        gk.fused_linear_policy_loss(h.reshape(2, 3, 16), w, y.reshape(2, 3), torch.ones(2, dtype=dtype, device=DEVICE),
                                    mask, bias=b, backend=backend)
    mask[0, 2] = False  # a masked token's target is never read
    gk.fused_linear_policy_loss(h.reshape(2, 3, 16), w, y.reshape(2, 3), torch.ones(2, dtype=dtype, device=DEVICE),
                                mask, bias=b, backend=backend)
    if backend == "reference":
        return
    logp, ent = gk.fused_linear_logprobs(h, w, y, bias=b, return_entropy=True, backend=backend, validate=False)
    _, rent = ref.linear_logprobs(h.double(), w.double(), y.clamp(0, 299), bias=b.double(), dtype=F64)
    lse = torch.logsumexp(ref.logits(h.double(), w.double(), b.double(), dtype=F64), dim=-1)
    assert abs(logp[2].item() + lse[2].item()) <= 5e-5 * max(1.0, lse[2].abs().item())
    assert abs(ent[2].item() - rent[2].item()) <= 5e-5 * max(1.0, rent[2].abs().item())


# ---------------------------------------------------------------------------------------------
# group layouts: negative sizes and ids
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_negative_group_sizes_and_ids(backend):
    dtype = dtype_for(backend)
    h, w, _ = head(6, 16, 40, dtype=dtype)
    for offsets, match in (([0, 4, 2, 6], "non-decreasing"), ([0, -1, 6], "non-decreasing"),
                           ([-2, 3, 6], "start at 0"), ([0, 3, 7], "end at R")):
        with pytest.raises(ValueError, match=match):
            gk.group_distribution_stats(h, w, group_offsets=torch.tensor(offsets, device=DEVICE), backend=backend)
    with pytest.raises(ValueError, match=">= 0"):
        gk.group_distribution_stats(h, w, group_ids=torch.tensor([0, 1, -1, 0, 1, 1], device=DEVICE), backend=backend)
    with pytest.raises(ValueError, match="num_groups"):
        gk.group_distribution_stats(h, w, group_ids=torch.tensor([0, 1, 0, 0, 1, 1], device=DEVICE), num_groups=-3,
                                    backend=backend)
    with pytest.raises(ValueError, match="non-negative"):
        gk.perturb_latents(h, 2, mode="sibling", group_index=torch.tensor([0, 1, -1, 0, 1, 1], device=DEVICE))
    # token_advantages: any integer ids (negative included); only equality matters
    batch = on(make_batch(10, B=6, T=20, K=3, groups=[0, 1, 0, 2, 1, 2]), backend, float_dtype=dtype)
    shifted = dict(batch, group_index=batch["group_index"] * 7 - 50)
    assert torch.equal(gk.token_advantages(**batch, backend=backend), gk.token_advantages(**shifted, backend=backend))


# ---------------------------------------------------------------------------------------------
# non-contiguous and expanded tensors
# ---------------------------------------------------------------------------------------------


def _strided(t: torch.Tensor) -> torch.Tensor:
    """A non-contiguous view with t's values: every other element of a doubled last dimension."""
    return torch.stack([t, torch.full_like(t, 1234.5) if t.is_floating_point() else t], dim=-1)[..., 0]


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_and_expanded_tensors(backend):
    """Stride-0 (expanded) and strided views give bitwise the results of dense copies."""
    dtype = dtype_for(backend)
    h, w, b = head(8, 16, 97, dtype=dtype)
    h_exp = h[:1].expand(8, 16)                         # stride 0 over rows
    w_str, b_str = _strided(w), _strided(b)
    y = torch.tensor([3, 4, 5, 6, 7, 8, 9, 10], device=DEVICE)
    y_exp = y[:1].expand(8)
    assert h_exp.stride(0) == 0 and not w_str.is_contiguous() and y_exp.stride(0) == 0
    dense = lambda t: t.contiguous()  # noqa: E731
    got = gk.fused_linear_logprobs(h_exp, w_str, y_exp, bias=b_str, return_entropy=True, backend=backend)
    want = gk.fused_linear_logprobs(dense(h_exp), dense(w_str), dense(y_exp), bias=dense(b_str), return_entropy=True,
                                    backend=backend)
    assert all(torch.equal(a, c) for a, c in zip(got, want))
    # expanded [B] advantages, a transposed-back mask and strided old log-probs for the fused loss
    h3 = h.reshape(2, 4, 16)
    adv = torch.tensor([0.5, -1.0], dtype=dtype, device=DEVICE)[:, None].expand(2, 4)
    mask = torch.ones(4, 2, dtype=torch.bool, device=DEVICE).T
    old = _strided(-torch.rand(2, 4, generator=torch.Generator().manual_seed(7), dtype=F64).to(dtype).to(DEVICE))
    got = gk.fused_linear_policy_loss(h3, w_str, y.reshape(2, 4), adv, mask, old_logp=old, bias=b_str, backend=backend)
    want = gk.fused_linear_policy_loss(h3, dense(w_str), y.reshape(2, 4), dense(adv), dense(mask), old_logp=dense(old),
                                       bias=dense(b_str), backend=backend)
    assert torch.equal(got.loss, want.loss)
    dl = gk.perturb_latents(h, 3, sigma=0.1, generator=torch.Generator(device=h.device).manual_seed(8))
    dl_exp = dl[:, :1].expand(8, 3, 16)
    got = gk.counterfactual_divergence(_strided(h), w_str, dl_exp, bias=b_str, backend=backend)
    want = gk.counterfactual_divergence(h, dense(w_str), dense(dl_exp), bias=dense(b_str), backend=backend)
    assert torch.equal(got, want)
    ids = torch.tensor([0, 1], device=DEVICE).repeat_interleave(4)
    got = gk.group_distribution_stats(h_exp, w_str, group_ids=_strided(ids), bias=b_str, backend=backend)
    want = gk.group_distribution_stats(dense(h_exp), dense(w_str), group_ids=ids, bias=dense(b_str), backend=backend)
    assert all(torch.equal(a, c) for a, c in zip(got, want))
    batch = on(make_batch(11, B=5, T=16, K=3), backend, float_dtype=dtype)
    views = dict(batch, mask=batch["mask"].T.contiguous().T, old_logp=_strided(batch["old_logp"]),
                 outcome_rewards=batch["outcome_rewards"][:1].expand(5),
                 episode_ids=_strided(batch["episode_ids"]))
    assert not views["mask"].is_contiguous() and views["outcome_rewards"].stride(0) == 0
    dense_views = {k: (v.contiguous() if isinstance(v, torch.Tensor) else v) for k, v in views.items()}
    assert torch.equal(gk.token_advantages(**views, backend=backend), gk.token_advantages(**dense_views, backend=backend))
    rob = torch.randn(3, 1).expand(3, 4)
    eff = _strided(torch.randn(3, 4))
    assert torch.equal(gk.episode_rewards(rob, eff), gk.episode_rewards(rob.contiguous(), eff.contiguous()))


# ---------------------------------------------------------------------------------------------
# mixed devices
# ---------------------------------------------------------------------------------------------


def test_mixed_devices_raise_clear_errors():
    """A 'meta' tensor stands in for a second device (this machine has one): every tensor argument
    of every op is checked, and the error names the devices."""
    h, w, b = head(4, 8, 20)
    y = torch.tensor([1, 2, 3, 4], device=DEVICE)
    meta = lambda t: t.to("meta")  # noqa: E731
    match = r"meta|device"
    cases = [
        lambda: gk.fused_linear_logprobs(meta(h), w, y),
        lambda: gk.fused_linear_logprobs(h, meta(w), y),
        lambda: gk.fused_linear_logprobs(h, w, y, bias=meta(b)),
        lambda: gk.fused_linear_logprobs(h, w, meta(y)),
        lambda: gk.fused_linear_policy_loss(h.reshape(1, 4, 8), w, y.reshape(1, 4), meta(torch.ones(1)),
                                            torch.ones(1, 4, dtype=torch.bool, device=DEVICE)),
        lambda: gk.counterfactual_divergence(h, w, meta(torch.zeros(4, 2, 8))),
        lambda: gk.counterfactual_divergence(h, w, torch.zeros(4, 2, 8, device=DEVICE),
                                             answer_token_ids=meta(torch.tensor([1, 2]))),
        lambda: gk.group_distribution_stats(h, meta(w), group_offsets=torch.tensor([0, 4], device=DEVICE)),
        lambda: gk.group_distribution_stats(h, w, group_offsets=meta(torch.tensor([0, 4]))),
        lambda: gk.group_distribution_stats(h, w, group_ids=meta(torch.tensor([0, 0, 1, 1]))),
        lambda: gk.perturb_latents(h, 2, mode="sibling", group_index=meta(torch.tensor([0, 0, 1, 1]))),
        lambda: gk.episode_rewards(torch.zeros(2, 3), meta(torch.zeros(2, 3))),
    ]
    batch = on(make_batch(12, B=3, T=8, K=2), "torch")
    for key in batch:
        cases.append(lambda key=key: gk.token_advantages(**dict(batch, **{key: meta(batch[key])})))
    for call in cases:
        with pytest.raises(ValueError, match=match):
            call()
    # the fused loss checks the mask's device before the mask meets the targets
    with pytest.raises(ValueError, match=match):
        gk.fused_linear_policy_loss(h.reshape(1, 4, 8), w, y.reshape(1, 4), torch.ones(1, device=DEVICE),
                                    meta(torch.ones(1, 4, dtype=torch.bool)))


# ---------------------------------------------------------------------------------------------
# policy_loss: every float input, the normalizer and loss_scale
# ---------------------------------------------------------------------------------------------


def _loss_inputs(dtype: torch.dtype = F64) -> dict:
    g = torch.Generator().manual_seed(21)
    r = lambda *s: torch.rand(*s, generator=g, dtype=F64).to(dtype).to(DEVICE)  # noqa: E731
    logp = -2 * r(3, 5)
    mask = torch.ones(3, 5, dtype=torch.bool, device=DEVICE)
    mask[1, 3:] = False
    mask[2] = False  # a row without tokens: its [B] values are never read
    return dict(logp=logp, old_logp=logp + 0.2 * (r(3, 5) - 0.5), advantages=2 * r(3) - 1, mask=mask,
                ref_logp=logp + 0.2 * (r(3, 5) - 0.5), entropy=2 * r(3, 5), is_weights=0.5 + r(3, 5))


_LOSS_CFG = gk.PolicyLossConfig(beta=0.04, entropy_coef=0.01)


@pytest.mark.parametrize("name", ["logp", "old_logp", "ref_logp", "entropy", "is_weights", "is_weights[B]"])
@pytest.mark.parametrize("bad", [float("nan"), -float("inf"), float("inf")])
def test_policy_loss_checks_every_float_input(name, bad):
    """NaN / inf where the loss reads an input raises, naming it; on masked tokens (a row without
    tokens for a [B] value) it is ignored: the loss and its gradients equal the clean ones."""
    kw = _loss_inputs()
    arg = name.split("[")[0]
    if name == "is_weights[B]":
        kw["is_weights"] = kw["is_weights"][:, 0].contiguous()
    read, unread = ((0,), (2,)) if kw[arg].dim() == 1 else ((0, 1), (1, 4))

    def run(inputs):
        inputs = dict(inputs)
        logp = inputs.pop("logp").clone().requires_grad_()
        loss, _ = gk.policy_loss(logp, inputs.pop("old_logp"), inputs.pop("advantages"), inputs.pop("mask"),
                                 config=_LOSS_CFG, **inputs)
        loss.backward()
        return loss, logp.grad

    clean = run(kw)
    dirty = dict(kw, **{arg: kw[arg].clone()})
    dirty[arg][read] = bad
    with pytest.raises(ValueError, match=rf"^{arg} holds 1 NaN/inf"):
        run(dirty)
    ignored = dict(kw, **{arg: kw[arg].clone()})
    ignored[arg][unread] = bad
    got = run(ignored)
    assert torch.equal(got[0], clean[0]) and torch.equal(got[1], clean[1])
    # the fused loss runs the same checks on what it is given
    if arg in ("old_logp", "ref_logp", "is_weights"):
        h, w, _ = head(15, 8, 30, dtype=F64)
        y = torch.randint(0, 30, (3, 5), generator=torch.Generator().manual_seed(22)).to(DEVICE)
        with pytest.raises(ValueError, match=rf"{arg} holds"):
            gk.fused_linear_policy_loss(h.reshape(3, 5, 8), w, y, kw["advantages"], kw["mask"], config=_LOSS_CFG,
                                        **{k: dirty[k] for k in ("old_logp", "ref_logp", "is_weights")},
                                        backend="torch")


@pytest.mark.parametrize("value", [-5.0, 0.0, float("nan"), float("inf"), -float("inf")])
def test_tensor_normalizer_and_loss_scale_are_checked(value):
    """A tensor normalizer of -5 used to flip the loss's sign, 0 gave inf, NaN gave NaN (a Python
    0 was already rejected); now a tensor is checked as a number is."""
    kw = _loss_inputs()
    run = lambda **extra: gk.policy_loss(**kw, config=_LOSS_CFG, **extra)[0]  # noqa: E731
    for normalizer in (torch.tensor(value), torch.tensor([value], dtype=torch.float32), value):
        with pytest.raises(ValueError, match="normalizer must be"):
            run(normalizer=normalizer)
    if not math.isfinite(value):
        for loss_scale in (torch.tensor(value), value):
            with pytest.raises(ValueError, match="loss_scale must be"):
                run(loss_scale=loss_scale)
    else:  # finite: any sign is a valid loss scale
        assert torch.equal(run(loss_scale=torch.tensor(value)), run(loss_scale=value))
    good = run(normalizer=torch.tensor(7.0))
    assert torch.allclose(good, run(normalizer=7.0))


def test_policy_loss_input_checks_compile_without_graph_breaks():
    """The new checks are the op ``gccpo::checked_loss_inputs``: policy_loss compiles with
    fullgraph=True and validate=True, the graph calls the op, and a NaN old_logp or a bad tensor
    normalizer still raises from the compiled function."""
    kw = _loss_inputs(torch.float32)
    names = []

    def backend(gm, example_inputs):
        names.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm.forward

    def fn(logp, old_logp, advantages, mask, ref_logp, entropy, is_weights, normalizer):
        return gk.policy_loss(logp, old_logp, advantages, mask, ref_logp=ref_logp, entropy=entropy,
                              is_weights=is_weights, normalizer=normalizer, config=_LOSS_CFG)[0]

    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend=backend)
    args = dict(kw, normalizer=torch.tensor(6.0))
    torch.testing.assert_close(compiled(**args), fn(**args))
    assert any("checked_loss_inputs" in n for n in names), names
    bad = kw["old_logp"].clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="old_logp holds"):
        compiled(**dict(args, old_logp=bad))
    with pytest.raises(ValueError, match="normalizer must be"):
        compiled(**dict(args, normalizer=torch.tensor(-5.0)))
    torch._dynamo.reset()


def test_opcheck_checked_loss_inputs():
    kw = _loss_inputs(torch.float32)
    args = (kw["mask"], kw["logp"], kw["old_logp"], kw["ref_logp"], kw["entropy"], kw["is_weights"][:, :1],
            torch.tensor(3.0), None)
    torch.library.opcheck(torch.ops.gccpo.checked_loss_inputs.default, args,
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))


# ---------------------------------------------------------------------------------------------
# the LM head: a non-finite bias, D = 0, the reference backend's output check
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", [-float("inf"), float("nan"), float("inf")])
def test_non_finite_bias_is_named(backend, bad):
    """A -inf bias entry gave NaN entropy and an error blaming overflow; every op now names the
    bias (validate=True)."""
    dtype = dtype_for(backend)
    h, w, b = head(6, 16, 40, dtype=dtype)
    b = b.clone()
    b[7] = bad
    y = torch.tensor([1, 7, 3, 0, 39, 8], device=DEVICE)
    dl = 0.1 * torch.randn(6, 2, 16, generator=torch.Generator().manual_seed(23), dtype=F64).to(dtype).to(DEVICE)
    calls = [
        lambda: gk.fused_linear_logprobs(h, w, y, bias=b, return_entropy=True, backend=backend),
        lambda: gk.fused_linear_policy_loss(h.reshape(2, 3, 16), w, y.reshape(2, 3), torch.ones(2, dtype=dtype,
                                            device=DEVICE), torch.ones(2, 3, dtype=torch.bool, device=DEVICE),
                                            bias=b, backend=backend),
        lambda: gk.counterfactual_divergence(h, w, dl, bias=b, backend=backend),
        lambda: gk.group_distribution_stats(h, w, group_offsets=torch.tensor([0, 2, 6], device=DEVICE), bias=b,
                                            backend=backend),
    ]
    for call in calls:
        with pytest.raises(ValueError, match=r"bias holds 1 non-finite"):
            call()


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_feature_dimension_raises(backend):
    """D = 0 used to fail with a reshape error: now a ValueError naming hidden and weight."""
    h, w = torch.zeros(4, 0, device=DEVICE), torch.zeros(5, 0, device=DEVICE)
    y = torch.tensor([0, 1, 2, 3], device=DEVICE)
    calls = [
        lambda: gk.fused_linear_logprobs(h, w, y, backend=backend),
        lambda: gk.fused_linear_policy_loss(h.reshape(2, 2, 0), w, y.reshape(2, 2), torch.ones(2, device=DEVICE),
                                            torch.ones(2, 2, dtype=torch.bool, device=DEVICE), backend=backend),
        lambda: gk.counterfactual_divergence(h, w, torch.zeros(4, 2, 0, device=DEVICE), backend=backend),
        lambda: gk.group_distribution_stats(h, w, group_offsets=torch.tensor([0, 4], device=DEVICE), backend=backend),
    ]
    for call in calls:
        with pytest.raises(ValueError, match=r"hidden .* and weight .* have D = 0 features"):
            call()
    with pytest.raises(ValueError, match="D >= 1"):
        gk.perturb_latents(h, 2)


def test_reference_backend_checks_its_outputs():
    """validate=True: outputs that overflow raise on the reference backend as on the fast ones
    (the check used to be skipped there)."""
    h, w, _ = head(4, 8, 20, dtype=F64)
    h = h * 1e160
    w = w * 1e160  # logits ~1e320: beyond float64
    dl = 0.1 * torch.randn(4, 2, 8, generator=torch.Generator().manual_seed(24), dtype=F64).to(DEVICE)
    y = torch.tensor([0, 1, 2, 3], device=DEVICE)
    calls = [
        lambda v: gk.fused_linear_logprobs(h, w, y, return_entropy=True, backend="reference", validate=v),
        lambda v: (gk.counterfactual_divergence(h, w, dl, backend="reference", validate=v),),
        lambda v: tuple(gk.group_distribution_stats(h, w, group_offsets=torch.tensor([0, 4], device=DEVICE),
                                                    backend="reference", validate=v)),
    ]
    for call in calls:
        with pytest.raises(ValueError, match="produced NaN or inf"):
            call(True)
        assert not all(bool(torch.isfinite(t).all()) for t in call(False))  # what validate=True caught


@pytest.mark.parametrize("backend", BACKENDS)
def test_token_advantages_rejects_non_binary_masks(backend):
    """A mask of 0.5 (or 2, or -1) and a complex mask used to be taken as "!= 0"."""
    batch = on(make_batch(25, B=4, T=10, K=3), backend, float_dtype=dtype_for(backend))
    for value in (0.5, 2.0, -1.0):
        mask = batch["mask"].to(torch.float32)
        mask[0, 0] = value
        with pytest.raises(ValueError, match="mask must hold only 0 and 1"):
            gk.token_advantages(**dict(batch, mask=mask), backend=backend)
    with pytest.raises(TypeError, match="mask must be bool"):
        gk.token_advantages(**dict(batch, mask=batch["mask"].to(torch.complex64)), backend=backend)
    as_float = gk.token_advantages(**dict(batch, mask=batch["mask"].to(torch.float32)), backend=backend)
    assert torch.equal(as_float, gk.token_advantages(**batch, backend=backend))


# ---------------------------------------------------------------------------------------------
# empty inputs
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_inputs(backend):
    """docs/guarantees.md §5 "Empty inputs": the empty answer (a loss of 0 with zero gradients),
    never a crash; D = 0 and V = 0 raise (test_zero_feature_dimension_raises)."""
    dtype = dtype_for(backend)
    _, w, b = head(1, 8, 20, dtype=dtype)
    # §2: B = 0 and T = 0, plain (every aggregation) and fused
    for bsz, t in ((0, 4), (3, 0), (0, 0)):
        for agg in ("token-mean", "token-sum", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"):
            logp = torch.zeros(bsz, t, dtype=dtype, device=DEVICE, requires_grad=True)
            loss, metrics = gk.policy_loss(logp, None, torch.zeros(bsz, dtype=dtype, device=DEVICE),
                                           torch.ones(bsz, t, dtype=torch.bool, device=DEVICE),
                                           config=gk.PolicyLossConfig(loss_agg=agg))
            loss.backward()
            assert loss.item() == 0.0 and logp.grad.shape == (bsz, t) and not bool(logp.grad.any())
            reduced = gk.reduce_metrics(metrics)
            assert reduced["ratio_mean"] == 0.0 and math.isnan(reduced["ratio_max"])
        h = torch.zeros(bsz, t, 8, dtype=dtype, device=DEVICE, requires_grad=True)
        wg = w.clone().requires_grad_()
        out = gk.fused_linear_policy_loss(h, wg, torch.zeros(bsz, t, dtype=torch.long, device=DEVICE),
                                          torch.zeros(bsz, dtype=dtype, device=DEVICE),
                                          torch.ones(bsz, t, dtype=torch.bool, device=DEVICE), bias=b, backend=backend)
        out.loss.backward()
        assert out.loss.item() == 0.0 and out.logp.shape == out.entropy.shape == (bsz, t)
        assert h.grad.shape == h.shape and not bool(wg.grad.any())
    # §1: no rows
    logp, ent = gk.fused_linear_logprobs(torch.zeros(2, 0, 8, dtype=dtype, device=DEVICE), w,
                                         torch.zeros(2, 0, dtype=torch.long, device=DEVICE), bias=b,
                                         return_entropy=True, backend=backend)
    assert logp.shape == ent.shape == (2, 0)
    # §3
    h0 = torch.zeros(0, 8, dtype=dtype, device=DEVICE)
    assert gk.perturb_latents(h0, 3).shape == (0, 3, 8)
    assert gk.counterfactual_divergence(h0, w, torch.zeros(0, 2, 8, dtype=dtype, device=DEVICE),
                                        backend=backend).shape == (0, 2)
    h3, _, _ = head(3, 8, 1, dtype=dtype)
    assert gk.counterfactual_divergence(h3, w, torch.zeros(3, 0, 8, dtype=dtype, device=DEVICE),
                                        backend=backend).shape == (3, 0)
    # §4: R = 0 with G = 0, 2 (offsets) and 0, 3 (ids)
    for layout, groups in ((dict(group_offsets=torch.tensor([0], device=DEVICE)), 0),
                           (dict(group_offsets=torch.tensor([0, 0, 0], device=DEVICE)), 2),
                           (dict(group_ids=torch.zeros(0, dtype=torch.long, device=DEVICE)), 0),
                           (dict(group_ids=torch.zeros(0, dtype=torch.long, device=DEVICE), num_groups=3), 3)):
        stats = gk.group_distribution_stats(h0, w, bias=b, backend=backend, **layout)
        assert [t.shape[0] for t in stats] == [0, 0, groups, groups, groups]
        assert not any(bool(t.any()) for t in stats)
    # §5-§6
    assert gk.episode_rewards(torch.zeros(0, 3), torch.zeros(0, 3)).shape == (0, 3)
    for bsz, t in ((0, 5), (3, 0), (0, 0)):
        adv = gk.token_advantages(torch.zeros(bsz, dtype=dtype, device=DEVICE),
                                  torch.zeros(bsz, dtype=torch.long, device=DEVICE),
                                  torch.zeros(bsz, t, dtype=torch.long, device=DEVICE),
                                  torch.zeros(bsz, 2, dtype=dtype, device=DEVICE),
                                  torch.zeros(bsz, t, dtype=dtype, device=DEVICE),
                                  torch.ones(bsz, t, dtype=torch.bool, device=DEVICE), backend=backend)
        assert adv.shape == (bsz, t)
