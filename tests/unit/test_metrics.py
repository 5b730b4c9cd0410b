import math

import numpy as np
import pytest

from kappatune.analysis import metrics


def test_values_of_a_known_spectrum() -> None:
    s = np.array([4.0, 2.0, 1.0])
    m = metrics.summarize(s)
    assert m.kappa == 4.0
    assert m.sigma_max == 4.0 and m.sigma_min == 1.0
    assert m.log_volume == pytest.approx(math.log(8.0), rel=1e-15)
    assert m.stable_rank == pytest.approx(21.0 / 16.0, rel=1e-15)
    p = s / 7.0
    assert m.effective_rank == pytest.approx(math.exp(-float(np.sum(p * np.log(p)))), rel=1e-15)
    assert m.entropy_deficit == pytest.approx(math.log(8.0) - 1.5 * math.log(21.0 / 3.0), rel=1e-14)


def test_equal_singular_values_have_no_deficit() -> None:
    m = metrics.summarize(np.full(5, 3.0))
    assert m.kappa == 1.0
    assert m.entropy_deficit == 0.0
    assert m.effective_rank == pytest.approx(5.0, rel=1e-14)
    assert m.stable_rank == pytest.approx(5.0, rel=1e-14)


@pytest.mark.parametrize(("kappa", "loss"), [(2, 0.223), (5, 0.956), (10, 1.619), (100, 3.912)])
def test_worked_numbers_of_the_two_value_deficit(kappa: float, loss: float) -> None:
    s = np.array([kappa, 1.0]) * 0.37  # the deficit is scale-invariant
    assert metrics.entropy_deficit(s) == pytest.approx(-loss, abs=5e-4)
    assert metrics.two_value_entropy_loss(kappa) == pytest.approx(-loss, abs=5e-4)


def test_singular_and_zero_spectra() -> None:
    s = np.array([2.0, 1.0, 0.0])
    assert metrics.condition_number(s) == math.inf
    assert metrics.log_volume(s) == -math.inf
    assert metrics.entropy_deficit(s) == -math.inf
    z = metrics.summarize(np.zeros(3))
    assert z.kappa == math.inf and z.sigma_max == 0.0
    assert math.isnan(z.stable_rank) and math.isnan(z.effective_rank)
    assert math.isnan(z.entropy_deficit)


def test_gaussian_output_entropy_closed_form() -> None:
    s = np.array([3.0, 0.5])
    expected = math.log(2 * math.pi * math.e * 2.0) + math.log(1.5)
    assert metrics.gaussian_output_entropy(s, variance=2.0) == pytest.approx(expected, rel=1e-15)
