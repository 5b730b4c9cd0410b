"""Rank correlations on constructed cases with known answers, and the bootstrap's behaviour."""

from __future__ import annotations

import math

import numpy as np
import pytest

from kappatune.errors import KappaTuneError
from kappatune.probe.correlation import (
    ALL,
    GroupCorrelation,
    RankCorrelation,
    grouped_correlations,
    rank_correlation,
)


@pytest.mark.parametrize("method", ["spearman", "kendall"])
def test_identical_ranking_is_one_and_reversed_is_minus_one(method: str) -> None:
    x = [3.3, 10.0, 143.0, 37.0, 5.5, 80.0]
    y_same = [math.log(v) * 2 + 1 for v in x]  # monotone transform: same ranking
    y_rev = [-v for v in x]
    same = rank_correlation(x, y_same, method, bootstrap=200, seed=1)
    rev = rank_correlation(x, y_rev, method, bootstrap=200, seed=1)
    assert same.estimate == pytest.approx(1.0, abs=1e-12)
    assert rev.estimate == pytest.approx(-1.0, abs=1e-12)
    # every resample of a perfect ranking is perfect (or constant and dropped)
    assert (same.ci_low, same.ci_high) == pytest.approx((1.0, 1.0), abs=1e-12)
    assert (rev.ci_low, rev.ci_high) == pytest.approx((-1.0, -1.0), abs=1e-12)
    assert 0 < same.bootstrap_used <= 200


def test_hand_computed_tau_and_rho() -> None:
    # pairs (1,2),(1,3),(1,4),(2,4),(3,4) concordant, (2,3) discordant: tau = (5 - 1) / 6
    x, y = [1, 2, 3, 4], [1, 3, 2, 4]
    assert rank_correlation(x, y, "kendall", bootstrap=0).estimate == pytest.approx(
        2 / 3, abs=1e-12
    )
    # d = (0, 1, -1, 0): rho = 1 - 6 * 2 / (4 * 15) = 0.8
    assert rank_correlation(x, y, "spearman", bootstrap=0).estimate == pytest.approx(0.8, abs=1e-12)


def test_tau_b_with_ties() -> None:
    # 4 concordant, 0 discordant, one tie in x and one in y among 6 pairs: 4 / sqrt(5 * 5)
    r = rank_correlation([1, 1, 2, 3], [1, 2, 3, 3], "kendall", bootstrap=0)
    assert r.estimate == pytest.approx(0.8, abs=1e-12)


def test_infinite_values_keep_their_rank_and_nan_pairs_are_dropped() -> None:
    r = rank_correlation(
        [1.0, 2.0, math.inf, math.nan, 3.0], [1.0, 2.0, 9.0, 0.0, 3.0], "spearman", bootstrap=0
    )
    assert r.n == 4
    assert r.estimate == pytest.approx(1.0)


def test_undefined_cases_are_nan_not_zero() -> None:
    few = rank_correlation([1.0, 2.0], [2.0, 1.0], "kendall")
    const = rank_correlation([1.0, 1.0, 1.0, 1.0], [1.0, 2.0, 3.0, 4.0], "spearman")
    for r in (few, const):
        assert math.isnan(r.estimate) and math.isnan(r.ci_low) and math.isnan(r.ci_high)
    assert few.n == 2 and const.n == 4


def test_bootstrap_is_seeded_and_brackets_the_estimate() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=60)
    y = x + rng.normal(scale=1.0, size=60)
    a = rank_correlation(x, y, "kendall", bootstrap=300, seed=7)
    b = rank_correlation(x, y, "kendall", bootstrap=300, seed=7)
    c = rank_correlation(x, y, "kendall", bootstrap=300, seed=8)
    assert a == b
    assert (a.ci_low, a.ci_high) != (c.ci_low, c.ci_high)
    assert a.ci_low < a.estimate < a.ci_high
    assert a.ci_low > 0.0 and a.ci_high < 1.0
    assert a.bootstrap_used == 300


def test_vectorised_spearman_bootstrap_matches_scipy_per_resample() -> None:
    from scipy import stats

    from kappatune.probe.correlation import _spearman_many

    rng = np.random.default_rng(3)
    x = rng.integers(0, 5, size=(20, 12)).astype(float)  # many ties
    y = rng.normal(size=(20, 12))
    got = _spearman_many(x, y)
    want = [
        stats.spearmanr(a, b).statistic if len(set(a)) > 1 else math.nan
        for a, b in zip(x, y, strict=True)
    ]
    np.testing.assert_allclose(got, want, atol=1e-12)


def test_grouped_correlations_all_then_sorted_groups() -> None:
    groups = ["v_proj", "q_proj", "v_proj", "q_proj", "v_proj", "q_proj", "o_proj"]
    x = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]
    y = [1.0, 6.0, 2.0, 5.0, 3.0, 4.0, 0.0]  # v_proj increasing, q_proj decreasing
    out = grouped_correlations(groups, x, y, bootstrap=50, seed=0)
    assert [(g.group, g.correlation.method) for g in out] == [
        (ALL, "spearman"),
        (ALL, "kendall"),
        ("o_proj", "spearman"),
        ("o_proj", "kendall"),
        ("q_proj", "spearman"),
        ("q_proj", "kendall"),
        ("v_proj", "spearman"),
        ("v_proj", "kendall"),
    ]
    by = {(g.group, g.correlation.method): g.correlation for g in out}
    assert by[("v_proj", "kendall")].estimate == pytest.approx(1.0)
    assert by[("q_proj", "spearman")].estimate == pytest.approx(-1.0)
    assert by[("o_proj", "spearman")].n == 1 and math.isnan(by[("o_proj", "spearman")].estimate)
    # a group's interval does not depend on which other groups are present
    alone = grouped_correlations(groups[:6], x[:6], y[:6], bootstrap=50, seed=0)
    alone_by = {(g.group, g.correlation.method): g.correlation for g in alone}
    assert alone_by[("q_proj", "kendall")] == by[("q_proj", "kendall")]


def test_json_round_trip_with_nan() -> None:
    rc = rank_correlation([1.0, 2.0], [1.0, 2.0], "spearman")
    g = GroupCorrelation("all", rc)
    back = GroupCorrelation.from_json(g.to_json())
    assert back.group == "all" and back.correlation.n == 2 and math.isnan(back.correlation.estimate)
    full = rank_correlation([1.0, 2.0, 4.0, 3.0], [1.0, 2.0, 3.0, 4.0], "kendall", bootstrap=20)
    assert RankCorrelation.from_json(full.to_json()) == full


def test_bad_arguments_raise() -> None:
    with pytest.raises(KappaTuneError, match="unknown rank correlation 'pearson'"):
        rank_correlation([1, 2, 3], [1, 2, 3], "pearson")
    with pytest.raises(KappaTuneError, match="equal-length"):
        rank_correlation([1, 2, 3], [1, 2], "kendall")
    with pytest.raises(KappaTuneError, match="differ in length: 2, 3, 3"):
        grouped_correlations(["a", "b"], [1, 2, 3], [1, 2, 3])
