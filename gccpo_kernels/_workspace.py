"""Bounded workspaces: how many rows of a [rows, V] tile fit the budget.

SPEC §0 allows a logits-sized tile whose size does not grow with N. The budget is
``GCCPO_WORKSPACE_MB`` (MiB) when set, else 1 GiB on CUDA and 32 MiB on the CPU. Tiles are
[rows, columns] with rows first (see tile_shape): the backward pays one read-modify-write of dW
(8VD bytes) per row chunk, so wide row chunks matter more than wide vocabulary chunks. The budget
is an upper bound: on the CPU the primitive's tiles stay at 512 x 512 (``recompute_tile``), where
its GEMMs run nearly as fast (~5 % slower in the benchmark) and BLAS's packing buffers stay
small; the ops that need whole-vocabulary rows (the in-forward loss gradient, divergence, group
statistics) use the budget.
"""

from __future__ import annotations

import os

import torch

ENV_VAR = "GCCPO_WORKSPACE_MB"
# CUDA: large enough that the chunk GEMMs have >= 1024 rows at V = 152k with a bf16 head (issue
# 18: below that, the float32 d-weight read-modify-write of each chunk makes the d-weight GEMM
# memory-bound); the CPU: cache-friendly tiles, the speed the CPU benchmarks measure
DEFAULT_BYTES = {"cuda": 1024 << 20, "cpu": 32 << 20}


def workspace_bytes(device: torch.device) -> int:
    """The workspace budget in bytes for ``device``."""
    env = os.environ.get(ENV_VAR)
    if env:
        try:
            mb = float(env)
        except ValueError as exc:
            raise ValueError(f"${ENV_VAR} must be a number of MiB, got {env!r}") from exc
        if mb <= 0:
            raise ValueError(f"${ENV_VAR} must be > 0, got {env!r}")
        return int(mb * (1 << 20))
    return DEFAULT_BYTES.get(device.type, DEFAULT_BYTES["cuda"])


def rows_per_chunk(vocab: int, bytes_per_row_elem: int, device: torch.device, *,
                   multiple: int = 1, budget: int | None = None) -> int:
    """Rows of a [rows, vocab] workspace that fit the budget; at least ``multiple``, a multiple of it.

    ``bytes_per_row_elem`` counts every [rows, vocab]-shaped buffer alive at once (e.g. two float32
    buffers -> 8).
    """
    budget = workspace_bytes(device) if budget is None else budget
    rows = budget // max(1, vocab * bytes_per_row_elem)
    rows = (rows // multiple) * multiple
    return max(multiple, rows)


ROW_CHUNK = 8192  # rows per tile: the backward reads and writes each dW slice once per row chunk
MIN_VOCAB_CHUNK = 256


def tile_shape(n: int, vocab: int, elem: int, device: torch.device, buffers: int, *,
               multiple: int = 1, budget: int | None = None,
               max_rows: int = ROW_CHUNK) -> tuple[int, int]:
    """(rows, columns) of a [rows, columns] tile such that ``buffers`` of them fit the budget.

    Rows come first, up to ``max_rows`` (ROW_CHUNK) (the backward pays one read-modify-write of dW
    per row chunk, 8VD bytes in float32, so wide row chunks are what make it cheap), then as many
    vocabulary columns as fit, rounded to ``multiple``; under a tiny budget the rows shrink instead.
    """
    budget = workspace_bytes(device) if budget is None else budget
    rows = max(1, min(n, max_rows))
    cols = budget // (rows * elem * buffers)
    floor = min(vocab, max(MIN_VOCAB_CHUNK, multiple))
    if cols < floor:
        cols = floor
        rows = max(1, min(rows, budget // (cols * elem * buffers)))
    cols = min(vocab, cols)
    if cols < vocab and multiple > 1:
        cols = max(multiple, cols // multiple * multiple)
    return rows, cols


# The CPU tile of the primitive's forward and recompute backward (issue 18), within the budget:
# at most 512 rows and 1 MiB per buffer (512 x 512 in float32, 512 x 256 in float64). Each tile
# runs three GEMMs (the logits and the two gradient products); at 2048 x 512 x 32000 they cost
# ~5 % more than with 16 MiB tiles, and the per-token NLL's forward + backward then grows RSS by
# 68.1-68.3 MiB against PyTorch's linear_cross_entropy's 71.5-71.6 (its 32-row chunks; BLAS keeps
# packing buffers that grow with the GEMMs' rows, ~3 MiB at 512 rows against ~8 at 2048).
CPU_TILE_ROWS = 512
CPU_TILE_BYTES = 1 << 20


def recompute_tile(n: int, vocab: int, elem: int, device: torch.device,
                   buffers: int) -> tuple[int, int]:
    """(rows, columns) of the primitive's tiles, ``buffers`` of them alive at once: the workspace
    budget on a GPU (wide tiles, few launches); on the CPU at most CPU_TILE_ROWS rows and
    CPU_TILE_BYTES per buffer (cache-sized tiles: ~5 % slower there than 16 MiB ones, a third
    less memory for logp + entropy forward + backward)."""
    if device.type != "cpu":
        return tile_shape(n, vocab, elem, device, buffers)
    budget = min(workspace_bytes(device), CPU_TILE_BYTES * buffers)
    return tile_shape(n, vocab, elem, device, buffers, budget=budget, max_rows=CPU_TILE_ROWS)
