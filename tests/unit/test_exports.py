from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from kappatune.analysis.spectra import AnalyzeOptions, analyze
from kappatune.errors import KappaTuneError
from kappatune.selection.budget import Budget
from kappatune.selection.core import Selection, select
from kappatune.selection.exports import axolotl_regex, render, write_export
from tests.unit._tiny_models import tiny_llama
from tests.unit.test_selection import ROWS

L1 = "model.layers.1."


def selection() -> Selection:
    return select(ROWS, "lowest-kappa", Budget(tensors=4), source="tiny", fingerprint="f00")


def test_manifest_round_trips_and_lists_names(tmp_path: Path) -> None:
    sel = selection()
    write_export(sel, "json", tmp_path / "sel.json")
    data = json.loads((tmp_path / "sel.json").read_text())
    assert data["parameters"] == [
        "model.layers.0.self_attn.v_proj.weight",
        L1 + "self_attn.v_proj.weight",
        L1 + "mlp.experts.down_proj",
    ]
    assert Selection.load(tmp_path / "sel.json") == sel
    assert data["param_count"] == 140 and data["tensor_count"] == 3


def test_axolotl_yaml_anchored_patterns_in_axolotls_syntax() -> None:
    sel = selection()
    text = render(sel, "axolotl")
    data = yaml.safe_load(text)
    assert data == {  # bare dots: Axolotl escapes them itself
        "unfrozen_parameters": [
            "^model.layers.0.self_attn.v_proj.weight$",
            "^model.layers.1.self_attn.v_proj.weight$",
            "^model.layers.1.mlp.experts.down_proj$",
        ]
    }
    assert "experts [0, 1]" in text and text.startswith(
        "# kappatune selection: lowest-kappa, 4 tensors"
    )
    assert axolotl_regex("a.b(c)+d") == r"^a.b\(c\)\+d$"


def _axolotl_freeze() -> Any:
    try:
        from axolotl.utils import freeze
    except ImportError as exc:  # the Makefile installs it; say why when it is missing
        print(f"axolotl not importable ({exc}); `pip install --no-deps axolotl` to run this test")
        pytest.skip(f"axolotl not importable: {exc}")
    return freeze


def test_axolotl_export_unfreezes_exactly_the_selection_in_axolotl() -> None:
    """Axolotl's own freeze_layers_except, fed the exported YAML, trains exactly the selection."""
    freeze = _axolotl_freeze()
    model = tiny_llama(seed=1)
    sel = select(analyze(model, AnalyzeOptions(workers=1)), "lowest-kappa", Budget(tensors=5))
    patterns = yaml.safe_load(render(sel, "axolotl"))["unfrozen_parameters"]
    freeze.freeze_layers_except(model, patterns)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(sel.names) and len(trainable) == 5
    # no pattern reaches a neighbour: layer 1 vs 11, weight vs weight_scale, a prefix
    pattern = freeze.LayerNamePattern(axolotl_regex(L1 + "self_attn.v_proj.weight"))
    assert pattern.match(L1 + "self_attn.v_proj.weight")
    for other in (
        "model.layers.11.self_attn.v_proj.weight",
        "modelXlayers.1.self_attn.v_proj.weight",
        "base.model.layers.1.self_attn.v_proj.weight",
        L1 + "self_attn.v_proj.weight_scale",
    ):
        assert not pattern.match(other)


def test_peft_targets_json() -> None:
    assert json.loads(render(selection(), "peft")) == {
        "target_modules": ["model.layers.0.self_attn.v_proj", L1 + "self_attn.v_proj"],
        "target_parameters": [L1 + "mlp.experts.down_proj"],
    }


def test_unknown_format_writes_nothing(tmp_path: Path) -> None:
    with pytest.raises(
        KappaTuneError, match=r"unknown export format 'csv' \(known: json, axolotl, peft\)"
    ):
        write_export(selection(), "csv", tmp_path / "x.csv")
    assert list(tmp_path.iterdir()) == []
