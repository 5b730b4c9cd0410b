import pytest

from kappatune.analysis.sharded import balance, launched_world
from kappatune.analysis.source_base import TensorEntry
from kappatune.analysis.spectra import matrix_cost


def test_balance_is_deterministic_longest_first() -> None:
    entries = [TensorEntry(f"t{i}", (100 * (i + 1), 10), "float32") for i in range(5)]
    shares = balance(entries, 2)
    assert [[e.name for e in s] for s in shares] == [["t4", "t1", "t0"], ["t3", "t2"]]
    loads = [sum(matrix_cost(e) for e in s) for s in shares]
    assert max(loads) - min(loads) <= matrix_cost(entries[0])
    assert balance(entries, 2) == shares
    assert sorted(e.name for s in balance(entries, 3) for e in s) == [e.name for e in entries]


def test_launched_world(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert launched_world() is None
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert launched_world() == (1, 2)


def test_backend_gloo_on_cpu_nccl_for_device_tensors_on_gpus() -> None:
    from kappatune.analysis.sharded import backend_for

    assert backend_for("cpu", cuda=True, nccl=True) == "gloo"
    assert backend_for("auto", cuda=False, nccl=False) == "gloo"
    assert backend_for("auto", cuda=True, nccl=False) == "gloo"
    assert backend_for("auto", cuda=True, nccl=True) == "cpu:gloo,cuda:nccl"
    assert backend_for("cuda", cuda=True, nccl=True) == "cpu:gloo,cuda:nccl"
