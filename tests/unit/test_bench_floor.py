"""The floor table of benchmarks/bench_floor.py on hand-made per-sequence losses."""

from __future__ import annotations

import math
import sys
from pathlib import Path

from kappatune.bench.fronts import paired_ppl_noise, ppl_noise_floor

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
import bench_floor as bf  # noqa: E402

TOKENS = [1, 2, 4, 8, 16, 32]
BASE = [3.0, 1.0, 7.0, 2.0, 30.0, 5.0]


def test_sizes_are_nested_evenly_spaced_subsets_and_too_large_ones_are_dropped() -> None:
    rows = bf.floor_rows(64, BASE, {"a": BASE}, TOKENS, [3, 10, 2, 3], resamples=50)
    assert [(r.rows, r.tokens) for r in rows] == [(2, 1 + 8), (3, 1 + 4 + 16)]
    assert [r.seq_len for r in rows] == [64, 64]
    assert rows[0].base_ppl == math.exp((3.0 + 2.0) / 9)
    assert rows[1].base_ppl == math.exp((3.0 + 7.0 + 30.0) / 21)


def test_floors_are_the_bench_functions_on_the_subset() -> None:
    tuned = {"x": [4.0, 1.0, 5.0, 3.0, 20.0, 9.0], "y": [3.0, 2.0, 7.0, 1.0, 31.0, 5.0]}
    (row,) = bf.floor_rows(256, BASE, tuned, TOKENS, [3], resamples=200)
    sub = [0, 2, 4]
    b, n = [BASE[i] for i in sub], [TOKENS[i] for i in sub]
    assert row.base_floor == ppl_noise_floor(b, n, 200)
    x, y = ([tuned[k][i] for i in sub] for k in ("x", "y"))
    assert row.paired == (
        ("x", paired_ppl_noise(b, x, n, 200)),
        ("y", paired_ppl_noise(b, y, n, 200)),
    )
    assert row.changes == (
        ("x", math.expm1((29.0 - 40.0) / 21) * 100),
        ("y", math.expm1((41.0 - 40.0) / 21) * 100),
    )
    assert row.paired_median == (row.paired[0][1] + row.paired[1][1]) / 2


def test_a_uniform_per_token_shift_has_no_paired_noise_and_a_flat_base_no_floor() -> None:
    flat = [0.5 * t for t in TOKENS]  # the same loss on every token
    shifted = [b + 0.25 * t for b, t in zip(BASE, TOKENS, strict=True)]
    (row,) = bf.floor_rows(64, flat, {"s": [f + 0.25 * t for f, t in zip(flat, TOKENS, strict=True)]},
                           TOKENS, [6], resamples=100)  # fmt: skip
    assert row.base_floor == 0.0 and row.base_ppl == math.exp(0.5)
    assert row.paired == (("s", 0.0),) and row.changes == (("s", math.expm1(0.25) * 100),)
    (varied,) = bf.floor_rows(64, BASE, {"s": shifted}, TOKENS, [6], resamples=100)
    assert varied.paired == (("s", 0.0),) and varied.base_floor > 10.0


def _row(rows: int, paired: tuple[float, ...]) -> bf.FloorRow:
    named = tuple((f"p{i}", v) for i, v in enumerate(paired))
    return bf.FloorRow(64, rows, rows * 63, 40.0, 5.0, named, named)


def test_smallest_below_takes_the_fewest_rows_whose_median_is_under_the_target() -> None:
    rows = [
        _row(24, (2.0, 4.0)),
        _row(64, (0.5, 1.5)),
        _row(128, (0.25, 1.25)),
        _row(256, (0.25, 0.75)),
    ]
    assert [r.paired_median for r in rows] == [3.0, 1.0, 0.75, 0.5]
    assert bf.smallest_below(rows) == 128
    assert bf.smallest_below(rows, target=0.5) is None
    assert bf.smallest_below(rows, target=0.625) == 256
