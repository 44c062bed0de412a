"""SPEC §2: the clipped policy loss (one copy of the math) and its fused LM-head form.

Oracles: gccpo_kernels.reference.policy_loss (a row-by-row transcription of SPEC §2), TRL 1.16's
own GRPOTrainer._compute_loss (called on a stub trainer, not a copy), a transcription of verl's
compute_policy_loss_vanilla + agg_loss + low_var_kl (verl is not installed), and, for the fused
path, materialized float64 logits. Float64 comparisons use tolerances of a few ulps of the loss
scale (1e-12); float32 ones 1e-5 (accumulation-order differences only).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import tempfile
import types
from collections import defaultdict

import pytest
import torch

from gccpo_kernels import reference as R
from gccpo_kernels.policy_loss import (
    LOSS_AGGS,
    FusedLinearPolicyLoss,
    PolicyLossConfig,
    PolicyLossOutput,
    fused_linear_policy_loss,
    policy_loss,
    reduce_metrics,
)

F64 = torch.float64
TOL = dict(rtol=1e-12, atol=1e-12)


def make_batch(b=5, t=7, *, seed=0, dtype=F64, spread=0.6, empty_row=True, adv_per_token=False):
    g = torch.Generator().manual_seed(seed)
    logp = (torch.randn(b, t, generator=g, dtype=dtype) * 0.5 - 2.0).requires_grad_()
    old = logp.detach() + spread * torch.randn(b, t, generator=g, dtype=dtype)
    ref = logp.detach() + 0.4 * torch.randn(b, t, generator=g, dtype=dtype)
    entropy = (torch.rand(b, t, generator=g, dtype=dtype) * 3).requires_grad_()
    mask = torch.rand(b, t, generator=g) > 0.3
    mask[0, 0] = True
    if empty_row and b > 2:
        mask[2] = False
    shape = (b, t) if adv_per_token else (b,)
    adv = torch.randn(*shape, generator=g, dtype=dtype)
    weights = torch.rand(b, t, generator=g, dtype=dtype) + 0.5
    return dict(logp=logp, old=old, ref=ref, entropy=entropy, mask=mask, adv=adv, w=weights)


def run_both(batch, cfg, *, use_old=True, use_ref=True, use_ent=True, use_w=True, normalizer=None,
             loss_scale=1.0):
    """(ours, reference): each (loss, d loss/d logp, d loss/d entropy, metrics as floats)."""
    kw = dict(ref_logp=batch["ref"] if use_ref else None, entropy=batch["entropy"] if use_ent else None,
              is_weights=batch["w"] if use_w else None, normalizer=normalizer, loss_scale=loss_scale)
    old = batch["old"] if use_old else None
    inputs = [batch["logp"], batch["entropy"]]
    loss, metrics = policy_loss(batch["logp"], old, batch["adv"], batch["mask"], config=cfg, **kw)
    g = torch.autograd.grad(loss, inputs, allow_unused=True, materialize_grads=True)
    rloss, rmetrics = R.policy_loss(batch["logp"], old, batch["adv"], batch["mask"], cfg, **kw)
    rg = torch.autograd.grad(rloss, inputs, allow_unused=True, materialize_grads=True)
    return (loss, *g, reduce_metrics(metrics)), (rloss, *rg, rmetrics)


def assert_match(ours, ref, tol=TOL):
    torch.testing.assert_close(ours[0], ref[0], **tol)
    torch.testing.assert_close(ours[1], ref[1], **tol)
    torch.testing.assert_close(ours[2], ref[2], **tol)
    assert set(ours[3]) == set(ref[3])
    for k, v in ref[3].items():
        if math.isnan(v):
            assert math.isnan(ours[3][k]), k
        else:
            assert ours[3][k] == pytest.approx(v, rel=1e-9, abs=1e-12), k


# ------------------------------------------------------------------------------------------------
# policy_loss against the reference
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("loss_agg", LOSS_AGGS)
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("adv_per_token", [False, True])
def test_every_agg_level_and_advantage_shape(loss_agg, level, adv_per_token):
    seed = LOSS_AGGS.index(loss_agg) + 10 * (level == "sequence") + 100 * adv_per_token
    batch = make_batch(adv_per_token=adv_per_token, seed=seed, spread=1.2 if level == "sequence" else 0.6)
    cfg = PolicyLossConfig(eps_high=0.28, delta=1.6, dual_clip=3.0, beta=0.05, entropy_coef=0.01,
                           kl_bias_correction=True, importance_sampling_level=level, loss_agg=loss_agg)
    ours, ref = run_both(batch, cfg)
    assert_match(ours, ref)
    assert ours[3]["clip_frac_region"] > 0  # the batch exercises the clip
    assert ours[1].abs().sum() > 0


@pytest.mark.parametrize("case", [
    dict(cfg=dict(), flags=dict(use_ref=False, use_ent=False, use_w=False)),            # plain PPO clip
    dict(cfg=dict(beta=0.0), flags=dict(use_ref=True)),                                  # beta 0, ref only logged
    dict(cfg=dict(beta=0.2, kl_bias_correction=False), flags=dict()),
    dict(cfg=dict(beta=0.2, kl_bias_correction=True, importance_sampling_level="sequence"), flags=dict()),
    dict(cfg=dict(dual_clip=1.5), flags=dict(use_w=False)),
    dict(cfg=dict(delta=1.2, eps_high=0.1), flags=dict()),
    dict(cfg=dict(entropy_coef=-0.05, entropy_agg="token-mean", loss_agg="seq-mean-token-sum"), flags=dict()),
    dict(cfg=dict(loss_agg="seq-mean-token-sum-norm", max_len=11), flags=dict()),
    dict(cfg=dict(loss_agg="seq-mean-token-sum-norm", sum_norm_rows=False, skip_empty_rows=True), flags=dict()),
    dict(cfg=dict(loss_agg="seq-mean-token-mean", skip_empty_rows=True), flags=dict()),
    dict(cfg=dict(log_ratio_clamp=0.3, kl_log_ratio_clamp=0.2, kl_value_clamp=0.01, beta=1.0), flags=dict()),
    dict(cfg=dict(beta=0.1, entropy_coef=0.1), flags=dict(use_old=False)),               # on-policy
])
def test_feature_combinations(case):
    batch = make_batch(seed=7)
    ours, ref = run_both(batch, PolicyLossConfig(**case["cfg"]), **case["flags"])
    assert_match(ours, ref)


def test_on_policy_ratio_is_one_and_gradient_flows():
    batch = make_batch(seed=3, empty_row=False)
    loss, metrics = policy_loss(batch["logp"], None, batch["adv"], batch["mask"])
    (g,) = torch.autograd.grad(loss, batch["logp"])
    m = batch["mask"].double()
    expected = -batch["adv"][:, None] * m / m.sum()  # d/dlogp of -A * exp(logp - sg(logp)), token-mean
    torch.testing.assert_close(g, expected, **TOL)
    out = reduce_metrics(metrics)
    assert out["ratio_mean"] == 1.0 and out["ratio_max"] == 1.0 and out["clip_frac_region"] == 0.0


@pytest.mark.parametrize("loss_agg", LOSS_AGGS)
def test_normalizer_and_loss_scale(loss_agg):
    batch = make_batch(seed=11)
    cfg = PolicyLossConfig(loss_agg=loss_agg, beta=0.1)
    norm = None if loss_agg == "token-sum" else 17.0
    ours, ref = run_both(batch, cfg, normalizer=norm, loss_scale=0.25)
    assert_match(ours, ref)
    if norm is not None:  # a tensor normalizer / loss_scale gives the same, without a host sync
        loss_t, _ = policy_loss(batch["logp"], batch["old"], batch["adv"], batch["mask"], ref_logp=batch["ref"],
                                entropy=batch["entropy"], is_weights=batch["w"], config=cfg,
                                normalizer=torch.tensor(17.0), loss_scale=torch.tensor(0.25, dtype=F64))
        torch.testing.assert_close(loss_t, ours[0], **TOL)
        unnormalized, _ = policy_loss(batch["logp"], batch["old"], batch["adv"], batch["mask"],
                                      ref_logp=batch["ref"], is_weights=batch["w"], config=cfg)
        assert not torch.allclose(unnormalized * 0.25, ours[0])


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_all_masked_rows_and_single_token(level):
    batch = make_batch(seed=5)
    batch["mask"][:] = False
    cfg = PolicyLossConfig(importance_sampling_level=level, beta=0.1, entropy_coef=0.1)
    for agg in LOSS_AGGS:
        loss, metrics = policy_loss(batch["logp"], batch["old"], batch["adv"], batch["mask"], ref_logp=batch["ref"],
                                    entropy=batch["entropy"], config=dataclasses.replace(cfg, loss_agg=agg))
        assert loss.item() == 0.0 and torch.isfinite(loss)
        (g,) = torch.autograd.grad(loss, batch["logp"])
        assert torch.count_nonzero(g) == 0
        out = reduce_metrics(metrics)
        assert out["approx_kl"] == 0.0 and out["entropy"] == 0.0
    one = make_batch(b=1, t=1, seed=6, empty_row=False)
    for agg in LOSS_AGGS:
        ours, ref = run_both(one, PolicyLossConfig(importance_sampling_level=level, loss_agg=agg, beta=0.1))
        assert_match(ours, ref)


def test_mask_dtypes_and_padding_garbage():
    batch = make_batch(seed=9)
    cfg = PolicyLossConfig(beta=0.1, loss_agg="seq-mean-token-mean", importance_sampling_level="sequence")
    base, _ = policy_loss(batch["logp"], batch["old"], batch["adv"], batch["mask"], ref_logp=batch["ref"], config=cfg)
    dirty_old = batch["old"].masked_fill(~batch["mask"], float("inf"))
    dirty_ref = batch["ref"].masked_fill(~batch["mask"], float("nan"))
    for mask in (batch["mask"].long(), batch["mask"].float(), batch["mask"].to(torch.int32)):
        loss, _ = policy_loss(batch["logp"], dirty_old, batch["adv"], mask, ref_logp=dirty_ref, config=cfg)
        torch.testing.assert_close(loss, base, **TOL)
        (g,) = torch.autograd.grad(loss, batch["logp"])
        assert torch.isfinite(g).all() and torch.count_nonzero(g[~batch["mask"]]) == 0


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_garbage_advantages_and_weights_on_padding(level):
    """NaN/inf per-token advantages and importance weights on masked tokens (TRL and verl pad with
    anything) change neither the loss nor, under a [B, 1] sequence-level ratio, the gradient."""
    batch = make_batch(seed=5)
    adv_bt = batch["adv"][:, None].expand_as(batch["logp"]).clone()
    w_bt = torch.rand(batch["logp"].shape, dtype=batch["logp"].dtype) + 0.5
    cfg = PolicyLossConfig(importance_sampling_level=level, loss_agg="seq-mean-token-mean")
    clean, _ = policy_loss(batch["logp"], batch["old"], adv_bt, batch["mask"], is_weights=w_bt, config=cfg)
    (g_clean,) = torch.autograd.grad(clean, batch["logp"])
    pad = ~batch["mask"]
    assert pad.any()
    dirty, _ = policy_loss(batch["logp"], batch["old"], adv_bt.masked_fill(pad, float("nan")),
                           batch["mask"], is_weights=w_bt.masked_fill(pad, float("inf")), config=cfg)
    (g_dirty,) = torch.autograd.grad(dirty, batch["logp"])
    torch.testing.assert_close(dirty, clean, **TOL)
    assert torch.isfinite(g_dirty).all()
    torch.testing.assert_close(g_dirty, g_clean, **TOL)


def test_tensor_loss_scale_keeps_a_scalar_loss():
    batch = make_batch(seed=6)
    loss, _ = policy_loss(batch["logp"], batch["old"], batch["adv"], batch["mask"],
                          loss_scale=torch.tensor([0.5]))
    assert loss.shape == ()


def test_dtypes():
    batch = make_batch(seed=2, dtype=torch.float32)
    loss, metrics = policy_loss(batch["logp"], batch["old"], batch["adv"], batch["mask"])
    assert loss.dtype == torch.float32 and metrics["approx_kl"].dtype == torch.float32
    lp16 = batch["logp"].detach().bfloat16().requires_grad_()
    loss16, _ = policy_loss(lp16, batch["old"].bfloat16(), batch["adv"].bfloat16(), batch["mask"])
    assert loss16.dtype == torch.float32
    torch.autograd.grad(loss16, lp16)
    batch64 = make_batch(seed=2)
    loss64, _ = policy_loss(batch64["logp"], batch64["old"], batch64["adv"], batch64["mask"])
    assert loss64.dtype == F64


def test_metric_values_by_hand():
    # 1 row, 4 tokens, A > 0 on tokens 0,1 and A < 0 on 2,3: ratios 1.5, 1.0, 0.5, 1.0
    logp = torch.zeros(1, 4, dtype=F64)
    old = -torch.log(torch.tensor([[1.5, 1.0, 0.5, 1.0]], dtype=F64))
    adv = torch.tensor([[1.0, 1.0, -1.0, -1.0]], dtype=F64)
    mask = torch.ones(1, 4, dtype=torch.bool)
    cfg = PolicyLossConfig(eps_low=0.2, eps_high=0.3, dual_clip=1.2)
    _, metrics = policy_loss(logp, old, adv, mask, config=cfg, entropy=torch.full((1, 4), 2.0, dtype=F64))
    out = reduce_metrics(metrics)
    assert out["clip_frac_high"] == 0.25 and out["clip_frac_low"] == 0.25 and out["clip_frac_region"] == 0.5
    assert out["ratio_max"] == pytest.approx(1.5) and out["ratio_mean"] == pytest.approx(1.0)
    assert out["approx_kl"] == pytest.approx(float(old.sum()) / 4)
    assert out["entropy"] == 2.0 and out["clip_frac_dual"] == 0.0
    # per-sequence ratios with per-sequence advantages count once per row (TRL), every row included
    logp2 = torch.zeros(3, 2, dtype=F64)
    old2 = torch.tensor([[-1.0, -1.0], [0.0, 0.0], [0.0, 0.0]], dtype=F64)  # row 0: ratio e
    mask2 = torch.tensor([[1, 1], [1, 0], [0, 0]])
    _, m2 = policy_loss(logp2, old2, torch.tensor([1.0, 1.0, 1.0], dtype=F64), mask2,
                        config=PolicyLossConfig(importance_sampling_level="sequence"))
    assert m2["clip_frac_high"].tolist() == [1.0, 3.0]
    assert reduce_metrics(m2)["ratio_max"] == pytest.approx(math.e)


def test_reduce_metrics_tensors_and_empty():
    batch = make_batch(seed=4)
    batch["mask"][:] = False
    _, metrics = policy_loss(batch["logp"], batch["old"], batch["adv"], batch["mask"])
    out = reduce_metrics(metrics, as_tensors=True)
    assert all(isinstance(v, torch.Tensor) and v.dim() == 0 for v in out.values())
    assert math.isnan(float(out["ratio_max"])) and float(out["ratio_mean"]) == 0.0
    assert reduce_metrics({}) == {}


def _dist_worker(rank: int, world: int, path: str, results: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=world)
    batch = make_batch(seed=100 + rank)
    _, metrics = policy_loss(batch["logp"], batch["old"], batch["adv"], batch["mask"], entropy=batch["entropy"])
    out = reduce_metrics(metrics, process_group=dist.group.WORLD)
    torch.save({"local": {k: v.clone() for k, v in metrics.items()}, "global": out}, f"{results}.{rank}")
    dist.destroy_process_group()


def test_reduce_metrics_across_processes():
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        results = os.path.join(tmp, "res")
        mp.spawn(_dist_worker, args=(2, os.path.join(tmp, "store"), results), nprocs=2, join=True)
        got = [torch.load(f"{results}.{r}") for r in range(2)]
    for key in got[0]["global"]:
        a, b = got[0]["local"][key], got[1]["local"][key]
        if key.endswith("_max"):
            expected = max(float(a[0]), float(b[0]))
        else:
            expected = float(a[0] + b[0]) / max(float(a[1] + b[1]), 1.0)
        assert got[0]["global"][key] == pytest.approx(expected, rel=1e-12)
        assert got[1]["global"][key] == got[0]["global"][key]


# ------------------------------------------------------------------------------------------------
# from_trl: against TRL 1.16's own GRPOTrainer._compute_loss
# ------------------------------------------------------------------------------------------------

def _trl_compute_loss(loss_type, logp, old, adv, mask, *, ref=None, entropy=None, is_ratio=None, epsilon=0.2,
                      epsilon_high=None, beta=0.0, delta=None, max_completion_length=None,
                      use_bias_correction_kl=True, level="token", entropy_coef=0.0, ga=1,
                      num_items_in_batch=None, steps_per_generation=1):
    """Run TRL's real loss code on a stub trainer whose model returns ``logp`` / ``entropy``."""
    from trl.trainer.grpo_trainer import GRPOTrainer

    b, t = logp.shape
    ent = entropy if entropy is not None else torch.zeros_like(logp)
    s = types.SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *a, **k: (logp, ent, None),
        top_entropy_quantile=1.0, off_policy_mask_threshold=None, importance_sampling_level=level, beta=beta,
        args=types.SimpleNamespace(use_bias_correction_kl=use_bias_correction_kl, delta=delta,
                                   steps_per_generation=steps_per_generation),
        loss_type=loss_type, epsilon_low=epsilon, epsilon_high=epsilon if epsilon_high is None else epsilon_high,
        use_vllm=is_ratio is not None, vllm_importance_sampling_correction=is_ratio is not None,
        model=types.SimpleNamespace(training=True), current_gradient_accumulation_steps=ga,
        max_completion_length=max_completion_length,
        accelerator=types.SimpleNamespace(num_processes=1, reduce=lambda x, reduction="sum": x,
                                          gather=lambda x: x, gather_for_metrics=lambda x: x,
                                          sync_gradients=True),
        _entropy_bonus_enabled=entropy_coef != 0, entropy_coef=entropy_coef, use_adaptive_entropy=False,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)}, aux_loss_enabled=False)
    inputs = {"prompt_ids": torch.zeros(b, 1, dtype=torch.long), "prompt_mask": torch.ones(b, 1, dtype=torch.long),
              "completion_ids": torch.zeros(b, t, dtype=torch.long), "completion_mask": mask.long(),
              "advantages": adv}
    for key, value in (("old_per_token_logps", old), ("ref_per_token_logps", ref),
                       ("importance_sampling_ratio", is_ratio), ("num_items_in_batch", num_items_in_batch)):
        if value is not None:
            inputs[key] = value
    loss = GRPOTrainer._compute_loss(s, None, inputs)
    return loss, {k: v[-1] for k, v in s._metrics["train"].items()}


