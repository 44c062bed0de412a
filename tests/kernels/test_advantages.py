"""SPEC §5-§6: episode_rewards and token_advantages on every backend against the loop reference.

Tolerances say what they are for:
- float64 (torch backend): rounding only, 1e-10 relative to max(1, |A|).
- float32 (triton backend; it computes in float32): sums of a few hundred terms and two
  normalizations by stds of order 1 leave ~1e-6 relative error; compared at 1e-4 relative to
  max(1, |A|).
Every batch carries NaN / huge garbage where the spec says nothing is read (padding, episode
rewards beyond a completion's count, ids outside the mask), so a leak shows up as NaN.
"""

from __future__ import annotations

import math
import random

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import gccpo_kernels as gk
from gccpo_kernels import reference as ref
from tests.conftest import DEVICE, available_backends

FAST_BACKENDS = [b for b in available_backends() if b != "reference"]
ALL_BACKENDS = available_backends()
TOL = {"torch": 1e-10, "triton": 1e-4, "reference": 1e-12}


def make_batch(seed: int, B: int = 9, T: int = 70, K: int = 6, *, groups: list[int] | None = None,
               pad: str = "mixed", p_empty: float = 0.15, binary: bool = False,
               p_zero_surprise: float = 0.1, garbage: bool = True) -> dict[str, torch.Tensor]:
    """A random padded batch in float64: group ids in any order, variable group sizes and episode
    counts, left/right padding, empty completions, garbage wherever nothing may be read."""
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    if groups is None:
        groups = [7 * rng.randrange(max(1, (B + 2) // 3)) - 5 for _ in range(B)]
    mask = torch.zeros(B, T, dtype=torch.bool)
    ids = torch.full((B, T), -1, dtype=torch.int64)
    counts = [0] * B
    for i in range(B):
        length = 0 if (rng.random() < p_empty or T == 0) else rng.randint(1, T)
        left = pad == "left" or (pad == "mixed" and rng.random() < 0.5)
        pos = torch.arange(T - length, T) if left else torch.arange(length)
        mask[i, pos] = True
        if length:
            count = rng.randint(1, min(K, length))
            cuts = sorted(rng.sample(range(1, length), count - 1))
            local = torch.zeros(length, dtype=torch.int64)
            for c in cuts:
                local[c:] += 1
            ids[i, pos] = local
            counts[i] = count
    if binary:
        outcome = torch.tensor([float(rng.random() < 0.5) for _ in range(B)], dtype=torch.float64)
    else:
        outcome = torch.rand(B, generator=gen, dtype=torch.float64)
    rewards = torch.randn(B, K, generator=gen, dtype=torch.float64)
    logp = -4 * torch.rand(B, T, generator=gen, dtype=torch.float64)
    # whole episodes of surprise 0 (omega must be 1 there)
    for i in range(B):
        for k in range(counts[i]):
            if rng.random() < p_zero_surprise:
                logp[i][(ids[i] == k) & mask[i]] = 0.0
    if garbage:
        for i in range(B):
            rewards[i, counts[i]:] = float("nan")
        logp[~mask] = float("nan")
        ids[~mask] = torch.randint(-1, K + 50, (int((~mask).sum()),), generator=gen)
    return dict(outcome_rewards=outcome, group_index=torch.tensor(groups, dtype=torch.int64),
                episode_ids=ids, episode_rewards=rewards, old_logp=logp, mask=mask)


def on(batch: dict[str, torch.Tensor], backend: str, *, float_dtype: torch.dtype | None = None):
    """Inputs for a backend: float64 for torch/reference, float32 for triton (or float_dtype)."""
    if float_dtype is None:
        float_dtype = torch.float32 if backend == "triton" else torch.float64
    out = {}
    for k, v in batch.items():
        if v is not None and v.is_floating_point():
            v = v.to(float_dtype)
        out[k] = None if v is None else v.to(DEVICE)
    return out


def reference64(batch, **opts) -> torch.Tensor:
    return ref.token_advantages(**batch, dtype=torch.float64, **opts)


def assert_close_to(got: torch.Tensor, want: torch.Tensor, backend: str) -> None:
    got = got.detach().cpu().double()
    assert torch.isfinite(got).all(), "non-finite advantages"
    scale = max(1.0, want.abs().max().item()) if want.numel() else 1.0
    err = (got - want).abs().max().item() if want.numel() else 0.0
    assert err <= TOL[backend] * scale, f"{backend}: max error {err:.3e} (scale {scale:.3g})"


OPTIONS = [
    {},
    {"gamma": 0.7, "scale": "batch"},
    {"gamma": 0.0, "eta": 0.5, "scale": "none"},
    {"surprise_weighting": False, "normalize_returns": False, "eps": 1e-6},
    {"gamma": 0.95, "eta": 2.0, "normalize_returns": False},
    # episode rewards used as given (a caller that normalized them itself: the paper formulation)
    {"gamma": 0.0, "normalize_returns": False, "normalize_rewards": False},
    {"gamma": 0.9, "normalize_rewards": False, "surprise_weighting": False},
]


# --------------------------------------------------------------------------------------------
# against the reference
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", FAST_BACKENDS)
@pytest.mark.parametrize("opts", OPTIONS,
                         ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "defaults")
def test_matches_reference(backend, opts):
    # T > the triton block of 128 tokens, K > its block of 32 episodes: every loop runs twice
    for seed, (B, T, K) in enumerate([(9, 70, 6), (5, 150, 40)]):
        batch = make_batch(seed, B, T, K)
        want = reference64(batch, **opts)
        got = gk.token_advantages(**on(batch, backend), backend=backend, **opts)
        assert got.shape == (B, T)
        assert got.dtype == (torch.float32 if backend == "triton" else torch.float64)
        assert_close_to(got, want, backend)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10**6), B=st.integers(1, 12), T=st.integers(1, 40), K=st.integers(1, 7),
       pad=st.sampled_from(["left", "right", "mixed"]), binary=st.booleans(),
       n_groups=st.integers(1, 6), eta=st.sampled_from([0.0, 1.0, 0.3]),
       gamma=st.sampled_from([1.0, 0.9, 0.0]), scale=st.sampled_from(["group", "batch", "none"]),
       surprise=st.booleans(), normalize=st.booleans(), normalize_rewards=st.booleans())
def test_property_torch_matches_reference(seed, B, T, K, pad, binary, n_groups, eta, gamma, scale,
                                          surprise, normalize, normalize_rewards):
    rng = random.Random(seed)
    groups = [rng.randrange(n_groups) for _ in range(B)]
    batch = make_batch(seed, B, T, K, groups=groups, pad=pad, binary=binary, p_empty=0.25)
    opts = dict(eta=eta, gamma=gamma, scale=scale, surprise_weighting=surprise,
                normalize_returns=normalize, normalize_rewards=normalize_rewards)
    want = reference64(batch, **opts)
    got = gk.token_advantages(**on(batch, "torch"), backend="torch", **opts)
    assert_close_to(got, want, "torch")


@pytest.mark.skipif("triton" not in FAST_BACKENDS, reason="triton is not importable here")
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10**6), B=st.integers(1, 10), T=st.integers(1, 40), K=st.integers(1, 5),
       pad=st.sampled_from(["left", "right", "mixed"]), binary=st.booleans(),
       n_groups=st.integers(1, 4), gamma=st.sampled_from([1.0, 0.8]),
       scale=st.sampled_from(["group", "batch", "none"]), surprise=st.booleans())
