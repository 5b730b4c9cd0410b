"""`kappatune demo` (and `make demo`): the whole path on a tiny causal LM built in code."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from kappatune.bench import records
from kappatune.cli.main import main
from kappatune.demo import DemoSettings, demo_data, measure
from kappatune.errors import KappaTuneError
from kappatune.training.models import load_causal_lm
from tests.unit._tiny_models import save_tiny_model

ROOT = Path(__file__).resolve().parents[2]
L = "model.layers."


def test_demo_analyzes_selects_trains_and_measures(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # fewer training modules keep the character tokenizer fast; the path is the same
    monkeypatch.setattr(records, "STDLIB_TRAIN", ("colorsys", "keyword", "bisect"))
    model_dir = save_tiny_model(tmp_path / "tiny", seed=0)
    out = tmp_path / "demo.json"
    argv = ["demo", str(model_dir), "--steps", "4", "--lr", "1e-2", "--budget-params", "20%"]
    assert main([*argv, "--eval-sequences", "4", "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    result = json.loads(out.read_text())
    # the lowest-kappa prefix of the 14 linear layers that fits 20% of the model
    assert [e["name"] for e in result["selection"]["entries"]] == [
        L + "1.self_attn.v_proj.weight",
        L + "0.self_attn.k_proj.weight",
        L + "1.self_attn.k_proj.weight",
        L + "1.mlp.down_proj.weight",
    ]
    assert result["matrices"] == 14 and result["trained_params"] == 3584
    assert result["steps"] == 4 and result["frozen_changed"] == []
    # "before" is the untouched model's perplexity on the same sequences
    model, tok = load_causal_lm(model_dir)
    settings = DemoSettings(model=str(model_dir), eval_sequences=4)
    base = measure(model, demo_data(tok, settings), settings.batch_size)
    assert result["before"] == pytest.approx({"task": base.task, "control": base.control}, rel=1e-6)
    assert result["after"]["task"] < result["before"]["task"]  # it learned something of the task
    sentence = result["sentence"]
    assert sentence.startswith(
        "Training only the 4 lowest-kappa of 14 matrices (13.4% of the weights) for 4 steps"
        " on Python source changed the perplexity on unseen Python code from"
        f" {result['before']['task']:.2f} to {result['after']['task']:.2f}"
    )
    assert " ".join(sentence.split()) in " ".join(printed.split())  # the last words printed
    assert "every frozen tensor is bit-identical" in printed and "step 4/4" in printed


def test_demo_settings_are_checked_before_loading() -> None:
    with pytest.raises(KappaTuneError, match="--steps must be at least 1, got 0"):
        DemoSettings(steps=0)
    with pytest.raises(KappaTuneError, match="cannot read parameter budget 'lots'"):
        DemoSettings(budget="lots")


def test_make_demo_runs_the_demo_command() -> None:
    makefile = (ROOT / "Makefile").read_text()
    recipe = re.search(r"^demo:.*\n((?:\t.*\n)+)", makefile, re.M)
    assert recipe is not None and "kappatune demo" in recipe.group(1)
