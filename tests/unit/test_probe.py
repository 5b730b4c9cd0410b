"""The probe as a library: ``run_probe`` on a tiny saved model, without argparse."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from kappatune.errors import KappaTuneError
from kappatune.probe.run import ProbeSettings, run_probe
from tests.unit._tiny_models import save_tiny_model

TEXT = (
    "The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs.\n"
    "How vexingly quick daft zebras jump! Sphinx of black quartz, judge my vow.\n"
) * 3


def test_run_probe_returns_the_report_and_saves_it(tmp_path: Path) -> None:
    model = save_tiny_model(tmp_path / "model")
    data = tmp_path / "data.txt"
    data.write_text(TEXT, encoding="utf-8")
    settings = ProbeSettings(kinds=("empirical",), tokens=100, seq_len=32, bootstrap=20)
    stages: set[str] = set()

    report = run_probe(str(model), [data], settings, progress=lambda s, d, t: stages.add(s))

    assert stages == {"kappa", "fisher"}
    assert len(report.rows) == 16
    assert report.rows[0].name == "model.embed_tokens.weight"
    assert set(report.results) == {"empirical"}
    assert report.sequences == 4  # 31 predicted tokens per sequence, 100 tokens in all
    assert report.conclusion().startswith("Conclusion: ")
    report.save_json(tmp_path / "p.json")
    report.save_csv(tmp_path / "p.csv")
    report.plot(tmp_path / "p.png")
    saved = json.loads((tmp_path / "p.json").read_text())
    assert saved == json.loads(json.dumps(report.to_json()))
    assert saved["settings"]["kinds"] == ["empirical"]
    assert set(saved) >= {"rows", "correlations", "spectral_correlations", "timings_s"}
    with (tmp_path / "p.csv").open() as fh:
        table = list(csv.DictReader(fh))
    assert [r["name"] for r in table] == [r.name for r in report.rows]
    # Spectrum's SNR of each matrix, as the analysis computed it, in the CSV and the JSON
    snr = {r.name: r.snr for r in report.analysis.tensors}
    assert all(snr[r.name] is not None for r in report.rows)
    assert [float(r["snr"]) for r in table] == [snr[r.name] for r in report.rows]
    assert [r["snr"] for r in saved["rows"]] == [snr[r.name] for r in report.rows]
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_run_probe_refuses_a_missing_data_file_before_loading(tmp_path: Path) -> None:
    with pytest.raises(KappaTuneError, match=r"^no such data file: "):
        run_probe("no-such-model", [tmp_path / "missing.txt"])


def test_probe_settings_defaults_are_the_cli_defaults() -> None:
    assert ProbeSettings().to_json() == {
        "kinds": ["true", "empirical"], "tokens": 2048, "seq_len": 128, "lambda": 1e-8,
        "samples": 1, "seed": 0, "bootstrap": 1000, "confidence": 0.95,
    }  # fmt: skip
