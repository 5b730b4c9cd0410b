"""The analysis memory model (kappatune.analysis.memory): how many matrices run at once."""

from __future__ import annotations

from kappatune.analysis import memory
from kappatune.analysis.options import DEFAULT_BLOCK_ROWS, AnalyzeOptions

BUDGET = AnalyzeOptions().memory_budget_mb * 1024 * 1024  # 768 MiB


def test_sizes() -> None:
    assert memory.gram_bytes(3584) == 2 * 3584 * 3584 * 8
    assert [memory.itemsize(d) for d in ("bfloat16", "float16", "float32", "float64")] == [
        2,
        2,
        4,
        8,
    ]
    assert memory.itemsize("Q4_K") == 4  # decoded to float32


def test_block_rows_shrink_only_for_wide_matrices() -> None:
    assert memory.block_rows(640, BUDGET, DEFAULT_BLOCK_ROWS, read=2) == DEFAULT_BLOCK_ROWS
    # Qwen2.5-7B's MLP side: (384 MiB - Gram 196 MiB) // (3584 * 10 bytes)
    assert memory.block_rows(3584, BUDGET, DEFAULT_BLOCK_ROWS, read=2) == 5500
    assert memory.block_rows(3584, BUDGET, 4, read=2) == 4  # a configured count below is kept
    assert memory.block_rows(8192, BUDGET, DEFAULT_BLOCK_ROWS, read=2) == memory.MIN_BLOCK_ROWS


def test_two_7b_mlp_matrices_fit_the_default_budget_together() -> None:
    """gate/up (18944 x 3584, streamed) and down (3584 x 18944, read whole), bf16: with
    8192-row blocks two streamed ones held 940 MiB of the 768 and ran one at a time."""
    n, tall = 3584, 18944
    rows = memory.block_rows(n, BUDGET, DEFAULT_BLOCK_ROWS, read=2)
    streamed = memory.streamed_hold(n, rows, "bfloat16")
    held = memory.tensor_bytes((n, tall), "bfloat16")
    assert held == tall * n * 2
    down_rows = memory.block_rows(n, BUDGET, DEFAULT_BLOCK_ROWS, held=held)
    assert down_rows == 2139
    whole = memory.in_memory_hold(held, (n, tall), down_rows)
    assert whole == held + 2139 * n * 8 + memory.gram_bytes(n)
    assert 2 * streamed <= BUDGET and streamed + whole <= BUDGET and 2 * whole <= BUDGET
    assert DEFAULT_BLOCK_ROWS * n * 16 * 2 > BUDGET  # the old hold: two did not fit
