"""Guarantee: torch.compile. Every public kernel op is a torch.library custom op (``gccpo::...``),
so a compiled training step traces through it without graph breaks.

- each op passes ``torch.library.opcheck`` (schema, fake/meta implementation, autograd
  registration, AOTAutograd with dynamic shapes);
- each public function compiles with ``fullgraph=True`` (any graph break is an error) and its
  graph calls its ``gccpo`` op;
- a training step (hidden -> fused_linear_policy_loss -> backward) compiled with
  ``fullgraph=True`` gives the eager loss and gradients, on the torch and triton backends.

Compiler backend: ``aot_eager`` (dynamo + AOTAutograd, the same graph capture and
functionalization as inductor, without code generation; inductor's C++ build alone takes ~20 s
per graph on this CPU). Every value check that needs a host sync (the primitive's, and the policy
loss's mask / advantage / target checks) runs inside an op, so the compiled steps keep the default
``validate=True`` and still reject bad values.
"""

from __future__ import annotations


import importlib

import pytest
import torch
from torch._library.custom_ops import OPDEFS

import gccpo_kernels as gk
from gccpo_kernels.policy_loss import PolicyLossConfig
from tests.conftest import DEVICE, available_backends, lm_head as head
from tests.kernels.test_advantages import make_batch, on

FAST = [b for b in available_backends() if b != "reference"]
F64 = torch.float64

#: Every ``gccpo`` op -> the module that registers it, the module of its op (issue 22: each op
#: module owns its registration; importing that module alone registers the op).
OP_HOMES: dict[str, str] = {
    "linear_logprobs": "gccpo_kernels.linear_logprobs",
    "linear_logprobs_backward": "gccpo_kernels.linear_logprobs",
    "counterfactual_divergence": "gccpo_kernels.divergence",
    "perturb_latents": "gccpo_kernels.divergence",
    "group_distribution_stats": "gccpo_kernels.group_stats",
    "token_advantages": "gccpo_kernels.advantages",
    "episode_rewards": "gccpo_kernels.advantages",
    "checked_mask": "gccpo_kernels._loss_checks",
    "finite_advantages": "gccpo_kernels._loss_checks",
    "masked_targets": "gccpo_kernels._loss_checks",
    "checked_loss_inputs": "gccpo_kernels._loss_checks",
}
#: Every op's schema, as released: a change breaks compiled graphs and saved programs that call it.
SCHEMAS: dict[str, str] = {
    "linear_logprobs": (
        "(Tensor hidden, Tensor weight, Tensor? bias, Tensor targets, SymInt ignore_index, "
        "float temperature, float logit_scale, float? softcap, str backend, "
        "bool validate) -> (Tensor, Tensor, Tensor)"
    ),
    "linear_logprobs_backward": (
        "(Tensor hidden, Tensor weight, Tensor? bias, Tensor targets, Tensor lse, "
        "Tensor entropy, Tensor? grad_logp, Tensor? grad_entropy, SymInt ignore_index, "
        "float temperature, float logit_scale, float? softcap, str backend, "
        "bool need_hidden, bool need_weight, bool need_bias) -> (Tensor, Tensor, Tensor)"
    ),
    "counterfactual_divergence": (
        "(Tensor hidden, Tensor weight, Tensor deltas, Tensor? bias, "
        "Tensor? answer_token_ids, float temperature, float logit_scale, float? softcap, "
        "str kind, str backend, bool validate) -> Tensor"
    ),
    "perturb_latents": (
        "(Tensor hidden, int num_perturbations, float sigma, str mode, float alpha, "
        "Tensor? group_index, Generator? generator) -> Tensor"
    ),
    "group_distribution_stats": (
        "(Tensor hidden, Tensor weight, Tensor? group_offsets, Tensor? group_ids, "
        "SymInt? num_groups, Tensor? bias, Tensor? answer_token_ids, float temperature, "
        "float logit_scale, float? softcap, str backend, bool validate) -> (Tensor, "
        "Tensor, Tensor, Tensor, Tensor)"
    ),
    "token_advantages": (
        "(Tensor outcome_rewards, Tensor group_index, Tensor episode_ids, "
        "Tensor episode_rewards, Tensor? old_logp, Tensor mask, float eta, float gamma, "
        "str scale, bool surprise_weighting, bool normalize_returns, float eps, "
        "str backend, bool validate, ScalarType dtype, "
        "bool normalize_rewards=True) -> Tensor"
    ),
    "episode_rewards": (
        "(Tensor robustness, Tensor effectiveness, float w_rob, float w_eff) -> Tensor"
    ),
    "checked_mask": (
        "(Tensor mask) -> Tensor"
    ),
    "finite_advantages": (
        "(Tensor advantages, Tensor used) -> Tensor"
    ),
    "masked_targets": (
        "(Tensor targets, Tensor mask, SymInt ignore_index) -> Tensor"
    ),
    "checked_loss_inputs": (
        "(Tensor mask, Tensor logp, Tensor? old_logp, Tensor? ref_logp, Tensor? entropy, "
        "Tensor? is_weights, Tensor? normalizer, Tensor? loss_scale) -> Tensor"
    ),
}


