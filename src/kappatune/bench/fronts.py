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
