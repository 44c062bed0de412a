"""``python -m gccpo.train [options]``: the same as the ``gccpo-train`` console script."""

from __future__ import annotations

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
