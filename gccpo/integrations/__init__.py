"""Glue for other RL trainers, each a few dozen lines on the public API of :mod:`gccpo_kernels`.

- :mod:`gccpo.integrations.trl`: ``GCCPOGRPOTrainer`` (TRL's GRPOTrainer with the fused loss and
  the optional causal reward) and ``add_gccpo_fused_lm_head`` (a drop-in for TRL's fused head).
- :mod:`gccpo.integrations.verl`: the ``"gccpo"`` policy loss in verl's registry and a
  ``FusedLinearForPPO``-compatible backend.

Nothing is imported here: each submodule imports its trainer package (trl, or verl and ray).
"""
