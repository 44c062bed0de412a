"""The one-shot GPU script: correctness on CUDA, then timings and peak memory on one card.

Usage on the lent H100/H200 (torch 2.11, triton 3.6 there, no network; peers as carried wheels):

    python benchmarks/gpu/run.py --out "$OUT" [--skip-tests] [--only primitive,policy_loss]

and here, on the CPU, as a dry run that exercises every code path at tiny shapes:

    python benchmarks/gpu/run.py --dry

What it does, in one run:
1. runs the test suite on CUDA (``pytest tests -x -q``), unless --skip-tests;
2. for each case in benchmarks/gpu/cases.py (the SPEC §1 primitive, the §2 fused policy loss, the
   §3 divergence and the §4 group statistics), times every available path with CUDA events
   (median of many repetitions, rotating among several input sets so the L2 cache does not
   flatter anyone), forward and forward+backward, next to the bare GEMM with the same FLOPs;
3. records peak ``torch.cuda.max_memory_allocated`` growth of each path;
4. writes ``results.json`` under --out and prints one table last.

Inputs are "realistic": the LM head is scaled so that logits have a standard deviation near 4,
giving peaked softmaxes like a trained model's (random near-uniform softmaxes flatter peers that
skip small gradients). Kernel configurations are pinned per architecture: nothing autotunes here.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Callable

import torch

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)

from benchmarks.gpu.cases import CASES  # noqa: E402


# ----------------------------------------------------------------------------- timing


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fns: list[Callable[[], object]], device: torch.device, *, reps: int, warmup: int = 2,
            ) -> float:
    """Median milliseconds of one call, cycling through ``fns`` (one per input set)."""
    for i in range(warmup):
        fns[i % len(fns)]()
    _sync(device)
    samples = []
    for i in range(reps):
        fn = fns[i % len(fns)]
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(samples)


def peak_mib(fn: Callable[[], object], device: torch.device) -> float | None:
    """Peak device memory growth of one call, in MiB (None off CUDA)."""
    if device.type != "cuda":
        return None
    _sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    _sync(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


# ----------------------------------------------------------------------------- cases


def _sum_outputs(out):
    if isinstance(out, tuple):
        return sum(o.sum() for o in out if o is not None)
    return out.sum()


def run_case(name, make, n, d, v, dtype, device, reps, sets):
    """Time every path of one case (forward, and forward+backward where it has one)."""
    inputs, paths, info = make(n, d, v, dtype, device, sets)
    rows = []

    def fwd(fn, args):
        def go():
            with torch.no_grad():
                fn(*args)
        return go

    def fwd_bwd(fn, args):
        def go():
            for a in args:
                if isinstance(a, torch.Tensor) and a.requires_grad:
                    a.grad = None
            _sum_outputs(fn(*args)).backward()
        return go

    order = ["bare_gemm"] + [p for p in paths if p != "bare_gemm"]
    for path in order:
        fn = paths[path]
        try:
            row = {"case": name, "path": path,
                   "fwd_ms": round(time_ms([fwd(fn, a) for a in inputs], device, reps=reps), 3)}
            if info.get("backward"):
                row["fwd_bwd_ms"] = round(time_ms([fwd_bwd(fn, a) for a in inputs], device,
                                                  reps=reps), 3)
                row["peak_mib"] = peak_mib(fwd_bwd(fn, inputs[0]), device)
            else:
                row["peak_mib"] = peak_mib(fwd(fn, inputs[0]), device)
            rows.append(row)
        except Exception as exc:  # a peer that breaks must not hide our numbers
            rows.append({"case": name, "path": path, "error": repr(exc)[:300]})
    key = "fwd_bwd_ms" if info.get("backward") else "fwd_ms"
    base = next((r for r in rows if r["path"] == "bare_gemm" and key in r), None)
    for r in rows:
        if base and key in r:
            r["vs_gemm"] = round(r[key] / base[key], 3)
        if "gemm_flops_fwd_bwd" in info and "fwd_bwd_ms" in r:
            r["tflops_equiv"] = round(info["gemm_flops_fwd_bwd"] / (r["fwd_bwd_ms"] * 1e-3) / 1e12,
                                      1)
    return rows


def run_tests(device: torch.device, out_dir: str) -> dict:
    env = dict(os.environ)
    cmd = [sys.executable, "-m", "pytest", "tests", "-x", "-q", "-p", "no:cacheprovider"]
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=420)
    with open(os.path.join(out_dir, "pytest.log"), "w") as f:
        f.write(proc.stdout + proc.stderr)
    tail = (proc.stdout.strip().splitlines() or [""])[-1]
    return {"returncode": proc.returncode, "summary": tail, "seconds": round(time.time() - t0, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description="gccpo one-shot GPU benchmark")
    parser.add_argument("--out", default=os.environ.get("OUT", "out"))
    parser.add_argument("--dry", action="store_true", help="tiny shapes on whatever device is here")
    parser.add_argument("--skip-tests", action="store_true")
    parser.add_argument("--only", default=",".join(CASES))
    parser.add_argument("--n", type=int, default=8192)
    parser.add_argument("--d", type=int, default=4096)
    parser.add_argument("--v", type=int, default=151936)
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--sets", type=int, default=3, help="input sets rotated between reps")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.dry:
        args.n, args.d, args.v, args.reps, args.sets = 256, 128, 4000, 3, 2
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    report = {"device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "shape": [args.n, args.d, args.v], "dtype": str(dtype)}
    try:
        import triton

        report["triton"] = triton.__version__
    except Exception:
        report["triton"] = None
    if not args.skip_tests and not args.dry:
        report["tests"] = run_tests(device, args.out)
        print("tests:", report["tests"], flush=True)
    rows = []
    for name in args.only.split(","):
        rows += run_case(name, CASES[name], args.n, args.d, args.v, dtype, device, args.reps,
                         args.sets)
        print(f"done {name}", flush=True)
    report["rows"] = rows
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(report, f, indent=1)
    print(json.dumps({k: v for k, v in report.items() if k != "rows"}))
    print(f"{'case':<12} {'path':<14} {'fwd ms':>9} {'fwd+bwd ms':>11} {'vs GEMM':>8} "
          f"{'peak MiB':>9}")
    for r in rows:
        if "error" in r:
            print(f"{r['case']:<12} {r['path']:<14} ERROR {r['error'][:60]}")
            continue
        mem = "-" if r["peak_mib"] is None else f"{r['peak_mib']:.0f}"
        fb = f"{r['fwd_bwd_ms']:>11.2f}" if "fwd_bwd_ms" in r else f"{'-':>11}"
        print(f"{r['case']:<12} {r['path']:<14} {r['fwd_ms']:>9.2f} {fb} "
              f"{r.get('vs_gemm', float('nan')):>8.2f} {mem:>9}")


if __name__ == "__main__":
    main()
