"""Spectrum's SNR: the score against hand computations, the analysis column, the ``snr`` policy."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch

from kappatune.analysis.metrics import marchenko_pastur_edge, spectrum_snr
from kappatune.analysis.spectra import Analysis, AnalyzeOptions, SpectrumRow, analyze
from kappatune.cli.main import main
from kappatune.errors import KappaTuneError
from kappatune.selection.budget import Budget
from kappatune.selection.core import select
from kappatune.selection.policies import PolicyContext, get_policy
from tests.conftest import known_matrix
from tests.unit.test_selection import row as selection_row

# s = (10, 3, 2, 1) on a 6 x 4 matrix, by hand: quartiles (linear) 1.75 and 4.75, so
# sigma = 3 / 1.349; beta = 4 / 6; edge = sigma (1 + sqrt(2/3)) = 4.0397 -> signal 10,
# noise 3 + 2 + 1 = 6; score = (10 / 6) / 10 = 1/6.
HAND = [10.0, 3.0, 2.0, 1.0]
HAND_EDGE = 3.0 / 1.349 * (1.0 + math.sqrt(4.0 / 6.0))


def test_score_equals_the_hand_computation() -> None:
    assert marchenko_pastur_edge(torch.tensor(HAND).numpy(), 6, 4) == pytest.approx(
        HAND_EDGE, rel=1e-12
    )
    assert spectrum_snr(torch.tensor(HAND).numpy(), 6, 4) == pytest.approx(1 / 6, rel=1e-12)
    # all equal: IQR 0, edge 0, every value is signal, noise defaults to 1 -> 8 / 2
    assert spectrum_snr(torch.tensor([2.0] * 4).numpy(), 4, 4) == 4.0
    # the values at or below the edge are all zero: noise 0 -> inf (as in Spectrum)
    assert spectrum_snr(torch.tensor([5.0, 0.0, 0.0, 0.0]).numpy(), 4, 8) == math.inf


@pytest.mark.parametrize(("s", "rows", "cols"), [([3.0], 1, 7), ([3.0], 7, 1), ([0.0] * 3, 3, 3)])
def test_undefined_noise_edge_is_nan(s: list[float], rows: int, cols: int) -> None:
    assert math.isnan(spectrum_snr(torch.tensor(s).numpy(), rows, cols))


def _model_state() -> dict[str, torch.Tensor]:
    return {
        "model.layers.0.mlp.up_proj.weight": known_matrix(6, 4, HAND, seed=1).float(),
        "model.layers.1.mlp.up_proj.weight": known_matrix(6, 4, [2.0] * 4, seed=2).float(),
        "model.layers.0.self_attn.q_proj.weight": known_matrix(4, 4, [8, 4, 2, 1], seed=3).float(),
    }


def test_analysis_rows_carry_the_score_through_json(tmp_path: Path) -> None:
    a = analyze(_model_state(), AnalyzeOptions(use_cache=False))
    by_name = {r.name: r.snr for r in a.tensors}
    assert by_name["model.layers.0.mlp.up_proj.weight"] == pytest.approx(1 / 6, rel=1e-5)
    assert by_name["model.layers.1.mlp.up_proj.weight"] == pytest.approx(4.0, rel=1e-5)
    # (8, 4, 2, 1): quartiles 1.75 and 5, edge 3.25 / 1.349 * 2 = 4.818 -> (8 / 7) / 8 = 1/7
    assert by_name["model.layers.0.self_attn.q_proj.weight"] == pytest.approx(1 / 7, rel=1e-5)
    a.save(tmp_path / "a.json")
    assert Analysis.load(tmp_path / "a.json").tensors == a.tensors


def test_cached_rows_carry_the_score(tmp_path: Path) -> None:
    opts = AnalyzeOptions(cache_dir=tmp_path)
    first = analyze(_model_state(), opts)
    again = analyze(_model_state(), opts)
    assert [r.snr for r in again.tensors] == [r.snr for r in first.tensors]
    stored = [json.loads(p.read_text()) for p in sorted((tmp_path / "spectra").rglob("*.json"))]
    assert len(stored) == 3 and all("-v3-" in s["key"] for s in stored)
    assert all("snr" in row for s in stored for row in s["rows"])


def test_schema_1_analysis_is_read_without_scores() -> None:
    a = analyze(_model_state(), AnalyzeOptions(use_cache=False))
    old = a.to_json()
    old["schema_version"] = 1
    for t in old["tensors"]:
        del t["snr"]
    back = Analysis.from_json(old)
    assert [r.snr for r in back.tensors] == [None, None, None]
    assert [r.kappa for r in back.tensors] == [r.kappa for r in a.tensors]
    with pytest.raises(KappaTuneError, match=r"has no SNR .* re-run kappatune analyze"):
        select(back, "snr")


def row(name: str, snr: float | None, shape: tuple[int, int] = (8, 8)) -> SpectrumRow:
    """A kappa-2 row of ``shape`` with Spectrum's ``snr``."""
    return dataclasses.replace(selection_row(name, 2.0, shape[0] * shape[1]), shape=shape, snr=snr)


