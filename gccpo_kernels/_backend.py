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

Dispatch: each op module holds one :class:`OpBackends` table, backend name -> the module that
implements the op on that backend, every backend with the same functions and signatures (the
op's backend interface: ``triton/<op>.py``, ``chunked/<op>.py``, ``reference_backend/<op>.py``).
The op looks its implementation up there, by the name :func:`resolve_backend` gave, and calls it
the same way whatever the backend (docs/kernels_layout.md: adding an op, adding a backend).
"""

from __future__ import annotations

import functools
import importlib.util
import os
import sys
import types
from typing import Any

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
    from . import _native

    isa = _native.isa()
    lines.append("compiled CPU row statistics (csrc/row_stats.c, the fused loss's pass on the "
                 "CPU): " + (f"loaded ({isa})" if isa else
                              f"switched off ({_native.ENV_VAR}=0)" if not _native.enabled() else
                              "not built (the torch passes run; `pip install .` with a C "
                              "compiler builds it)"))
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


class OpBackends:
    """One op's backends: the op's single dispatch point.

    ``OpBackends(op, interface, torch=module, triton=loader, reference=module)``: each keyword is
    a backend name of :data:`BACKENDS` and its implementation, a module (or any object) whose
    attributes named in ``interface`` are the op's backend functions, one signature across
    backends; or a zero-argument function returning it, called on first use (the triton modules
    import triton, which must stay unimported until a triton kernel runs). An op may lack a
    backend (the in-forward loss gradient has no reference form); asking for it raises.
    """

    def __init__(self, op: str, interface: tuple[str, ...], **implementations: Any):
        unknown = [name for name in implementations if name not in BACKENDS]
        if unknown:
            raise ValueError(f"{op}: {unknown} are not backends; the backends are {BACKENDS}")
        self.op = op
        self.interface = tuple(interface)
        self._sources = implementations
        self._loaded: dict[str, Any] = {}

    @property
    def names(self) -> tuple[str, ...]:
        """The backends this op has, in :data:`BACKENDS` order."""
        return tuple(name for name in BACKENDS if name in self._sources)

    def __contains__(self, name: object) -> bool:
        return name in self._sources

    def load(self, name: str) -> Any:
        """The implementation of backend ``name`` (a name from :func:`resolve_backend`), its
        interface checked once: a missing function raises TypeError naming it."""
        impl = self._loaded.get(name)
        if impl is not None:
            return impl
        if name not in self._sources:
            raise ValueError(f"{self.op} has no {name!r} backend; it has {self.names}")
        impl = self._sources[name]
        if not isinstance(impl, types.ModuleType) and callable(impl):
            impl = impl()
        missing = [fn for fn in self.interface if not callable(getattr(impl, fn, None))]
        if missing:
            raise TypeError(f"the {name!r} backend of {self.op} ({getattr(impl, '__name__', impl)}) "
                            f"lacks {missing} of the op's interface {self.interface}")
        self._loaded[name] = impl
        return impl