def test_property_triton_matches_reference(seed, B, T, K, pad, binary, n_groups, gamma, scale, surprise):
    rng = random.Random(seed)
    groups = [rng.randrange(n_groups) for _ in range(B)]
    batch = make_batch(seed, B, T, K, groups=groups, pad=pad, binary=binary, p_empty=0.25)
    opts = dict(gamma=gamma, scale=scale, surprise_weighting=surprise)
    want = reference64(batch, **opts)
    got = gk.token_advantages(**on(batch, "triton"), backend="triton", **opts)
    assert_close_to(got, want, "triton")


# --------------------------------------------------------------------------------------------
# the formula itself, by hand and against plain GRPO
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_hand_computed_example(backend):
    """Two completions, three episodes, gamma = 0.5, every step written out."""
    nan = float("nan")
    eps = 1e-4
    batch = dict(
        outcome_rewards=torch.tensor([1.0, 0.0], dtype=torch.float64),
        group_index=torch.tensor([4, 4]),
        episode_ids=torch.tensor([[0, 0, 1, -1], [0, 0, 7, 7]]),
        episode_rewards=torch.tensor([[1.0, 3.0], [2.0, nan]], dtype=torch.float64),
        old_logp=torch.tensor([[-1.0, -3.0, -2.0, nan], [-2.0, -2.0, nan, nan]], dtype=torch.float64),
        mask=torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]]),
    )
    a0 = 0.5 / (math.sqrt(0.5) + eps)  # outcome: mean 0.5, sample std sqrt(0.5)
    # process rewards {1, 3, 2}: mean 2, sample std 1
    a = 1.0 / (1.0 + eps)
    returns = [-a + 0.5 * a, a, 0.0]  # row 0: r~ = (-a, a) discounted; row 1: r~ = 0
    mean = sum(returns) / 3
    std = math.sqrt(sum((x - mean) ** 2 for x in returns) / 2)
    r00, r01, r10 = [(x - mean) / (std + eps) for x in returns]
    want = torch.tensor([[a0 + 0.5 * r00, a0 + 1.5 * r00, a0 + r01, 0.0],  # omega = 2*s/4 in ep 0
                         [-a0 + r10, -a0 + r10, 0.0, 0.0]], dtype=torch.float64)
    got = gk.token_advantages(**on(batch, backend), gamma=0.5, backend=backend)
    assert_close_to(got, want, backend)