def q(i: int) -> str:
    return f"model.layers.{i}.self_attn.q_proj.weight"


def v(i: int) -> str:
    return f"model.layers.{i}.self_attn.v_proj.weight"


ROWS = (
    row(q(0), 0.1),
    row(v(0), 0.9),
    row(q(1), 0.4),
    row(v(1), 0.2),
    row(q(2), 0.3),
    row(q(3), 0.4),  # ties q(1): name breaks it
)


def test_order_interleaves_types_by_rank_fraction() -> None:
    got = [r.name for r in get_policy("snr")(ROWS, PolicyContext())]
    # q: 1/4 q1, 2/4 q3, 3/4 q2, 4/4 q0; v: 1/2 v0, 2/2 v1 (ties on the fraction: higher SNR)
    assert got == [q(1), v(0), q(3), q(2), v(1), q(0)]


def test_fraction_budget_is_spectrums_top_fraction_per_type() -> None:
    sel = select(ROWS, "snr", Budget(fraction=0.5))
    # Spectrum at 50 %: int(4 * 0.5) = 2 q_proj (q1, q3), int(2 * 0.5) = 1 v_proj (v0)
    assert [e.name for e in sel.entries] == [q(1), v(0), q(3)]


def test_one_by_n_matrix_is_an_error_naming_it() -> None:
    rows = (*ROWS, row("model.layers.0.mlp.gate.weight", math.nan, (1, 8)))
    with pytest.raises(
        KappaTuneError, match=r"noise edge of model.layers.0.mlp.gate.weight \(1 x 8"
    ):
        select(rows, "snr", Budget(tensors=2))
    # left out, the rest selects as before
    assert [e.name for e in select(ROWS, "snr", Budget(tensors=2)).entries] == [q(1), v(0)]


def test_cli_one_by_n_exits_2_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    state = _model_state()
    state["model.layers.0.mlp.gate.weight"] = torch.ones(1, 8)
    analysis = analyze(state, AnalyzeOptions(use_cache=False))
    analysis.save(tmp_path / "a.json")
    assert main(["select", str(tmp_path / "a.json"), "--policy", "snr"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "noise edge of model.layers.0.mlp.gate.weight (1 x 8" in err[0]
    out = tmp_path / "sel.json"
    code = main(
        [
            "select",
            str(tmp_path / "a.json"),
            "--policy",
            "snr",
            "--exclude",
            "gate",
            "-o",
            str(out),
            "--budget-tensors",
            "2",
        ]
    )
    assert code == 0
    names_ = [e["name"] for e in json.loads(out.read_text())["entries"]]
    # up_proj: layer 1 (4.0) at 1/2, then at 1/1 layer 0's up_proj (1/6) before q_proj (1/7)
    assert names_ == ["model.layers.1.mlp.up_proj.weight", "model.layers.0.mlp.up_proj.weight"]


def test_train_with_the_snr_policy_trains_spectrums_choice(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from kappatune.selection.core import Selection
    from tests.unit._tiny_models import save_tiny_model

    model = save_tiny_model(tmp_path / "tiny", seed=0)
    data = tmp_path / "train.txt"
    data.write_text("the quick brown fox jumps over the lazy dog.\n" * 6)
    out = tmp_path / "run"
    argv = ["train", str(model), "--data", str(data), "--output", str(out), "--steps", "1",
            "--batch-size", "2", "--seq-len", "16", "--lr", "1e-2", "--method", "selective",
            "--policy", "snr", "--budget-fraction", "0.5"]  # fmt: skip
    assert main(argv) == 0
    sel = Selection.load(out / "selection.json")
    rows = analyze(load_file(str(model / "model.safetensors")), AnalyzeOptions(use_cache=False))
    expected = select(rows, "snr", Budget(fraction=0.5))
    assert sel.policy == "snr" and sel.names == expected.names
    # 16 candidates (2 x 7 projections, embed_tokens, lm_head): int(16 x 0.5) = 8, the top one of
    # each projection type first
    assert sel.entry_count == 8
