"""The SFTTrainer example runs end to end on a tiny causal LM and trains exactly the selection."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from kappatune.analysis.spectra import analyze
from kappatune.selection.budget import Budget
from kappatune.selection.core import select
from tests.unit._tiny_models import save_tiny_model

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def test_trl_sft_example_trains_exactly_the_selection(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # about 3 s in the suite (10 s alone, mostly importing TRL): the one run of SFTTrainer
    pytest.importorskip("trl")
    spec = importlib.util.spec_from_file_location("trl_sft", EXAMPLES / "trl_sft_callback.py")
    assert spec is not None and spec.loader is not None
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    model_dir = save_tiny_model(tmp_path / "tiny")
    trained = example.main([str(model_dir), "--steps", "1"])
    expected = select(analyze(model_dir), "lowest-kappa", Budget(fraction=0.2))
    assert trained == [n for n in trained if n in expected.names]  # model order
    assert sorted(trained) == sorted(expected.names) and len(trained) == 3
    assert "trained 3 tensors (8,704 parameters) with SFTTrainer" in capsys.readouterr().out
