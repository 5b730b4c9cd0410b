"""Training memory predicted from the config on the meta device (train --dry-run)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kappatune.analysis.spectra import AnalyzeOptions, analyze
from kappatune.cli.main import main
from kappatune.selection.budget import Budget
from kappatune.selection.core import select
from kappatune.training import memory
from tests.unit._tiny_models import VOCAB_SIZE, save_tiny_model, tiny_llama


def _config() -> object:
    return tiny_llama().config


def test_full_method_counts_every_parameter() -> None:
    n = sum(p.numel() for p in tiny_llama().parameters())
    e = memory.estimate(lambda: memory.meta_model(_config()), "full", 2, 16)
    assert (e.params, e.trainable) == (n, n)
    assert (e.weights, e.gradients, e.optimizer, e.step_transient) == (4 * n, 4 * n, 8 * n, 4 * n)
    assert e.backward_transient == 3 * 2 * 16 * VOCAB_SIZE * 4
    assert e.total == e.weights + e.peak_above_weights
    assert e.peak_above_weights == 12 * n + max(e.activations + e.backward_transient, 4 * n)


def test_meta_activations_bound_those_of_the_real_model() -> None:
    """Meta tensors share no storage pointers, so aliases that are not autograd views count
    twice: the meta figure is an upper bound, measured 14 % above on this model."""

    def real_saved(model: torch.nn.Module) -> int:
        params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        seen: dict[int, int] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            ptr = t.untyped_storage().data_ptr()
            if ptr not in params:
                seen[ptr] = t.untyped_storage().nbytes()
            return t

        ids = torch.zeros((2, 16), dtype=torch.long)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(input_ids=ids, labels=ids)
        return sum(seen.values())

    real = tiny_llama()
    real.train()
    meta = memory.meta_model(_config())
    ratio = memory.saved_activation_bytes(meta, 2, 16) / real_saved(real)
    assert 1.0 <= ratio <= 1.2


def test_selective_saves_only_what_its_gradients_need() -> None:
    full = memory.estimate(lambda: memory.meta_model(_config()), "full", 2, 16)
    model = tiny_llama()
    rows = analyze(model, AnalyzeOptions(use_cache=False, include=r"layers\.1\.mlp\.down"))
    sel = select(rows, "lowest-kappa", Budget(tensors=1))
    assert [e.name for e in sel.entries] == ["model.layers.1.mlp.down_proj.weight"]
    e = memory.estimate(lambda: memory.meta_model(_config()), "selective", 2, 16, sel)
    assert e.trainable == 32 * 64
    assert (e.gradients, e.optimizer) == (4 * 32 * 64, 8 * 32 * 64)
    assert 0 < e.activations < full.activations


def test_dry_run_prints_every_method_and_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = save_tiny_model(tmp_path / "tiny")
    data = tmp_path / "t.txt"
    data.write_text("hello world\n" * 4)
    out = tmp_path / "run"
    argv = ["train", model, "--data", data, "-o", out, "--steps", 1, "--method", "lora",
            "--lora-r", 2, "--budget-tensors", 2, "--batch-size", 2, "--seq-len", 16,
            "--dry-run"]  # fmt: skip
    code = main([str(a) for a in argv])
    text = capsys.readouterr().out
    assert code == 0
    lines = [ln for ln in text.splitlines() if ln.startswith("│")]
    assert [ln.split("│")[1].strip() for ln in lines] == [
        "full",
        "selective",
        "lora *",
        "kappa-lora",
    ]
    n = sum(p.numel() for p in tiny_llama().parameters())
    assert lines[0].split("│")[2].strip() == f"{n:,}"
    assert not out.exists()
