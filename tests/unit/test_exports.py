from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from kappatune.errors import KappaTuneError
from kappatune.exports import axolotl_regex, render, write_export
from kappatune.selection import Budget, Selection, select
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


def test_axolotl_yaml_anchored_escaped_regexes() -> None:
    sel = selection()
    text = render(sel, "axolotl")
    data = yaml.safe_load(text)
    assert data == {
        "unfrozen_parameters": [
            r"^model\.layers\.0\.self_attn\.v_proj\.weight$",
            r"^model\.layers\.1\.self_attn\.v_proj\.weight$",
            r"^model\.layers\.1\.mlp\.experts\.down_proj$",
        ]
    }
    assert "experts [0, 1]" in text and text.startswith(
        "# kappatune selection: lowest-kappa, 4 tensors"
    )
    pattern = axolotl_regex(L1 + "self_attn.v_proj.weight")
    assert re.search(pattern, L1 + "self_attn.v_proj.weight")
    for other in (
        "model.layers.11.self_attn.v_proj.weight",
        "modelXlayers.1.self_attn.v_proj.weight",
        "base.model.layers.1.self_attn.v_proj.weight",
        L1 + "self_attn.v_proj.weight_scale",
    ):
        assert not re.search(pattern, other)


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
