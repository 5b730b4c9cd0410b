import math

import pytest

from kappatune.bench.fronts import (
    FrontPoint,
    accuracy_noise_floor,
    difference_at_gain_interval,
    forgetting_at_gain,
    gain_within_budget,
    joint_front,
    matched_gain,
    mean_points,
    paired_ppl_noise,
    pareto_front,
    percentile,
    ppl_noise_floor,
)

P = FrontPoint


def test_front_drops_dominated_points_and_sorts_by_gain() -> None:
    pts = [
        P(1.0, 1.0, "a"),
        P(2.0, 3.0, "b"),
        P(1.5, 2.0, "c"),  # on the front
        P(1.5, 2.5, "d"),  # same gain as c, more forgetting: dominated
        P(0.5, 1.5, "e"),  # less gain, more forgetting than a: dominated
        P(3.0, 3.0, "f"),  # dominates b
        P(math.nan, 0.0, "g"),  # dropped
    ]
    assert [p.label for p in pareto_front(pts)] == ["a", "c", "f"]
    assert pareto_front([]) == ()


def test_forgetting_interpolates_along_the_front_and_never_extrapolates() -> None:
    front = pareto_front([P(1.0, 1.0), P(3.0, 5.0)])
    assert forgetting_at_gain(front, 2.0) == 3.0
    assert forgetting_at_gain(front, 2.5) == 4.0
    assert forgetting_at_gain(front, 3.0) == 5.0
    assert forgetting_at_gain(front, 0.5) == 1.0  # below the front: its first point (upper bound)
    assert forgetting_at_gain(front, 3.01) is None  # not reached
    assert forgetting_at_gain((), 1.0) is None


def test_gain_within_budget() -> None:
    front = pareto_front([P(1.0, 0.5), P(3.0, 2.5), P(4.0, 4.5)])
    assert gain_within_budget(front, 1.5) == 2.0  # halfway between the first two points
    assert gain_within_budget(front, 0.5) == 1.0
    assert gain_within_budget(front, 10.0) == 4.0  # the best point is inside the budget
    assert gain_within_budget(front, 0.4) is None  # every point forgets more: not reached


def test_matched_gain_is_the_weakest_arms_best_gain() -> None:
    fronts = {
        "kappa": pareto_front([P(1.0, 1.0), P(2.0, 2.0)]),
        "full": pareto_front([P(1.0, 0.5), P(4.0, 3.0)]),
    }
    assert matched_gain(fronts) == 2.0
    assert matched_gain({**fronts, "none": ()}) is None
    assert matched_gain({"x": pareto_front([P(-1.0, 0.0)])}) is None  # never learned
    assert joint_front(fronts) == ("kappa", "full")  # no full point beats (2, 2) on both
    fronts["full"] = pareto_front([P(1.0, 0.5), P(2.5, 1.5)])
    assert joint_front(fronts) == ("full",)


def test_mean_points_and_paired_bootstrap() -> None:
    by_seed = {
        ("a", 0): [P(1.0, 1.0, "s1"), P(2.0, 2.0, "s2")],
        ("a", 1): [P(1.0, 3.0, "s1"), P(2.0, 4.0, "s2")],
        ("b", 0): [P(1.0, 0.0, "s1"), P(2.0, 1.0, "s2")],
        ("b", 1): [P(1.0, 2.0, "s1"), P(2.0, 3.0, "s2")],
    }
    assert mean_points(by_seed, "a", [0, 1]) == [P(1.0, 2.0, "s1"), P(2.0, 3.0, "s2")]
    diff = difference_at_gain_interval(by_seed, "a", "b", [0, 1], 1.5, resamples=200)
    # a - b is exactly 1.0 for every seed, so every resample gives 1.0
    assert (diff.estimate, diff.low, diff.high, diff.reached) == (1.0, 1.0, 1.0, 1.0)
    assert diff.excludes_zero
    missing = difference_at_gain_interval(by_seed, "a", "b", [0, 1], 9.0, resamples=20)
    assert missing.estimate is None and missing.reached == 0.0
    one = difference_at_gain_interval(by_seed, "a", "b", [0], 1.5, resamples=20)
    assert (one.estimate, one.low, one.high) == (1.0, None, None)  # one seed: no interval


