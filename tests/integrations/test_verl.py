"""gccpo.integrations.verl against the real verl package (its own code, not a transcription).

- the registered ``"gccpo"`` loss, fetched with verl's ``get_policy_loss_fn``, equals verl's
  ``vanilla`` for every ``loss_agg_mode``, with and without ``global_batch_info`` (dp_size > 1),
  clamped log-ratios, dual clip and rollout-correction weights: loss, gradient and metrics;
- through verl's engine loss ``verl.workers.utils.losses.ppo_loss`` with the remove-padding
  (nested, packed) layout of the log-probs, plus verl's own entropy and KL terms;
- :class:`GCCPOFusedLinearForPPO` equals verl's torch ``FusedLinearForPPO`` (values and
  gradients, padded and packed layouts), and after :func:`use_gccpo_fused_backend` verl's own
  fused-kernel model forward runs on it.

verl is installed without its dependencies by ``tests/run.sh`` (its NO_DEPS and VERL_DEPS arrays; see
.ci/run). verl imports ``ray`` at package import; ray is a large binary package that these tests
never use, so when it is not installed a stub module named ``ray`` (exposing only the
``ObjectRef`` name that verl uses in a type annotation) stands in while verl is imported, and is
removed from ``sys.modules`` right after. Nothing else is stubbed.
"""

from __future__ import annotations

import importlib.util
import sys
import types

import pytest
import torch

F64 = torch.float64
RAY_STUB_NOTE = "ray is not installed: a stub 'ray' module (ObjectRef only) stood in during verl's import"


def _import_verl() -> tuple[types.SimpleNamespace | None, str]:
    """The verl modules these tests use, and a note on how ray was provided (or why we skip)."""
    if importlib.util.find_spec("verl") is None:
        return None, ("verl is not installed: run tests/run.sh, or pip install --no-deps verl and the "
                      "packages of its VERL_DEPS array")
    stubbed = "ray" not in sys.modules and importlib.util.find_spec("ray") is None
    if stubbed:
        # the ONE stubbed module: verl's import runs `import ray` and reads ray.ObjectRef in an annotation
        stub = types.ModuleType("ray", "test stub: verl's import needs the name, these tests never call ray")
        stub.ObjectRef = type("ObjectRef", (), {})
        sys.modules["ray"] = stub
    try:
        from verl.trainer.ppo import core_algos
        from verl.utils.experimental import torch_functional
        from verl.workers.config import FSDPActorConfig
        from verl.workers.config import PolicyLossConfig as VerlPolicyLossConfig
        from verl.workers.utils import losses

        import gccpo.integrations.verl as ours
    except Exception as exc:  # a partial install: say what is missing
        return None, (f"importing verl failed ({exc!r}){' with ' + RAY_STUB_NOTE if stubbed else ''}; "
                      "install what tests/run.sh installs (its NO_DEPS and VERL_DEPS arrays)")
    finally:
        if stubbed:
            sys.modules.pop("ray", None)
    ns = types.SimpleNamespace(core_algos=core_algos, torch_functional=torch_functional,
                               FSDPActorConfig=FSDPActorConfig,
                               VerlPolicyLossConfig=VerlPolicyLossConfig, losses=losses, ours=ours)
    return ns, (RAY_STUB_NOTE if stubbed else "real ray")


VERL, VERL_NOTE = _import_verl()
pytestmark = pytest.mark.skipif(VERL is None, reason=VERL_NOTE)

MODES = ["token-mean", "token-sum", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]


