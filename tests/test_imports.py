"""The package's import structure (issue 22): no import cycle, and every module imports alone.

The graph counts every ``import`` of a package module, at the top of a file or inside a function
(an import inside a function is still a dependency; hiding a cycle there is what this guards
against)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("gccpo", "gccpo_kernels")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_module(name: str) -> bool:
    base = ROOT.joinpath(*name.split("."))
    return base.with_suffix(".py").exists() or (base / "__init__.py").exists()


def import_graph(package: str) -> dict[str, set[str]]:
    """module -> the package modules it imports (``from .x import y`` counts ``.x.y`` when that
    is a module, else ``.x``)."""
    graph: dict[str, set[str]] = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        mod = _module_name(path)
        here = mod.split(".") if path.name == "__init__.py" else mod.split(".")[:-1]
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = ".".join(here[:len(here) - node.level + 1] + ([node.module] if node.module else [])) \
                    if node.level else (node.module or "")
                for alias in node.names:
                    deps.add(f"{base}.{alias.name}" if _is_module(f"{base}.{alias.name}") else base)
            elif isinstance(node, ast.Import):
                deps.update(alias.name for alias in node.names)
        graph[mod] = {d for d in deps if d.split(".")[0] == package and d != mod and _is_module(d)}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_gccpo_has_no_import_cycle():
    assert cycles(import_graph("gccpo")) == []


def test_gccpo_kernels_has_no_import_cycle():
    assert cycles(import_graph("gccpo_kernels")) == []


@pytest.mark.parametrize("package", PACKAGES)
def test_every_module_imports_alone(package):
    """Each module imported first, with no module of ours loaded before it (one interpreter, our
    packages removed from ``sys.modules`` between modules; torch and the other dependencies stay
    loaded), so no earlier import hides an order problem. An optional dependency that is missing
    may only surface as an ImportError that says what to install."""
    mods = [m for m in sorted(import_graph(package)) if not m.endswith("__main__")]
    code = ("import importlib, sys\nbad = []\nfor m in sys.argv[1:]:\n"
            "    for k in [k for k in sys.modules if k.split('.')[0] in ('gccpo', 'gccpo_kernels')]:\n"
            "        del sys.modules[k]\n"
            "    try:\n        importlib.import_module(m)\n"
            "    except ImportError as exc:\n"
            "        if 'pip install' not in str(exc): bad.append((m, repr(exc)))\n"
            "    except Exception as exc:\n        bad.append((m, repr(exc)))\n"
            "print(bad)\nsys.exit(1 if bad else 0)\n")
    out = subprocess.run([sys.executable, "-c", code, *mods], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
