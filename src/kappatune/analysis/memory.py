"""How much memory analysing one tensor holds, and the row blocks that keep two side by side.

A worker holds the tensor as read (its own dtype; only streamed tall matrices are read in row
blocks instead), one float64 row block of the tall matrix, and the float64 Gram of the smaller
side with syrk's product of the block (``2 n^2`` doubles). The analysis admits workers while
their holds fit in ``memory_budget_mb``; rows per block are chosen so that a hold is at most
half of it, so two workers still run together on the wide matrices of 7B-class models (side
3584: 8192-row blocks would have run them one at a time).
"""

from __future__ import annotations

import math

import torch

MIN_BLOCK_ROWS = 256  # below this, syrk's rate drops; a wider matrix runs alone instead
_DECODED_ITEMSIZE = 4  # sources that decode (GGUF quants) yield float32


def gram_bytes(n: int) -> int:
    """The float64 Gram of side ``n`` and syrk's product of one block."""
    return 2 * n * n * 8


def itemsize(dtype: str) -> int:
    """Bytes per element of a tensor as a source returns it."""
    t = getattr(torch, dtype, None)
    return t.itemsize if isinstance(t, torch.dtype) else _DECODED_ITEMSIZE


def block_rows(n: int, budget_bytes: int, configured: int, *, held: int = 0, read: int = 0) -> int:
    """Rows per float64 block of a tall matrix with ``n`` columns: the configured count, or
    fewer so that what the worker already ``held``, a block (``read`` bytes per element as
    read, 8 as float64) and the Gram take at most half the budget; never under
    ``MIN_BLOCK_ROWS`` unless so configured."""
    fit = (budget_bytes // 2 - held - gram_bytes(n)) // (n * (read + 8))
    return min(configured, max(MIN_BLOCK_ROWS, fit))


def streamed_hold(n: int, rows: int, dtype: str) -> int:
    """Bytes a worker holds while it streams a tall matrix with ``n`` columns."""
    return rows * n * (itemsize(dtype) + 8) + gram_bytes(n)


def tensor_bytes(shape: tuple[int, ...], dtype: str) -> int:
    """Bytes of a tensor as a source returns it."""
    return math.prod(shape) * itemsize(dtype)


def in_memory_hold(held: int, matrix: tuple[int, int], rows: int) -> int:
    """Bytes a worker holds for a tensor read whole (``held`` bytes, see :func:`tensor_bytes`)
    whose matrices are ``matrix`` (rows x cols, any orientation)."""
    n = min(matrix)
    return held + min(rows, max(matrix)) * n * 8 + gram_bytes(n)
