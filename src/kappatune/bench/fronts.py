"""Pareto fronts of task gain against forgetting, and the two headline numbers read off them.

Pure functions on plain numbers. Conventions: higher gain is better, lower forgetting is better.
A point is dominated when another point has at least its gain and at most its forgetting, and is
strictly better in one of the two. A front is sorted by gain (ascending); along it forgetting
rises too. Nothing here extrapolates: a gain above an arm's best measured gain is "not reached".
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class FrontPoint:
    gain: float
    forgetting: float
    label: str = ""  # what produced it, e.g. "lr 1e-04, step 8"


def pareto_front(points: Sequence[FrontPoint]) -> tuple[FrontPoint, ...]:
    """Non-dominated points (NaNs dropped), by gain ascending; ties keep the first label."""
    finite = [p for p in points if math.isfinite(p.gain) and math.isfinite(p.forgetting)]
    # best gain first; among equal gain, least forgetting first; then by label for determinism
    ordered = sorted(finite, key=lambda p: (-p.gain, p.forgetting, p.label))
    front: list[FrontPoint] = []
    best_forgetting = math.inf
    for p in ordered:
        if p.forgetting < best_forgetting:
            front.append(p)
            best_forgetting = p.forgetting
    return tuple(reversed(front))


def forgetting_at_gain(front: Sequence[FrontPoint], gain: float) -> float | None:
    """Forgetting along ``front`` at ``gain``: linear between the two front points around it.

    Below the front's lowest gain, that point's forgetting (it reaches more gain than asked, so
    this is an upper bound). Above the front's highest gain: ``None`` (not reached).
    """
    if not front or not math.isfinite(gain) or gain > front[-1].gain:
        return None
    if gain <= front[0].gain:
        return front[0].forgetting
    for lo, hi in itertools.pairwise(front):
        if lo.gain <= gain <= hi.gain:
            t = (gain - lo.gain) / (hi.gain - lo.gain)
            return lo.forgetting + t * (hi.forgetting - lo.forgetting)
    return None  # pragma: no cover - a sorted front always brackets a gain within its range


def gain_within_budget(front: Sequence[FrontPoint], budget: float) -> float | None:
    """The most gain along ``front`` with forgetting at most ``budget`` (linear between front
    points); ``None`` when every measured point forgets more than the budget (not reached)."""
    inside = [p for p in front if p.forgetting <= budget]
    if not inside:
        return None
    best = max(inside, key=lambda p: p.gain)
    after = [p for p in front if p.gain > best.gain]
    if not after:
        return best.gain
    nxt = after[0]
    t = (budget - best.forgetting) / (nxt.forgetting - best.forgetting)
    return best.gain + t * (nxt.gain - best.gain)


def matched_gain(fronts: Mapping[str, Sequence[FrontPoint]]) -> float | None:
    """The highest gain every front reaches (the least of their best gains); ``None`` if any
    front is empty or that gain is not positive (some arm never learned anything)."""
    if not fronts or any(not f for f in fronts.values()):
        return None
    level = min(f[-1].gain for f in fronts.values())
    return level if level > 0 else None


def joint_front(fronts: Mapping[str, Sequence[FrontPoint]]) -> tuple[str, ...]:
    """Arms with at least one point on the front of all arms' points pooled, in input order."""
    pooled = [
        FrontPoint(p.gain, p.forgetting, name) for name, front in fronts.items() for p in front
    ]
    on = {p.label for p in pareto_front(pooled)}
    return tuple(name for name in fronts if name in on)


# --------------------------------------------------------------------------- bootstrap over seeds

# (arm, seed) -> points of that seed; the points of one arm share labels across seeds
SeedPoints = Mapping[tuple[str, int], Sequence[FrontPoint]]


def mean_points(by_seed: SeedPoints, arm: str, seeds: Sequence[int]) -> list[FrontPoint]:
    """Per label, the mean over ``seeds`` (repeats count again) of one arm's points."""
    acc: dict[str, list[tuple[float, float]]] = {}
    for seed in seeds:
        for p in by_seed.get((arm, seed), ()):
            acc.setdefault(p.label, []).append((p.gain, p.forgetting))
    out = []
    for label in sorted(acc):
        xs = acc[label]
        out.append(
            FrontPoint(sum(g for g, _ in xs) / len(xs), sum(f for _, f in xs) / len(xs), label)
        )
    return out


@dataclass(frozen=True)
class Interval:
    estimate: float | None
    low: float | None
    high: float | None
    reached: float  # fraction of bootstrap resamples where the number exists

    @property
    def excludes_zero(self) -> bool:
        return self.low is not None and self.high is not None and (self.low > 0 or self.high < 0)


