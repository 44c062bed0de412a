"""Input checks shared by every public op: errors that say what is wrong and what to do.

Value checks (finite hidden states, target range) cost one pass over the inputs and one host
synchronisation; every public op takes ``validate=True`` and skips them when it is False.
Shape, dtype and device checks are free and always run.
"""

from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def out_dtype_for(dtype: torch.dtype) -> torch.dtype:
    """Output / accumulation dtype: float64 for float64 inputs, float32 for 16- and 32-bit ones."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_float(name: str, t: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")


def check_same_device(**tensors: torch.Tensor | None) -> None:
    present = {k: v for k, v in tensors.items() if v is not None}
    devices = {str(v.device) for v in present.values()}
    if len(devices) > 1:
        where = ", ".join(f"{k} on {v.device}" for k, v in present.items())
        raise ValueError(f"all tensors must be on one device, got {where}; move them with .to(device)")


def check_lm_head(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    """hidden [..., D], weight [V, D], bias [V] or None: same float dtype, same device."""
    check_float("hidden", hidden)
    check_float("weight", weight)
    if weight.dim() != 2:
        raise ValueError(f"weight must be [V, D], got shape {tuple(weight.shape)}")
    if hidden.dim() < 1 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"hidden's last dimension ({tuple(hidden.shape)}) must equal weight's D ({weight.shape[1]}); "
            "weight is the LM head [V, D] (e.g. model.lm_head.weight), not its transpose"
        )
    if weight.shape[0] < 1:
        raise ValueError("weight must have at least one vocabulary row (V >= 1)")
    if weight.shape[1] < 1:
        raise ValueError(f"hidden {tuple(hidden.shape)} and weight {tuple(weight.shape)} have D = 0 "
                         "features: the LM head needs D >= 1")
    if hidden.dtype != weight.dtype:
        raise TypeError(
            f"hidden ({hidden.dtype}) and weight ({weight.dtype}) must share a dtype; cast one of them"
        )
    if bias is not None:
        check_float("bias", bias)
        if bias.shape != (weight.shape[0],):
            raise ValueError(f"bias must be [V] = [{weight.shape[0]}], got {tuple(bias.shape)}")
        if bias.dtype != weight.dtype:
            raise TypeError(f"bias ({bias.dtype}) must have weight's dtype ({weight.dtype})")
    check_same_device(hidden=hidden, weight=weight, bias=bias)


def check_logit_params(temperature: float, logit_scale: float, softcap: float | None) -> None:
    for name, value in (("temperature", temperature), ("logit_scale", logit_scale)):
        if not isinstance(value, (int, float)) or not value > 0 or value != value or value == float("inf"):
            raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    if softcap is not None and (not isinstance(softcap, (int, float)) or not 0 < softcap < float("inf")):
        raise ValueError(f"softcap must be None or a finite number > 0, got {softcap!r}")


def check_targets(targets: torch.Tensor, lead_shape: torch.Size, vocab: int, ignore_index: int,
                  validate: bool, device: torch.device) -> None:
    """targets: integer tensor of shape ``lead_shape`` with values in [0, V) or == ignore_index."""
    if not isinstance(targets, torch.Tensor):
        raise TypeError(f"targets must be a torch.Tensor, got {type(targets).__name__}")
    if targets.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"targets must be int64 (or int32), got {targets.dtype}")
    if targets.device != device:
        raise ValueError(f"targets are on {targets.device} but hidden is on {device}")
    if targets.shape != lead_shape:
        raise ValueError(
            f"targets shape {tuple(targets.shape)} must match hidden's leading shape {tuple(lead_shape)}"
        )
    if validate and targets.numel() > 0:
        bad = ((targets < 0) | (targets >= vocab)) & (targets != ignore_index)
        if bool(bad.any()):
            first = targets[bad].flatten()[0].item()
            raise ValueError(
                f"targets hold {int(bad.sum())} value(s) outside [0, {vocab}) that are not "
                f"ignore_index={ignore_index} (first: {first})"
            )


def check_finite(name: str, t: torch.Tensor | None, validate: bool,
                 hint: str = "check the model's forward") -> None:
    """Raise when ``t`` holds NaN or +-inf (one pass and one host sync; skipped if not validate
    or ``t`` is None)."""
    # max |t| propagates NaN and inf, costs one reduction and never overflows (a sum could);
    # isfinite(t).all() was 50x slower on the CPU build measured here
    if validate and t is not None and t.numel() > 0 and not bool(torch.isfinite(t.abs().amax())):
        count = int((~torch.isfinite(t)).sum())
        raise ValueError(f"{name} holds {count} non-finite value(s) (NaN or inf); {hint}")


BIAS_HINT = ("an LM-head bias must be finite (a -inf entry to forbid a token is not supported: "
             "restrict the vocabulary with answer_token_ids or slice the head instead)")


def check_bias_finite(bias: torch.Tensor | None, validate: bool) -> None:
    """Raise when the LM-head ``bias`` [V] holds NaN or +-inf (O(V), one host sync; skipped if not
    validate). The weight [V, D] is not scanned (a pass over it would cost more than the op's
    output check, which catches it)."""
    check_finite("bias", bias, validate, BIAS_HINT)


def check_answer_ids(answer_token_ids: torch.Tensor | None, vocab: int, device: torch.device,
                     validate: bool) -> None:
    """answer_token_ids: None, or a non-empty [K] int tensor of distinct ids in [0, V)."""
    if answer_token_ids is None:
        return
    if not isinstance(answer_token_ids, torch.Tensor) or answer_token_ids.dtype not in (torch.int64, torch.int32):
        raise TypeError("answer_token_ids must be an int64/int32 tensor of token ids")
    if answer_token_ids.dim() != 1 or answer_token_ids.numel() == 0:
        raise ValueError(f"answer_token_ids must be a non-empty 1-D tensor, got shape "
                         f"{tuple(answer_token_ids.shape)}")
    if answer_token_ids.device != device:
        raise ValueError(f"answer_token_ids are on {answer_token_ids.device} but hidden is on {device}")
    if validate:
        if bool(((answer_token_ids < 0) | (answer_token_ids >= vocab)).any()):
            raise ValueError(f"answer_token_ids must lie in [0, {vocab})")
        if torch.unique(answer_token_ids).numel() != answer_token_ids.numel():
            raise ValueError("answer_token_ids must be distinct (a repeated id would count twice)")
