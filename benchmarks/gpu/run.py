"""The one-shot GPU script: correctness on CUDA, then timings and peak memory on one card.

Usage on the lent H100/H200 (torch 2.11, triton 3.6 there, no network; peers as carried wheels):

    python benchmarks/gpu/run.py --out "$OUT" [--skip-tests] [--only primitive,policy_loss]

and here, on the CPU, as a dry run that exercises every code path at tiny shapes:

    python benchmarks/gpu/run.py --dry

What it does, in one run:
1. runs the test suite on CUDA (``pytest tests -x -q``), unless --skip-tests;
2. for each case (the SPEC §1 primitive, the §2 fused policy loss, the §3 divergence and the §4
   group statistics, each where its module exists), times every available path with CUDA events
   (median of many repetitions, rotating among several input sets so the L2 cache does not
   flatter anyone), forward and forward+backward, next to the bare GEMM with the same FLOPs;
3. records peak ``torch.cuda.max_memory_allocated`` growth of each path;
4. writes ``results.json`` under --out and prints one table last.

Inputs are "realistic": the LM head is scaled so that logits have a standard deviation near 4,
giving peaked softmaxes like a trained model's (random near-uniform softmaxes flatter peers that
skip small gradients).
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


# ----------------------------------------------------------------------------- inputs


def lm_inputs(n: int, d: int, v: int, dtype: torch.dtype, device: torch.device, seed: int,
              logit_std: float = 4.0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    h = torch.randn(n, d, generator=g)
    w = torch.randn(v, d, generator=g) * (logit_std / d ** 0.5)
    y = torch.randint(0, v, (n,), generator=g)
    return (h.to(device, dtype).requires_grad_(), w.to(device, dtype).requires_grad_(),
            y.to(device))


# ----------------------------------------------------------------------------- cases


def case_primitive(n, d, v, dtype, device, sets):
    """SPEC §1: logp + entropy, forward and forward+backward."""
    from benchmarks.test_bench_linear_logprobs import PATHS, _available

    inputs = [lm_inputs(n, d, v, dtype, device, seed) for seed in range(sets)]
    paths = {name: fn for name, fn in PATHS.items() if _available(name) and name != "liger"}
    if _liger_ok(device):
        paths["liger"] = PATHS["liger"]
    _add_cce(paths, device)
    flops_fb = 6 * n * v * d  # bare GEMM forward + backward: z = h W^T, dh = g W, dW = g^T h
    return inputs, paths, flops_fb


def _liger_ok(device):
    if device.type != "cuda":
        return False
    try:
        import liger_kernel  # noqa: F401
    except Exception:
        return False
    return True


def _add_cce(paths, device):
    if device.type != "cuda":
        return
    try:
        from cut_cross_entropy import linear_cross_entropy
    except Exception:
        return

    def cce(h, w, y, filter_eps="auto"):
        return -linear_cross_entropy(h, w, y, reduction="none", filter_eps=filter_eps), None

    paths["cce"] = cce
    paths["cce_nofilter"] = lambda h, w, y: cce(h, w, y, filter_eps=None)


def bare_gemm(h, w, y):
    """The floor: z = h W^T forward; dh = g W and dW = g^T h backward (g = ones-like upstream)."""
    z = h @ w.T
    return z, None


def run_case(name, make, n, d, v, dtype, device, reps, sets):
    inputs, paths, flops_fb = make(n, d, v, dtype, device, sets)
    rows = []

    def fwd(fn, h, w, y):
        def go():
            with torch.no_grad():
                fn(h, w, y)
        return go

    def fwd_bwd(fn, h, w, y):
        def go():
            h.grad = None
            w.grad = None
            out, extra = fn(h, w, y)
            if out.dim() == 2:  # bare GEMM: backward of sum(z * G) with a fixed upstream
                out.backward(torch.ones_like(out))
            else:
                (out.sum() if extra is None else out.sum() + extra.sum()).backward()
        return go

    all_paths = {"bare_gemm": bare_gemm, **paths}
    for path, fn in all_paths.items():
        try:
            f_ms = time_ms([fwd(fn, *inp) for inp in inputs], device, reps=reps)
            fb_ms = time_ms([fwd_bwd(fn, *inp) for inp in inputs], device, reps=reps)
            mem = peak_mib(fwd_bwd(fn, *inputs[0]), device)
            rows.append({"case": name, "path": path, "fwd_ms": round(f_ms, 3),
                         "fwd_bwd_ms": round(fb_ms, 3), "peak_mib": mem})
        except Exception as exc:  # a peer that breaks must not hide our numbers
            rows.append({"case": name, "path": path, "error": repr(exc)[:300]})
    base = next((r for r in rows if r["path"] == "bare_gemm" and "fwd_bwd_ms" in r), None)
    for r in rows:
        if base and "fwd_bwd_ms" in r:
            r["fwd_bwd_vs_gemm"] = round(r["fwd_bwd_ms"] / base["fwd_bwd_ms"], 3)
            r["tflops_fwd_bwd_equiv"] = round(flops_fb / (r["fwd_bwd_ms"] * 1e-3) / 1e12, 1)
    return rows


CASES = {"primitive": case_primitive}


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
        print(f"{r['case']:<12} {r['path']:<14} {r['fwd_ms']:>9.2f} {r['fwd_bwd_ms']:>11.2f} "
              f"{r.get('fwd_bwd_vs_gemm', float('nan')):>8.2f} {mem:>9}")


if __name__ == "__main__":
    main()