def grpo_advantage(rewards: torch.Tensor, groups: torch.Tensor, scale: str, eps: float = 1e-4):
    """GRPO's outcome advantage written independently (as TRL computes it, group by group)."""
    out = torch.zeros_like(rewards)
    batch_std = rewards.std() if rewards.numel() > 1 else torch.zeros(())
    for g in groups.unique():
        sel = groups == g
        r = rewards[sel]
        centred = r - r.mean()
        if r.numel() == 1 or bool((r == r[0]).all()):
            continue
        if scale == "group":
            centred = centred / (r.std() + eps)
        elif scale == "batch":
            centred = centred / (batch_std + eps)
        out[sel] = centred
    return out


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_eta_zero_is_grpo(backend, scale):
    for seed, binary in ((0, True), (1, False)):
        batch = make_batch(10 + seed, 11, 30, 4, binary=binary)
        got = gk.token_advantages(**on(batch, backend), eta=0.0, scale=scale, backend=backend)
        seq = grpo_advantage(batch["outcome_rewards"], batch["group_index"], scale)
        want = torch.where(batch["mask"], seq[:, None], torch.zeros(()))
        assert_close_to(got, want, backend)
        if binary:  # all-equal groups are exactly 0, not eps-small
            for g in batch["group_index"].unique():
                sel = batch["group_index"] == g
                r = batch["outcome_rewards"][sel]
                if bool((r == r[0]).all()):
                    assert bool((got.cpu()[sel] == 0).all())


