"""Fixtures for the unit tier: one torch thread for every test, and the toy bench inputs."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from tests.unit._tiny_models import write_toy_bench


@pytest.fixture(autouse=True, scope="package")
def _one_torch_thread() -> Iterator[None]:
    """The tiny models' matrices are too small to split across threads: a second thread only
    spins, and on 2 cores it more than doubles the CPU time of the training tests. The
    integration tier, on real models, keeps torch's default."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def toy_bench(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The toy bench inputs (a tiny model and its data), written once; tests only read them."""
    return write_toy_bench(tmp_path_factory.mktemp("toy-bench"))