TRL_CASES = [
    dict(),
    dict(beta=0.04),
    dict(beta=0.04, use_bias_correction_kl=False, epsilon_high=0.28),
    dict(level="sequence", beta=0.04),
    dict(delta=1.5, epsilon_high=0.28, entropy_coef=0.03),
    dict(is_weights=True, entropy_coef=0.03, ga=4),
    dict(old=False, beta=0.1, ga=2),
]


@pytest.mark.skipif(importlib.util.find_spec("trl") is None, reason="trl not installed")
@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
@pytest.mark.parametrize("case", range(len(TRL_CASES)))
def test_from_trl_reproduces_trl(loss_type, case):
    opts = dict(TRL_CASES[case])
    ga = opts.pop("ga", 1)
    use_old = opts.pop("old", True)
    use_w = opts.pop("is_weights", False)
    level = opts.pop("level", "token")
    batch = make_batch(b=6, t=9, seed=20 + case, spread=0.5)
    max_len = 12
    spg = 2
    num_items = batch["mask"].sum().to(F64) * 3  # as if the generation batch were 3x this micro-batch
    trl_kw = dict(opts, level=level, max_completion_length=max_len, ga=ga, steps_per_generation=spg,
                  num_items_in_batch=num_items)
    old = batch["old"] if use_old else None
    is_ratio = batch["w"] if use_w else None
    trl_loss, trl_metrics = _trl_compute_loss(loss_type, batch["logp"], old, batch["adv"], batch["mask"],
                                              ref=batch["ref"] if opts.get("beta") else None, entropy=batch["entropy"],
                                              is_ratio=is_ratio, **trl_kw)
    cfg = PolicyLossConfig.from_trl(loss_type, max_completion_length=max_len, importance_sampling_level=level,
                                    **{k: v for k, v in opts.items()})
    normalizer = num_items.clamp(min=1) / 1 / spg if loss_type == "dapo" else None
    loss, metrics = policy_loss(batch["logp"], old, batch["adv"], batch["mask"],
                                ref_logp=batch["ref"] if cfg.beta else None, entropy=batch["entropy"],
                                is_weights=is_ratio, config=cfg, normalizer=normalizer, loss_scale=1.0 / ga)
    torch.testing.assert_close(loss, trl_loss, **TOL)
    g_ours = torch.autograd.grad(loss, [batch["logp"], batch["entropy"]], allow_unused=True, materialize_grads=True)
    g_trl = torch.autograd.grad(trl_loss, [batch["logp"], batch["entropy"]], allow_unused=True,
                                materialize_grads=True)
    torch.testing.assert_close(g_ours[0], g_trl[0], **TOL)
    torch.testing.assert_close(g_ours[1], g_trl[1], **TOL)
    out = reduce_metrics(metrics)
    for ours_key, trl_key in (("clip_frac_low", "clip_ratio/low_mean"), ("clip_frac_high", "clip_ratio/high_mean"),
                              ("clip_frac_region", "clip_ratio/region_mean"), ("entropy", "entropy"),
                              ("kl_ref", "kl")):
        if trl_key in trl_metrics:  # TRL takes the clip fractions' means in float32 (.float())
            rel = 1e-6 if ours_key.startswith("clip") else 1e-12
            assert out[ours_key] == pytest.approx(trl_metrics[trl_key], rel=rel, abs=1e-15), ours_key