# --------------------------------------------------------------------------------------------
# the rules of SPEC §6, one at a time
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_group_of_one(backend):
    batch = make_batch(3, 4, 20, 3, groups=[0, 1, 1, 1], p_empty=0.0)
    got = gk.token_advantages(**on(batch, backend), backend=backend).cpu()
    assert torch.isfinite(got).all()
    # row 0 is alone: A_out = 0, so its tokens carry the process advantage only
    got_eta0 = gk.token_advantages(**on(batch, backend), eta=0.0, backend=backend).cpu()
    assert bool((got_eta0[0] == 0).all())
    assert_close_to(got, reference64(batch), backend)
    # a lone completion with a single episode has nothing to compare: all zero
    one = make_batch(4, 1, 10, 1, groups=[3], p_empty=0.0)
    out = gk.token_advantages(**on(one, backend), backend=backend).cpu()
    assert bool((out == 0).all())


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_all_equal_rewards_give_exact_zero(backend):
    # 0.1 is not representable: the group mean is not exactly 0.1, the rule still gives exact 0
    batch = make_batch(5, 6, 25, 3, groups=[2, 2, 2, 9, 9, 9], p_empty=0.0)
    batch["outcome_rewards"] = torch.full((6,), 0.1, dtype=torch.float64)
    batch["episode_rewards"] = torch.full((6, 3), 0.7, dtype=torch.float64)
    for gamma in (1.0, 0.5):
        got = gk.token_advantages(**on(batch, backend), gamma=gamma, backend=backend).cpu()
        # process rewards all equal -> r~ = 0 -> returns 0 -> A = 0 everywhere
        assert bool((got == 0).all()), got.abs().max()


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_zero_surprise_episode_has_unit_weights(backend):
    batch = make_batch(6, 4, 16, 2, groups=[0, 0, 0, 0], p_empty=0.0, garbage=False)
    batch["old_logp"][0] = 0.0  # every episode of row 0 has surprise sum 0
    full = gk.token_advantages(**on(batch, backend), backend=backend).cpu().double()
    flat = gk.token_advantages(**on(batch, backend), surprise_weighting=False, backend=backend).cpu().double()
    tol = TOL[backend] * max(1.0, full.abs().max().item())
    assert (full[0] - flat[0]).abs().max().item() <= tol
    assert_close_to(full, reference64(batch), backend)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_surprise_weights_average_to_one(backend):
    """Within an episode the process advantage is R^ * omega with mean(omega) = 1: the episode's
    mean advantage equals the unweighted one."""
    batch = make_batch(7, 6, 30, 4, groups=[0, 0, 0, 1, 1, 1], p_empty=0.0, garbage=False)
    w = gk.token_advantages(**on(batch, backend), backend=backend).cpu().double()
    u = gk.token_advantages(**on(batch, backend), surprise_weighting=False, backend=backend).cpu().double()
    for i in range(6):
        for k in range(int(batch["episode_ids"][i].max()) + 1):
            sel = (batch["episode_ids"][i] == k) & batch["mask"][i]
            assert abs(w[i][sel].mean().item() - u[i][sel].mean().item()) <= 10 * TOL[backend] * max(
                1.0, u.abs().max().item())


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_empty_completions_count_in_outcome_stats(backend):
    batch = make_batch(8, 4, 12, 2, groups=[1, 1, 1, 5], p_empty=0.0, garbage=False)
    batch["mask"][1] = False
    batch["episode_ids"][1] = -1
    batch["outcome_rewards"] = torch.tensor([1.0, 0.0, 0.0, 1.0], dtype=torch.float64)
    got = gk.token_advantages(**on(batch, backend), eta=0.0, backend=backend).cpu().double()
    assert bool((got[1] == 0).all())
    mean, std = 1 / 3, math.sqrt(((2 / 3) ** 2 + 2 * (1 / 3) ** 2) / 2)  # the empty row counts
    want0 = (1 - mean) / (std + 1e-4)
    assert abs(got[0][batch["mask"][0]] - want0).max().item() <= TOL[backend] * 2
    assert_close_to(gk.token_advantages(**on(batch, backend), backend=backend), reference64(batch), backend)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_completion_tokens_without_episode_get_outcome_only(backend):
    batch = make_batch(9, 4, 20, 3, groups=[0, 0, 1, 1], p_empty=0.0, garbage=False)
    batch["episode_ids"][:, :3] = torch.where(batch["mask"][:, :3], -1, batch["episode_ids"][:, :3])
    got = gk.token_advantages(**on(batch, backend), backend=backend).cpu().double()
    outcome_only = gk.token_advantages(**on(batch, backend), eta=0.0, backend=backend).cpu().double()
    sel = batch["mask"] & (batch["episode_ids"] < 0)
    assert torch.equal(got[sel], outcome_only[sel])


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_gamma_discounts_later_episodes(backend):
    """One completion with three episodes in a group with a one-episode partner, no
    renormalization: R_k = sum_{k' >= k} gamma^(k'-k) r~_k'."""
    eps = 1e-4
    r = [0.5, -1.0, 2.0, 0.25]
    batch = dict(outcome_rewards=torch.tensor([0.0, 0.0], dtype=torch.float64),
                 group_index=torch.tensor([0, 0]),
                 episode_ids=torch.tensor([[0, 1, 2], [0, -1, -1]]),
                 episode_rewards=torch.tensor([r[:3], [r[3], 0.0, 0.0]], dtype=torch.float64),
                 old_logp=torch.full((2, 3), -1.0, dtype=torch.float64),
                 mask=torch.tensor([[1, 1, 1], [1, 0, 0]], dtype=torch.bool))
    mean = sum(r) / 4
    std = math.sqrt(sum((x - mean) ** 2 for x in r) / 3)
    rt = [(x - mean) / (std + eps) for x in r]
    for gamma in (0.0, 0.3, 1.0):
        want = [[rt[0] + gamma * rt[1] + gamma ** 2 * rt[2], rt[1] + gamma * rt[2], rt[2]],
                [rt[3], 0.0, 0.0]]
        got = gk.token_advantages(**on(batch, backend), gamma=gamma, normalize_returns=False,
                                  backend=backend)
        assert_close_to(got, torch.tensor(want, dtype=torch.float64), backend)


