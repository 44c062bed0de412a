"""Skips under the test command are explained or they fail.

``tests/run.sh`` sets ``GCCPO_TEST_STRICT=1`` and installs everything the suite imports, so under
it a test may skip only for a reason listed in :data:`ALLOWED` (what would make it run is in the
reason). Any other skip (typically a package missing, or failing to import after a release of one
of our dependencies changed) is turned into a failure that quotes the reason: dependency drift
cannot hide as a skip. Without the variable (a developer's ``python -m pytest -k ...``) nothing
changes. Both conftests (``tests/`` and ``benchmarks/``) import these hooks.
"""

from __future__ import annotations

import os
import re

import pytest

STRICT = os.environ.get("GCCPO_TEST_STRICT") == "1"

# reason patterns a skip may have under the test command, each saying what would make it run
ALLOWED: tuple[str, ...] = (
    r"the triton backend takes 16/32-bit inputs; float64 runs on the torch backend",
    r"CUDA present: the triton backend runs",          # a CPU-only check, skipped on GPU machines
    r"needs CUDA",                                     # a GPU-only check, skipped without one
    r"tested on Linux",
)


def _reason(longrepr) -> str:
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2])
    return str(longrepr)


def _unexplained(report) -> str | None:
    if not (STRICT and report.skipped) or hasattr(report, "wasxfail"):
        return None
    reason = _reason(report.longrepr)
    if any(re.search(p, reason) for p in ALLOWED):
        return None
    return (f"skipped under tests/run.sh (GCCPO_TEST_STRICT=1), which installs everything the "
            f"suite needs, for a reason not in tests/_strict.py's ALLOWED list: {reason}")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    message = _unexplained(report)
    if message is not None:
        report.outcome, report.longrepr = "failed", message


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    report = outcome.get_result()
    message = _unexplained(report)
    if message is not None:
        report.outcome, report.longrepr = "failed", message
