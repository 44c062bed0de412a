"""The backend dispatcher (issue 22): each op looks its backend up in one ``OpBackends`` table,
and the three backends, ``reference`` included, share one interface and are called the same way.

- ``OpBackends`` itself: names checked, loaders called once on first use, a missing backend or
  interface function raises with a message that names it;
- every op's table: each backend here has every interface function, with the torch backend's
  parameters;
- no op module branches on a backend name (the dispatch is the table's);
- the reference backend runs through the op and its table (a spy on the reference module sees the
  call) and gives the reference functions' values, gradients included, in float64.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import types
from pathlib import Path

import pytest
import torch

import gccpo_kernels.advantages as advantages
import gccpo_kernels.divergence as divergence
import gccpo_kernels.group_stats as group_stats
import gccpo_kernels.linear_logprobs as linear_logprobs
import gccpo_kernels.loss_in_forward as loss_in_forward
from gccpo_kernels import reference as ref
from gccpo_kernels._backend import BACKENDS, OpBackends, triton_unavailable_reason
from gccpo_kernels.reference_backend import advantages as ref_advantages
from gccpo_kernels.reference_backend import divergence as ref_divergence
from gccpo_kernels.reference_backend import group_stats as ref_group_stats
from gccpo_kernels.reference_backend import linear_logprobs as ref_linear_logprobs
from tests.conftest import DEVICE, lm_head
from tests.kernels.test_advantages import make_batch, on

F64 = torch.float64
TABLES = {
    "linear_logprobs": linear_logprobs.IMPLEMENTATIONS,
    "divergence": divergence.IMPLEMENTATIONS,
    "group_stats": group_stats.IMPLEMENTATIONS,
    "advantages": advantages.IMPLEMENTATIONS,
    "loss_in_forward": loss_in_forward.IMPLEMENTATIONS,
}
# (the package attribute gccpo_kernels.policy_loss is the function: the module from sys.modules)
OP_MODULES = (advantages, divergence, group_stats, linear_logprobs, loss_in_forward,
              importlib.import_module("gccpo_kernels.policy_loss"))


# ---------------------------------------------------------------------------------------------
# OpBackends
# ---------------------------------------------------------------------------------------------


def test_unknown_backend_name_is_refused():
    with pytest.raises(ValueError, match=r"\['cuda'\] are not backends"):
        OpBackends("op", ("forward",), cuda=types.SimpleNamespace(forward=len))


def test_loader_runs_once_on_first_use():
    calls = []
    impl = types.SimpleNamespace(forward=len)

    def loader():
        calls.append(1)
        return impl

    table = OpBackends("op", ("forward",), triton=loader, torch=impl)
    assert calls == [] and table.names == ("triton", "torch")
    assert table.load("triton") is impl and table.load("triton") is impl
    assert calls == [1]
    assert table.load("torch") is impl
    assert "reference" not in table and "torch" in table


def test_missing_backend_and_missing_function_raise():
    table = OpBackends("op", ("forward", "backward"), torch=types.SimpleNamespace(forward=len),
                       triton=types.SimpleNamespace(forward=len, backward=len))
    with pytest.raises(ValueError, match=r"op has no 'reference' backend; it has \('triton', 'torch'\)"):
        table.load("reference")
    with pytest.raises(TypeError, match=r"lacks \['backward'\]"):
        table.load("torch")
    assert table.load("triton").backward is len


# ---------------------------------------------------------------------------------------------
# the op tables
# ---------------------------------------------------------------------------------------------


def _here(table: OpBackends) -> list[str]:
    return [b for b in table.names if b != "triton" or triton_unavailable_reason() is None]


@pytest.mark.parametrize("op", list(TABLES))
def test_every_backend_has_the_interface_with_one_signature(op):
    table = TABLES[op]
    assert set(table.names) <= set(BACKENDS) and "torch" in table
    base = table.load("torch")
    for name in _here(table):
        impl = table.load(name)
        for fn in table.interface:
            want = list(inspect.signature(getattr(base, fn)).parameters)
            got = list(inspect.signature(getattr(impl, fn)).parameters)
            assert got == want, f"{op}: {name}.{fn}{got} differs from torch's {want}"


def test_every_spec_op_has_a_reference_backend():
    for op in ("linear_logprobs", "divergence", "group_stats", "advantages"):
        assert TABLES[op].names == BACKENDS, op
    assert "reference" not in loss_in_forward.IMPLEMENTATIONS  # the reference composes the loss


@pytest.mark.parametrize("module", OP_MODULES, ids=lambda m: m.__name__)
def test_no_op_module_branches_on_a_backend_name(module):
    tree = ast.parse(Path(module.__file__).read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            for operand in (node.left, *node.comparators):
                if isinstance(operand, ast.Constant) and operand.value in BACKENDS:
                    raise AssertionError(f"{module.__name__}:{node.lineno} compares with the backend "
                                         f"name {operand.value!r}: dispatch through IMPLEMENTATIONS")


# ---------------------------------------------------------------------------------------------
# the reference backend, called like the others
# ---------------------------------------------------------------------------------------------


def _spy(monkeypatch, module, name: str) -> list[int]:
    calls: list[int] = []
    real = getattr(module, name)

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, spy)
    return calls


def test_reference_linear_logprobs_runs_through_the_op(monkeypatch):
    h, w, b = (t.to(F64).requires_grad_() for t in lm_head(7, 12, 29, seed=3))
    y = torch.tensor([0, 5, -100, 28, 2, 9, -100], device=DEVICE)
    fwd = _spy(monkeypatch, ref_linear_logprobs, "forward")
    bwd = _spy(monkeypatch, ref_linear_logprobs, "backward")
    opts = dict(bias=b, temperature=0.7, logit_scale=1.3, softcap=4.0)
    logp, ent = linear_logprobs.fused_linear_logprobs(h, w, y, return_entropy=True,
                                                      backend="reference", **opts)
    g = torch.randn(2, 7, generator=torch.Generator().manual_seed(0), dtype=F64).to(DEVICE)
    grads = torch.autograd.grad((g[0] * logp).sum() + (g[1] * ent).sum(), (h, w, b))
    assert (fwd, bwd) == ([1], [1])
    want_logp, want_ent = ref.linear_logprobs(h, w, y, **opts)
    want = torch.autograd.grad((g[0] * want_logp).sum() + (g[1] * want_ent).sum(), (h, w, b))
    torch.testing.assert_close(logp, want_logp, rtol=0, atol=1e-12)
    torch.testing.assert_close(ent, want_ent, rtol=0, atol=1e-12)
    for got, exp in zip(grads, want):
        torch.testing.assert_close(got, exp, rtol=0, atol=1e-11)


def test_reference_divergence_and_group_stats_run_through_their_tables(monkeypatch):
    h, w, b = (t.to(F64) for t in lm_head(6, 10, 23, seed=4))
    deltas = 0.1 * torch.randn(6, 3, 10, generator=torch.Generator().manual_seed(5), dtype=F64).to(DEVICE)
    answers = torch.tensor([3, 0, 17, 22, 9], device=DEVICE)
    calls = _spy(monkeypatch, ref_divergence, "forward")
    got = divergence.counterfactual_divergence(h, w, deltas, bias=b, kind="js", softcap=3.0,
                                               answer_token_ids=answers, backend="reference")
    assert calls == [1]
    want = ref.counterfactual_divergence(h, w, deltas, bias=b, kind="js", softcap=3.0,
                                         answer_token_ids=answers)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-14)

    ids = torch.tensor([2, 0, 2, 1, 0, 2], device=DEVICE)  # unsorted: rows are sorted for the backend
    calls = _spy(monkeypatch, ref_group_stats, "forward")
    got = group_stats.group_distribution_stats(h, w, group_ids=ids, num_groups=4, bias=b,
                                               temperature=0.9, backend="reference")
    assert calls == [1]
    want = ref.group_distribution_stats(h, w, ids, 4, bias=b, temperature=0.9)
    for g, e in zip(got, want):
        torch.testing.assert_close(g, e, rtol=0, atol=1e-14)


def test_reference_advantages_run_through_the_table(monkeypatch):
    batch = on(make_batch(7, B=6, T=11, K=3, garbage=False), "reference", float_dtype=F64)
    calls = _spy(monkeypatch, ref_advantages, "token_advantages")
    args = (batch["outcome_rewards"], batch["group_index"], batch["episode_ids"],
            batch["episode_rewards"], batch["old_logp"], batch["mask"])
    got = advantages.token_advantages(*args, eta=0.7, gamma=0.9, backend="reference")
    assert calls == [1]
    assert got.device == batch["episode_ids"].device and got.dtype == F64
    want = ref.token_advantages(*args, eta=0.7, gamma=0.9)
    torch.testing.assert_close(got, want.to(got.device), rtol=0, atol=0)