def test_from_trl_mapping_and_errors():
    assert PolicyLossConfig.from_trl("grpo").loss_agg == "seq-mean-token-mean"
    assert PolicyLossConfig.from_trl("bnpo").loss_agg == "token-mean"
    dr = PolicyLossConfig.from_trl("dr_grpo", max_completion_length=256)
    assert (dr.loss_agg, dr.max_len, dr.sum_norm_rows) == ("seq-mean-token-sum-norm", 256, True)
    dapo = PolicyLossConfig.from_trl()  # TRL 1.16's default loss_type
    assert dapo.loss_agg == "token-mean" and dapo.kl_bias_correction and dapo.clip_high == 0.2
    assert dapo.entropy_agg == "token-mean"
    assert PolicyLossConfig.from_trl("dapo", epsilon_high=0.28).clip_high == 0.28
    with pytest.raises(ValueError, match="max_completion_length"):
        PolicyLossConfig.from_trl("dr_grpo")
    with pytest.raises(ValueError, match="supported TRL loss types"):
        PolicyLossConfig.from_trl("sapo")  # cispo is supported since it was registered (issue 22)


# ------------------------------------------------------------------------------------------------
# from_verl: against a transcription of verl's actor loss
# ------------------------------------------------------------------------------------------------

def _verl_actor_loss(logp, old, adv, mask, mode, *, clip_low=0.2, clip_high=0.2, clip_c=3.0, ref=None,
                     kl_coef=0.0, entropy=None, entropy_coeff=0.0, rollout_w=None, loss_scale_factor=None,
                     newest_sum_norm=False):
    """verl: compute_policy_loss_vanilla, agg_loss, low_var_kl and dp_actor's entropy / KL terms."""
    m = mask.to(logp.dtype)

    def masked_mean(x):
        return (x * m).sum() / (m.sum() + 1e-8)

    def agg(mat):
        if mode == "token-mean":
            return (mat * m).sum() / m.sum()
        rows_tok = m.sum(-1)
        seq_mask = (rows_tok > 0).to(logp.dtype)
        if mode == "seq-mean-token-mean":
            seq = (mat * m).sum(-1) / (rows_tok + 1e-8)
            return (seq * seq_mask).sum() / seq_mask.sum()
        seq = (mat * m).sum(-1)
        if mode == "seq-mean-token-sum":
            return (seq * seq_mask).sum() / seq_mask.sum()
        horizon = m.shape[-1] if loss_scale_factor is None else loss_scale_factor
        if newest_sum_norm:
            return (seq * seq_mask).sum() / seq_mask.sum() / horizon
        return seq.sum() / horizon

    neg_kl = torch.clamp(logp - old, min=-20.0, max=20.0)
    ratio = torch.exp(neg_kl)
    ppo_kl = masked_mean(-neg_kl)
    l1 = -adv * ratio
    l2 = -adv * torch.clamp(ratio, 1 - clip_low, 1 + clip_high)
    c1 = torch.maximum(l1, l2)
    clipfrac = masked_mean(torch.gt(l2, l1).to(logp.dtype))
    l3 = -adv * clip_c
    c2 = torch.min(l3, c1)
    clipfrac_lower = masked_mean(torch.gt(c1, l3).to(logp.dtype) * (adv < 0).to(logp.dtype))
    pg = torch.where(adv < 0, c2, c1)
    if rollout_w is not None:
        pg = pg * rollout_w
    loss = agg(pg)
    if entropy_coeff != 0:
        loss = loss - agg(entropy) * entropy_coeff
    if kl_coef != 0:
        kl = torch.clamp(ref - logp, min=-20, max=20)
        kld = torch.clamp(torch.exp(kl) - kl - 1, min=-10, max=10)
        loss = loss + agg(kld) * kl_coef
    return loss, dict(pg_clipfrac=clipfrac.item(), ppo_kl=ppo_kl.detach().item(),
                      pg_clipfrac_lower=clipfrac_lower.item())


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"])
@pytest.mark.parametrize("extras", [False, True])
def test_from_verl_reproduces_verl(mode, extras):
    batch = make_batch(b=6, t=8, seed=40, spread=1.5, adv_per_token=True)
    with torch.no_grad():  # a log-ratio beyond verl's +-20 clamp and a KL beyond its +-10 clamp
        batch["old"][0, 0] = batch["logp"][0, 0] - 25.0
        batch["ref"][1, :] = batch["logp"][1, :] + 4.0
    kw = dict(clip_ratio_low=0.2, clip_ratio_high=0.28)
    vkw = dict(clip_low=0.2, clip_high=0.28)
    if extras:
        kw.update(use_kl_loss=True, kl_loss_coef=0.05, entropy_coeff=0.01, loss_scale_factor=16)
        vkw.update(kl_coef=0.05, entropy_coeff=0.01, ref=batch["ref"], entropy=batch["entropy"],
                   rollout_w=batch["w"], loss_scale_factor=16)
    cfg = PolicyLossConfig.from_verl(mode, **kw)
    loss, metrics = policy_loss(batch["logp"], batch["old"], batch["adv"], batch["mask"],
                                ref_logp=batch["ref"] if extras else None,
                                entropy=batch["entropy"] if extras else None,
                                is_weights=batch["w"] if extras else None, config=cfg)
    vloss, vmetrics = _verl_actor_loss(batch["logp"], batch["old"], batch["adv"], batch["mask"], mode, **vkw)
    # verl divides a row's sum by count + 1e-8 where we use max(count, 1): relative 1e-8 / count
    tol = dict(rtol=1e-8, atol=1e-12) if mode == "seq-mean-token-mean" else TOL
    torch.testing.assert_close(loss, vloss, **tol)
    torch.testing.assert_close(torch.autograd.grad(loss, batch["logp"])[0],
                               torch.autograd.grad(vloss, batch["logp"])[0], **tol)
    out = reduce_metrics(metrics)
    assert out["clip_frac_region"] == pytest.approx(vmetrics["pg_clipfrac"], rel=1e-8)
    assert out["approx_kl"] == pytest.approx(vmetrics["ppo_kl"], rel=1e-8)
    assert out["clip_frac_dual"] == pytest.approx(vmetrics["pg_clipfrac_lower"], rel=1e-8, abs=1e-12)
    if mode == "seq-mean-token-sum-norm":
        newest = PolicyLossConfig.from_verl(mode, sum_norm_divides_rows=True, **kw)
        nloss, _ = policy_loss(batch["logp"], batch["old"], batch["adv"], batch["mask"],
                               ref_logp=batch["ref"] if extras else None,
                               entropy=batch["entropy"] if extras else None,
                               is_weights=batch["w"] if extras else None, config=newest)
        vnew, _ = _verl_actor_loss(batch["logp"], batch["old"], batch["adv"], batch["mask"], mode,
                                   newest_sum_norm=True, **vkw)
        torch.testing.assert_close(nloss, vnew, **TOL)


