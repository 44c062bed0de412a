"""Block-shape sweep of the SPEC §1 Triton epilogues on the card at hand, in one run.

The GEMMs run on cuBLAS (issue 18); what is pinned per architecture is the block shape of the two
streaming epilogues over the float32 logit chunk (gccpo_kernels/triton/logit_epilogues.py
CONFIGS: "stats", the row statistics of the forward; "grad", the logit gradient of the backward).
Nothing autotunes at run time, so that a row's result never depends on the batch around it. This
script is how the pinned sm_90 entries are chosen: it times the whole forward and the whole
backward for each candidate, next to the bare GEMMs with the same FLOPs, checks that every
candidate gives the same numbers as the pinned one (the gradient kernel's block shape changes no
arithmetic: 0 difference; the statistics kernel's BLOCK_V changes the order of its row sums:
float32 rounding), and writes ``sweep.json`` under --out.

    python benchmarks/gpu/sweep.py --out "$OUT"              # on the GPU machine
    python benchmarks/gpu/sweep.py --dry --out /tmp/sweep     # here, interpreter, tiny shapes
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from benchmarks.gpu.cases import lm_inputs  # noqa: E402
from benchmarks.gpu.run import time_ms  # noqa: E402

# (BLOCK_N, BLOCK_V, num_warps)
FWD = [(2, 2048, 8), (1, 4096, 8), (4, 1024, 8), (2, 1024, 4), (1, 2048, 4), (4, 2048, 16)]
BWD = [(16, 256, 8), (8, 512, 8), (32, 128, 8), (16, 512, 8), (16, 256, 4), (64, 128, 8)]
DRY = [(16, 128, 4)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "out"))
    parser.add_argument("--dry", action="store_true")
    parser.add_argument("--n", type=int, default=16384)
    parser.add_argument("--d", type=int, default=4096)
    parser.add_argument("--v", type=int, default=151936)
    parser.add_argument("--reps", type=int, default=6)
    parser.add_argument("--deadline", type=float, default=150.0)
    args = parser.parse_args()
    from gccpo_kernels._logits import LogitParams
    from gccpo_kernels.triton import linear_logprobs as ll
    from gccpo_kernels.triton import logit_epilogues as epi
    from gccpo_kernels.triton._utils import arch_key

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if args.dry:
        args.n, args.d, args.v, args.reps = 128, 64, 700, 1
    table = epi.CONFIGS[arch_key(device)]
    pinned_fwd, pinned_bwd = dict(table["stats"]), dict(table["grad"])
    h, w, y = lm_inputs(args.n, args.d, args.v, dtype, device, seed=0)
    h, w = h.detach(), w.detach()
    params = LogitParams.of(1.0, 1.0, None)
    g_logp = torch.ones(args.n, device=device)
    g_ent = torch.full((args.n,), 0.1, device=device)
    os.makedirs(args.out, exist_ok=True)
    t0 = time.time()
    report = {"device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
              "shape": [args.n, args.d, args.v], "dtype": str(dtype), "pinned_fwd": pinned_fwd,
              "pinned_bwd": pinned_bwd, "rows": []}
    report["gemm_fwd_ms"] = time_ms([lambda: h @ w.T], device, reps=args.reps)
    def gemm_bwd(z: torch.Tensor = h @ w.T):  # a backward's GEMMs: recompute z, dh = z W, dW = z^T h
        return h @ w.T, z @ w, z.T @ h

    report["gemm_bwd_ms"] = time_ms([gemm_bwd], device, reps=args.reps)
    del gemm_bwd  # frees the [N, V] operand of this baseline before the fused kernels run

    def fwd():
        return ll.forward(h, w, None, y, params)

    base_logp, base_ent, lse = fwd()
    base_grads = ll.backward(h, w, None, y, lse, base_ent, g_logp, g_ent, params, (True, True, False))
    for kind, cands in (("fwd", DRY if args.dry else FWD), ("bwd", DRY if args.dry else BWD)):
        key = "stats" if kind == "fwd" else "grad"
        for n_, v_, warps in cands:
            cfg = dict(pinned_fwd if kind == "fwd" else pinned_bwd, BLOCK_N=n_, BLOCK_V=v_,
                       num_warps=warps)
            row = {"kernel": kind, **cfg}
            if time.time() - t0 > args.deadline:
                row["error"] = "skipped: past the --deadline"
                report["rows"].append(row)
                continue
            table[key] = cfg
            try:
                if kind == "fwd":
                    logp, ent, _ = fwd()
                    row["max_diff"] = float(torch.maximum((logp - base_logp).abs().max(),
                                                          (ent - base_ent).abs().max()))
                    row["ms"] = round(time_ms([fwd], device, reps=args.reps), 3)
                    row["vs_gemm"] = round(row["ms"] / report["gemm_fwd_ms"], 3)
                else:
                    def bwd():
                        return ll.backward(h, w, None, y, lse, base_ent, g_logp, g_ent, params,
                                           (True, True, False))
                    dh, dw, _ = bwd()
                    row["max_rel_diff"] = float(max(
                        (a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30)
                        for a, b in zip((dh, dw), base_grads[:2])))
                    row["ms"] = round(time_ms([bwd], device, reps=args.reps), 3)
                    row["vs_gemm"] = round(row["ms"] / report["gemm_bwd_ms"], 3)
            except Exception as exc:  # a shape that does not fit (shared memory, registers)
                row["error"] = repr(exc)[:200]
            finally:
                table[key] = pinned_fwd if kind == "fwd" else pinned_bwd
            report["rows"].append(row)
            print(json.dumps(row), flush=True)
            with open(os.path.join(args.out, "sweep.json"), "w") as f:
                json.dump(report, f, indent=1)
    print(f"GEMM fwd {report['gemm_fwd_ms']:.2f} ms, bwd-equivalent {report['gemm_bwd_ms']:.2f} ms")
    for r in report["rows"]:
        shape = f"{r['BLOCK_N']}x{r['BLOCK_V']} w{r['num_warps']}"
        print(f"{r['kernel']} {shape:<22} " + (f"{r['ms']:9.2f} ms  {r['vs_gemm']:.2f}x GEMM"
                                             if "ms" in r else r.get("error", "")))


if __name__ == "__main__":
    main()
