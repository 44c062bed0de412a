"""setup shim: the metadata lives in pyproject.toml; this adds the one compiled piece.

``csrc/row_stats.c`` (the CPU row statistics of the fused policy loss, see csrc/README.md) builds
as ``gccpo_kernels._row_stats``. It is optional: where no C compiler is found the install goes on
without it and the torch backend runs its pure-torch passes instead (``python -m gccpo_kernels``
says which). It needs no CUDA and no torch headers. It is built with OpenMP (so that its threads
are torch's own workers); a compiler without OpenMP builds it with POSIX threads instead.
"""

import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

OPENMP = "-fopenmp"


class BuildExt(build_ext):
    """build_ext that retries an extension without OpenMP when the OpenMP build fails."""

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except Exception as exc:  # CompileError / LinkError, as setuptools raises them
            if OPENMP not in ext.extra_compile_args:
                raise
            print(f"gccpo: building {ext.name} without OpenMP ({exc}); its threads are its own",
                  file=sys.stderr)
            ext.extra_compile_args = [a for a in ext.extra_compile_args if a != OPENMP]
            ext.extra_link_args = [a for a in ext.extra_link_args if a != OPENMP]
            super().build_extension(ext)


unix = sys.platform != "win32"
setup(
    cmdclass={"build_ext": BuildExt},
    ext_modules=[
        Extension(
            "gccpo_kernels._row_stats",
            sources=["csrc/row_stats.c"],
            depends=["csrc/row_stats_isa.h"],
            extra_compile_args=["-O3", "-Wno-psabi", OPENMP] if unix else [],
            extra_link_args=[OPENMP, "-pthread"] if unix else [],
            libraries=["m"] if unix else [],
            optional=True,
        )
    ],
)
