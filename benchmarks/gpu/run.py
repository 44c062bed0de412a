"""The one-shot GPU script: correctness on CUDA, then timings and peak memory on one card.

Usage on the lent H100/H200 (torch 2.11, triton 3.6 there, no network; peers as carried wheels):

    python benchmarks/gpu/run.py --out "$OUT" [--skip-tests] [--only primitive,policy_loss]

and here, on the CPU, as a dry run that exercises every code path at tiny shapes:

    python benchmarks/gpu/run.py --dry

What it does, in one run:
1. runs the kernel tests on CUDA (``pytest tests/kernels``, parallel workers where pytest-xdist is
   installed), unless --skip-tests;
2. for each case in benchmarks/gpu/cases.py (the SPEC §1 primitive, the §2 fused policy loss, the
   §3 divergence and the §4 group statistics), times every available path with CUDA events
   (median of many repetitions, rotating among several input sets so the L2 cache does not
   flatter anyone), forward and forward+backward, next to the bare GEMM with the same FLOPs;
   ``ours`` also at each ``--workspaces`` budget (default 1024 MiB besides the 256 MiB default:
   the chunk GEMMs' size is what issue 18's predictions turn on);
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


def with_workspace(fn: Callable, mb: int) -> Callable:
    """``fn`` run with ``GCCPO_WORKSPACE_MB=mb`` (read by every op at each call), restored after."""
    def go(*args):
        old = os.environ.get("GCCPO_WORKSPACE_MB")
        os.environ["GCCPO_WORKSPACE_MB"] = str(mb)
        try:
            return fn(*args)
        finally:
            if old is None:
                os.environ.pop("GCCPO_WORKSPACE_MB", None)
            else:
                os.environ["GCCPO_WORKSPACE_MB"] = old
    return go


def run_case(name, make, n, d, v, dtype, device, reps, sets, workspaces=()):
    """Time every path of one case (forward, and forward+backward where it has one); ``ours`` also
    at each extra workspace budget in ``workspaces`` (MiB), as paths ``ours@<MiB>``."""
    inputs, paths, info = make(n, d, v, dtype, device, sets)
    if "ours" in paths:
        for mb in workspaces:
            paths[f"ours@{mb}"] = with_workspace(paths["ours"], mb)
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


def run_tests(out_dir: str, paths: str, timeout_s: int) -> dict:
    """Run the test suite on this device (CUDA: the kernels compile for the card), in parallel
    workers when pytest-xdist is installed, each test bounded when pytest-timeout is."""
    import importlib.util

    # -v: one line per test as it ends, so a suite cut short by the timeout still names failures
    cmd = [sys.executable, "-m", "pytest", *paths.split(","), "-v", "-p", "no:cacheprovider",
           "-rfE", "--tb=short"]
    if importlib.util.find_spec("xdist") is not None:
        cmd += ["-n", "8"]
    if importlib.util.find_spec("pytest_timeout") is not None:
        cmd += ["--timeout", "150"]
    t0 = time.time()
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=dict(os.environ), capture_output=True, text=True,
                              timeout=timeout_s)
        log, rc = proc.stdout + proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as exc:
        log = (exc.stdout or b"").decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        rc = "timeout"
    with open(os.path.join(out_dir, "pytest.log"), "w") as f:
        f.write(log)
    lines = log.strip().splitlines()
    failed = sorted({ln.split(" FAILED ")[-1].split(" ERROR ")[-1].split(" - ")[0].strip()
                     for ln in lines if " FAILED " in f" {ln}" or " ERROR " in f" {ln}"})
    return {"returncode": rc, "summary": lines[-1] if lines else "", "failed": failed[:40],
            "seconds": round(time.time() - t0, 1)}


def _write(report: dict, out_dir: str) -> None:
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(report, f, indent=1)


def main() -> None:
    parser = argparse.ArgumentParser(description="gccpo one-shot GPU benchmark")
    parser.add_argument("--out", default=os.environ.get("OUT", "out"))
    parser.add_argument("--dry", action="store_true", help="tiny shapes on whatever device is here")
    parser.add_argument("--skip-tests", action="store_true")
    parser.add_argument("--tests", default="tests/kernels", help="comma-separated pytest paths")
    parser.add_argument("--test-timeout", type=int, default=240, help="seconds for the whole suite")
    parser.add_argument("--only", default=",".join(CASES))
    parser.add_argument("--ns", default="4096,16384", help="token counts N for the --every-n cases")
    parser.add_argument("--every-n", default="primitive,policy_loss",
                        help="cases timed at every N; the others at the first N only")
    parser.add_argument("--d", type=int, default=4096)
    parser.add_argument("--v", type=int, default=151936)
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--sets", type=int, default=3, help="input sets rotated between reps")
    parser.add_argument("--workspaces", default="1024",
                        help="extra GCCPO_WORKSPACE_MB budgets (MiB, comma-separated; '' for none) "
                             "at which 'ours' is also timed, as paths ours@<MiB>")
    parser.add_argument("--deadline", type=float, default=480,
                        help="seconds after which the remaining cases are skipped (and recorded so)")
    args = parser.parse_args()
    t_start = time.time()
    os.makedirs(args.out, exist_ok=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    ns = [int(x) for x in args.ns.split(",")]
    if args.dry:
        ns, args.d, args.v, args.reps, args.sets = [256, 512], 128, 4000, 3, 2
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    report = {"device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "ns": ns, "d": args.d, "v": args.v,
              "dtype": str(dtype), "reps": args.reps, "sets": args.sets, "rows": []}
    try:
        import triton

        report["triton"] = triton.__version__
    except Exception:
        report["triton"] = None
    if not args.skip_tests and not args.dry:
        report["tests"] = run_tests(args.out, args.tests, args.test_timeout)
        print("tests:", json.dumps(report["tests"], indent=1), flush=True)
        _write(report, args.out)
    every = set(args.every_n.split(","))
    plan = [(name, n) for n in ns for name in args.only.split(",") if name in every or n == ns[0]]
    for name, n in plan:
        if time.time() - t_start > args.deadline:
            report["rows"].append({"case": name, "n": n, "path": "-",
                                   "error": "skipped: past the --deadline"})
            continue
        workspaces = [int(x) for x in args.workspaces.split(",") if x]
        rows = run_case(name, CASES[name], n, args.d, args.v, dtype, device, args.reps, args.sets,
                        workspaces)
        for r in rows:
            r["n"] = n
        report["rows"] += rows
        report["elapsed_s"] = round(time.time() - t_start, 1)
        _write(report, args.out)  # after every case: a run cut short still returns what it had
        if device.type == "cuda":
            torch.cuda.empty_cache()
        print(f"done {name} N={n} at {report['elapsed_s']} s", flush=True)
    print(json.dumps({k: v for k, v in report.items() if k not in ("rows", "tests")}))
    print(f"{'case':<12} {'N':>6} {'path':<14} {'fwd ms':>9} {'fwd+bwd ms':>11} {'vs GEMM':>8} "
          f"{'peak MiB':>9}")
    for r in report["rows"]:
        if "error" in r:
            print(f"{r['case']:<12} {r['n']:>6} {r['path']:<14} ERROR {r['error'][:70]}")
            continue
        mem = "-" if r["peak_mib"] is None else f"{r['peak_mib']:.0f}"
        fb = f"{r['fwd_bwd_ms']:>11.2f}" if "fwd_bwd_ms" in r else f"{'-':>11}"
        print(f"{r['case']:<12} {r['n']:>6} {r['path']:<14} {r['fwd_ms']:>9.2f} {fb} "
              f"{r.get('vs_gemm', float('nan')):>8.2f} {mem:>9}")


if __name__ == "__main__":
    main()
