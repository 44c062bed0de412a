"""Triton kernels only: one module per kernel family, plus _utils.py.

Importing anything here imports triton; the public API imports these modules only when the triton
backend is picked. Each module that defines kernels exposes ``compile_cases()``, the kernels at
every configuration the dispatcher can pick, for the ahead-of-time sm_90 / sm_80 compile check
(tests/kernels/test_compile.py); host-only modules (``linear_logprobs``, ``loss_epilogue``) launch
the shared epilogues of ``logit_epilogues``.
"""