class GraphRecorder:
    """A torch.compile backend that records the ops of every graph dynamo hands it and runs the
    graph eagerly."""

    def __init__(self) -> None:
        self.graphs: list[torch.fx.GraphModule] = []

    def __call__(self, gm: torch.fx.GraphModule, example_inputs):
        self.graphs.append(gm)
        return gm.forward

    def targets(self) -> set[str]:
        """Called functions by name, overloads folded into their op ('gccpo.linear_logprobs')."""
        return {str(node.target).removesuffix(".default") for gm in self.graphs for node in gm.graph.nodes
                if node.op == "call_function"}


def compiled_targets(fn, *args) -> tuple[object, set[str]]:
    """Run ``fn`` compiled with fullgraph=True; (its result, the ops its one graph calls)."""
    torch._dynamo.reset()
    rec = GraphRecorder()
    out = torch.compile(fn, fullgraph=True, backend=rec)(*args)
    assert len(rec.graphs) == 1, f"{len(rec.graphs)} graphs: a graph break"
    return out, rec.targets()


# ---------------------------------------------------------------------------------------------
# registration
# ---------------------------------------------------------------------------------------------


def test_every_op_is_registered():
    for home in set(OP_HOMES.values()):
        importlib.import_module(home)
    for name in OP_HOMES:
        op = getattr(torch.ops.gccpo, name)
        assert isinstance(op.default, torch._ops.OpOverload), name
    assert sorted(k for k in OPDEFS if k.startswith("gccpo::")) == sorted(f"gccpo::{n}" for n in OP_HOMES)


@pytest.mark.parametrize("name", list(OP_HOMES))
def test_each_op_is_registered_by_its_module(name):
    """The op's implementation is defined in its home module, which registers it on import."""
    importlib.import_module(OP_HOMES[name])
    assert OPDEFS[f"gccpo::{name}"]._init_fn.__module__ == OP_HOMES[name]


@pytest.mark.parametrize("name", list(OP_HOMES))
def test_op_schemas_are_unchanged(name):
    importlib.import_module(OP_HOMES[name])
    assert str(getattr(torch.ops.gccpo, name).default._schema) == f"gccpo::{name}{SCHEMAS[name]}"


def _opcheck_cases():
    h, w, b = head(6, 16, 37)
    y = torch.tensor([0, 5, -100, 36, 2, 9], device=DEVICE)
    dl = torch.randn(6, 2, 16, generator=torch.Generator().manual_seed(1)).to(DEVICE) * 0.1
    batch = on(make_batch(2, B=5, T=9, K=3, garbage=False), "torch", float_dtype=torch.float32)
    rob, eff = torch.randn(3, 4), torch.randn(3, 4, dtype=F64)
    hg, wg, bg = (t.clone().requires_grad_() for t in (h, w, b))
    return {
        "linear_logprobs": (hg, wg, bg, y, -100, 0.8, 1.0, 5.0, "torch", True),
        "counterfactual_divergence": (h, w, dl, b, None, 1.0, 1.0, None, "kl", "torch", True),
        # sigma = 0: the deltas are zeros whatever the random draw, so runs can be compared
        "perturb_latents": (h, 3, 0.0, "gaussian", 0.5, None, None),
        "group_distribution_stats": (h, w, torch.tensor([0, 2, 2, 6], device=DEVICE), None, None, b, None,
                                     1.0, 1.0, None, "torch", True),
        "token_advantages": (batch["outcome_rewards"], batch["group_index"], batch["episode_ids"],
                             batch["episode_rewards"], batch["old_logp"], batch["mask"], 1.0, 1.0, "group",
                             True, True, 1e-4, "torch", True, torch.float32),
        "episode_rewards": (rob.requires_grad_(), eff.requires_grad_(), 0.9, 0.8),
        "checked_mask": (torch.tensor([[1, 0, 1], [0, 0, 1]], device=DEVICE),),
        "finite_advantages": (torch.randn(2, 3, device=DEVICE, requires_grad=True),
                              torch.tensor([[True, False, True], [False, True, True]], device=DEVICE)),
        "masked_targets": (torch.tensor([[4, -100, 2], [1, 5, 0]], device=DEVICE),
                           torch.tensor([[True, False, True], [True, True, False]], device=DEVICE), -100),
    }


