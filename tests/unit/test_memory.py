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
from kappatune.training.loop import LoraSettings, prepare_model
from kappatune.training.step_memory import LiveBytes, StepPeak, simulate_steps
from tests.unit._tiny_models import TinyTiedLM, save_tiny_model, tiny_llama

F32 = 4


def _config() -> object:
    return tiny_llama().config


def test_live_bytes_counts_each_storage_once_while_it_lives() -> None:
    with LiveBytes(iter(())) as mode:
        a = torch.empty(10, device="meta")  # 40 bytes
        b = torch.empty(5, 4, device="meta")  # 80
        a.view(2, 5).add_(1)  # a view and an in-place update: no new storage
        assert mode.by_category["temporaries"] == 120
        mode.tag(b, "gradients")
        del a
        c = torch.empty(100, device="meta")  # 400
    assert mode.by_category == {
        "gradients": 80,
        "optimizer": 0,
        "activations": 0,
        "temporaries": 400,
    }
    assert mode.peak == StepPeak(gradients=80, optimizer=0, activations=0, temporaries=400,
                                 phase="forward")  # fmt: skip
    del b, c
    assert mode.by_category["gradients"] == 0


def _tied(vocab: int, dim: int) -> tuple[TinyTiedLM, list[dict[str, object]]]:
    with torch.device("meta"):
        model = TinyTiedLM(vocab, dim)
    return model, [{"params": list(model.parameters())}]


def test_optimizer_step_peak_counted_by_hand() -> None:
    """Batch 1 x 1 on an 8 x 64 embedding and a 64 x 64 matrix: the update peaks on the matrix.
    One tensor at a time (CPU): its square root and the division are two matrix-sized
    temporaries while the embedding's denominator is still named; multi-tensor: one square
    root per tensor, all at once."""
    n = 8 * 64 + 64 * 64
    matrix, embedding = 64 * 64 * F32, 8 * 64 * F32
    held = 1 * 1 * 8 * F32 + F32  # the loop's last output: logits and loss
    state = 2 * n * F32 + 2 * F32  # two moments per element, a step counter per tensor
    one = simulate_steps(*_tied(8, 64), 1, 1, foreach=False)
    assert one.peak == StepPeak(gradients=n * F32, optimizer=state, activations=0,
                                temporaries=2 * matrix + embedding + held,
                                phase="optimizer step")  # fmt: skip
    multi = simulate_steps(*_tied(8, 64), 1, 1, foreach=True)
    assert multi.peak == StepPeak(gradients=n * F32, optimizer=state, activations=0,
                                  temporaries=n * F32 + held, phase="optimizer step")  # fmt: skip


def test_loss_backward_peak_counted_by_hand() -> None:
    """Batch 4 x 32 on a 512 x 8 embedding: the peak is the start of the loss backward, with
    four logits-sized tensors (log-softmax output saved; logits held, the gradients of the
    log-softmax output and of the logits) and no parameter gradient yet."""
    tokens, vocab, dim = 4 * 32, 512, 8
    logits, hidden = tokens * vocab * F32, tokens * dim * F32
    n = vocab * dim + dim * dim
    sim = simulate_steps(*_tied(vocab, dim), 4, 32)
    # saved: the embedding output (for the matrix's gradient), the matrix output (for the
    # head's), the log-softmax output, the loss's total weight
    assert sim.saved_activations == 2 * hidden + logits + F32
    assert sim.peak == StepPeak(gradients=0, optimizer=2 * n * F32 + 2 * F32,
                                activations=2 * hidden + logits,
                                temporaries=3 * logits + 2 * F32,  # and the loss and its seed
                                phase="backward")  # fmt: skip


@pytest.mark.parametrize(("method", "lora"), [("full", None), ("lora", LoraSettings(r=2))])
def test_meta_simulation_matches_the_real_model_exactly(
    method: str, lora: LoraSettings | None
) -> None:
    """The same steps on real CPU tensors, attention left to PyTorch's own kernel choice,
    create the same storages: the meta device and the fused-attention stand-in change nothing."""
    real = prepare_model(tiny_llama(tied=True), method, None, lora)
    meta = prepare_model(memory.meta_model(tiny_llama(tied=True).config), method, None, lora)
    on_cpu = simulate_steps(real.model, real.param_groups, 2, 16, fused_attention=False)
    assert simulate_steps(meta.model, meta.param_groups, 2, 16) == on_cpu


def test_full_method_counts_every_parameter() -> None:
    n = sum(p.numel() for p in tiny_llama().parameters())
    e = memory.estimate(lambda: memory.meta_model(_config()), "full", 2, 16, runtime=1000)
    assert (e.params, e.trainable) == (n, n)
    assert (e.weights, e.gradients, e.optimizer) == (F32 * n, F32 * n, 2 * F32 * n)
    assert e.peak_above_weights == e.peak.total
    assert e.total == e.weights + e.peak.total + 1000


def test_selective_saves_only_what_its_gradients_need() -> None:
    full = memory.estimate(lambda: memory.meta_model(_config()), "full", 2, 16)
    model = tiny_llama()
    rows = analyze(model, AnalyzeOptions(use_cache=False, include=r"layers\.1\.mlp\.down"))
    sel = select(rows, "lowest-kappa", Budget(tensors=1))
    assert [e.name for e in sel.entries] == ["model.layers.1.mlp.down_proj.weight"]
    e = memory.estimate(lambda: memory.meta_model(_config()), "selective", 2, 16, sel)
    assert e.trainable == 32 * 64
    assert (e.gradients, e.optimizer) == (F32 * 32 * 64, 2 * F32 * 32 * 64)
    assert 0 < e.activations < full.activations
    assert e.peak_above_weights < full.peak_above_weights


def test_runtime_is_this_process_with_the_tokenizer_loaded(tmp_path: Path) -> None:
    model = save_tiny_model(tmp_path / "tiny")
    before = memory.resident_bytes()
    runtime = memory.runtime_bytes(model)
    assert before > 0
    assert runtime >= before - 64 * 2**20  # the same process, give or take freed pages


def test_dry_run_prints_every_method_and_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = save_tiny_model(tmp_path / "tiny")
    data = tmp_path / "t.txt"
    data.write_text("hello world\n" * 4)
    out = tmp_path / "run"
    argv = ["train", model, "--data", data, "-o", out, "--steps", 1, "--method", "lora",
            "--lora-r", 2, "--budget-tensors", 2, "--batch-size", 2, "--seq-len", 16,
            "--device", "cpu", "--dry-run"]  # fmt: skip
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
    assert "one tensor at a time" in text.replace("\n", " ")
    assert [ln.split()[0] for ln in text.splitlines() if ln.startswith("runtime:")] == ["runtime:"]
    assert not out.exists()
    # a dry run needs neither --steps nor --output; a real run needs --output, in one line
    short = [a for a in argv if a not in ("-o", out, "--steps", 1)]
    assert main([str(a) for a in short]) == 0
    assert capsys.readouterr().out.count("lora *") == 1
    real = [a for a in short if a != "--dry-run"]
    assert main([str(a) for a in real]) == 2
    assert capsys.readouterr().err.strip() == (
        "kappatune: error: the following arguments are required: --output/-o"
    )
