"""The ``train`` extra holds everything the README's main command needs on a fresh machine.

CI installs ``.[test,train,peers]``, where ``peers`` (TRL) brings accelerate along, so a missing
entry in ``train`` alone would pass CI and still break ``pip install -e ".[train]" && gccpo-train``
(it did: transformers loads a GGUF file only with accelerate installed).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

try:
    import tomllib  # Python >= 3.11
except ModuleNotFoundError:  # Python 3.10: the backport the test extra installs there
    import tomli as tomllib

PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"


def _names(requirements: list[str]) -> set[str]:
    return {re.split(r"[<>=!~;\[ ]", r, maxsplit=1)[0].strip().lower() for r in requirements}


def test_train_extra_covers_the_embedded_default_run():
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    train = _names(project["optional-dependencies"]["train"])
    # the GGUF model (transformers + gguf + accelerate), the task, the progress bar, the config, plots
    assert {"transformers", "gguf", "accelerate", "reasoning-gym", "tqdm", "pyyaml", "matplotlib"} <= train
    assert "gccpo-train" in project["scripts"]
