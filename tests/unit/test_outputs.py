"""Output locations are checked before the work; all outputs of a command or none; file modes."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from safetensors.torch import save_file

from kappatune.cli.main import main
from kappatune.errors import KappaTuneError
from kappatune.jsonio import atomic_write_json, atomic_write_text
from kappatune.outputs import check_dir, check_file, write_all
from tests.conftest import geometric, known_matrix


@pytest.fixture
def umask() -> Iterator[None]:
    old = os.umask(0o022)
    yield
    os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize(("mask", "mode"), [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_atomic_writes_follow_the_umask(tmp_path: Path, umask: None, mask: int, mode: int) -> None:
    os.umask(mask)
    atomic_write_json(tmp_path / "a.json", {"a": 1})
    write_all([(tmp_path / "b.csv", b"x\n")])
    assert (_mode(tmp_path / "a.json"), _mode(tmp_path / "b.csv")) == (mode, mode)


def test_replacing_a_file_keeps_its_mode(tmp_path: Path, umask: None) -> None:
    path = tmp_path / "a.json"
    path.write_text("{}")
    path.chmod(0o640)
    atomic_write_text(path, "[]")
    write_all([(path, b"[1]")])
    assert path.read_text() == "[1]" and _mode(path) == 0o640


def test_write_all_writes_nothing_when_one_output_fails(tmp_path: Path) -> None:
    (tmp_path / "blocker").write_text("a file, not a folder")
    good = tmp_path / "good.json"
    with pytest.raises(KappaTuneError, match=r"^cannot write .*blocker"):
        write_all([(good, b"{}"), (tmp_path / "blocker" / "a.csv", b"x")])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blocker"]


def test_check_file_and_dir(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    (tmp_path / "d").mkdir()
    check_file(tmp_path / "new" / "deeper" / "a.json", "-o", (".json",))
    check_dir(tmp_path / "new" / "run", "-o")
    cases = [
        (lambda: check_file(tmp_path / "d", "-o"), r"-o .*d is a directory; give a file name"),
        (lambda: check_file(tmp_path / "a.txt", "--csv", (".csv",)), r"should end in \.csv"),
        (
            lambda: check_file(tmp_path / "f" / "a.json", "-o"),
            r"-o .*f/a.json: .*f is not a directory",
        ),
        (lambda: check_dir(tmp_path / "f", "-o"), r"-o .*f exists and is not a directory"),
        (lambda: check_dir(tmp_path / "f" / "run", "-o"), r"f is not a directory"),
    ]
    for call, message in cases:
        with pytest.raises(KappaTuneError, match=message):
            call()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d", "f"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_folder_is_refused_up_front(tmp_path: Path) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        with pytest.raises(KappaTuneError, match=r"cannot write into .*ro \(permission denied\)"):
            check_file(ro / "a.csv", "--csv", (".csv",))
        with pytest.raises(KappaTuneError, match=r"cannot write into .*ro \(permission denied\)"):
            check_dir(ro / "run", "--output")
    finally:
        ro.chmod(0o755)


@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    ts = {"model.layers.0.self_attn.q_proj.weight": known_matrix(16, 8, geometric(12.0, 8)).float()}
    save_file(ts, tmp_path / "model.safetensors")
    return tmp_path / "model.safetensors"


def _fail_if_called(*args: object, **kwargs: object) -> None:
    raise AssertionError("the work started before the outputs were checked")


@pytest.mark.parametrize("command", ["analyze", "select", "train"])
def test_unwritable_output_fails_before_the_work(
    tmp_path: Path,
    checkpoint: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    command: str,
) -> None:
    import kappatune.analysis.spectra

    monkeypatch.setattr(kappatune.analysis.spectra, "analyze", _fail_if_called)
    (tmp_path / "blocker").write_text("a file")
    ok, bad = tmp_path / "ok.json", tmp_path / "blocker" / "x"
    argv = {
        "analyze": ["analyze", checkpoint, "-o", ok, "--csv", f"{bad}.csv"],
        "select": ["select", checkpoint, "--budget-tensors", "1", "-o", f"{bad}.json"],
        "train": [
            "train",
            checkpoint,
            "--data",
            checkpoint,
            "--method",
            "full",
            "--steps",
            "1",
            "-o",
            bad,
        ],
    }[command]
    before = sorted(p.name for p in tmp_path.iterdir())
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kappatune: error: "), err
    assert lines[0].endswith("blocker is not a directory"), lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_analyze_writes_no_output_when_the_last_one_fails(
    tmp_path: Path,
    checkpoint: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The JSON and CSV are staged, the plot cannot be written: none of the three appears."""
    import kappatune.outputs

    real = kappatune.outputs.stage_file

    def stage(path: Path, data: bytes) -> str:
        if path.suffix == ".png":
            raise PermissionError(13, "Permission denied", str(path))
        return real(path, data)

    monkeypatch.setattr(kappatune.outputs, "stage_file", stage)
    out = tmp_path / "out"
    out.mkdir()
    argv = [
        "analyze",
        checkpoint,
        "-o",
        out / "a.json",
        "--csv",
        out / "a.csv",
        "--plot",
        out / "a.png",
    ]
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.strip() == f"kappatune: error: cannot write {out / 'a.png'}: Permission denied"
    assert list(out.iterdir()) == []


def test_folder_without_write_access_is_refused(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    checkpoint: Path,
) -> None:
    """The access check as a non-root user sees a read-only folder (root passes every check)."""
    import kappatune.outputs

    ro = tmp_path / "ro"
    ro.mkdir()
    real = os.access
    monkeypatch.setattr(kappatune.outputs.os, "access", lambda p, m: Path(p) != ro and real(p, m))
    code = main(
        ["analyze", str(checkpoint), "-o", str(tmp_path / "ok.json"), "--csv", str(ro / "a.csv")]
    )
    err = capsys.readouterr().err
    assert code == 2
    assert (
        err.strip()
        == f"kappatune: error: --csv {ro / 'a.csv'}: cannot write into {ro} (permission denied)"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors", "ro"]
