"""The compiled CPU row statistics (``csrc/row_stats.c``), loaded through ctypes.

``row_stats(z, write_exp)`` gives, for each row of a float32 CPU matrix ``z`` [rows, V] (unit
column stride), the log-sum-exp, the softmax entropy and the max in one call: two reads of each
row (the max, then the sums while the row is in cache) instead of torch's six passes per cache
block, and with ``write_exp`` it leaves ``e^{z - max}`` over ``z``. Measured at 2048 x 32000 on
this project's 2-core CPU: ~20 ms against ~40 ms for the torch passes (benchmarks/RESULTS.md).
Accuracy: e^x within ~1 ulp; each float32 lane sums 4 terms, then double lanes, so lse is
float32's correctly rounded value but for ties (tests/kernels/test_native.py against float64).

The extension is optional (setup.py builds it where a C compiler exists). ``available()`` says
whether it loaded; ``GCCPO_NATIVE=0`` turns it off (the pure-torch passes run instead, the same
results to float32 rounding).
"""

from __future__ import annotations

import ctypes
import functools
import importlib.util
import os

import torch

ENV_VAR = "GCCPO_NATIVE"
ISA_NAMES = {2: "avx512", 1: "avx2", 0: "generic"}


@functools.lru_cache(maxsize=1)
def _library() -> ctypes.CDLL | None:
    spec = importlib.util.find_spec("gccpo_kernels._row_stats")
    if spec is None or not spec.origin:
        return None
    try:
        return bind(ctypes.CDLL(spec.origin))
    except (OSError, AttributeError):
        return None


def bind(lib: ctypes.CDLL) -> ctypes.CDLL:
    """Declare the C signatures on a loaded row_stats library (returned)."""
    lib.gccpo_row_stats.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                                    ctypes.c_int64, ctypes.c_int, ctypes.c_void_p,
                                    ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int]
    lib.gccpo_row_stats.restype = ctypes.c_int
    lib.gccpo_row_stats_isa.restype = ctypes.c_int
    lib.gccpo_row_stats_force_isa.argtypes = [ctypes.c_int]
    lib.gccpo_row_stats_force_isa.restype = ctypes.c_int
    return lib


def force_isa(name: str | None) -> str | None:
    """Run instruction set ``name`` (one of ``ISA_NAMES``' values, at most the best this CPU
    runs) from now on, or the best with None; returns the one in use. Process-wide, for tests."""
    lib = _library()
    if lib is None:
        return None
    codes = {v: k for k, v in ISA_NAMES.items()}
    return ISA_NAMES[lib.gccpo_row_stats_force_isa(-1 if name is None else codes[name])]


def enabled() -> bool:
    """Not switched off by ``GCCPO_NATIVE=0``."""
    return os.environ.get(ENV_VAR, "1").strip().lower() not in ("0", "false", "no", "off")


def available() -> bool:
    """The compiled library loaded and is not switched off."""
    return enabled() and _library() is not None


def isa() -> str | None:
    """The instruction set the library dispatched to on this CPU, or None when not available."""
    lib = _library() if enabled() else None
    return None if lib is None else ISA_NAMES.get(lib.gccpo_row_stats_isa(), "generic")


def usable_for(z: torch.Tensor) -> bool:
    """``row_stats`` applies to ``z``: available, a float32 CPU matrix with unit column stride,
    outside autograd (``write_exp`` writes through the pointer, unseen by autograd's version
    counter)."""
    return (z.device.type == "cpu" and z.dtype == torch.float32 and z.dim() == 2
            and not z.requires_grad
            and z.stride(1) == 1 and z.shape[1] > 0
            and (z.shape[0] <= 1 or z.stride(0) >= z.shape[1])
            and available())


def row_stats(z: torch.Tensor, write_exp: bool = False, threads: int | None = None
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(lse [rows, 1], entropy [rows, 1], max [1, rows]) of the softmax over each row of ``z``
    [rows, V] (float32, CPU, unit column stride: see ``usable_for``); with ``write_exp``,
    ``z`` is overwritten with ``e^{z - max}`` (row by row). Entropy is clamped into [0, log V];
    a row holding a NaN gives NaN. ``threads``: rows are split over that many of torch's
    OpenMP workers (default ``torch.get_num_threads()``); each row's result is the same bits
    whatever the split. Cost: ~3 flops and one exp per element, two reads of z."""
    if not usable_for(z):
        raise RuntimeError("row_stats needs the compiled library and a float32 CPU matrix (no "
                           "grad) with unit column stride (see gccpo_kernels._native.usable_for)")
    return call(_library(), z, write_exp, threads)


def call(lib: ctypes.CDLL, z: torch.Tensor, write_exp: bool, threads: int | None
         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``row_stats`` through a given (``bind``-declared) library, ``z`` already checked."""
    rows, vocab = z.shape
    out = torch.empty(3, rows, dtype=torch.float32)
    if rows:
        ld = z.stride(0) if rows > 1 else vocab
        rc = lib.gccpo_row_stats(z.data_ptr(), rows, vocab, ld, int(write_exp),
                                 out[0].data_ptr(), out[1].data_ptr(), out[2].data_ptr(),
                                 threads or torch.get_num_threads())
        if rc != 0:
            raise RuntimeError(f"gccpo_row_stats failed (code {rc}) on a {tuple(z.shape)} matrix")
    return out[0][:, None], out[1][:, None], out[2][None]