@pytest.mark.parametrize("name", list(_opcheck_cases()))
def test_opcheck(name):
    """Schema, fake implementation, autograd registration and AOTAutograd (dynamic shapes) of each
    op; the backward op is exercised through the differentiable ``linear_logprobs``."""
    args = _opcheck_cases()[name]
    torch.library.opcheck(getattr(torch.ops.gccpo, name).default, args,
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor",
                                      "test_aot_dispatch_dynamic"))


def test_opcheck_group_stats_with_data_dependent_group_count():
    """group_ids without num_groups: G = max id + 1 is known only from the data (an unbacked size
    in the fake implementation)."""
    h, w, _ = head(7, 16, 29)
    ids = torch.tensor([2, 0, 2, 1, 0, 0, 2], device=DEVICE)
    torch.library.opcheck(torch.ops.gccpo.group_distribution_stats.default,
                          (h, w, None, ids, None, None, None, 1.0, 1.0, None, "torch", True),
                          test_utils=("test_schema", "test_faketensor"))


# ---------------------------------------------------------------------------------------------
# every public function traces into one graph that calls its op
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", FAST)
def test_public_functions_compile_without_graph_breaks(backend):
    h, w, b = head(12, 64, 300)
    y = torch.randint(0, 300, (12,), generator=torch.Generator().manual_seed(2)).to(DEVICE)
    y[3] = -100
    dl = gk.perturb_latents(h, 2, sigma=0.1, generator=torch.Generator(device=h.device).manual_seed(3))
    offsets = torch.tensor([0, 5, 5, 12], device=DEVICE)
    ids = torch.tensor([1, 0, 1, 2, 2, 0, 1, 1, 0, 2, 2, 1], device=DEVICE)
    batch = on(make_batch(4, B=6, T=20, K=3), backend, float_dtype=torch.float32)
    rob, eff = torch.randn(6, 3), torch.randn(6, 3)
    cases = {
        "linear_logprobs": (lambda: gk.fused_linear_logprobs(h, w, y, bias=b, return_entropy=True, temperature=0.7,
                                                             backend=backend),
                            "gccpo.linear_logprobs"),
        "divergence": (lambda: gk.counterfactual_divergence(h, w, dl, bias=b, kind="js", backend=backend),
                       "gccpo.counterfactual_divergence"),
        "group_stats_offsets": (lambda: tuple(gk.group_distribution_stats(h, w, group_offsets=offsets, bias=b,
                                                                          backend=backend)),
                                "gccpo.group_distribution_stats"),
        "group_stats_ids": (lambda: tuple(gk.group_distribution_stats(h, w, group_ids=ids, backend=backend)),
                            "gccpo.group_distribution_stats"),
        "advantages": (lambda: gk.token_advantages(**batch, backend=backend), "gccpo.token_advantages"),
        "episode_rewards": (lambda: gk.episode_rewards(rob, eff), "gccpo.episode_rewards"),
        "perturb_latents": (lambda: gk.perturb_latents(h, 2, sigma=0.0), "gccpo.perturb_latents"),
    }
    for name, (fn, op) in cases.items():
        eager = fn()
        out, targets = compiled_targets(fn)
        assert op in targets, (name, sorted(targets))
        eager = eager if isinstance(eager, tuple) else (eager,)
        out = out if isinstance(out, tuple) else (out,)
        for a, c in zip(eager, out):
            if a is not None:
                assert torch.equal(a, c), name


def test_value_checks_run_inside_the_compiled_graph():
    """validate=True compiles (the checks run in the op's body) and still rejects bad values."""
    h, w, b = head(5, 16, 40)
    fn = torch.compile(lambda hh, yy: gk.fused_linear_logprobs(hh, w, yy, bias=b, backend="torch")[0],
                       fullgraph=True, backend="aot_eager")
    y = torch.tensor([1, 2, 3, 4, 5], device=DEVICE)
    torch._dynamo.reset()
    fn(h, y)
    with pytest.raises(ValueError, match=r"outside \[0, 40\)"):
        fn(h, torch.tensor([1, 2, 40, 4, 5], device=DEVICE))
    bad = h.clone()
    bad[1, 1] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        fn(bad, y)


