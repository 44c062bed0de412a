"""gccpo: the thin trainer layer of GC2PO on top of :mod:`gccpo_kernels`.

Data flows one way: tasks -> rollout -> episodes (:mod:`gccpo.episodes`) -> rewards (kernels of
SPEC §3-§4) -> advantages (SPEC §6) -> loss (SPEC §2 on §1) -> optimizer. Modules here use only
the public API of ``gccpo_kernels``; they never re-implement a kernel.
"""
