"""Pure functions of a singular-value spectrum (float64, any order, zeros allowed).

Definitions per weight matrix W (m x n, r = min(m, n), singular values s_1 >= ... >= s_r) as in
KappaTune (arXiv 2506.16289) and Spectrum (for the SNR). A zero singular value makes the
matrix singular: kappa is ``inf`` and the log-volume ``-inf`` (never an epsilon-inflated
number). Quantities that are undefined for the all-zero matrix are ``nan``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import numpy as np
from numpy.typing import NDArray

Spectrum = NDArray[np.float64]


@dataclass(frozen=True)
class SpectralMetrics:
    kappa: float
    sigma_max: float
    sigma_min: float
    log_volume: float
    entropy_deficit: float
    stable_rank: float
    effective_rank: float


#: The metric names, in report order: the CSV columns, the JSON and cache float fields.
METRIC_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(SpectralMetrics))


def condition_number(s: Spectrum) -> float:
    """kappa = s_max / s_min; ``inf`` when s_min is zero (including the zero matrix)."""
    smax, smin = float(np.max(s)), float(np.min(s))
    return math.inf if smin <= 0.0 else smax / smin


def log_volume(s: Spectrum) -> float:
    """sum_i log s_i: log of the r-dimensional volume scaling (``-inf`` when singular)."""
    if float(np.min(s)) <= 0.0:
        return -math.inf
    return float(np.sum(np.log(s)))


def gaussian_output_entropy(s: Spectrum, variance: float = 1.0) -> float:
    """h(Wx) in nats for x ~ N(0, variance I) and W of full row rank (r = len(s))."""
    r = len(s)
    return 0.5 * r * math.log(2.0 * math.pi * math.e * variance) + log_volume(s)


def entropy_deficit(s: Spectrum) -> float:
    """sum log s_i - (r/2) log(||W||_F^2 / r); <= 0, and 0 exactly when all s_i are equal."""
    frob2 = float(np.sum(np.square(s)))
    if frob2 == 0.0:
        return math.nan
    lv = log_volume(s)
    if lv == -math.inf:
        return -math.inf
    deficit = lv - 0.5 * len(s) * math.log(frob2 / len(s))
    return min(deficit, 0.0)


def stable_rank(s: Spectrum) -> float:
    """||W||_F^2 / s_max^2."""
    smax = float(np.max(s))
    if smax == 0.0:
        return math.nan
    return float(np.sum(np.square(s / smax)))


def effective_rank(s: Spectrum) -> float:
    """Roy & Vetterli: exp of the Shannon entropy of p_i = s_i / sum_j s_j."""
    total = float(np.sum(s))
    if total == 0.0:
        return math.nan
    p = s[s > 0] / total
    return float(math.exp(-np.sum(p * np.log(p))))


def summarize(s: Spectrum) -> SpectralMetrics:
    """All metrics of one spectrum."""
    s = np.asarray(s, dtype=np.float64)
    return SpectralMetrics(
        kappa=condition_number(s),
        sigma_max=float(np.max(s)),
        sigma_min=float(np.min(s)),
        log_volume=log_volume(s),
        entropy_deficit=entropy_deficit(s),
        stable_rank=stable_rank(s),
        effective_rank=effective_rank(s),
    )


def two_value_entropy_loss(kappa: float) -> float:
    """Entropy lost against kappa = 1 at fixed norm for two singular values, in nats.

    Closed form log(2 kappa / (1 + kappa^2)) (negative: it is a loss).
    """
    return math.log(2.0 * kappa / (1.0 + kappa * kappa))


# Spectrum (cognitivecomputations/spectrum, spectrum.py at commit
# 0ed1756bc4a7920249860bcd0a32b551bcdf6d1f, April 2025): ModelModifier.calculate_snr_for_layer,
# marchenko_pastur_threshold, estimate_sigma_with_full_iqr.
_IQR_TO_SIGMA = 1.349  # IQR of a standard normal distribution


def marchenko_pastur_edge(s: Spectrum, rows: int, cols: int) -> float:
    """Spectrum's noise edge: sigma (1 + sqrt(beta)), sigma = IQR(s) / 1.349, beta = min/max dim.

    Quantiles interpolate linearly, as ``torch.quantile`` (and ``numpy.quantile``) do.
    """
    q75, q25 = np.quantile(np.asarray(s, dtype=np.float64), [0.75, 0.25])
    sigma = float(q75 - q25) / _IQR_TO_SIGMA
    beta = min(rows, cols) / max(rows, cols)
    return sigma * math.sqrt((1.0 + math.sqrt(beta)) ** 2)


def spectrum_snr(s: Spectrum, rows: int, cols: int) -> float:
    """Spectrum's score of a (rows x cols) matrix: (signal / noise) / s_max.

    signal = sum of the singular values above the Marchenko-Pastur edge, noise = sum of the
    rest (1 when none is at or below it; ``inf`` when those are all zero), as in Spectrum.
    ``nan`` where the noise edge is undefined: a 1 x N or N x 1 matrix (one singular value:
    no spread to estimate the noise from) and the all-zero matrix (Spectrum divides by s_max = 0).
    """
    s = np.asarray(s, dtype=np.float64)
    if min(rows, cols) < 2 or s.size < 2:
        return math.nan
    smax = float(np.max(s))
    if smax == 0.0:
        return math.nan
    edge = marchenko_pastur_edge(s, rows, cols)
    above = s > edge
    signal = float(np.sum(s[above]))
    noise = float(np.sum(s[~above])) if bool(np.any(~above)) else 1.0
    snr = signal / noise if noise != 0.0 else math.inf
    return snr / smax
