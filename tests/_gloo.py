"""Run a function in P CPU processes joined by a gloo process group (spawned from pytest).

``run_gloo(fn, world, *args)`` spawns ``world`` processes; each initialises the default group
(gloo, a free local port), calls ``fn(rank, world, *args)`` and tears the group down. ``fn`` must
be a module-level function (it is pickled by reference). A failure in any rank fails the call
with that rank's traceback; ranks still running after ``timeout`` seconds (e.g. one stuck in a
collective the others never enter) are killed and the call fails, so a deadlock fails a test
instead of hanging it. The children inherit ``TRITON_INTERPRET`` from the environment, so the
Triton backend runs in the interpreter there too.

``CollectiveSizes`` records the size of every ``all_reduce`` / ``all_gather`` a process sends,
to bound a distributed op's traffic in a test.
"""

from __future__ import annotations

import os
import socket
import time
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, fn: Callable[..., Any], args: tuple) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        fn(rank, world, *args)
        # every rank done with its collectives before any tears its connections down: a rank
        # destroying its group while a peer still talks to it was the likely cause of a rare
        # SIGABRT ("terminate called without an active exception") seen under full-suite load,
        # once in ~8 suite runs, never in isolation (so this is a mitigation, not a proven fix)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run_gloo(fn: Callable[..., Any], world: int, *args: Any, timeout: float = 240.0) -> None:
    """Run ``fn(rank, world, *args)`` in ``world`` gloo processes; raises if any rank fails or
    the ranks are still running after ``timeout`` seconds (they are killed)."""
    ctx = mp.spawn(_entry, args=(world, free_port(), fn, args), nprocs=world, join=False)
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=max(0.5, deadline - time.monotonic())):  # raises if a rank failed
        if time.monotonic() >= deadline:
            for proc in ctx.processes:
                if proc.is_alive():
                    proc.kill()
            raise AssertionError(f"{world} gloo ranks still running after {timeout:.0f} s: "
                                 "a rank is stuck in a collective (deadlock)")


class CollectiveSizes:
    """While active, records the number of elements each ``dist.all_reduce`` / ``dist.all_gather``
    of this process sends (the library looks them up on ``torch.distributed`` at call time)."""

    def __init__(self) -> None:
        self.sizes: list[tuple[str, int]] = []

    def __enter__(self) -> "CollectiveSizes":
        self._saved = (dist.all_reduce, dist.all_gather)
        all_reduce, all_gather = self._saved

        def recording_all_reduce(tensor, *a, **k):
            self.sizes.append(("all_reduce", tensor.numel()))
            return all_reduce(tensor, *a, **k)

        def recording_all_gather(parts, tensor, *a, **k):
            self.sizes.append(("all_gather", tensor.numel()))
            return all_gather(parts, tensor, *a, **k)

        dist.all_reduce, dist.all_gather = recording_all_reduce, recording_all_gather
        return self

    def __exit__(self, *exc) -> None:
        dist.all_reduce, dist.all_gather = self._saved

    def check(self, bound: int, what: str) -> None:
        assert self.sizes, f"{what}: no collective was recorded"
        kind, worst = max(self.sizes, key=lambda x: x[1])
        assert worst <= bound, f"{what}: an {kind} of {worst} elements > {bound} (O(N x V)?)"
