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
"""

from __future__ import annotations


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
