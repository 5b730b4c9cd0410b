"""benchmarks/analyze_scale.py end to end on a tiny shape: repeats, and one route measured again."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
import scale_checkpoint as sc  # noqa: E402

TINY = sc.Arch("tiny", "qwen2", 2, 64, 160, 4, 2, 16, 300, False)


def _run(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, *extra: str) -> dict:
    import analyze_scale

    shape = tmp_path / "tiny.json"
    shape.write_text(json.dumps(TINY.__dict__))
    argv = ["analyze_scale.py", "--sizes", str(shape), "--workdir", str(tmp_path / "work")]
    argv += ["--results", str(tmp_path / "res"), "--peft-for", "none", *extra]
    monkeypatch.setattr(sys, "argv", argv)
    assert analyze_scale.main() == 0
    return json.loads((tmp_path / "res" / "tiny.json").read_text())


def test_repeats_keep_the_fastest_run_and_only_replaces_one_route(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = _run(monkeypatch, tmp_path, "--repeats", "2")
    assert {"kappatune", "kappatune_kappa_only"} <= set(first) and "peft" not in first
    for key in ("kappatune", "kappatune_kappa_only"):
        r = first[key]
        assert len(r["seconds_all"]) == 2 and r["seconds"] == min(r["seconds_all"])
        assert r["matrices"] == 16 and r["max_rel_err_vs_designed"] < 1e-2
        assert "--repeats 2" in r["measured"]["command"]
    again = _run(monkeypatch, tmp_path, "--only", "full")
    assert again["kappatune_kappa_only"] == first["kappatune_kappa_only"]  # kept as it was
    assert "--only full" in again["kappatune"]["measured"]["command"]
    assert len(again["kappatune"]["seconds_all"]) == 1
    report = (tmp_path / "analyze_scale.md").read_text()
    assert "--only full" in report and "best of" in report  # both commands, the repeats shown
    assert list((tmp_path / "work").iterdir()) == []  # the checkpoint is deleted


def test_repeats_below_one_is_one_line_exit_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import analyze_scale

    monkeypatch.setattr(sys, "argv", ["analyze_scale.py", "--repeats", "0"])
    assert analyze_scale.main() == 2
    assert capsys.readouterr().err.strip() == "error: --repeats must be at least 1, got 0"
