"""The one place that picks a backend for an op, and says why.

Backends:
  ``triton``    fused Triton kernels. CUDA tensors; CPU tensors only when ``TRITON_INTERPRET=1``
                is set before triton is imported (that is how the tests run the real kernels on a
                machine without a GPU). float16 / bfloat16 / float32 inputs.
  ``torch``     chunked PyTorch code with a bounded workspace; any device, any float dtype
                (float64 included). The CPU default.
  ``reference`` the materializing float64-capable spec in code (:mod:`gccpo_kernels.reference`).
                For tests and debugging: it builds full N x V tensors.

Choice: an explicit ``backend=`` argument wins, then the ``GCCPO_BACKEND`` environment variable
(``auto`` or a backend name), then automatic: CUDA -> triton (float64 -> torch), otherwise torch.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import sys

import torch

BACKENDS: tuple[str, ...] = ("triton", "torch", "reference")
ENV_VAR = "GCCPO_BACKEND"
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def triton_interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0", "false", "False")


@functools.lru_cache(maxsize=None)
def triton_unavailable_reason() -> str | None:
    """None when triton can be imported, else a sentence saying why not."""
    if not sys.platform.startswith("linux"):
        return f"triton is only supported on Linux (this is {sys.platform})"
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (pip install triton)"
    try:
        import triton  # noqa: F401
    except Exception as exc:  # pragma: no cover - depends on the install
        return f"importing triton failed: {exc!r}"
    return None


def triton_usable_on(device: torch.device, dtype: torch.dtype) -> str | None:
    """None when the triton backend can run on tensors of this device and dtype, else why not."""
    reason = triton_unavailable_reason()
    if reason is not None:
        return reason
    if device.type == "cpu" and not triton_interpreting():
        return "tensors are on the CPU and TRITON_INTERPRET=1 is not set (the triton backend needs CUDA)"
    if device.type not in ("cpu", "cuda"):
        return f"triton kernels here target CUDA, not {device.type}"
    if dtype not in TRITON_DTYPES:
        return f"the triton kernels take float16/bfloat16/float32, not {dtype} (use backend='torch')"
    return None


def _requested(backend: str | None) -> str:
    name = backend if backend is not None else os.environ.get(ENV_VAR, "auto")
    name = name.strip().lower()
    if name != "auto" and name not in BACKENDS:
        origin = "backend=" if backend is not None else f"${ENV_VAR}="
        raise ValueError(f"{origin}{name!r} is not a backend; choose one of {BACKENDS} or 'auto'")
    return name


def resolve_backend(backend: str | None, device: torch.device, dtype: torch.dtype) -> str:
    """Return the backend name to use for tensors on ``device`` with float ``dtype``.

    An explicitly requested backend that cannot run raises ``RuntimeError`` saying why, instead of
    silently running another one.
    """
    name = _requested(backend)
    if name == "auto":
        if device.type == "cuda" and triton_usable_on(device, dtype) is None:
            return "triton"
        return "torch"
    if name == "triton":
        reason = triton_usable_on(device, dtype)
        if reason is not None:
            raise RuntimeError(f"backend 'triton' cannot run here: {reason}")
    return name


def explain() -> str:
    """A human-readable report: versions, devices, usable backends and the automatic choice."""
    lines = [f"python {sys.version.split()[0]}", f"torch {torch.__version__}"]
    try:
        import triton

        lines.append(f"triton {triton.__version__}")
    except Exception:
        lines.append("triton: not importable")
    lines.append(f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '')!r}")
    lines.append(f"{ENV_VAR}={os.environ.get(ENV_VAR, '')!r}")
    devices = [torch.device("cpu")]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            cap = torch.cuda.get_device_capability(i)
            lines.append(f"cuda:{i} {torch.cuda.get_device_name(i)} (sm_{cap[0]}{cap[1]})")
            devices.append(torch.device("cuda", i))
    else:
        lines.append("cuda: not available")
    for device in devices:
        for dtype in (torch.bfloat16, torch.float32, torch.float64):
            usable = []
            for b in BACKENDS:
                why = triton_usable_on(device, dtype) if b == "triton" else None
                usable.append(f"{b}: {'yes' if why is None else 'no (' + why + ')'}")
            try:
                picked = resolve_backend(None, device, dtype)
            except Exception as exc:
                picked = f"error: {exc}"
            lines.append(f"{device} {str(dtype).replace('torch.', '')}: picks {picked}; " + "; ".join(usable))
    return "\n".join(lines)
