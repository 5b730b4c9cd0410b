"""The analysis plot's data: titles that fit the model, a column for matrices without a layer."""

from __future__ import annotations

import math

import pytest

from kappatune.analysis.report import NO_LAYER, kappa_heatmap, plot_png
from kappatune.analysis.spectra import Analysis
from tests.unit.test_selection import ROWS, row

L0, L1 = "model.layers.0.", "model.layers.1."
DENSE = (
    row("model.embed_tokens.weight", 100, 500),
    row(L0 + "self_attn.v_proj.weight", 10, 40),
    row(L1 + "self_attn.v_proj.weight", 1000, 40),
    row(L1 + "mlp.up_proj.weight", 10, 200),
    row(L1 + "mlp.down_proj.weight", math.inf, 200),  # singular: not on the heat map
)


def test_dense_heatmap_has_a_no_layer_column_and_no_expert_note() -> None:
    heat = kappa_heatmap(Analysis("dense", "fp", DENSE))
    assert heat.title == "log10 kappa by layer and module type"
    assert heat.columns == ("0", "1", NO_LAYER)
    # module types by median kappa: up_proj (10), embed_tokens (100), v_proj (median of 10, 1000)
    assert heat.rows == ("up_proj", "embed_tokens", "v_proj")
    nan = pytest.approx(math.nan, nan_ok=True)
    assert heat.values == (
        (nan, pytest.approx(1.0), nan),
        (nan, nan, pytest.approx(2.0)),
        (pytest.approx(1.0), pytest.approx(3.0), nan),
    )


def test_expert_heatmap_says_experts_are_averaged() -> None:
    heat = kappa_heatmap(Analysis("moe", "fp", ROWS))
    assert heat.title == "log10 kappa by layer and module type (experts averaged)"
    down = heat.values[heat.rows.index("down_proj")]
    assert down[heat.columns.index("1")] == pytest.approx(math.log10(7))  # experts 0 and 1, both 7
    assert NO_LAYER in heat.columns  # the embedding


def test_plot_renders_png() -> None:
    assert plot_png(Analysis("dense", "fp", DENSE)).startswith(b"\x89PNG")
