"""The benchmark harness shared by every op: timing, peak-memory growth in a clean subprocess,
and the ratios each benchmark reports in pytest-benchmark's extra_info.

Peak memory on the CPU is the growth of the process's peak RSS (VmHWM, reset once the inputs
exist) over its RSS at that moment, measured in a fresh subprocess with
``MALLOC_MMAP_THRESHOLD_=131072`` (so glibc returns
freed buffers to the OS instead of keeping them resident). A workload is named by
``"module:factory"``: ``factory(**kwargs)`` allocates the inputs and returns a zero-argument
callable that runs the workload once.

One-time costs of a process are not the workload's: before the measured run, the child runs the
same workload once at a tiny shape (``warmup=``, the factory's keyword arguments to override), so
every contender's modules are imported and its lazy initialisation done. This matters: the first
call of any ``torch.library`` custom op (ours) imports ``torch._dynamo`` (about 900 modules, ~140
MiB of RSS, ~1 s; torch wraps the op's backend call in ``torch._disable_dynamo``), and so does
loading any transformers model, so a trainer has paid it before our first call; the peers import
their own modules (triton, liger's ops) on first use too.
"""

from __future__ import annotations

import gc
import importlib
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Callable

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def median_time(fn: Callable[[], object], *, repeats: int = 3, warmup: int = 1) -> float:
    """Median wall time of ``fn()`` in seconds (device-synchronised when CUDA is in use)."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_rss_growth(workload: str, *, warmup: dict | None = None, **kwargs) -> int:
    """Bytes by which ``workload`` (``"module:factory"``) grows peak RSS beyond its inputs.

    ``warmup``: keyword arguments that override ``kwargs`` for one run at a tiny shape before the
    measured one (imports and lazy initialisation; see the module docstring); None: no warm-up.
    """
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    args = [json.dumps(kwargs), json.dumps(warmup)]
    proc = subprocess.run([sys.executable, "-m", "benchmarks._harness", workload, *args],
                          env=env, capture_output=True, text=True, timeout=1800, cwd=REPO)
    if proc.returncode != 0:
        raise RuntimeError(f"memory subprocess for {workload} failed:\n{proc.stderr[-3000:]}")
    return int(json.loads(proc.stdout.strip().splitlines()[-1])["growth"])


def _load(workload: str) -> Callable[..., Callable[[], object]]:
    module, factory = workload.split(":")
    return getattr(importlib.import_module(module), factory)


def _child(workload: str, kwargs: dict, warmup: dict | None) -> None:
    factory = _load(workload)
    if warmup is not None:
        factory(**{**kwargs, **warmup})()
        gc.collect()
    run = factory(**kwargs)
    base = _status_bytes("VmRSS")
    # Reset this process's high-water mark (VmHWM) to its current RSS, so that the peak read
    # after the run is the workload's own. (ru_maxrss would not do: Linux carries the parent's
    # peak into a child across fork/exec, so every workload would report the parent's peak.)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    run()
    print(json.dumps({"growth": max(0, _status_bytes("VmHWM") - base)}))


def ratio_info(ours_s: float, baselines: dict[str, float | None]) -> dict[str, float]:
    """{'ratio_vs_<name>': ours / baseline} for every baseline that ran."""
    return {f"ratio_vs_{k}": round(ours_s / v, 4) for k, v in baselines.items() if v}


if __name__ == "__main__":
    _child(sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3]))