@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_row_order_does_not_matter(backend):
    batch = make_batch(11, 10, 33, 5)
    perm = torch.randperm(10, generator=torch.Generator().manual_seed(0))
    shuffled = {k: v[perm] for k, v in batch.items()}
    a = gk.token_advantages(**on(batch, backend), backend=backend).cpu()
    b = gk.token_advantages(**on(shuffled, backend), backend=backend).cpu()
    torch.testing.assert_close(b, a[perm], rtol=0, atol=TOL[backend] * max(1.0, a.abs().max().item()))


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_degenerate_shapes(backend):
    # no completion has an episode: K = 0
    batch = dict(outcome_rewards=torch.tensor([1.0, 0.0, 1.0], dtype=torch.float64),
                 group_index=torch.tensor([0, 0, 1]), episode_ids=torch.full((3, 5), -1),
                 episode_rewards=torch.zeros(3, 0, dtype=torch.float64),
                 old_logp=torch.zeros(3, 5, dtype=torch.float64), mask=torch.zeros(3, 5, dtype=torch.bool))
    got = gk.token_advantages(**on(batch, backend), backend=backend)
    assert got.shape == (3, 5) and bool((got == 0).all())
    for B, T in ((0, 4), (2, 0)):
        b = dict(outcome_rewards=torch.zeros(B, dtype=torch.float64),
                 group_index=torch.zeros(B, dtype=torch.int64),
                 episode_ids=torch.full((B, T), -1), episode_rewards=torch.zeros(B, 2, dtype=torch.float64),
                 old_logp=torch.zeros(B, T, dtype=torch.float64), mask=torch.zeros(B, T, dtype=torch.bool))
        assert gk.token_advantages(**on(b, backend), backend=backend).shape == (B, T)


