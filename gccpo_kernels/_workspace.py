"""Bounded workspaces: how many rows of a [rows, V] tile fit the budget.

SPEC §0 allows a logits-sized tile whose size does not grow with N. The budget is
``GCCPO_WORKSPACE_MB`` (MiB) when set, else 1 GiB on CUDA and 32 MiB on the CPU. Tiles are
[rows, columns] with rows first (see tile_shape): the backward pays one read-modify-write of dW
(8VD bytes) per row chunk, so wide row chunks matter more than wide vocabulary chunks.
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
               multiple: int = 1, budget: int | None = None) -> tuple[int, int]:
    """(rows, columns) of a [rows, columns] tile such that ``buffers`` of them fit the budget.

    Rows come first, up to ROW_CHUNK (the backward pays one read-modify-write of dW per row chunk,
    8VD bytes in float32, so wide row chunks are what make it cheap), then as many vocabulary
    columns as fit, rounded to ``multiple``; under a tiny budget the rows shrink instead.
    """
    budget = workspace_bytes(device) if budget is None else budget
    rows = max(1, min(n, ROW_CHUNK))
    cols = budget // (rows * elem * buffers)
    floor = min(vocab, max(MIN_VOCAB_CHUNK, multiple))
    if cols < floor:
        cols = floor
        rows = max(1, min(rows, budget // (cols * elem * buffers)))
    cols = min(vocab, cols)
    if cols < vocab and multiple > 1:
        cols = max(multiple, cols // multiple * multiple)
    return rows, cols
