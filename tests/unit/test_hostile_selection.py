"""A selection made for another model is refused before anything is written (issue 27, 1)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

from kappatune.cli.main import main
from kappatune.selection.core import Selection
from tests.unit._tiny_models import char_tokenizer, save_tiny_model

TEXT = "the quick brown fox jumps over the lazy dog. pack my box with five dozen liquor jugs.\n" * 6


def _train(model: Path, data: Path, out: Path, selection: Path, *extra: str) -> list[str]:
    return ["train", str(model), "--data", str(data), "--output", str(out), "--steps", "2",
            "--batch-size", "2", "--seq-len", "16", "--lr", "1e-2", "--method", "selective",
            "--selection", str(selection), *extra]  # fmt: skip


@pytest.fixture
def made(tmp_path: Path) -> tuple[Path, Path, Path]:
    model = save_tiny_model(tmp_path / "tiny0", seed=0)
    data = tmp_path / "train.txt"
    data.write_text(TEXT)
    sel = tmp_path / "sel.json"
    assert main(["select", str(model), "--budget-tensors", "2", "-o", str(sel)]) == 0
    return model, data, sel


def test_a_selection_for_other_weights_is_refused(
    made: tuple[Path, Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model, data, sel = made
    other = save_tiny_model(tmp_path / "tiny1", seed=1)  # same architecture, other weights
    capsys.readouterr()
    out = tmp_path / "run"
    assert main(_train(other, data, out, sel)) == 2
    err = capsys.readouterr().err.strip()
    assert "--selection was made for other weights:" in err and "Traceback" not in err
    assert "--selection-other-weights" in err and len(err.splitlines()) == 1
    assert not out.exists()  # nothing written

    # on purpose: trained, and exactly the selected tensors changed
    assert main(_train(other, data, out, sel, "--selection-other-weights")) == 0
    names = set(Selection.load(sel).names)
    before = load_file(str(other / "model.safetensors"))
    after = load_file(str(out / "model" / "model.safetensors"))
    changed = {n for n in before if not before[n].equal(after[n])}
    assert changed == names

    # the model it was made for trains without a word
    assert main(_train(model, data, tmp_path / "own", sel)) == 0


def test_a_selection_for_other_shapes_is_refused(
    made: tuple[Path, Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    _, data, sel = made
    config = LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                         max_position_embeddings=256, bos_token_id=2, eos_token_id=1,
                         pad_token_id=0)  # fmt: skip
    other = tmp_path / "wider"
    LlamaForCausalLM(config).save_pretrained(other)
    char_tokenizer().save_pretrained(other)
    # make the selection name an MLP matrix, whose shape differs in this model
    record = json.loads(sel.read_text())
    entry = record["entries"][0]
    entry["name"], entry["shape"] = "model.layers.0.mlp.up_proj.weight", [64, 32]
    sel.write_text(json.dumps(record))
    capsys.readouterr()
    out = tmp_path / "run"
    assert main(_train(other, data, out, sel, "--selection-other-weights")) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith(
        "--selection was made for another model: model.layers.0.mlp.up_proj.weight is [64, 32]"
        " there, [48, 32] here; select again for this model"
    )
    assert not out.exists()
