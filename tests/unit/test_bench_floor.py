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


def test_spread_order_is_bit_reversed_so_power_of_two_prefixes_are_evenly_spaced() -> None:
    assert bf.spread_order(8) == [0, 4, 2, 6, 1, 5, 3, 7]
    assert bf.spread_order(6) == [0, 4, 2, 1, 5, 3]
    assert bf.spread_order(1) == [0]
    assert bf.spread_order(16)[:4] == [0, 8, 4, 12]


def test_sizes_are_prefixes_of_the_scored_rows_and_too_large_ones_are_dropped() -> None:
    rows = bf.floor_rows(64, BASE, {"a": BASE}, TOKENS, [3, 10, 2, 3], resamples=50)
    assert [(r.rows, r.tokens) for r in rows] == [(2, 1 + 2), (3, 1 + 2 + 4)]
    assert [r.seq_len for r in rows] == [64, 64]
    assert rows[0].base_ppl == math.exp((3.0 + 1.0) / 3)
    assert rows[1].base_ppl == math.exp((3.0 + 1.0 + 7.0) / 7)
    assert rows[1].changes == (("a", 0.0),) and rows[1].paired == (("a", 0.0),)


def test_floors_are_the_bench_functions_on_the_prefix() -> None:
    tuned = {"x": [4.0, 1.0, 5.0, 3.0, 20.0, 9.0], "y": [3.0, 2.0, 7.0, 1.0, 31.0, 5.0]}
    (row,) = bf.floor_rows(256, BASE, tuned, TOKENS, [4], resamples=200)
    b, n = BASE[:4], TOKENS[:4]
    assert row.base_floor == ppl_noise_floor(b, n, 200)
    x, y = tuned["x"][:4], tuned["y"][:4]
    assert row.paired == (
        ("x", paired_ppl_noise(b, x, n, 200)),
        ("y", paired_ppl_noise(b, y, n, 200)),
    )
    assert row.changes == (
        ("x", math.expm1((13.0 - 13.0) / 15) * 100),
        ("y", math.expm1((13.0 - 13.0) / 15) * 100),
    )
    (six,) = bf.floor_rows(256, BASE, tuned, TOKENS, [6], resamples=200)
    assert six.changes == (
        ("x", math.expm1((42.0 - 48.0) / 63) * 100),
        ("y", math.expm1((49.0 - 48.0) / 63) * 100),
    )
    assert six.paired_median == (six.paired[0][1] + six.paired[1][1]) / 2


def test_a_uniform_per_token_shift_has_no_paired_noise_and_a_flat_base_no_floor() -> None:
    flat = [0.5 * t for t in TOKENS]  # the same loss on every token
    up = [f + 0.25 * t for f, t in zip(flat, TOKENS, strict=True)]
    (row,) = bf.floor_rows(64, flat, {"s": up}, TOKENS, [6], resamples=100)
    assert row.base_floor == 0.0 and row.base_ppl == math.exp(0.5)
    assert row.paired == (("s", 0.0),) and row.changes == (("s", math.expm1(0.25) * 100),)
    shifted = [b + 0.25 * t for b, t in zip(BASE, TOKENS, strict=True)]
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


def test_rows_for_extrapolates_as_one_over_sqrt_rows_rounding_up() -> None:
    assert bf.rows_for(2.0, 24) == 96
    assert bf.rows_for(1.5, 64) == 144
    assert bf.rows_for(0.5, 64) == 16
    assert bf.rows_for(1.25, 100) == 157


def test_parse_stages_keeps_the_order() -> None:
    assert bf.parse_stages("64:24,256:8,64:64") == [(64, 24), (256, 8), (64, 64)]


def test_score_stages_scores_each_stage_s_new_rows_with_both_models_in_order() -> None:
    from kappatune.bench.evaluate import EvalSequence, control_eval
    from tests.unit._tiny_models import tiny_llama

    base, tuned = tiny_llama(seed=0), tiny_llama(seed=1)
    draw = [EvalSequence(tuple(range(2 + i, 10 + i))) for i in range(4)]
    seen: list[tuple[int, list[tuple[int, int]]]] = []
    scored, skipped = bf.score_stages(
        base, tuned, {8: draw}, [(8, 2), (8, 3), (8, 9)], 0, {8: 2}, math.inf,
        lambda sc, sk: seen.append((len(sc[8].base), sk)),
    )  # fmt: skip
    assert skipped == []
    assert seen == [(2, [(8, 3), (8, 9)]), (3, [(8, 9)]), (4, [])]
    for model, got in ((base, scored[8].base), (tuned, scored[8].tuned)):
        want = [control_eval(model, part, pad_id=0, batch_size=2).nll_sums
                for part in (draw[:2], draw[2:3], draw[3:])]  # fmt: skip
        assert got == [x for w in want for x in w]
    assert scored[8].tokens == [7, 7, 7, 7]
    late, missed = bf.score_stages(base, tuned, {8: draw}, [(8, 2)], 0, {8: 2}, 0.0)
    assert missed == [(8, 2)] and late[8].base == [] and late[8].seconds == 0.0
