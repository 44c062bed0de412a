"""Ahead-of-time compile check of every Triton kernel for Hopper (sm_90) and Ampere (sm_80).

Runs without a GPU: ``triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))`` produces
PTX and a cubin; the cuobjdump shipped in the triton wheel reads registers, shared memory, stack
and local memory from the cubin, and the ptxas triton compiles with, run verbosely on the PTX,
counts spill stores and loads (a stack frame alone is not a spill: calls and some library
routines use one). This catches what the interpreter lets through: dot tiles
under 16, non-power-of-two blocks, shared memory over the limit, ops the GPU backend lacks.

``python -m gccpo_kernels.triton._aot [--json]`` prints a table (or JSON) of every kernel at every
configuration the dispatchers can pick. It must run with TRITON_INTERPRET unset (interpreted
kernels cannot be compiled).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import pkgutil
import re
import subprocess
import tempfile

# Opt-in shared memory per block: H100 227 KiB, A100 163 KiB.
SHARED_LIMIT = {90: 232448, 80: 166912}
ARCHS = {"sm90": 90, "sm80": 80}


def _cuobjdump() -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def _resource_usage(cubin: bytes) -> dict[str, int]:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([_cuobjdump(), "--dump-resource-usage", f.name], capture_output=True,
                             text=True, check=True).stdout
    usage = {}
    for key in ("REG", "STACK", "SHARED", "LOCAL"):
        m = re.search(rf"\b{key}:(\d+)", out)
        usage[key.lower()] = int(m.group(1)) if m else -1
    return usage


def _ptxas_path(cc: int) -> str:
    """The ptxas triton itself compiles with for this arch (honours TRITON_PTXAS_PATH)."""
    from triton.backends.nvidia import compiler

    try:
        tool = compiler.get_ptxas(cc)
    except TypeError:  # triton 3.6: get_ptxas() takes no arch
        tool = compiler.get_ptxas()
    return getattr(tool, "path", tool)


def _spills(ptx: str, cc: int) -> tuple[int, int]:
    """Bytes of spill stores and spill loads ptxas reports for this PTX, summed over functions."""
    gpu = f"sm_{cc}a" if cc >= 90 else f"sm_{cc}"
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = os.path.join(tmp, "k.ptx"), os.path.join(tmp, "k.cubin")
        with open(src, "w") as f:
            f.write(ptx)
        proc = subprocess.run([_ptxas_path(cc), "-v", f"--gpu-name={gpu}", src, "-o", dst],
                              capture_output=True, text=True, check=True)
    pairs = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads",
                       proc.stdout + proc.stderr)
    if not pairs:
        raise RuntimeError(f"ptxas -v printed no spill counts: {proc.stderr[:300]}")
    return sum(int(a) for a, _ in pairs), sum(int(b) for _, b in pairs)


def kernel_modules() -> list[str]:
    """The modules of ``gccpo_kernels.triton`` that define kernels: those with ``compile_cases``
    (host-only modules, which launch kernels defined elsewhere, have none)."""
    import gccpo_kernels.triton as pkg

    names = sorted(m.name for m in pkgutil.iter_modules(pkg.__path__) if not m.name.startswith("_"))
    return [n for n in names
            if hasattr(importlib.import_module(f"gccpo_kernels.triton.{n}"), "compile_cases")]


def compile_all(only: str | None = None) -> list[dict]:
    """Compile every case of every kernel module for every arch; one dict per (case, arch)."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("unset TRITON_INTERPRET: interpreted kernels cannot be compiled")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    rows = []
    for mod_name in kernel_modules():
        if only and only not in mod_name:
            continue
        mod = importlib.import_module(f"gccpo_kernels.triton.{mod_name}")
        for arch, cc in ARCHS.items():
            for case in mod.compile_cases(arch):
                names = list(case.kernel.arg_names)
                attrs = {(names.index(k),): [["tt.divisibility", 16]] for k, t in case.signature.items()
                         if t.startswith("*") or k in case.divisible_ints}
                src = ASTSource(fn=case.kernel, signature=case.signature, constexprs=case.constexprs,
                                attrs=attrs)
                options = {"num_warps": case.num_warps, "num_stages": case.num_stages, **case.options}
                compiled = triton.compile(src, target=GPUTarget("cuda", cc, 32), options=options)
                ptx = compiled.asm["ptx"]
                usage = _resource_usage(compiled.asm["cubin"])
                spill_stores, spill_loads = _spills(ptx, cc)
                rows.append({
                    "module": mod_name, "case": case.name, "arch": arch,
                    "num_warps": case.num_warps, "num_stages": case.num_stages,
                    "registers": usage["reg"], "shared_bytes": int(compiled.metadata.shared),
                    "shared_limit": SHARED_LIMIT[cc], "stack": usage["stack"], "local": usage["local"],
                    "spill_stores": spill_stores, "spill_loads": spill_loads,
                    "wgmma": "wgmma" in ptx, "mma": bool(re.search(r"\bmma\.sync", ptx)),
                    "uses_dot": case.uses_dot, "large_shape_config": case.large_shape_config,
                    "dtype": case.signature.get("H", case.signature.get("X", "")).lstrip("*"),
                })
    return rows


def markdown(rows: list[dict]) -> str:
    head = ("| kernel | case | arch | warps | stages | registers | shared (B) | stack | local | "
            "spills (B) | tensor-core op |\n|---|---|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in rows:
        op = "wgmma" if r["wgmma"] else ("mma.sync" if r["mma"] else "-")
        lines.append(f"| {r['module']} | {r['case']} | {r['arch']} | {r['num_warps']} | "
                     f"{r['num_stages']} | {r['registers']} | {r['shared_bytes']} | {r['stack']} | "
                     f"{r['local']} | {r['spill_stores'] + r['spill_loads']} | {op} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--only", default=None, help="only kernel modules whose name contains this")
    args = parser.parse_args()
    rows = compile_all(args.only)
    print(json.dumps(rows, indent=1) if args.json else markdown(rows))


if __name__ == "__main__":
    main()
