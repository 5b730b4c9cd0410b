import math

import numpy as np
import pytest
import torch

from kappatune.analysis import linalg
from tests.conftest import geometric, known_matrix


def rel(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


@pytest.mark.parametrize("kappa", [1.0, 10.0, 300.0, 1e3, 1e4, 1e5, 1e6])
@pytest.mark.parametrize("shape", [(96, 40), (40, 96)])
def test_kappa_matches_float64_lapack_svd(kappa: float, shape: tuple[int, int]) -> None:
    w = known_matrix(*shape, geometric(kappa, min(shape)))
    ref = linalg.reference_svdvals(w)
    res = linalg.matrix_spectrum(w)
    assert rel(res.singular_values[0] / res.singular_values[-1], ref[0] / ref[-1]) <= 1e-9
    assert rel(res.singular_values[0] / res.singular_values[-1], kappa) <= 1e-9
    assert res.method == ("gram" if kappa <= linalg.GRAM_MAX_KAPPA else "qr-svd")


@pytest.mark.parametrize(
    ("dtype", "tol"), [(torch.float32, 1e-5), (torch.bfloat16, 5e-2), (torch.float16, 5e-3)]
)
def test_low_precision_is_upcast_and_exact_for_the_stored_matrix(
    dtype: torch.dtype, tol: float
) -> None:
    w = known_matrix(64, 48, geometric(20.0, 48), seed=1, dtype=dtype)
    res = linalg.matrix_spectrum(w)
    ref = linalg.reference_svdvals(w)  # the same (rounded) matrix, in float64
    np.testing.assert_allclose(res.singular_values, ref, rtol=1e-10, atol=1e-12)
    assert rel(res.singular_values[0] / res.singular_values[-1], 20.0) <= tol


def test_row_blocks_give_the_same_spectrum() -> None:
    w = known_matrix(300, 20, geometric(50.0, 20), seed=2, dtype=torch.float32)
    a = linalg.matrix_spectrum(w, block_rows=7).singular_values
    b = linalg.matrix_spectrum(w, block_rows=10_000).singular_values
    np.testing.assert_allclose(a, b, rtol=1e-11)  # summation order differs
    c = linalg.matrix_spectrum(torch.from_numpy(w.numpy().T.copy()), block_rows=7).singular_values
    np.testing.assert_allclose(a, c, rtol=1e-11)


def test_exactly_singular_matrix_has_zero_sigma_min() -> None:
    w = known_matrix(30, 10, geometric(5.0, 10), seed=3)
    w[:, 9] = w[:, 3]  # a repeated column: rank 9 exactly
    res = linalg.matrix_spectrum(w)
    assert res.singular_values[-1] == 0.0
    assert res.method == "qr-svd"


def test_zero_matrix() -> None:
    res = linalg.matrix_spectrum(torch.zeros(5, 3))
    assert list(res.singular_values) == [0.0, 0.0, 0.0]


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_weights_raise_with_counts(bad: float) -> None:
    w = torch.ones(6, 4)
    w[2, 1] = bad
    with pytest.raises(linalg.NonFiniteMatrix, match=r"\((1 NaN, 0 Inf|0 NaN, 1 Inf)\)"):
        linalg.matrix_spectrum(w)


def test_kernels_are_reshaped_to_out_by_rest() -> None:
    w = torch.randn(8, 3, 2, 2, dtype=torch.float64)
    res = linalg.matrix_spectrum(w)
    np.testing.assert_allclose(
        res.singular_values, linalg.reference_svdvals(w.reshape(8, 12)), rtol=1e-12
    )


def test_batch_matches_single() -> None:
    ws = [known_matrix(20, 12, geometric(k, 12), seed=i) for i, k in enumerate([3.0, 30.0, 3e4])]
    ws.append(torch.full((20, 12), math.nan, dtype=torch.float64))
    out = linalg.batch_spectra(ws)
    for w, res in zip(ws[:3], out[:3], strict=True):
        assert isinstance(res, linalg.SpectrumResult)
        np.testing.assert_allclose(res.singular_values, linalg.reference_svdvals(w), rtol=1e-9)
    assert isinstance(out[3], linalg.NonFiniteMatrix)
