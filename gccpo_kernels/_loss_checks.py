"""SPEC §2's value checks as ``gccpo`` custom ops: the policy loss's checks that need a host
synchronisation (mask values, finite advantages, targets vs ``ignore_index``, finite loss inputs).

The loss math itself (:mod:`gccpo_kernels.policy_loss`) is plain torch code that dynamo traces as
it is; only these checks would break a compiled graph, so each runs inside an op: eagerly, also in
a compiled graph, and its output (what the loss goes on to use) keeps it from being dropped as
dead code. Each op has a fake implementation for the tracer; ``finite_advantages`` is
differentiable (its gradient passes where the advantage is used). The schemas are written out
(this module's annotations are postponed strings).

Ops (``torch.ops.gccpo.<name>``): ``checked_mask``, ``finite_advantages``, ``masked_targets``,
``checked_loss_inputs``.
"""

from __future__ import annotations

import torch


@torch.library.custom_op("gccpo::checked_mask", mutates_args=(), schema="(Tensor mask) -> Tensor")
def _checked_mask(mask):
    if mask.numel() > 0:
        bad = (mask != 0) & (mask != 1)
        if bool(bad.any()):
            value = mask[bad].flatten()[0].item()
            raise ValueError(f"mask must hold only 0 and 1 (or be bool), found {value!r}; pass mask > 0 "
                             "(or mask.bool()) if it holds weights, and put weights into is_weights")
    return mask != 0


@_checked_mask.register_fake
def _checked_mask_fake(mask):
    return torch.empty_like(mask, dtype=torch.bool)


def checked_mask(mask: torch.Tensor) -> torch.Tensor:
    """``mask != 0`` after checking that a non-bool mask holds only 0 and 1."""
    return torch.ops.gccpo.checked_mask(mask)


@torch.library.custom_op("gccpo::finite_advantages", mutates_args=(),
                        schema="(Tensor advantages, Tensor used) -> Tensor")
def _finite_advantages(advantages, used):
    bad = ~torch.isfinite(advantages) & used
    if bool(bad.any()):
        raise ValueError(f"advantages hold {int(bad.sum())} NaN/inf value(s) on unmasked tokens; "
                         "check the reward / advantage computation (e.g. a group std of 0)")
    return torch.where(used, advantages, torch.zeros((), dtype=advantages.dtype, device=advantages.device))


@_finite_advantages.register_fake
def _finite_advantages_fake(advantages, used):
    return torch.empty(torch.broadcast_shapes(advantages.shape, used.shape), dtype=advantages.dtype,
                       device=advantages.device)


def _finite_advantages_setup(ctx, inputs, output) -> None:
    ctx.save_for_backward(inputs[1])


def _finite_advantages_grad(ctx, grad):
    (used,) = ctx.saved_tensors
    return torch.where(used, grad, torch.zeros((), dtype=grad.dtype, device=grad.device)), None


_finite_advantages.register_autograd(_finite_advantages_grad, setup_context=_finite_advantages_setup)


def finite_advantages(advantages: torch.Tensor, used: torch.Tensor) -> torch.Tensor:
    """``advantages`` where ``used`` (0 elsewhere: masked garbage never reaches the backward), after
    checking that every used value is finite."""
    return torch.ops.gccpo.finite_advantages(advantages, used)


@torch.library.custom_op("gccpo::masked_targets", mutates_args=(),
                        schema="(Tensor targets, Tensor mask, SymInt ignore_index) -> Tensor")
def _masked_targets(targets, mask, ignore_index):
    if targets.numel() > 0 and bool((mask & (targets == ignore_index)).any()):
        raise ValueError(f"targets == ignore_index ({ignore_index}) on tokens where mask is 1: "
                         "set mask to 0 there (the loss would silently count them with logp = 0)")
    return targets.masked_fill(~mask, ignore_index)


@_masked_targets.register_fake
def _masked_targets_fake(targets, mask, ignore_index):
    return torch.empty_like(targets)


def masked_targets(targets: torch.Tensor, mask: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """``targets`` with ``ignore_index`` where ``mask`` is False, after checking that no unmasked
    target already is ``ignore_index``."""
    return torch.ops.gccpo.masked_targets(targets, mask, ignore_index)


@torch.library.custom_op(
    "gccpo::checked_loss_inputs", mutates_args=(),
    schema="(Tensor mask, Tensor logp, Tensor? old_logp, Tensor? ref_logp, Tensor? entropy, "
           "Tensor? is_weights, Tensor? normalizer, Tensor? loss_scale) -> Tensor")
def _checked_loss_inputs(mask, logp, old_logp, ref_logp, entropy, is_weights, normalizer,
                         loss_scale):
    """A copy of the bool ``mask`` [B, T] after checking (one host sync) that logp, old_logp,
    ref_logp, entropy ([B, T]) and is_weights ([B, 1] or [B, T]) are finite where the loss reads
    them (unmasked tokens; for a [B, 1] value, rows with an unmasked token), that a tensor
    ``normalizer`` is finite and > 0 and a tensor ``loss_scale`` finite."""
    named = [("logp", logp), ("old_logp", old_logp), ("ref_logp", ref_logp), ("entropy", entropy),
             ("is_weights", is_weights)]
    named = [(k, t) for k, t in named if t is not None]
    bad = []
    for _, t in named:
        used = mask if t.shape[1] > 1 else mask.any(1, keepdim=True)
        bad.append(~torch.isfinite(t) & used)
    flags = [b.any() for b in bad]
    scalars = [(k, v) for k, v in (("normalizer", normalizer), ("loss_scale", loss_scale)) if v is not None]
    for k, v in scalars:
        ok = torch.isfinite(v) & (v > 0) if k == "normalizer" else torch.isfinite(v)
        flags.append(~ok.reshape(()))
    if flags and any(torch.stack(flags).tolist()):
        problems = []
        for (k, t), b in zip(named, bad):
            count = int(b.sum())
            if count:
                where = "unmasked tokens" if t.shape[1] > 1 else "rows with an unmasked token"
                problems.append(f"{k} holds {count} NaN/inf value(s) on {where}")
        for k, v in scalars:
            value = float(v.reshape(()))
            finite = value == value and abs(value) != float("inf")
            if not finite or (k == "normalizer" and not value > 0):
                need = "a finite number > 0" if k == "normalizer" else "finite"
                problems.append(f"{k} must be {need}, got tensor value {value!r}")
        raise ValueError("; ".join(problems) + " (validate=False skips this check and gives a NaN "
                         "or wrong loss)")
    return mask.clone()


@_checked_loss_inputs.register_fake
def _checked_loss_inputs_fake(mask, logp, old_logp, ref_logp, entropy, is_weights, normalizer,
                              loss_scale):
    return torch.empty_like(mask)


def checked_loss_inputs(mask: torch.Tensor, logp: torch.Tensor, old_logp: torch.Tensor | None,
                        ref_logp: torch.Tensor | None, entropy: torch.Tensor | None,
                        is_weights: torch.Tensor | None, normalizer: torch.Tensor | None,
                        loss_scale: torch.Tensor | None) -> torch.Tensor:
    """The bool ``mask`` (a copy) after the policy loss's finiteness checks of its float inputs
    (see ``gccpo::checked_loss_inputs``); the inputs are read detached."""
    det = lambda t: None if t is None else t.detach()  # noqa: E731
    return torch.ops.gccpo.checked_loss_inputs(mask, logp.detach(), det(old_logp), det(ref_logp),
                                               det(entropy), det(is_weights), det(normalizer),
                                               det(loss_scale))
