import json
import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from kappatune import AnalyzeOptions, analyze, linalg
from kappatune import spectra as spectra_mod
from tests.conftest import geometric, known_matrix


@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    ts = {
        f"layers.{i}.w.weight": known_matrix(30, 10, geometric(2.0 + i, 10), seed=i).float()
        for i in range(4)
    }
    save_file(ts, tmp_path / "m.safetensors")
    return tmp_path / "m.safetensors"


@pytest.fixture
def counter(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    real = linalg.batch_spectra

    def counting(ws, **kw):
        calls.append(len(ws))
        return real(ws, **kw)

    monkeypatch.setattr(spectra_mod.linalg, "batch_spectra", counting)
    return calls


def opts(tmp_path: Path, **kw) -> AnalyzeOptions:
    return AnalyzeOptions(cache_dir=tmp_path / "cache", workers=1, **kw)


def test_second_run_is_served_from_cache(
    tmp_path: Path, checkpoint: Path, counter: list[int]
) -> None:
    a = analyze(checkpoint, opts(tmp_path))
    assert len(counter) == 4
    b = analyze(checkpoint, opts(tmp_path))
    assert len(counter) == 4
    assert a == b


def test_cache_is_keyed_by_content_not_file_name(
    tmp_path: Path, checkpoint: Path, counter: list[int]
) -> None:
    analyze(checkpoint, opts(tmp_path))
    copy = tmp_path / "renamed.safetensors"
    copy.write_bytes(checkpoint.read_bytes())
    analyze(copy, opts(tmp_path))
    assert len(counter) == 4


def test_changed_weight_is_recomputed(tmp_path: Path, checkpoint: Path, counter: list[int]) -> None:
    a = analyze(checkpoint, opts(tmp_path))
    ts = {
        f"layers.{i}.w.weight": known_matrix(30, 10, geometric(2.0 + i, 10), seed=i).float()
        for i in range(4)
    }
    ts["layers.2.w.weight"] = known_matrix(30, 10, geometric(50.0, 10), seed=9).float()
    save_file(ts, checkpoint)  # same file name, new content
    b = analyze(checkpoint, opts(tmp_path))
    assert len(counter) == 5
    assert b.row("layers.2.w.weight").kappa == pytest.approx(50.0, rel=1e-5)
    assert a.row("layers.1.w.weight") == b.row("layers.1.w.weight")


def test_corrupt_entry_is_ignored_with_a_warning(
    tmp_path: Path, checkpoint: Path, counter: list[int], caplog: pytest.LogCaptureFixture
) -> None:
    a = analyze(checkpoint, opts(tmp_path))
    entries = sorted((tmp_path / "cache" / "spectra").rglob("*.json"))
    assert len(entries) == 4
    entries[0].write_text("{ this is not json")
    entries[1].write_text(json.dumps({"format": 1, "key": "wrong", "rows": []}))
    with caplog.at_level(logging.WARNING, logger="kappatune.cache"):
        b = analyze(checkpoint, opts(tmp_path))
    assert len(counter) == 6
    assert sum("corrupt cache entry" in r.message for r in caplog.records) == 2
    assert a == b
    json.loads(entries[0].read_text())  # rewritten


def test_interrupted_run_resumes(
    tmp_path: Path, checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = linalg.batch_spectra
    calls: list[int] = []
    crash = {"at": 3}

    def flaky(ws, **kw):
        calls.append(1)
        if len(calls) == crash["at"]:
            raise RuntimeError("simulated crash")
        return real(ws, **kw)

    monkeypatch.setattr(spectra_mod.linalg, "batch_spectra", flaky)
    with pytest.raises(RuntimeError, match="simulated crash"):
        analyze(checkpoint, opts(tmp_path))
    assert len(list((tmp_path / "cache" / "spectra").rglob("*.json"))) == 2
    calls.clear()
    crash["at"] = -1
    resumed = analyze(checkpoint, opts(tmp_path))
    assert len(calls) == 2  # only the two unfinished tensors were computed
    assert resumed == analyze(checkpoint, AnalyzeOptions(use_cache=False))


def test_no_cache_neither_reads_nor_writes(
    tmp_path: Path, checkpoint: Path, counter: list[int]
) -> None:
    analyze(checkpoint, opts(tmp_path))
    analyze(checkpoint, AnalyzeOptions(cache_dir=tmp_path / "cache", use_cache=False))
    assert len(counter) == 8
    analyze(checkpoint, AnalyzeOptions(cache_dir=tmp_path / "other", use_cache=False))
    assert not (tmp_path / "other").exists()


def test_in_memory_modules_are_cached_by_content(tmp_path: Path, counter: list[int]) -> None:
    m = torch.nn.Linear(8, 6)
    analyze(m, opts(tmp_path))
    analyze(m, opts(tmp_path))
    assert len(counter) == 1
