"""The benchmark harness shared by every op: timing, peak-memory growth in a clean subprocess,
and the ratios each benchmark reports in pytest-benchmark's extra_info.

Peak memory on the CPU is the growth of the process's peak RSS over its RSS once the inputs
exist, measured in a fresh subprocess with ``MALLOC_MMAP_THRESHOLD_=131072`` (so glibc returns
freed buffers to the OS instead of keeping them resident). A workload is named by
``"module:factory"``: ``factory(**kwargs)`` allocates the inputs and returns a zero-argument
callable that runs the workload once.
"""

from __future__ import annotations

import importlib
import json
import os
import resource
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


def _current_rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_growth(workload: str, **kwargs) -> int:
    """Bytes by which ``workload`` (``"module:factory"``) grows peak RSS beyond its inputs."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-m", "benchmarks._harness", workload, json.dumps(kwargs)],
                          env=env, capture_output=True, text=True, timeout=1800, cwd=REPO)
    if proc.returncode != 0:
        raise RuntimeError(f"memory subprocess for {workload} failed:\n{proc.stderr[-3000:]}")
    return int(json.loads(proc.stdout.strip().splitlines()[-1])["growth"])


def _load(workload: str) -> Callable[..., Callable[[], object]]:
    module, factory = workload.split(":")
    return getattr(importlib.import_module(module), factory)


def _child(workload: str, kwargs: dict) -> None:
    run = _load(workload)(**kwargs)
    base = _current_rss()
    # ru_maxrss is a high-water mark: to measure only the workload, its peak must exceed everything
    # before it, which holds when the inputs are allocated before `base` and nothing larger preceded
    run()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"growth": max(0, peak - base)}))


def ratio_info(ours_s: float, baselines: dict[str, float | None]) -> dict[str, float]:
    """{'ratio_vs_<name>': ours / baseline} for every baseline that ran."""
    return {f"ratio_vs_{k}": round(ours_s / v, 4) for k, v in baselines.items() if v}


if __name__ == "__main__":
    _child(sys.argv[1], json.loads(sys.argv[2]))
