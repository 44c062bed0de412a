"""Run a function in P CPU processes joined by a gloo process group (spawned from pytest).

``run_gloo(fn, world, *args)`` spawns ``world`` processes; each initialises the default group
(gloo, a free local port), calls ``fn(rank, world, *args)`` and tears the group down. ``fn`` must
be a module-level function (it is pickled by reference). A failure in any rank fails the call
with that rank's traceback. The children inherit ``TRITON_INTERPRET`` from the environment, so
the Triton backend runs in the interpreter there too.
"""

from __future__ import annotations

import os
import socket
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
    finally:
        dist.destroy_process_group()


def run_gloo(fn: Callable[..., Any], world: int, *args: Any) -> None:
    """Run ``fn(rank, world, *args)`` in ``world`` gloo processes; raises if any rank fails."""
    mp.spawn(_entry, args=(world, free_port(), fn, args), nprocs=world, join=True)
