"""Benchmarks run on the device the machine has (CPU here); they import benchmarks._harness."""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tests._strict import pytest_make_collect_report, pytest_runtest_makereport  # noqa: E402,F401
