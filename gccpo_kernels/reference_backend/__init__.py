"""The reference backend: :mod:`gccpo_kernels.reference` behind the interface of ``chunked/`` and
``triton/``.

Each module here mirrors one op and has the same functions and signatures as the torch and triton
backends' module of that op, so an op calls all three the same way through its
:class:`gccpo_kernels._backend.OpBackends` table. The modules only adapt arguments and dtypes: the
math is the materializing float64-capable spec in ``reference.py``, which builds full N x V tensors.
"""