def test_from_verl_mapping_and_errors():
    cfg = PolicyLossConfig.from_verl()
    assert (cfg.dual_clip, cfg.log_ratio_clamp, cfg.skip_empty_rows, cfg.beta) == (3.0, 20.0, True, 0.0)
    assert PolicyLossConfig.from_verl(use_kl_loss=True).beta == 0.001
    with pytest.raises(ValueError, match="vanilla"):
        PolicyLossConfig.from_verl(policy_loss="gspo")
    with pytest.raises(ValueError, match="low_var_kl"):
        PolicyLossConfig.from_verl(use_kl_loss=True, kl_loss_type="mse")
    with pytest.raises(ValueError, match="not a verl mode"):
        PolicyLossConfig.from_verl("token-sum")


# ------------------------------------------------------------------------------------------------
# config and input validation
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, match", [
    (dict(eps_low=-0.1), "eps_low"),
    (dict(eps_high=float("nan")), "eps_high"),
    (dict(delta=0.9), "delta=None"),
    (dict(dual_clip=1.0), "dual_clip"),
    (dict(beta=-1.0), "beta"),
    (dict(importance_sampling_level="seq"), "importance_sampling_level"),
    (dict(loss_agg="dapo"), "from_trl"),
    (dict(entropy_agg="mean"), "entropy_agg"),
    (dict(max_len=128), "set loss_agg='seq-mean-token-sum-norm'"),
    (dict(loss_agg="seq-mean-token-sum-norm", max_len=0), "max_len"),
    (dict(log_ratio_clamp=0.0), "log_ratio_clamp"),
])
def test_config_rejects(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PolicyLossConfig(**kwargs)


def test_bad_inputs():
    batch = make_batch(seed=1)
    lp, old, adv, mask = batch["logp"], batch["old"], batch["adv"], batch["mask"]
    with pytest.raises(ValueError, match="old_logp has shape"):
        policy_loss(lp, old[:, :-1], adv, mask)
    with pytest.raises(ValueError, match="advantages has shape"):
        policy_loss(lp, old, adv[:-1], mask)
    with pytest.raises(ValueError, match="mask has shape"):
        policy_loss(lp, old, adv, mask[:, :-1])
    with pytest.raises(ValueError, match="logp must be"):
        policy_loss(lp.detach().reshape(-1), None, adv, mask)
    with pytest.raises(ValueError, match="is_weights"):
        policy_loss(lp, old, adv, mask, is_weights=batch["w"][:, :2])
    nan_adv = adv.clone()
    nan_adv[0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        policy_loss(lp, old, nan_adv, mask)
    nan_tok = torch.zeros_like(old)
    nan_tok[0, 0] = float("nan")  # mask[0, 0] is on
    with pytest.raises(ValueError, match="NaN"):
        policy_loss(lp, old, nan_tok, mask)
    nan_tok[2, 0], nan_tok[0, 0] = float("nan"), 0.0  # row 2 is fully masked: ignored
    policy_loss(lp, old, nan_tok, mask)
    with pytest.raises(ValueError, match="only 0 and 1"):
        policy_loss(lp, old, adv, mask.long() * 2)
    with pytest.raises(ValueError, match="only 0 and 1"):
        policy_loss(lp, old, adv, mask.float() * 0.5)
    with pytest.raises(ValueError, match="pass ref_logp"):
        policy_loss(lp, old, adv, mask, config=PolicyLossConfig(beta=0.1))
    with pytest.raises(ValueError, match="pass entropy"):
        policy_loss(lp, old, adv, mask, config=PolicyLossConfig(entropy_coef=0.1))
    with pytest.raises(ValueError, match="token-mean' with normalizer"):
        policy_loss(lp, old, adv, mask, config=PolicyLossConfig(loss_agg="token-sum"), normalizer=4.0)
    with pytest.raises(ValueError, match="normalizer must be > 0"):
        policy_loss(lp, old, adv, mask, normalizer=0)
    with pytest.raises(TypeError, match="PolicyLossConfig"):
        policy_loss(lp, old, adv, mask, config={"beta": 0.1})
    with pytest.raises(TypeError, match="advantages must be float"):
        policy_loss(lp, old, adv.long(), mask)


# ------------------------------------------------------------------------------------------------
# the fused form against materialized float64 logits
# ------------------------------------------------------------------------------------------------

def fused_problem(b=3, t=5, d=16, v=97, *, seed=0, dtype=F64, bias=True):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(b, t, d, generator=g, dtype=dtype).requires_grad_()
    weight = (torch.randn(v, d, generator=g, dtype=dtype) * 0.3).requires_grad_()
    bvec = (torch.randn(v, generator=g, dtype=dtype) * 0.1).requires_grad_() if bias else None
    targets = torch.randint(0, v, (b, t), generator=g)
    mask = torch.rand(b, t, generator=g) > 0.25
    mask[0, 0] = True
    if b > 1:
        mask[1] = False  # an all-masked row
    targets[~mask] = -7  # garbage where masked: the op must never look at it
    with torch.no_grad():
        cur, _ = R.linear_logprobs(hidden, weight, targets.clamp(min=0), bias=bvec, dtype=F64)
    old = (cur + 0.5 * torch.randn(b, t, generator=g, dtype=F64)).to(dtype)
    ref = (cur + 0.3 * torch.randn(b, t, generator=g, dtype=F64)).to(dtype)
    adv = torch.randn(b, generator=g, dtype=dtype)
    w = torch.rand(b, t, generator=g, dtype=dtype) + 0.5
    return dict(hidden=hidden, weight=weight, bias=bvec, targets=targets, mask=mask, old=old, ref=ref, adv=adv, w=w)


def materialized(p, cfg, logit_kw, **kw):
    """Oracle: full float64 logits -> log-probs/entropy -> the reference loss."""
    y = p["targets"].masked_fill(~p["mask"], 0)
    logp, ent = R.linear_logprobs(p["hidden"], p["weight"], y, bias=p["bias"], dtype=F64, **logit_kw)
    return R.policy_loss(logp, p["old"], p["adv"], p["mask"], cfg, ref_logp=p["ref"] if cfg.beta else None,
                         entropy=ent, is_weights=p["w"], **kw)


FUSED_CONFIGS = [
    PolicyLossConfig(),
    PolicyLossConfig(beta=0.1, entropy_coef=0.05, eps_high=0.28, loss_agg="seq-mean-token-mean"),
    PolicyLossConfig(importance_sampling_level="sequence", beta=0.04, kl_bias_correction=True,
                     loss_agg="seq-mean-token-sum-norm", max_len=8),
    PolicyLossConfig.from_verl("seq-mean-token-sum", use_kl_loss=True, entropy_coeff=-0.02),
]


@pytest.mark.parametrize("backend", ["torch", "reference"])
@pytest.mark.parametrize("cfg_i", range(len(FUSED_CONFIGS)))
def test_fused_matches_materialized_float64(backend, cfg_i):
    cfg = FUSED_CONFIGS[cfg_i]
    p = fused_problem(seed=cfg_i)
    logit_kw = dict(temperature=0.7, logit_scale=1.3, softcap=4.0) if cfg_i % 2 else {}
    params = [p["hidden"], p["weight"], p["bias"]]
    out = fused_linear_policy_loss(p["hidden"], p["weight"], p["targets"], p["adv"], p["mask"], old_logp=p["old"],
                                   ref_logp=p["ref"] if cfg.beta else None, bias=p["bias"], is_weights=p["w"],
                                   config=cfg, loss_scale=0.5, backend=backend, **logit_kw)
    assert isinstance(out, PolicyLossOutput)
    grads = torch.autograd.grad(out.loss, params)
    rloss, rmetrics = materialized(p, cfg, logit_kw, loss_scale=0.5)
    rgrads = torch.autograd.grad(rloss, params)
    torch.testing.assert_close(out.loss, rloss, **TOL)
    for name, a, b in zip(("hidden", "weight", "bias"), grads, rgrads):
        torch.testing.assert_close(a, b, **TOL, msg=lambda s, n=name: f"d{n}: {s}")
    assert torch.count_nonzero(grads[0][~p["mask"]]) == 0  # masked tokens get no gradient
    assert not out.logp.requires_grad and not out.entropy.requires_grad
    assert torch.count_nonzero(out.logp[~p["mask"]]) == 0
    got = reduce_metrics(out.metrics)
    for k, v in rmetrics.items():
        assert got[k] == pytest.approx(v, rel=1e-9, abs=1e-12), k


def test_fused_module_and_float32():
    p = fused_problem(b=4, t=6, d=32, v=130, seed=9, dtype=torch.float32, bias=False)
    cfg = PolicyLossConfig.from_trl("grpo", beta=0.05, entropy_coef=0.01)
    module = FusedLinearPolicyLoss(cfg, temperature=0.9, backend="torch")
    assert "temperature=0.9" in repr(module)
    out = module(p["hidden"], p["weight"], p["targets"], p["adv"], p["mask"], old_logp=p["old"], ref_logp=p["ref"],
                 is_weights=p["w"])
    assert out.loss.dtype == torch.float32
    grads = torch.autograd.grad(out.loss, [p["hidden"], p["weight"]])
    p64 = {k: (v.detach().double().requires_grad_() if isinstance(v, torch.Tensor) and v.is_floating_point()
               else v) for k, v in p.items()}
    rloss, _ = materialized(p64, cfg, dict(temperature=0.9))
    rgrads = torch.autograd.grad(rloss, [p64["hidden"], p64["weight"]])
    torch.testing.assert_close(out.loss.double(), rloss, rtol=1e-5, atol=1e-6)
    for a, b in zip(grads, rgrads):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-6)


def test_fused_bad_inputs():
    p = fused_problem(seed=3)
    args = (p["hidden"], p["weight"], p["targets"], p["adv"], p["mask"])
    with pytest.raises(ValueError, match=r"hidden must be \[B, T, D\]"):
        fused_linear_policy_loss(p["hidden"][0], *args[1:])
    with pytest.raises(ValueError, match="targets must be"):
        fused_linear_policy_loss(p["hidden"], p["weight"], p["targets"][:, :-1], *args[3:])
    with pytest.raises(ValueError, match="mask has shape"):
        fused_linear_policy_loss(*args[:4], p["mask"][:, :-1])
    bad_targets = p["targets"].clone()
    bad_targets[0, 0] = -100
    with pytest.raises(ValueError, match="ignore_index"):
        fused_linear_policy_loss(p["hidden"], p["weight"], bad_targets, *args[3:])
    with pytest.raises(ValueError, match="only 0 and 1"):
        fused_linear_policy_loss(*args[:4], p["mask"].long() * 3)
    with pytest.raises(ValueError, match="pass ref_logp"):
        fused_linear_policy_loss(*args, config=PolicyLossConfig(beta=0.1))


@pytest.mark.skipif(importlib.util.find_spec("gccpo_kernels.triton.linear_logprobs") is None,
                    reason="triton backend not written yet")
def test_fused_triton_backend_tiny():
    from tests.conftest import DEVICE, available_backends

    if "triton" not in available_backends():
        pytest.skip("triton not importable here")
    p = fused_problem(b=2, t=5, d=64, v=200, seed=12, dtype=torch.float32)
    p64 = {k: (v.detach().double().requires_grad_() if isinstance(v, torch.Tensor) and v.is_floating_point()
               else v) for k, v in p.items()}
    dev = {k: (v.detach().to(DEVICE).requires_grad_(v.requires_grad) if isinstance(v, torch.Tensor) else v)
           for k, v in p.items()}
    cfg = PolicyLossConfig(beta=0.05, entropy_coef=0.02, loss_agg="seq-mean-token-mean")
    out = fused_linear_policy_loss(dev["hidden"], dev["weight"], dev["targets"], dev["adv"], dev["mask"],
                                   old_logp=dev["old"], ref_logp=dev["ref"], bias=dev["bias"], is_weights=dev["w"],
                                   config=cfg, backend="triton")
    grads = torch.autograd.grad(out.loss, [dev["hidden"], dev["weight"], dev["bias"]])
    rloss, _ = materialized(p64, cfg, {})
    rgrads = torch.autograd.grad(rloss, [p64["hidden"], p64["weight"], p64["bias"]])
    torch.testing.assert_close(out.loss.double().cpu(), rloss, rtol=1e-5, atol=1e-6)
    for a, b in zip(grads, rgrads):
        torch.testing.assert_close(a.double().cpu(), b, rtol=1e-4, atol=1e-5)