def test_noise_floors() -> None:
    assert percentile([1.0, 2.0, 3.0], 0.5) == 2.0
    assert percentile([0.0, 10.0], 0.95) == pytest.approx(9.5)
    # identical sequences: every resample has the same perplexity
    assert ppl_noise_floor([2.0] * 20, [10] * 20, resamples=50) == 0.0
    assert ppl_noise_floor([1.0, 3.0] * 10, [10] * 20, resamples=200) > 1.0
    assert accuracy_noise_floor([True] * 30, resamples=50) == 0.0


def test_paired_noise_of_a_change() -> None:
    base = [1.0, 3.0] * 10
    tokens = [10] * 20
    # a model that shifts every sequence's NLL by the same amount: every resample agrees
    assert paired_ppl_noise(base, [x + 0.5 for x in base], tokens, 200) == pytest.approx(
        0, abs=1e-9
    )
    # the base model's own floor on the same texts is wide; a shift that varies is noisy
    assert ppl_noise_floor(base, tokens, 200) > 4.0
    assert paired_ppl_noise(base, [x + (i % 3) for i, x in enumerate(base)], tokens, 200) > 0.5


def test_paired_tests_over_few_seeds() -> None:
    from kappatune.bench.fronts import paired_test, sign_flip_p, t_interval

    # mean 2, sd 1, n 3: 2 -/+ t(0.975, 2) / sqrt(3), t = 4.302653
    low, high = t_interval([1.0, 2.0, 3.0])  # type: ignore[misc]
    assert (low, high) == pytest.approx((-0.4841377, 4.4841377), abs=1e-6)
    assert t_interval([5.0]) is None
    assert sign_flip_p([1.0, 2.0, 3.0]) == 0.25  # all positive: 2 of 8 patterns
    assert sign_flip_p([0.1, 0.2, 0.3, 0.4, 0.5]) == 0.0625  # 2 of 32: still above 5 %
    assert sign_flip_p([1.0, -1.0]) == 1.0  # mean 0: every pattern is as extreme
    # [3, 1, -1]: sum 3; the 8 sign patterns give |sums| 3 5 1 3 3 1 5 3: 6 reach 3
    assert sign_flip_p([3.0, 1.0, -1.0]) == 0.75
    assert sign_flip_p([]) is None
    t = paired_test([-2.0, -3.0, -2.5])
    assert t.n == 3 and t.estimate == pytest.approx(-2.5) and t.excludes_zero
    assert t.high is not None and t.high < 0 and t.p_sign_flip == 0.25
    one = paired_test([1.0])
    assert one.low is None and not one.excludes_zero and one.p_sign_flip == 1.0
    assert paired_test([]).estimate is None


def test_seedwise_matched_gain_is_below_every_arms_best_seed() -> None:
    from kappatune.bench.fronts import readings_at_gain, seedwise_matched_gain

    pts = {
        ("a", 0): [FrontPoint(4.0, 1.0, "x"), FrontPoint(8.0, 3.0, "y")],
        ("a", 1): [FrontPoint(6.0, 1.0, "x"), FrontPoint(12.0, 2.0, "y")],
        ("b", 0): [FrontPoint(9.0, 0.5, "x")],
        ("b", 1): [FrontPoint(7.0, 0.5, "x")],
    }
    assert seedwise_matched_gain(pts, ["a", "b"], [0, 1]) == 7.0  # b's seed 1
    assert readings_at_gain(pts, "a", [0, 1], 7.0) == {0: 2.5, 1: pytest.approx(1 + 1 / 6)}
    assert readings_at_gain(pts, "a", [0, 1], 10.0) == {1: pytest.approx(2 - 1 / 3)}
    assert seedwise_matched_gain({("a", 0): [FrontPoint(-1.0, 0.0, "x")]}, ["a"], [0]) is None
