"""Data parallelism for the trainer: one process per device, launched by ``accelerate launch``.

Each process samples its own questions (a disjoint slice of the shared problem stream), scores
them, builds its own advantages (groups never straddle processes, so SPEC §4-§6 need no
communication, except that the effectiveness mixture of SPEC §5 is over the process's own batch),
and back-propagates its own loss. Then the gradients are averaged over the processes with one
all-reduce of a flat buffer, before clipping, so every process applies the same AdamW update to
the same weights. Evaluation is split over the processes and its counts summed. With
``model.sharding`` = ``fsdp`` / ``zero3`` (:mod:`gccpo.sharding`) the parameters are sharded over
the same processes instead, and FSDP / DeepSpeed reduce the gradients (same loss scale).

    accelerate launch --multi_gpu --num_processes 2 -m gccpo.train [options]

``--multi_gpu`` is accelerate's name for its torch-elastic launcher, which also runs CPU-only
processes (gloo; what the test does). ``accelerate launch --cpu --num_processes N`` does not: on one
machine it starts a single process unless MPI is set up.

:meth:`DataParallel.from_env` joins the process group the launcher describes (gloo on the CPU,
NCCL on CUDA); without a launcher it gives the single-process no-op.

Loss scale: each process normalizes its loss over its own tokens (``loss_agg``), and the
gradients are averaged, i.e. the mean over processes of the per-process token means (TRL's
``bnpo`` with several processes does the same); with equal per-process token counts this is the
global token mean.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import torch


@dataclass(frozen=True)
class DataParallel:
    """This process's place in the data-parallel world (``world_size == 1``: no communication)."""

    rank: int = 0
    world_size: int = 1
    device: torch.device | None = None
    owns_group: bool = False  # from_env joined the process group (and close() leaves it)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @classmethod
    def from_env(cls, *, cpu: bool = False) -> "DataParallel":
        """The world a launcher set up (``accelerate launch`` and ``torchrun`` both export ``RANK``,
        ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``), else a single process.
        Joins the process group (NCCL with one GPU per process when CUDA is there and ``cpu`` is
        False, else gloo) unless the caller already did."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        import torch.distributed as dist

        local = int(os.environ.get("LOCAL_RANK", "0"))
        cuda = torch.cuda.is_available() and not cpu
        device = torch.device("cuda", local) if cuda else torch.device("cpu")
        owns = not dist.is_initialized()
        if owns:
            if cuda:
                torch.cuda.set_device(device)
            dist.init_process_group(backend="nccl" if cuda else "gloo")
        return cls(rank=dist.get_rank(), world_size=dist.get_world_size(), device=device, owns_group=owns)

    def shard(self, items: Sequence[Any]) -> list[Any]:
        """This process's contiguous slice of ``items`` (``len(items)`` a multiple of the world size
        gives equal slices)."""
        n = len(items)
        lo, hi = n * self.rank // self.world_size, n * (self.rank + 1) // self.world_size
        return list(items[lo:hi])

    def average_gradients(self, params: Iterable[torch.nn.Parameter]) -> None:
        """Replace every ``p.grad`` by its mean over the processes: one all-reduce of a flat float32
        buffer (parameters without a gradient here count as zeros, so every process reduces the
        same layout). No-op for a single process. Sharded parameters (``model.sharding``: FSDP's
        DTensors, ZeRO-3's partitioned ones) are skipped: their sharding already reduced them."""
        if not self.enabled:
            return
        import torch.distributed as dist

        from .sharding import is_sharded_param

        params = [p for p in params if p.requires_grad and not is_sharded_param(p)]
        if not params:
            return
        device = params[0].device
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).float()
                          for p in params]).to(device)
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat /= self.world_size
        offset = 0
        for p in params:
            n = p.numel()
            p.grad = flat[offset:offset + n].view_as(p).to(p.dtype)
            offset += n

    def sum(self, values: Sequence[float]) -> list[float]:
        """Element-wise sum of ``values`` over the processes (float64)."""
        if not self.enabled:
            return [float(v) for v in values]
        import torch.distributed as dist

        t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=self._comm_device())
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t.tolist()

    def mean_metrics(self, metrics: dict[str, Any]) -> dict[str, Any]:
        """Numeric metrics averaged over the processes (``step`` and non-numbers kept); maxima
        (keys ending in ``max``) take the maximum. Every process must pass the same keys."""
        if not self.enabled:
            return metrics
        import torch.distributed as dist

        keys = sorted(k for k, v in metrics.items() if k != "step" and isinstance(v, (int, float)))
        means = [k for k in keys if not k.endswith("max")]
        maxima = [k for k in keys if k.endswith("max")]
        out = dict(metrics)
        if means:
            out.update(zip(means, [v / self.world_size for v in self.sum([metrics[k] for k in means])]))
        if maxima:
            t = torch.tensor([float(metrics[k]) for k in maxima], dtype=torch.float64,
                             device=self._comm_device())
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            out.update(zip(maxima, t.tolist()))
        return out

    def barrier(self) -> None:
        if self.enabled:
            import torch.distributed as dist

            dist.barrier()

    def close(self) -> None:
        """Wait for every process, then leave the process group if :meth:`from_env` joined it (a
        process exiting with a live gloo group can abort in its teardown)."""
        if self.enabled:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.barrier()
                if self.owns_group:
                    dist.destroy_process_group()

    def _comm_device(self) -> torch.device:
        import torch.distributed as dist

        return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" \
            else torch.device("cpu")
