"""Where kappa stands among the spectral scores: kappa, Spectrum's SNR and Fisher, pairwise."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from scipy import stats

from kappatune.analysis.spectra import AnalyzeOptions, analyze
from kappatune.cli.main import main
from kappatune.errors import KappaTuneError
from kappatune.probe.correlation import pairwise_correlations
from tests.unit._tiny_models import save_tiny_model

TEXT = (
    "The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs.\n"
    "How vexingly quick daft zebras jump! Sphinx of black quartz, judge my vow.\n"
) * 3


def test_pairwise_correlations_every_pair_all_then_per_group() -> None:
    groups = ["b", "a", "a", "b", "a", "b"]
    scores = {
        "x": [1.0, 2.0, 3.0, 4.0, 5.0, 6.0],
        "y": [10.0, 20.0, 30.0, 40.0, 50.0, 60.0],
        "z": [6.0, 5.0, 4.0, 3.0, 2.0, math.nan],
    }
    got = pairwise_correlations(groups, scores, methods=("spearman",), bootstrap=0)
    table = {(c["x"], c["y"], c["group"]): (c["n"], c["estimate"]) for c in got}
    assert list(table) == [
        (a, b, g) for a, b in (("x", "y"), ("x", "z"), ("y", "z")) for g in ("all", "a", "b")
    ]
    assert table[("x", "y", "all")] == (6, pytest.approx(1.0))
    assert table[("x", "z", "all")] == (5, pytest.approx(-1.0))  # the nan pair is dropped
    assert table[("y", "z", "b")][0] == 2 and table[("y", "z", "b")][1] is None  # < 3 pairs


def test_pairwise_correlations_unknown_score() -> None:
    with pytest.raises(KappaTuneError, match="no score named w"):
        pairwise_correlations(["a"] * 3, {"x": [1, 2, 3]}, [("x", "w")])


def test_probe_reports_kappa_snr_fisher_correlations(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = save_tiny_model(tmp_path / "tiny")
    data = tmp_path / "d.txt"
    data.write_text(TEXT)
    out = tmp_path / "p.json"
    args = ["probe", str(model), "--data", str(data), "--tokens", "200", "--seq-len", "32",
            "--bootstrap", "20", "--output", str(out)]  # fmt: skip
    assert main(args) == 0
    assert "is spectral selection one signal?" in capsys.readouterr().out
    report = json.loads(out.read_text())
    spectral = report["spectral_correlations"]
    pairs = list(dict.fromkeys((c["x"], c["y"]) for c in spectral))
    assert pairs == [
        ("kappa", "snr"),
        ("kappa", "fisher-true"),
        ("kappa", "fisher-empirical"),
        ("snr", "fisher-true"),
        ("snr", "fisher-empirical"),
    ]
    types = sorted({r["module_type"] for r in report["rows"]})
    groups = list(dict.fromkeys(c["group"] for c in spectral))
    assert groups == ["all", *types]
    # the kappa ~ SNR estimate over all matrices, recomputed from the analysis itself
    rows = analyze(model, AnalyzeOptions(use_cache=False)).tensors
    rho = stats.spearmanr([r.kappa for r in rows], [r.snr for r in rows]).statistic
    mine = next(
        c for c in spectral
        if (c["x"], c["y"], c["group"], c["method"]) == ("kappa", "snr", "all", "spearman")
    )  # fmt: skip
    assert mine["n"] == len(rows) and mine["estimate"] == pytest.approx(rho, abs=1e-12)
