"""Rank correlations (Spearman, Kendall tau-b) with seeded percentile-bootstrap intervals.

Point estimates and p-values come from ``scipy.stats``; the interval resamples the (x, y)
pairs with replacement ``bootstrap`` times from ``numpy.random.default_rng(seed)`` and takes
the ``(1 - confidence) / 2`` and ``(1 + confidence) / 2`` percentiles of the statistic.
Resamples in which x or y is constant have no rank correlation and are left out (their number
is reported). ``nan`` values are dropped pairwise; infinite values keep their rank.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray
from scipy import stats

from kappatune.errors import KappaTuneError
from kappatune.jsonio import decode_float, fields_json

METHODS = ("spearman", "kendall")
MIN_PAIRS = 3
_FLOATS = ("estimate", "p_value", "ci_low", "ci_high")


@dataclass(frozen=True)
class RankCorrelation:
    """One rank correlation with its bootstrap interval (``nan`` where undefined)."""

    method: str
    n: int
    estimate: float
    p_value: float
    ci_low: float
    ci_high: float
    confidence: float
    bootstrap: int
    bootstrap_used: int

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(
                f"unknown rank correlation {self.method!r} (known: {', '.join(METHODS)})"
            )

    def to_json(self) -> dict[str, Any]:
        return fields_json(self, _FLOATS)

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> RankCorrelation:
        return cls(
            method=str(d["method"]),
            n=int(d["n"]),
            confidence=float(d["confidence"]),
            bootstrap=int(d["bootstrap"]),
            bootstrap_used=int(d["bootstrap_used"]),
            **{f: decode_float(d[f]) for f in _FLOATS},
        )


def _as_pairs(
    x: Sequence[float], y: Sequence[float]
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    xa, ya = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if xa.shape != ya.shape or xa.ndim != 1:
        raise KappaTuneError(
            f"rank correlation needs two equal-length 1-D sequences, got {xa.shape} and {ya.shape}"
        )
    keep = ~(np.isnan(xa) | np.isnan(ya))
    return xa[keep], ya[keep]


def _statistic(method: str, x: NDArray[np.float64], y: NDArray[np.float64]) -> tuple[float, float]:
    if np.all(x == x[0]) or np.all(y == y[0]):
        return math.nan, math.nan
    r = stats.spearmanr(x, y) if method == "spearman" else stats.kendalltau(x, y, variant="b")
    return float(r.statistic), float(r.pvalue)


def _spearman_many(x: NDArray[np.float64], y: NDArray[np.float64]) -> NDArray[np.float64]:
    """Spearman rho of each row pair (Pearson correlation of average ranks); nan for constant rows."""
    rx = stats.rankdata(x, axis=1)
    ry = stats.rankdata(y, axis=1)
    rx -= rx.mean(axis=1, keepdims=True)
    ry -= ry.mean(axis=1, keepdims=True)
    num = np.sum(rx * ry, axis=1)
    den = np.sqrt(np.sum(rx * rx, axis=1) * np.sum(ry * ry, axis=1))
    with np.errstate(invalid="ignore", divide="ignore"):
        out: NDArray[np.float64] = np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)
    return out


def _bootstrap(
    method: str, x: NDArray[np.float64], y: NDArray[np.float64], n_boot: int, seed: int
) -> NDArray[np.float64]:
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(x), size=(n_boot, len(x)))
    if method == "spearman":
        values = _spearman_many(x[idx], y[idx])
    else:
        values = np.array([_statistic(method, x[i], y[i])[0] for i in idx])
    return values[~np.isnan(values)]


def rank_correlation(
    x: Sequence[float],
    y: Sequence[float],
    method: str = "spearman",
    *,
    bootstrap: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> RankCorrelation:
    """Rank correlation of paired values with a seeded percentile-bootstrap interval.

    Fewer than 3 pairs, or constant x or y, give ``nan`` everywhere (undefined, not 0).
    """
    if method not in METHODS:
        raise KappaTuneError(f"unknown rank correlation {method!r} (known: {', '.join(METHODS)})")
    if bootstrap < 0:
        raise KappaTuneError(f"--bootstrap must be 0 or more, got {bootstrap}")
    if not 0.0 < confidence < 1.0:
        raise KappaTuneError(f"confidence must be between 0 and 1, got {confidence}")
    xa, ya = _as_pairs(x, y)
    nan = math.nan
    if len(xa) < MIN_PAIRS:
        return RankCorrelation(method, len(xa), nan, nan, nan, nan, confidence, bootstrap, 0)
    estimate, p_value = _statistic(method, xa, ya)
    lo = hi = nan
    used = 0
    if bootstrap and not math.isnan(estimate):
        values = _bootstrap(method, xa, ya, bootstrap, seed)
        used = len(values)
        if used:
            alpha = (1.0 - confidence) / 2.0
            lo, hi = (float(v) for v in np.quantile(values, [alpha, 1.0 - alpha]))
    return RankCorrelation(method, len(xa), estimate, p_value, lo, hi, confidence, bootstrap, used)


@dataclass(frozen=True)
class GroupCorrelation:
    """A correlation over one group of tensors (``"all"`` or a module type)."""

    group: str
    correlation: RankCorrelation

    def to_json(self) -> dict[str, Any]:
        return {"group": self.group, **self.correlation.to_json()}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> GroupCorrelation:
        return cls(str(d["group"]), RankCorrelation.from_json(d))


ALL = "all"


def grouped_correlations(
    groups: Sequence[str],
    x: Sequence[float],
    y: Sequence[float],
    *,
    methods: Sequence[str] = METHODS,
    bootstrap: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> list[GroupCorrelation]:
    """Correlations over all pairs, then per group (sorted by name), for each method.

    Groups with fewer than 3 pairs are reported with ``nan``. Each (group, method) uses its
    own bootstrap stream derived from ``seed`` and its position, so results do not depend on
    which other groups exist.
    """
    if not (len(groups) == len(x) == len(y)):
        raise KappaTuneError(f"groups, x and y differ in length: {len(groups)}, {len(x)}, {len(y)}")
    xa, ya = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    ga = np.asarray(groups, dtype=object)
    out: list[GroupCorrelation] = []
    labels = [ALL, *sorted(set(groups) - {ALL})]
    for label in labels:
        mask = np.ones(len(ga), dtype=bool) if label == ALL else ga == label
        for method in methods:
            group_seed = _derived_seed(seed, label, method)
            rc = rank_correlation(
                xa[mask],
                ya[mask],
                method,
                bootstrap=bootstrap,
                confidence=confidence,
                seed=group_seed,
            )
            out.append(GroupCorrelation(label, rc))
    return out


def _derived_seed(seed: int, label: str, method: str) -> int:
    """A stable child seed (not Python's salted ``hash``)."""
    data = np.frombuffer(f"{label}|{method}".encode(), dtype=np.uint8)
    return int(np.random.SeedSequence([seed, *data.tolist()]).generate_state(1)[0])


def pairwise_correlations(
    groups: Sequence[str],
    scores: Mapping[str, Sequence[float]],
    pairs: Sequence[tuple[str, str]] | None = None,
    *,
    methods: Sequence[str] = METHODS,
    bootstrap: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """:func:`grouped_correlations` of each pair of named scores (default: every pair, in order).

    Rows: ``{"x": name, "y": name, "group": ..., <RankCorrelation JSON>}``.
    """
    names = list(scores)
    if pairs is None:
        pairs = [(a, b) for i, a in enumerate(names) for b in names[i + 1 :]]
    unknown = sorted({n for p in pairs for n in p} - set(names))
    if unknown:
        raise KappaTuneError(f"no score named {', '.join(unknown)} (have: {', '.join(names)})")
    out: list[dict[str, Any]] = []
    for a, b in pairs:
        for g in grouped_correlations(
            groups, scores[a], scores[b], methods=methods, bootstrap=bootstrap,
            confidence=confidence, seed=seed,
        ):  # fmt: skip
            out.append({"x": a, "y": b, **g.to_json()})
    return out
