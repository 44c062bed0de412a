"""setup shim: the metadata lives in pyproject.toml; this adds the one compiled piece.

``csrc/row_stats.c`` (the CPU row statistics of the fused policy loss, see csrc/README.md) builds
as ``gccpo_kernels._row_stats``. It is optional: where no C compiler is found the install goes on
without it and the torch backend runs its pure-torch passes instead (``python -m gccpo_kernels``
says which). It needs no CUDA and no torch headers.
"""

import sys

from setuptools import Extension, setup

unix = sys.platform != "win32"
setup(
    ext_modules=[
        Extension(
            "gccpo_kernels._row_stats",
            sources=["csrc/row_stats.c"],
            depends=["csrc/row_stats_isa.h"],
            extra_compile_args=["-O3", "-Wno-psabi", "-fopenmp"] if unix else [],
            extra_link_args=["-fopenmp", "-pthread"] if unix else [],
            libraries=["m"] if unix else [],
            optional=True,
        )
    ]
)