@pytest.mark.skipif("triton" not in FAST_BACKENDS, reason="triton is not importable here")
@pytest.mark.parametrize("logp_dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_triton_input_dtypes(logp_dtype):
    batch = make_batch(12, 7, 50, 4)
    want = reference64({**batch, "old_logp": batch["old_logp"].to(logp_dtype).double()})
    inputs = on(batch, "triton")
    inputs["old_logp"] = inputs["old_logp"].to(logp_dtype)
    inputs["episode_ids"] = inputs["episode_ids"].to(torch.int32)
    inputs["mask"] = inputs["mask"].to(torch.float32)
    inputs["group_index"] = inputs["group_index"].to(torch.int32)
    got = gk.token_advantages(**inputs, backend="triton")
    assert got.dtype == torch.float32
    assert_close_to(got, want, "triton")


@pytest.mark.skipif("triton" not in FAST_BACKENDS, reason="triton is not importable here")
def test_triton_is_one_launch(monkeypatch):
    from gccpo_kernels.triton import advantages as tri

    calls = []
    kernel = tri._token_advantages_kernel
    original = kernel.run
    monkeypatch.setattr(kernel, "run", lambda *a, **k: calls.append(1) or original(*a, **k))
    batch = make_batch(13, 8, 40, 3)
    gk.token_advantages(**on(batch, "triton"), backend="triton")
    assert len(calls) == 1


def test_torch_row_chunks_give_the_same_result(monkeypatch):
    """A tiny workspace budget makes every token pass run one row at a time."""
    batch = make_batch(16, 7, 45, 5)
    whole = gk.token_advantages(**on(batch, "torch"), backend="torch")
    monkeypatch.setenv("GCCPO_WORKSPACE_MB", "0.001")
    chunked = gk.token_advantages(**on(batch, "torch"), backend="torch")
    if whole.device.type == "cpu":
        assert torch.equal(whole, chunked)
    else:  # CUDA reductions pick their order by shape: equal to rounding, not bit for bit
        torch.testing.assert_close(chunked, whole, rtol=1e-12, atol=1e-12)
    assert_close_to(chunked, reference64(batch), "torch")


def test_float32_inputs_on_torch_give_float32():
    batch = make_batch(14, 6, 20, 3)
    got = gk.token_advantages(**on(batch, "torch", float_dtype=torch.float32), backend="torch")
    assert got.dtype == torch.float32
    assert (got.cpu().double() - reference64(batch)).abs().max().item() <= 1e-4 * max(
        1.0, got.abs().max().item())


def test_bad_inputs_raise_clear_errors():
    batch = make_batch(15, 4, 10, 2, garbage=False)
    with pytest.raises(ValueError, match="scale"):
        gk.token_advantages(**batch, scale="seq")
    bad = dict(batch, episode_ids=batch["episode_ids"].clone())
    bad["episode_ids"][batch["mask"]] = 5
    with pytest.raises(ValueError, match="outside"):
        gk.token_advantages(**bad)
    with pytest.raises(ValueError, match="old_logp is required"):
        gk.token_advantages(**dict(batch, old_logp=None))
    with pytest.raises(ValueError, match=r"\[B, K\]"):
        gk.token_advantages(**dict(batch, episode_rewards=batch["episode_rewards"][:2]))
    with pytest.raises(TypeError, match="integer"):
        gk.token_advantages(**dict(batch, group_index=batch["group_index"].double()))
    with pytest.raises(ValueError, match="gamma"):
        gk.token_advantages(**batch, gamma=-0.5)
    nan_reward = dict(batch, episode_rewards=batch["episode_rewards"].clone())
    nan_reward["episode_rewards"][0, 0] = float("nan")
    with pytest.raises(ValueError, match="episode_rewards hold NaN"):
        gk.token_advantages(**nan_reward)
    # without surprise weighting old_logp may be omitted
    out = gk.token_advantages(**dict(batch, old_logp=None), surprise_weighting=False)
    assert out.shape == batch["mask"].shape


# --------------------------------------------------------------------------------------------
# §5 episode rewards
# --------------------------------------------------------------------------------------------


def test_episode_rewards():
    rob = -torch.rand(3, 4, dtype=torch.float64)
    eff = torch.rand(3, 4, dtype=torch.float64)
    got = gk.episode_rewards(rob, eff)
    torch.testing.assert_close(got, 0.9 * rob + 0.8 * eff, rtol=0, atol=1e-15)
    torch.testing.assert_close(got, ref.episode_rewards(rob, eff), rtol=0, atol=0)
    assert gk.episode_rewards(rob.float(), eff.bfloat16(), w_rob=1.0, w_eff=0.0).dtype == torch.float32
    torch.testing.assert_close(gk.episode_rewards(rob, eff, w_rob=0.0, w_eff=2.0), 2 * eff)
    with pytest.raises(ValueError, match="one shape"):
        gk.episode_rewards(rob, eff[:, :2])


@pytest.mark.parametrize("backend", FAST_BACKENDS + ["reference"])
def test_rewards_as_given(backend):
    """normalize_rewards=False, gamma 0, returns not normalized: A_t = A_out + eta * r_{i,k(t)}
    exactly (the values a caller normalized itself reach the tokens unchanged)."""
    ids = torch.tensor([[0, 0, 1, 1, -1], [0, 1, 1, 1, 1]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]], dtype=torch.bool)
    rewards = torch.tensor([[0.5, -2.0], [3.0, 0.25]])
    out = gk.token_advantages(torch.tensor([1.0, 0.0]), torch.tensor([0, 0]), ids, rewards, None, mask,
                              eta=0.5, gamma=0.0, surprise_weighting=False, normalize_returns=False,
                              normalize_rewards=False, backend=backend)
    a = 0.5 / (0.7071067811865476 + 1e-4)  # (1 - 0.5) / (sample std + eps)
    want = torch.tensor([[a + 0.25, a + 0.25, a - 1.0, a - 1.0, a],
                         [-a + 1.5, -a + 0.125, -a + 0.125, -a + 0.125, 0.0]])
    torch.testing.assert_close(out.double(), want.double(), atol=1e-5, rtol=1e-5)
    # the default standardizes them: a different result
    normed = gk.token_advantages(torch.tensor([1.0, 0.0]), torch.tensor([0, 0]), ids, rewards, None, mask,
                                 eta=0.5, gamma=0.0, surprise_weighting=False, normalize_returns=False,
                                 backend=backend)
    assert (normed - out).abs().max() > 0.1
