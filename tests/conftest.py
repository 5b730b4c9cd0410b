"""Shared fixtures: an isolated cache directory for every test and matrices with known spectra."""

from __future__ import annotations

import gc
import sys
from collections.abc import Sequence

import numpy as np
import pytest
import torch


@pytest.fixture(autouse=True)
def _isolated_cache(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KAPPATUNE_CACHE", str(tmp_path_factory.mktemp("kappatune-cache")))


def known_matrix(
    m: int,
    n: int,
    singular_values: Sequence[float],
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """U diag(s) V^T with random orthonormal U (m x r) and V (n x r), r = len(s) = min(m, n)."""
    rng = np.random.default_rng(seed)
    r = len(singular_values)
    assert r == min(m, n)
    u, _ = np.linalg.qr(rng.standard_normal((m, r)))
    v, _ = np.linalg.qr(rng.standard_normal((n, r)))
    w = (u * np.asarray(singular_values, dtype=np.float64)) @ v.T
    return torch.from_numpy(w).to(dtype)


def geometric(kappa: float, r: int, top: float = 1.0) -> list[float]:
    return list(np.geomspace(top, top / kappa, r))


_INTEGRATION_DIR = "integration"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Every test under tests/integration and every slow (real-weight) test is in the
    integration tier, which ``make test-unit`` (``-m "not integration"``) leaves out."""
    for item in items:
        in_dir = _INTEGRATION_DIR in item.path.relative_to(config.rootpath).parts[:2]
        if in_dir or item.get_closest_marker("slow") is not None:
            item.add_marker(pytest.mark.integration)


# Full garbage collections (the bench runner and accelerate ask for one after each run) walk
# every object; what the imports allocated is frozen (gc.freeze) so that they skip it. Freezing
# again whenever a test has imported many more modules (transformers, peft, matplotlib load
# lazily) costs one collection each time and saves about 0.5 s a collection on 2 cores.
_FROZEN_AT = [0]
_REFREEZE_AFTER = 100  # new modules


def _freeze() -> None:
    gc.collect()
    gc.freeze()
    _FROZEN_AT[0] = len(sys.modules)


def pytest_collection_finish(session: pytest.Session) -> None:
    _freeze()


def pytest_runtest_logfinish(nodeid: str, location: tuple[str, int | None, str]) -> None:
    if len(sys.modules) - _FROZEN_AT[0] >= _REFREEZE_AFTER:
        _freeze()