# ---------------------------------------------------------------------------------------------
# a compiled training step
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend, dtype", [("torch", F64), *[(b, torch.float32) for b in FAST]])
def test_compiled_training_step_matches_eager(backend, dtype):
    """hidden -> fused_linear_policy_loss -> backward under torch.compile(fullgraph=True,
    backend="aot_eager"): the compiled forward and backward graphs call the custom ops; loss and
    hidden / weight / bias gradients equal the eager ones."""
    bsz, t, d, v = 3, 7, 64, 301
    h, w, b = head(bsz * t, d, v, dtype=dtype)
    h = h.reshape(bsz, t, d)
    g = torch.Generator().manual_seed(4)
    y = torch.randint(0, v, (bsz, t), generator=g).to(DEVICE)
    mask = (torch.rand(bsz, t, generator=g) > 0.2).to(DEVICE)
    adv = torch.randn(bsz, generator=g, dtype=F64).to(dtype).to(DEVICE)
    old = (-3 * torch.rand(bsz, t, generator=g, dtype=F64)).to(dtype).to(DEVICE)
    ref = (-3 * torch.rand(bsz, t, generator=g, dtype=F64)).to(dtype).to(DEVICE)
    cfg = PolicyLossConfig(beta=0.05, entropy_coef=0.01, eps_high=0.28, loss_agg="seq-mean-token-mean")

    def step(hh, ww, bb):
        out = gk.fused_linear_policy_loss(hh, ww, y, adv, mask, old_logp=old, ref_logp=ref, bias=bb, config=cfg,
                                          temperature=0.9, backend=backend)       # validate=True
        return out.loss

    def run(fn):
        params = [t.detach().clone().requires_grad_() for t in (h, w, b)]
        loss = fn(*params)
        loss.backward()
        return [loss.detach(), *(p.grad for p in params)]

    eager = run(step)
    torch._dynamo.reset()
    compiled = run(torch.compile(step, fullgraph=True, backend="aot_eager"))
    # on the torch backend eager forms the gradient in the forward (gccpo_kernels.loss_in_forward)
    # and the compiled graph takes the composed path: the same math, other rounding in float32
    # (on the CPU eager's row statistics also come from csrc/row_stats.c, whose exponentials round
    # unlike torch's): float32 tolerances are relative to each tensor's largest entry, where
    # both paths' errors sit (~1e-6 of it, against float64), not to entries that cancel
    for name, a, c in zip(("loss", "hidden", "weight", "bias"), eager, compiled):
        tol = (dict(rtol=1e-12, atol=1e-14) if dtype == F64 else
               dict(rtol=1e-5, atol=1e-6 * max(1.0, float(a.abs().max()))))
        torch.testing.assert_close(c, a, **tol, msg=name)
    # the same capture as aot_eager, recording AOTAutograd's forward and backward graphs: the
    # forward calls the primitive's op, the backward its backward op
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    fw, bw = GraphRecorder(), GraphRecorder()
    recording = aot_autograd(fw_compiler=lambda gm, ex: make_boxed_func(fw(gm, ex)),
                             bw_compiler=lambda gm, ex: make_boxed_func(bw(gm, ex)))
    torch._dynamo.reset()
    recorded = run(torch.compile(step, fullgraph=True, backend=recording))
    loss_tol = dict(rtol=1e-12, atol=1e-14) if dtype == F64 else dict(rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(recorded[0], eager[0], **loss_tol)
    assert "gccpo.linear_logprobs" in fw.targets(), sorted(fw.targets())
    assert "gccpo.linear_logprobs_backward" in bw.targets(), sorted(bw.targets())


def test_policy_loss_value_checks_run_inside_the_compiled_graph():
    """The policy loss's host-sync checks (mask values, NaN advantages on used tokens, targets equal
    to ignore_index under the mask) are ops: the fused loss compiles with validate=True and still
    raises the same errors; NaN advantages on masked tokens stay harmless."""
    h, w, b = head(6, 16, 40)
    h = h.reshape(2, 3, 16)
    y = torch.tensor([[1, 2, 3], [4, 5, 6]], device=DEVICE)
    fn = torch.compile(lambda hh, yy, adv, mask: gk.fused_linear_policy_loss(hh, w, yy, adv, mask, backend="torch").loss,
                       fullgraph=True, backend="aot_eager")
    torch._dynamo.reset()
    mask = torch.tensor([[1, 1, 0], [1, 0, 1]], device=DEVICE)
    adv = torch.tensor([1.0, -1.0], device=DEVICE)
    eager = gk.fused_linear_policy_loss(h, w, y, adv, mask, backend="torch").loss
    torch.testing.assert_close(fn(h, y, adv, mask), eager)
    with pytest.raises(ValueError, match="only 0 and 1"):
        fn(h, y, adv, torch.tensor([[1, 2, 0], [1, 0, 1]], device=DEVICE))
    with pytest.raises(ValueError, match="NaN/inf"):
        fn(h, y, torch.tensor([float("nan"), 1.0], device=DEVICE), mask)
    with pytest.raises(ValueError, match="ignore_index"):
        fn(h, torch.tensor([[1, -100, 3], [4, 5, 6]], device=DEVICE), adv, mask)
    token_adv = torch.tensor([[1.0, 2.0, float("nan")], [0.5, float("inf"), 1.0]], device=DEVICE)
    assert torch.isfinite(fn(h, y, token_adv, mask))               # garbage only where mask is 0
