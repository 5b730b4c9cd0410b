import json
import logging
import os
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from kappatune import AnalyzeOptions, analyze
from kappatune.analysis import linalg
from kappatune.analysis import spectra as spectra_mod
from kappatune.analysis.cache import rows_problem
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
    with caplog.at_level(logging.WARNING, logger="kappatune.analysis.cache"):
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


# --------------------------------------------------------------------------- hostile entries


def _entry_of(tmp_path: Path, checkpoint: Path, name: str) -> Path:
    """The cache entry file holding the rows of tensor ``name`` (found through the index)."""
    from kappatune.analysis.cache import SpectrumCache

    cache = SpectrumCache(tmp_path / "cache")
    digest = cache.file_digests(checkpoint)[name]
    return cache._row_path(SpectrumCache.key(digest, "matrix"))


ROW_MUTATIONS = {
    "no rows": lambda row: [],
    "a row of junk": lambda row: [{"foo": 1}],
    "a null row": lambda row: [None],
    "two rows for one matrix": lambda row: [row, row],
    "an expert index on a plain matrix": lambda row: [{**row, "expert": 0}],
    "expert true": lambda row: [{**row, "expert": True}],
    "transposed shape": lambda row: [{**row, "shape": row["shape"][::-1]}],
    "wrong numel": lambda row: [{**row, "numel": row["numel"] + 1}],
    "kappa not a number": lambda row: [{**row, "kappa": "abc"}],
    "kappa edited": lambda row: [{**row, "kappa": 3.167}],
    "kappa a bool": lambda row: [{**row, "kappa": True}],
    "sigma_min above sigma_max": lambda row: [
        {**row, "sigma_min": row["sigma_max"] * 2, "kappa": 0.5}
    ],
    "negative sigma": lambda row: [{**row, "sigma_min": -1.0}],
    "missing method": lambda row: [{k: v for k, v in row.items() if k != "method"}],
    "shape of strings": lambda row: [{**row, "shape": ["30", "10"]}],
}


