"""Theory checks: the closed forms of kappatune.analysis.metrics against Monte Carlo.

Monte Carlo entropy of y = W x, x ~ N(0, v I): y is Gaussian with covariance v W W^T, so its
differential entropy is (m/2) log(2 pi e) + 1/2 log det Cov(y). We estimate log det Cov(y)
from N samples through the sample covariance S (N - 1 degrees of freedom). For Gaussian data
(N - 1) S ~ Wishart_m(Sigma, N - 1), hence exactly

    E[log det S]   = log det Sigma + sum_{i=1..m} psi((N - i) / 2) + m log(2 / (N - 1))
    Var[log det S] = sum_{i=1..m} psi'((N - i) / 2)

(psi = digamma, psi' = trigamma). The test removes that known bias and allows 5 standard
deviations of the estimate; with N = 40000 and m <= 6 the standard deviation of the entropy
estimate is about sqrt(m / (2 N)) <= 0.0087 nats. Seeds make it deterministic.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.special import digamma, polygamma

from kappatune.analysis.metrics import (
    entropy_deficit,
    gaussian_output_entropy,
    two_value_entropy_loss,
)

N_SAMPLES = 40_000


def _matrix_with_spectrum(s: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """An m x n matrix (m = len(s) <= n) with singular values s, as U diag(s) V^T."""
    m = len(s)
    u, _ = np.linalg.qr(rng.normal(size=(m, m)))
    v, _ = np.linalg.qr(rng.normal(size=(n, m)))
    return (u * s) @ v.T


def _mc_entropy(w: np.ndarray, variance: float, rng: np.random.Generator) -> tuple[float, float]:
    """Bias-corrected Monte Carlo entropy of W x and its standard deviation (nats)."""
    m, n = w.shape
    x = rng.normal(scale=math.sqrt(variance), size=(N_SAMPLES, n))
    y = x @ w.T
    _, logdet = np.linalg.slogdet(np.cov(y, rowvar=False))
    dof = np.arange(1, m + 1)
    bias = float(np.sum(digamma((N_SAMPLES - dof) / 2.0)) + m * math.log(2.0 / (N_SAMPLES - 1)))
    var = float(np.sum(polygamma(1, (N_SAMPLES - dof) / 2.0)))
    h = 0.5 * m * math.log(2 * math.pi * math.e) + 0.5 * (logdet - bias)
    return h, 0.5 * math.sqrt(var)


@pytest.mark.parametrize(
    ("spectrum", "n", "variance", "seed"),
    [
        ([1.0, 1.0, 1.0], 3, 1.0, 0),  # isotropic square
        ([4.0, 1.0], 2, 0.5, 1),  # kappa 4, small input variance
        ([9.0, 3.0, 1.0, 0.1], 7, 2.0, 2),  # wide matrix (full row rank), kappa 90
        ([2.0, 1.5, 1.2, 1.0, 0.8, 0.5], 6, 1.0, 3),
    ],
)
def test_monte_carlo_output_entropy_matches_closed_form(
    spectrum: list[float], n: int, variance: float, seed: int
) -> None:
    rng = np.random.default_rng(seed)
    s = np.array(spectrum)
    w = _matrix_with_spectrum(s, n, rng)
    h_mc, sd = _mc_entropy(w, variance, rng)
    h_closed = gaussian_output_entropy(np.linalg.svd(w, compute_uv=False), variance)
    assert h_closed == pytest.approx(
        0.5 * len(s) * math.log(2 * math.pi * math.e * variance) + np.log(s).sum()
    )
    assert sd < 0.01
    assert abs(h_mc - h_closed) < 5 * sd


@pytest.mark.parametrize(("kappa", "loss"), [(2, 0.223), (5, 0.956), (10, 1.619), (100, 3.912)])
def test_two_value_entropy_deficit_matches_worked_numbers(kappa: float, loss: float) -> None:
    s = np.array([kappa, 1.0])
    assert -entropy_deficit(s) == pytest.approx(loss, abs=5e-4)
    assert two_value_entropy_loss(kappa) == pytest.approx(entropy_deficit(s), abs=1e-12)
    assert two_value_entropy_loss(kappa) == pytest.approx(
        math.log(2 * kappa / (1 + kappa**2)), abs=1e-15
    )
    # scale invariance: the deficit is a function of the spectrum's shape only
    assert entropy_deficit(3.7 * s) == pytest.approx(entropy_deficit(s), abs=1e-12)


def test_deficit_is_entropy_lost_against_isotropic_matrix_of_same_norm() -> None:
    """h(W) - h(W_iso) = entropy_deficit(W) when ||W_iso||_F = ||W||_F and W_iso has kappa 1."""
    rng = np.random.default_rng(11)
    for _ in range(5):
        s = np.sort(rng.uniform(0.1, 5.0, size=4))[::-1]
        iso = np.full(4, math.sqrt(np.sum(s**2) / 4))
        diff = gaussian_output_entropy(s, 1.3) - gaussian_output_entropy(iso, 1.3)
        assert diff == pytest.approx(entropy_deficit(s), abs=1e-12)
        assert entropy_deficit(s) < 0.0
    assert entropy_deficit(np.full(5, 2.5)) == 0.0


def test_monte_carlo_entropy_loss_at_kappa_5_matches_worked_number() -> None:
    """Sampled outputs of a kappa-5 unit carry 0.956 nats less than an isotropic one of equal norm."""
    rng = np.random.default_rng(5)
    norm = math.sqrt(26.0)  # s = (5, 1)
    w5 = _matrix_with_spectrum(np.array([5.0, 1.0]), 2, rng)
    w1 = _matrix_with_spectrum(np.full(2, norm / math.sqrt(2.0)), 2, rng)
    h5, sd5 = _mc_entropy(w5, 1.0, rng)
    h1, sd1 = _mc_entropy(w1, 1.0, rng)
    assert h1 - h5 == pytest.approx(0.956, abs=5 * math.hypot(sd5, sd1) + 5e-4)


def test_singular_matrix_has_no_finite_entropy() -> None:
    assert gaussian_output_entropy(np.array([1.0, 0.0])) == -math.inf
    assert entropy_deficit(np.array([1.0, 0.0])) == -math.inf