def _batch(b: int = 6, t: int = 9, seed: int = 0, dtype: torch.dtype = F64) -> dict[str, torch.Tensor]:
    """A batch with ragged rows, one fully masked row, clipping in both directions, a log-ratio
    beyond verl's +-20 clamp and dual-clip-active negative advantages."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, t + 1, (b,), generator=g)
    lengths[2] = 0
    mask = torch.arange(t)[None, :] < lengths[:, None]
    logp = (-torch.rand(b, t, generator=g, dtype=dtype) * 3).requires_grad_()
    old = (logp.detach() + torch.randn(b, t, generator=g, dtype=dtype) * 0.6)
    old[0, 0] = logp.detach()[0, 0] - 25.0  # log-ratio +25: clamped to +20
    adv = torch.randn(b, t, generator=g, dtype=dtype) * 2
    adv[1] = -3.0  # with old < logp: ratio far above 1 with A < 0, where the dual clip binds
    old[1] = logp.detach()[1] - 2.5
    weights = torch.rand(b, t, generator=g, dtype=dtype) + 0.5
    return dict(logp=logp, old=old, adv=adv, mask=mask, w=weights)


def _actor_config(mode: str, info: dict | None = None, **kw):
    cfg = VERL.FSDPActorConfig(rollout_n=4, ppo_micro_batch_size_per_gpu=2, loss_agg_mode=mode,
                               clip_ratio_low=0.2, clip_ratio_high=0.28, clip_ratio_c=3.0, **kw)
    cfg.global_batch_info.update(info or {})
    return cfg


def test_registered_under_gccpo():
    assert VERL.core_algos.get_policy_loss_fn("gccpo") is VERL.ours.gccpo_policy_loss
    assert VERL.core_algos.get_policy_loss_fn("vanilla") is not VERL.ours.gccpo_policy_loss


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("global_info", [False, True])
@pytest.mark.parametrize("weights", [False, True])
def test_gccpo_equals_vanilla(mode, global_info, weights):
    batch = _batch(seed=3)
    info = None
    if global_info:  # as verl's ppo_loss sets it: this micro-batch is part of a 2-rank global batch
        info = dict(dp_size=2, batch_num_tokens=int(batch["mask"].sum()) * 2 + 5, global_batch_size=13,
                    loss_scale_factor=16)
    config = _actor_config(mode, info)
    kw = dict(old_log_prob=batch["old"], log_prob=batch["logp"], advantages=batch["adv"],
              response_mask=batch["mask"], loss_agg_mode=mode, config=config,
              rollout_is_weights=batch["w"] if weights else None)
    ours_fn = VERL.core_algos.get_policy_loss_fn("gccpo")
    vanilla_fn = VERL.core_algos.get_policy_loss_fn("vanilla")
    loss, metrics = ours_fn(**kw)
    vloss, vmetrics = vanilla_fn(**kw)
    # verl divides a row's sum by count + 1e-8 where gccpo uses max(count, 1): relative 1e-8 / count
    tol = dict(rtol=1e-8, atol=1e-12) if mode == "seq-mean-token-mean" else dict(rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(loss, vloss, **tol)
    g = torch.autograd.grad(loss, batch["logp"])[0]
    gv = torch.autograd.grad(vloss, batch["logp"])[0]
    torch.testing.assert_close(g, gv, **tol)
    assert set(metrics) == set(vmetrics) == {"actor/pg_clipfrac", "actor/ppo_kl", "actor/pg_clipfrac_lower"}
    for key in vmetrics:  # verl's masked_mean adds 1e-8 to the count and takes clip fractions in float32
        rel = 1e-6 if "clipfrac" in key else 1e-8
        assert metrics[key] == pytest.approx(vmetrics[key], rel=rel, abs=1e-12), key
    assert vmetrics["actor/pg_clipfrac"] > 0 and vmetrics["actor/pg_clipfrac_lower"] > 0  # both clips active


@pytest.mark.parametrize("mode", MODES)
def test_through_verl_ppo_loss_with_packed_layout(mode):
    """verl's engine loss (ppo_loss): nested remove-padding log-probs and entropy, verl's own
    no_padding_2_padding, global batch info, KL and entropy terms; only loss_mode differs."""
    from tensordict import TensorDict
    from verl.utils import tensordict_utils as tu

    b, p, r = 5, 4, 7
    g = torch.Generator().manual_seed(11)
    prompt_lens = torch.randint(1, p + 1, (b,), generator=g)
    resp_lens = torch.randint(1, r + 1, (b,), generator=g)
    attention_mask = torch.cat([torch.arange(p)[None].flip(1) < prompt_lens[:, None],  # left-padded prompts
                                torch.arange(r)[None] < resp_lens[:, None]], 1).long()
    response_mask = (torch.arange(r)[None] < resp_lens[:, None]).long()
    resp_logp = (-torch.rand(b, r, generator=g, dtype=F64) * 2).requires_grad_()
    resp_ent = (torch.rand(b, r, generator=g, dtype=F64) * 3).requires_grad_()

    def packed(resp: torch.Tensor, fill: float) -> torch.Tensor:
        # the model's output over prompt + response tokens of each row, concatenated (remove padding):
        # position prompt_len - 1 + j predicts response token j
        rows = []
        for i in range(b):
            pl, rl = int(prompt_lens[i]), int(resp_lens[i])
            rows += [torch.full((pl - 1,), fill, dtype=F64), resp[i, :rl], torch.full((1,), fill, dtype=F64)]
        values = torch.cat(rows)
        offsets = torch.cat([torch.zeros(1, dtype=torch.long), (prompt_lens + resp_lens).cumsum(0)])
        return torch.nested.nested_tensor_from_jagged(values, offsets=offsets)

    old = resp_logp.detach() + torch.randn(b, r, generator=g, dtype=F64) * 0.5
    ref = resp_logp.detach() + torch.randn(b, r, generator=g, dtype=F64) * 0.3
    data = TensorDict({"prompts": torch.zeros(b, p, dtype=torch.long), "responses": torch.zeros(b, r, dtype=torch.long),
                       "attention_mask": attention_mask, "response_mask": response_mask, "old_log_probs": old,
                       "advantages": torch.randn(b, r, generator=g, dtype=F64), "ref_log_prob": ref,
                       "rollout_is_weights": torch.rand(b, r, generator=g, dtype=F64) + 0.5}, batch_size=[b])
    tu.assign_non_tensor_data(data, "max_response_len", r)
    tu.assign_non_tensor_data(data, "dp_size", 2)
    tu.assign_non_tensor_data(data, "batch_num_tokens", int(response_mask.sum()) * 2)
    tu.assign_non_tensor_data(data, "global_batch_size", 2 * b)

    results = {}
    for loss_mode in ("vanilla", "gccpo"):
        config = _actor_config(mode, use_kl_loss=True, kl_loss_coef=0.05, entropy_coeff=0.01, loss_scale_factor=12,
                               policy_loss=VERL.VerlPolicyLossConfig(loss_mode=loss_mode))
        out = {"log_probs": packed(resp_logp, -0.7), "entropy": packed(resp_ent, 1.3)}
        loss, metrics = VERL.losses.ppo_loss(config, out, data.clone())
        grads = torch.autograd.grad(loss, [resp_logp, resp_ent])
        results[loss_mode] = (loss, grads, metrics)
    (lv, gv, mv), (lo, go, mo) = results["vanilla"], results["gccpo"]
    tol = dict(rtol=1e-8, atol=1e-12) if mode == "seq-mean-token-mean" else dict(rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(lo, lv, **tol)
    torch.testing.assert_close(go[0], gv[0], **tol)
    torch.testing.assert_close(go[1], gv[1], **tol)
    assert set(mo) == set(mv)
    for key in ("actor/pg_clipfrac", "actor/ppo_kl", "actor/pg_clipfrac_lower", "actor/pg_loss"):
        a, v = mo[key].aggregate(), mv[key].aggregate()
        rel = 1e-6 if "clipfrac" in key else 1e-8  # verl takes clip fractions in float32
        assert float(a) == pytest.approx(float(v), rel=rel, abs=1e-12), key


def test_nested_inputs_equal_padded():
    batch = _batch(seed=5)
    lengths = batch["mask"].sum(1)
    keep = lengths > 0  # a jagged tensor has no empty rows here
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths[keep].cumsum(0)])

    def jag(t: torch.Tensor) -> torch.Tensor:
        return torch.nested.nested_tensor_from_jagged(t[keep][batch["mask"][keep]], offsets=offsets)

    config = _actor_config("seq-mean-token-mean")
    loss, metrics = VERL.ours.gccpo_policy_loss(jag(batch["old"]), jag(batch["logp"]), jag(batch["adv"]),
                                                jag(batch["mask"]), "seq-mean-token-mean", config)
    t = int(lengths.max())
    ref, ref_metrics = VERL.ours.gccpo_policy_loss(batch["old"][keep, :t], batch["logp"][keep, :t],
                                                   batch["adv"][keep, :t], batch["mask"][keep, :t],
                                                   "seq-mean-token-mean", config)
    torch.testing.assert_close(loss, ref, rtol=1e-13, atol=1e-15)
    torch.testing.assert_close(torch.autograd.grad(loss, batch["logp"])[0],
                               torch.autograd.grad(ref, batch["logp"])[0], rtol=1e-13, atol=1e-15)
    assert metrics == pytest.approx(ref_metrics, rel=1e-13)


def test_loss_config_errors():
    batch = _batch()
    fn = VERL.ours.gccpo_policy_loss
    args = (batch["old"], batch["logp"], batch["adv"], batch["mask"])
    with pytest.raises(ValueError, match="batch_num_tokens"):
        fn(*args, "token-mean", _actor_config("token-mean", dict(dp_size=2)))
    with pytest.raises(ValueError, match="global_batch_size"):
        fn(*args, "seq-mean-token-sum", _actor_config("seq-mean-token-sum", dict(dp_size=4)))
    with pytest.raises(ValueError, match="not one of verl's modes"):
        fn(*args, "sequence-mean", _actor_config("token-mean"))
    with pytest.raises(ValueError, match="config="):
        fn(*args, "token-mean", None)
    with pytest.raises(ValueError, match="agg_loss does not take"):
        fn(*args, "token-mean", _actor_config("token-mean", dict(num_tokens=3)))


@pytest.mark.parametrize("layout", ["padded", "packed"])
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_fused_backend_matches_verl(layout, dtype):
    g = torch.Generator().manual_seed(7)
    v, d = 67, 24
    shape = (3, 11) if layout == "padded" else (29,)
    hidden = torch.randn(*shape, d, generator=g, dtype=dtype).requires_grad_()
    weight = (torch.randn(v, d, generator=g, dtype=dtype) * 0.3).requires_grad_()
    ids = torch.randint(0, v, shape, generator=g)
    up_logp = torch.randn(shape, generator=g, dtype=torch.float32)
    up_ent = torch.randn(shape, generator=g, dtype=torch.float32)
    outs = {}
    for name, module in (("verl", VERL.torch_functional.FusedLinearForPPO(chunk_size=8, impl_backend="torch")),
                         ("gccpo", VERL.ours.GCCPOFusedLinearForPPO(chunk_size=8))):
        logp, ent = module(hidden, weight, ids, temperature=0.7)
        loss = (logp.float() * up_logp).sum() + (ent.float() * up_ent).sum()
        outs[name] = (logp, ent, *torch.autograd.grad(loss, [hidden, weight]))
    # verl computes in float32 whatever the input dtype (logits.to(float32)); compare at float32 accuracy
    for ours_t, verl_t, what in zip(outs["gccpo"], outs["verl"], ("log_probs", "entropy", "d hidden", "d weight")):
        assert ours_t.shape == verl_t.shape, what
        torch.testing.assert_close(ours_t.to(F64), verl_t.to(F64), rtol=2e-5, atol=2e-5, msg=what)
    assert outs["gccpo"][0].dtype == (F64 if dtype == F64 else torch.float32)


def test_fused_backend_bad_inputs():
    module = VERL.ours.GCCPOFusedLinearForPPO()
    with pytest.raises(ValueError, match="hidden_states"):
        module(torch.randn(2, 3, 4, 5), torch.randn(7, 5), torch.zeros(2, 3, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="input_ids"):
        module(torch.randn(2, 3, 5), torch.randn(7, 5), torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="chunk_size"):
        VERL.ours.GCCPOFusedLinearForPPO(chunk_size=0)


def test_verl_fused_forward_runs_on_gccpo_backend(monkeypatch):
    """verl's own fused-kernel model forward (forward_with_torch_backend) on a tiny Llama, before
    and after use_gccpo_fused_backend()."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from verl.models.transformers.dense_common import forward_with_torch_backend

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 64, (2, 10))
    mask = torch.ones_like(ids)
    # restore verl's class after the test
    monkeypatch.setattr(VERL.torch_functional, "FusedLinearForPPO", VERL.torch_functional.FusedLinearForPPO)
    before = forward_with_torch_backend(model, input_ids=ids, attention_mask=mask, return_dict=True,
                                        temperature=0.8)
    calls = []
    original_forward = VERL.ours.GCCPOFusedLinearForPPO.forward
    monkeypatch.setattr(VERL.ours.GCCPOFusedLinearForPPO, "forward",
                        lambda self, *a, **k: calls.append(1) or original_forward(self, *a, **k))
    VERL.ours.use_gccpo_fused_backend()
    assert VERL.torch_functional.FusedLinearForPPO is VERL.ours.GCCPOFusedLinearForPPO
    after = forward_with_torch_backend(model, input_ids=ids, attention_mask=mask, return_dict=True,
                                       temperature=0.8)
    assert calls, "verl's forward did not use the gccpo backend"
    torch.testing.assert_close(after.log_probs, before.log_probs, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(after.entropy, before.entropy.float(), rtol=1e-5, atol=1e-5)