@pytest.mark.parametrize("what", sorted(ROW_MUTATIONS))
def test_entry_that_does_not_fit_the_tensor_is_recomputed_with_a_warning(
    what: str,
    tmp_path: Path,
    checkpoint: Path,
    counter: list[int],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The issue's cases: rows [] made a matrix vanish; rows [{"foo": 1}] was an internal error."""
    a = analyze(checkpoint, opts(tmp_path))
    entry = _entry_of(tmp_path, checkpoint, "layers.1.w.weight")
    payload = json.loads(entry.read_text())
    payload["rows"] = ROW_MUTATIONS[what](payload["rows"][0])
    entry.write_text(json.dumps(payload))
    with caplog.at_level(logging.WARNING, logger="kappatune.analysis.cache"):
        b = analyze(checkpoint, opts(tmp_path))
    assert b == a and len(b.tensors) == 4
    assert len(counter) == 5  # only the bad entry was recomputed
    warnings = [r.message for r in caplog.records]
    assert len(warnings) == 1 and f"ignoring corrupt cache entry {entry}" in warnings[0]
    assert rows_problem(json.loads(entry.read_text())["rows"], [(None, (30, 10))]) is None


@pytest.mark.parametrize(
    "text", ["[" * 100_000, '{"format": 1, "key": 5, "rows": {}}', "\udcff", '"rows"']
)
def test_unreadable_entry_text_is_recomputed(
    text: str, tmp_path: Path, checkpoint: Path, counter: list[int]
) -> None:
    a = analyze(checkpoint, opts(tmp_path))
    entry = _entry_of(tmp_path, checkpoint, "layers.1.w.weight")
    entry.write_text(text, errors="surrogateescape")
    assert analyze(checkpoint, opts(tmp_path)) == a
    assert len(counter) == 5


def test_experts_entry_with_a_missing_expert_is_recomputed(
    tmp_path: Path, counter: list[int], caplog: pytest.LogCaptureFixture
) -> None:
    experts = torch.stack(
        [known_matrix(12, 6, geometric(2.0 + e, 6), seed=e).float() for e in range(3)]
    )
    path = tmp_path / "moe.safetensors"
    save_file({"model.layers.0.mlp.experts.down_proj": experts}, path)
    a = analyze(path, opts(tmp_path))
    assert [r.expert for r in a.tensors] == [0, 1, 2]
    (entry,) = (tmp_path / "cache" / "spectra").rglob("*.json")
    payload = json.loads(entry.read_text())
    payload["rows"] = payload["rows"][:2]
    entry.write_text(json.dumps(payload))
    with caplog.at_level(logging.WARNING, logger="kappatune.analysis.cache"):
        b = analyze(path, opts(tmp_path))
    assert b == a and len(counter) == 2
    assert "2 rows for 3 matrices" in caplog.records[0].message


def _index_file(tmp_path: Path) -> Path:
    (index,) = (tmp_path / "cache" / "files").glob("*.json")
    return index


def _swap_digests(tmp_path: Path, seal: bool) -> Path:
    """The stat index with the digests of layers 0 and 3 swapped, re-sealed by hand if ``seal``."""
    from kappatune.analysis.cache import SpectrumCache

    index = _index_file(tmp_path)
    record = json.loads(index.read_text())
    d = record["digests"]
    d["layers.0.w.weight"], d["layers.3.w.weight"] = d["layers.3.w.weight"], d["layers.0.w.weight"]
    if seal:
        record["seal"] = SpectrumCache._seal(record["path"], record["stat"], d)
    index.write_text(json.dumps(record))
    return index


def test_swapped_digests_in_the_stat_index_do_not_swap_kappas(
    tmp_path: Path, checkpoint: Path, caplog: pytest.LogCaptureFixture
) -> None:
    a = analyze(checkpoint, opts(tmp_path))
    index = _swap_digests(tmp_path, seal=False)
    with caplog.at_level(logging.WARNING, logger="kappatune.analysis.cache"):
        b = analyze(checkpoint, opts(tmp_path))
    assert [r.kappa for r in b.tensors] == [r.kappa for r in a.tensors]
    assert b == a
    assert [r.message for r in caplog.records] == [
        f"ignoring cache index {index} for {checkpoint}: it fails its checksum"
    ]


def _rewrite_in_place(path: Path, name: str, matrix: torch.Tensor) -> None:
    """Overwrite one tensor's bytes in place and restore the file's size and mtime."""
    from kappatune.analysis.sources import open_source

    before = path.stat()
    (entry,) = [e for e in open_source(path).entries() if e.name == name]
    _, offset, nbytes = entry.locator
    raw = matrix.contiguous().view(torch.uint8).numpy().tobytes()
    assert len(raw) == nbytes
    with path.open("r+b") as fh:
        fh.seek(offset)
        fh.write(raw)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = path.stat()
    assert (after.st_size, after.st_mtime_ns, after.st_ino) == (
        before.st_size,
        before.st_mtime_ns,
        before.st_ino,
    )


def test_in_place_rewrite_with_restored_mtime_is_recomputed(
    tmp_path: Path, checkpoint: Path, counter: list[int]
) -> None:
    """The issue's case: same size, same inode, mtime put back; the ctime still moves."""
    a = analyze(checkpoint, opts(tmp_path))
    assert a.row("layers.2.w.weight").kappa == pytest.approx(4.0, rel=1e-6)
    time.sleep(0.02)  # past the file system's timestamp granularity
    _rewrite_in_place(
        checkpoint, "layers.2.w.weight", known_matrix(30, 10, geometric(2612.6, 10), seed=5).float()
    )
    b = analyze(checkpoint, opts(tmp_path))
    assert b.row("layers.2.w.weight").kappa == pytest.approx(2612.6, rel=1e-4)
    assert len(counter) == 5


def test_verify_cache_hashes_every_tensor_even_under_a_forged_index(
    tmp_path: Path, checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A swap re-sealed by hand passes the checksum; --verify-cache does not look at the index."""
    a = analyze(checkpoint, opts(tmp_path))
    _swap_digests(tmp_path, seal=True)
    reads: list[str] = []
    from kappatune.analysis.safetensors_source import SafetensorsSource

    real_read = SafetensorsSource.read

    def counting_read(self, entry):
        reads.append(entry.name)
        return real_read(self, entry)

    monkeypatch.setattr(SafetensorsSource, "read", counting_read)
    b = analyze(checkpoint, opts(tmp_path, verify_cache=True))
    assert b == a
    assert sorted(reads) == [f"layers.{i}.w.weight" for i in range(4)]
    reads.clear()
    analyze(checkpoint, opts(tmp_path))  # the default trusts the (now rewritten) index
    assert reads == []


def test_verify_cache_flag_reaches_the_options(
    tmp_path: Path, checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from kappatune.analysis import spectra
    from kappatune.cli.main import main

    seen: list[AnalyzeOptions] = []
    real = spectra.analyze

    def spy(source, options=None, progress=None):
        seen.append(options)
        return real(source, options, progress)

    monkeypatch.setattr(spectra, "analyze", spy)
    argv = ["analyze", str(checkpoint), "--cache-dir", str(tmp_path / "c"), "--top", "0"]
    assert main([*argv, "--verify-cache"]) == 0 and main(argv) == 0
    assert [o.verify_cache for o in seen] == [True, False]


def test_file_changed_during_the_analysis_is_not_indexed(
    tmp_path: Path, checkpoint: Path, monkeypatch: pytest.MonkeyPatch, caplog
) -> None:
    """The stat recorded is the one taken before any read; a later change voids the record."""
    real = spectra_mod.compute

    def compute_then_touch(the_plan, options, only=None, progress=None):
        out = real(the_plan, options, only, progress)
        os.utime(checkpoint, ns=(0, 0))
        return out

    monkeypatch.setattr(spectra_mod, "compute", compute_then_touch)
    with caplog.at_level(logging.WARNING, logger="kappatune.analysis.cache"):
        analyze(checkpoint, opts(tmp_path))
    assert not list((tmp_path / "cache" / "files").glob("*.json"))
    assert f"{checkpoint} changed during the analysis" in caplog.records[0].message