def percentile(sorted_xs: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (q in [0, 1]) of sorted values."""
    pos = q * (len(sorted_xs) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_xs) - 1)
    return sorted_xs[lo] + (pos - lo) * (sorted_xs[hi] - sorted_xs[lo])


def bootstrap(
    statistic: Callable[[Sequence[int]], float | None],
    seeds: Sequence[int],
    resamples: int = 1000,
    rng_seed: int = 0,
    level: float = 0.95,
) -> Interval:
    """Percentile interval of ``statistic`` over resamples of ``seeds`` with replacement
    (none from a single seed: it has no spread to resample)."""
    estimate = statistic(list(seeds))
    if len(set(seeds)) < 2:
        return Interval(estimate, None, None, 0.0 if estimate is None else 1.0)
    rng = random.Random(rng_seed)
    values: list[float] = []
    for _ in range(resamples):
        draw = [rng.choice(list(seeds)) for _ in seeds]
        v = statistic(draw)
        if v is not None and math.isfinite(v):
            values.append(v)
    if not values:
        return Interval(estimate, None, None, 0.0)
    values.sort()
    tail = (1 - level) / 2
    return Interval(
        estimate, percentile(values, tail), percentile(values, 1 - tail), len(values) / resamples
    )


def forgetting_at_gain_interval(
    by_seed: SeedPoints, arm: str, seeds: Sequence[int], gain: float, resamples: int = 1000
) -> Interval:
    def stat(draw: Sequence[int]) -> float | None:
        return forgetting_at_gain(pareto_front(mean_points(by_seed, arm, draw)), gain)

    return bootstrap(stat, seeds, resamples)


def difference_at_gain_interval(
    by_seed: SeedPoints,
    arm: str,
    reference: str,
    seeds: Sequence[int],
    gain: float,
    resamples: int = 1000,
) -> Interval:
    """``arm``'s forgetting minus ``reference``'s at ``gain``; the same seeds are drawn for both
    (same seed = same data order), so the interval is a paired one."""

    def stat(draw: Sequence[int]) -> float | None:
        a = forgetting_at_gain(pareto_front(mean_points(by_seed, arm, draw)), gain)
        b = forgetting_at_gain(pareto_front(mean_points(by_seed, reference, draw)), gain)
        return None if a is None or b is None else a - b

    return bootstrap(stat, seeds, resamples)


# --------------------------------------------------------------------------- noise


def ppl_noise_floor(
    nll_sums: Sequence[float], tokens: Sequence[int], resamples: int = 1000, rng_seed: int = 0
) -> float:
    """Half-width, in % of perplexity, of the 95 % band of one model's token-weighted perplexity
    over bootstrap resamples of the evaluation sequences (per-sequence NLL sums and token counts).
    A perplexity change smaller than this is within the noise of which text was drawn."""
    n = len(nll_sums)
    total = sum(tokens)
    full = sum(nll_sums) / total
    rng = random.Random(rng_seed)
    devs: list[float] = []
    for _ in range(resamples):
        idx = [rng.randrange(n) for _ in range(n)]
        nll = sum(nll_sums[i] for i in idx) / sum(tokens[i] for i in idx)
        devs.append(abs(math.expm1(nll - full)) * 100)
    devs.sort()
    return percentile(devs, 0.95)


def paired_ppl_noise(
    base_nlls: Sequence[float],
    nlls: Sequence[float],
    tokens: Sequence[int],
    resamples: int = 1000,
    rng_seed: int = 0,
) -> float:
    """Half-width, in % of perplexity, of the 95 % band of a model's perplexity change against
    the base model over bootstrap resamples of the control sequences, both models scored on the
    same resample (paired): the evaluation noise of that change."""
    import numpy as np

    b = np.asarray(base_nlls, dtype=np.float64)
    t = np.asarray(nlls, dtype=np.float64)
    n = np.asarray(tokens, dtype=np.float64)
    full = math.expm1((t.sum() - b.sum()) / n.sum())
    idx = np.random.default_rng(rng_seed).integers(0, len(b), size=(resamples, len(b)))
    changes = np.expm1((t[idx].sum(1) - b[idx].sum(1)) / n[idx].sum(1))
    devs = sorted(float(x) for x in np.abs(changes - full) * 100)
    return percentile(devs, 0.95)


def accuracy_noise_floor(
    correct: Sequence[bool], resamples: int = 1000, rng_seed: int = 0
) -> float:
    """Half-width, in percentage points, of the 95 % band of an accuracy over bootstrap
    resamples of the questions."""
    n = len(correct)
    full = sum(correct) / n
    rng = random.Random(rng_seed)
    devs = sorted(
        abs(sum(correct[rng.randrange(n)] for _ in range(n)) / n - full) * 100
        for _ in range(resamples)
    )
    return percentile(devs, 0.95)


# --------------------------------------------------------------------------- tests over few seeds


@dataclass(frozen=True)
class PairedTest:
    """A paired comparison over seeds: the per-seed differences, their paired t-interval and
    the exact two-sided sign-flip permutation p-value. With n seeds the permutation test has
    2**n sign patterns, so its p-value is never below 2 / 2**n (0.25 for 3 seeds, 0.0625 for 5):
    it cannot reject at 5 % below 6 seeds, and the verdict rests on the t-interval."""

    diffs: tuple[float, ...]
    estimate: float | None  # mean of the differences
    low: float | None
    high: float | None
    p_sign_flip: float | None

    @property
    def n(self) -> int:
        return len(self.diffs)

    @property
    def excludes_zero(self) -> bool:
        return self.low is not None and self.high is not None and (self.low > 0 or self.high < 0)


def t_interval(values: Sequence[float], level: float = 0.95) -> tuple[float, float] | None:
    """Student-t interval of the mean of ``values`` (None below two values)."""
    from scipy import stats

    n = len(values)
    if n < 2:
        return None
    mean = math.fsum(values) / n
    sd = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1))
    half = float(stats.t.ppf(0.5 + level / 2, n - 1)) * sd / math.sqrt(n)
    return mean - half, mean + half


def sign_flip_p(diffs: Sequence[float]) -> float | None:
    """Exact two-sided p-value of the paired sign-flip permutation test: the share of the
    2**n sign patterns whose mean is at least as far from 0 as the observed one (None for no
    differences; up to 20 of them are enumerated)."""
    n = len(diffs)
    if n == 0 or n > 20:
        return None
    observed = abs(math.fsum(diffs))
    tol = 1e-12 * max(1.0, sum(abs(d) for d in diffs))
    hits = sum(
        1
        for signs in itertools.product((1, -1), repeat=n)
        if abs(math.fsum(s * d for s, d in zip(signs, diffs, strict=True))) >= observed - tol
    )
    return hits / 2**n


def paired_test(diffs: Sequence[float], level: float = 0.95) -> PairedTest:
    xs = tuple(float(d) for d in diffs)
    if not xs:
        return PairedTest((), None, None, None, None)
    ci = t_interval(xs, level)
    low, high = ci if ci is not None else (None, None)
    return PairedTest(xs, math.fsum(xs) / len(xs), low, high, sign_flip_p(xs))


def seed_fronts(
    by_seed: SeedPoints, arm: str, seeds: Sequence[int]
) -> dict[int, tuple[FrontPoint, ...]]:
    """Each seed's own front of one arm (its learning rates and checkpoints pooled)."""
    return {s: pareto_front(list(by_seed.get((arm, s), ()))) for s in seeds}


def seedwise_matched_gain(
    by_seed: SeedPoints, arms: Sequence[str], seeds: Sequence[int]
) -> float | None:
    """The highest gain that every arm reaches on every seed's own front. Below every arm's
    best mean point (unless its seeds agree exactly), so no arm is read at the maximum of its
    own grid (the winner's curse of taking the weakest arm's best point), and every seed of
    every arm has a reading there. ``None`` when it is not positive."""
    tops = [
        front[-1].gain if front else -math.inf
        for a in arms
        for front in seed_fronts(by_seed, a, seeds).values()
    ]
    if not tops:
        return None
    level = min(tops)
    return level if level > 0 and math.isfinite(level) else None


def readings_at_gain(
    by_seed: SeedPoints, arm: str, seeds: Sequence[int], gain: float
) -> dict[int, float]:
    """Forgetting at ``gain`` on each seed's own front (seeds whose front does not reach it are
    left out)."""
    out = {}
    for s, front in seed_fronts(by_seed, arm, seeds).items():
        v = forgetting_at_gain(front, gain)
        if v is not None and math.isfinite(v):
            out[s] = v
    return out


def paired_difference_at_gain(
    by_seed: SeedPoints, arm: str, reference: str, seeds: Sequence[int], gain: float
) -> PairedTest:
    """``arm`` minus ``reference`` at ``gain``, seed by seed (same seed = same data order), over
    the seeds where both reach it."""
    a = readings_at_gain(by_seed, arm, seeds, gain)
    b = readings_at_gain(by_seed, reference, seeds, gain)
    return paired_test([a[s] - b[s] for s in seeds if s in a and s in b])
