"""The kappa-only route: Cholesky + Lanczos extremes of the float64 Gram, with fallbacks."""

import math

import numpy as np
import pytest
import torch

from kappatune.analysis import linalg
from kappatune.analysis.spectra import AnalyzeOptions, analyze
from tests.conftest import geometric, known_matrix

DEFAULT_MIN_SIDE = linalg.LANCZOS_MIN_SIDE  # read before the fixture below replaces it


@pytest.fixture(autouse=True)
def small_lanczos_side(monkeypatch: pytest.MonkeyPatch) -> None:
    """The route starts at sides of 512 (where it pays); the tests use small matrices."""
    monkeypatch.setattr(linalg, "LANCZOS_MIN_SIDE", 64)


def rel(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


def kappa_of(res: linalg.SpectrumResult) -> float:
    s = res.singular_values
    return math.inf if s[-1] == 0.0 else float(s[0] / s[-1])


def check_against_lapack(w: torch.Tensor) -> linalg.SpectrumResult:
    res = linalg.matrix_spectrum(w, kappa_only=True)
    ref = linalg.reference_svdvals(w)
    assert rel(kappa_of(res), ref[0] / ref[-1]) <= 1e-9
    assert rel(float(res.singular_values[0]), ref[0]) <= 1e-9
    assert rel(float(res.singular_values[-1]), ref[-1]) <= 1e-9
    return res


@pytest.mark.parametrize("kappa", [1.0, 1.5, 10.0, 300.0])
@pytest.mark.parametrize("shape", [(200, 80), (80, 200)])
def test_lanczos_route_matches_float64_lapack_svd(kappa: float, shape: tuple[int, int]) -> None:
    w = known_matrix(*shape, geometric(kappa, min(shape), top=3.0), seed=5)
    res = check_against_lapack(w)
    assert res.method == "gram-lanczos"
    assert not res.complete
    assert len(res.singular_values) == 2
    assert rel(kappa_of(res), kappa) <= 1e-9


@pytest.mark.parametrize("gap", [1e-3, 1e-6, 1e-9])
def test_clustered_smallest_singular_values(gap: float) -> None:
    s = list(np.geomspace(2.0, 0.05, 90)) + [0.01 * (1 + gap * i) for i in range(9, -1, -1)]
    w = known_matrix(300, 100, s, seed=6)
    res = check_against_lapack(w)
    assert res.method in ("gram-lanczos", "gram")
    assert rel(kappa_of(res), 200.0) <= 1e-9


def test_clustered_largest_singular_values() -> None:
    s = [1.0 + 1e-7 * i for i in range(20, 0, -1)] + list(np.geomspace(0.9, 0.02, 80))
    res = check_against_lapack(known_matrix(100, 250, s, seed=7))
    assert res.method == "gram-lanczos"


def test_no_convergence_falls_back_to_the_full_route(monkeypatch: pytest.MonkeyPatch) -> None:
    w = known_matrix(200, 90, geometric(50.0, 90), seed=8)
    monkeypatch.setattr(linalg, "LANCZOS_MAX_STEPS", 3)
    assert linalg.lanczos_largest(lambda x: x * np.arange(1.0, 91.0), 90) is None
    res = check_against_lapack(w)
    assert res.method == "gram"
    assert res.complete
    assert len(res.singular_values) == 90


def test_lanczos_largest_of_a_diagonal_operator() -> None:
    d = np.linspace(1.0, 7.0, 500)
    top = linalg.lanczos_largest(lambda x: d * x, 500)
    assert top is not None and rel(top, 7.0) <= 1e-10


def test_rank_deficient_matrix_has_infinite_kappa() -> None:
    w = known_matrix(150, 70, geometric(5.0, 70), seed=9)
    w[:, 69] = w[:, 3]
    res = linalg.matrix_spectrum(w, kappa_only=True)
    assert res.method == "qr-svd"
    assert res.singular_values[-1] == 0.0
    assert kappa_of(res) == math.inf


@pytest.mark.parametrize("kappa", [1e3, 1e6])
def test_ill_conditioned_matrices_take_the_qr_route(kappa: float) -> None:
    res = check_against_lapack(known_matrix(160, 96, geometric(kappa, 96), seed=10))
    assert res.method == "qr-svd"
    assert rel(kappa_of(res), kappa) <= 1e-9


def test_default_threshold_keeps_small_sides_on_the_full_route(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(linalg, "LANCZOS_MIN_SIDE", DEFAULT_MIN_SIDE)
    res = linalg.matrix_spectrum(known_matrix(600, 400, geometric(9.0, 400)), kappa_only=True)
    assert res.method == "gram" and len(res.singular_values) == 400


def test_default_threshold_sends_sides_of_512_to_lanczos(monkeypatch: pytest.MonkeyPatch) -> None:
    assert DEFAULT_MIN_SIDE == 512
    monkeypatch.setattr(linalg, "LANCZOS_MIN_SIDE", DEFAULT_MIN_SIDE)
    w = known_matrix(700, 512, geometric(25.0, 512), seed=14)
    res = check_against_lapack(w)
    assert res.method == "gram-lanczos" and len(res.singular_values) == 2


def test_cholesky_solve_inverts_the_gram() -> None:
    a = known_matrix(90, 60, geometric(30.0, 60), seed=15).double().numpy()
    g = a.T @ a
    factor, info = linalg.lapack.dpotrf(g, lower=1, clean=0)  # its upper triangle still holds G
    assert info == 0
    x = np.random.default_rng(0).standard_normal(60)
    got = linalg._cholesky_solve(factor, x)
    want = np.linalg.solve(g, x)
    assert np.max(np.abs(got - want)) <= 1e-12 * np.max(np.abs(want))
    assert np.array_equal(x, np.random.default_rng(0).standard_normal(60))  # x is not touched


def test_zero_and_small_matrices_take_the_full_route() -> None:
    zero = linalg.matrix_spectrum(torch.zeros(100, 80), kappa_only=True)
    assert zero.method == "gram" and list(zero.singular_values) == [0.0] * 80
    small = linalg.matrix_spectrum(known_matrix(40, 30, geometric(4.0, 30)), kappa_only=True)
    assert small.method == "gram" and len(small.singular_values) == 30


def test_row_blocks_and_float32() -> None:
    w = known_matrix(1000, 70, geometric(40.0, 70), seed=11, dtype=torch.float32)
    a = linalg.matrix_spectrum(w, block_rows=64, kappa_only=True)
    ref = linalg.reference_svdvals(w)
    assert a.method == "gram-lanczos"
    assert rel(kappa_of(a), ref[0] / ref[-1]) <= 1e-9


def _model() -> dict[str, torch.Tensor]:
    return {
        "layers.0.mlp.up_proj.weight": known_matrix(160, 64, geometric(20.0, 64), seed=12),
        "layers.0.self_attn.q_proj.weight": known_matrix(64, 64, geometric(3.0, 64), seed=13),
        "layers.0.norm.weight": torch.ones(64),
    }


def test_analysis_rows_mark_undefined_metrics() -> None:
    a = analyze(_model(), AnalyzeOptions(use_cache=False, kappa_only=True))
    assert [r.name for r in a.tensors] == [
        "layers.0.mlp.up_proj.weight",
        "layers.0.self_attn.q_proj.weight",
    ]
    for r, kappa in zip(a.tensors, (20.0, 3.0), strict=True):
        assert r.kappa_only and r.method == "gram-lanczos"
        assert rel(r.kappa, kappa) <= 1e-9
        assert math.isnan(r.log_volume) and math.isnan(r.effective_rank)
        d = r.to_json()
        assert d["kappa_only"] is True
        assert [
            d[k] for k in ("log_volume", "entropy_deficit", "stable_rank", "effective_rank")
        ] == [None] * 4
    full = analyze(_model(), AnalyzeOptions(use_cache=False))
    assert [r.kappa_only for r in full.tensors] == [False, False]
    assert all(rel(x.kappa, y.kappa) <= 1e-9 for x, y in zip(a.tensors, full.tensors, strict=True))


def test_cache_never_serves_kappa_only_rows_for_full_metrics(tmp_path) -> None:  # type: ignore[no-untyped-def]
    kappa_opts = AnalyzeOptions(cache_dir=tmp_path, kappa_only=True)
    full_opts = AnalyzeOptions(cache_dir=tmp_path)
    first = analyze(_model(), kappa_opts)
    assert all(r.kappa_only for r in first.tensors)
    full = analyze(_model(), full_opts)
    assert not any(r.kappa_only for r in full.tensors)
    assert not any(math.isnan(r.effective_rank) for r in full.tensors)
    again = analyze(_model(), kappa_opts)  # full rows now cached: they serve kappa requests
    assert [r.method for r in again.tensors] == ["gram", "gram"]
    assert not any(r.kappa_only for r in again.tensors)


def test_select_analyses_with_the_kappa_only_route(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from safetensors.torch import save_file

    from kappatune.cli.select import load_analysis

    path = tmp_path / "m.safetensors"
    save_file({k: v.float().contiguous() for k, v in _model().items()}, str(path))
    a = load_analysis(str(path))
    assert [(r.name, r.kappa_only, r.method) for r in a.tensors] == [
        ("layers.0.mlp.up_proj.weight", True, "gram-lanczos"),
        ("layers.0.self_attn.q_proj.weight", True, "gram-lanczos"),
    ]
