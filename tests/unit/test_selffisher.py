"""Self-Fisher (Fisher on the model's own samples) and the self-fisher/interference policies."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kappatune.analysis.self_fisher import (
    SelfFisherOptions,
    interference_scores,
    sample_sequences,
    self_fisher_scores,
)
from kappatune.cli.main import main
from kappatune.errors import KappaTuneError
from kappatune.selection.budget import Budget
from kappatune.selection.core import Selection, select
from kappatune.selection.policies import PolicyContext, get_policy
from tests.unit._tiny_models import save_tiny_model, tiny_llama
from tests.unit.test_selection import ROWS

QKV0 = [f"model.layers.0.self_attn.{p}_proj.weight" for p in ("q", "k", "v")]


def _deaf_llama() -> torch.nn.Module:
    """Layer 0's attention output is multiplied by a zero o_proj: its q, k, v cannot matter."""
    model = tiny_llama(seed=0)
    with torch.no_grad():
        model.model.layers[0].self_attn.o_proj.weight.zero_()
    return model.eval()


def test_samples_are_seeded_start_with_bos_and_cover_the_vocabulary() -> None:
    model = tiny_llama()
    a = sample_sequences(model, 5, 9, bos=2, seed=1, batch_size=2)
    b = sample_sequences(model, 5, 9, bos=2, seed=1, batch_size=2)
    c = sample_sequences(model, 5, 9, bos=2, seed=2, batch_size=2)
    assert a.shape == (5, 9) and torch.equal(a, b) and not torch.equal(a, c)
    assert a[:, 0].tolist() == [2] * 5
    assert len(set(a[:, 1:].flatten().tolist())) > 20  # temperature 1 on a near-uniform model


def test_irrelevant_tensors_have_zero_self_fisher_and_come_first() -> None:
    from kappatune.analysis.spectra import AnalyzeOptions, analyze

    model = _deaf_llama()
    analysis = analyze(model, AnalyzeOptions(use_cache=False, workers=1))
    opts = SelfFisherOptions(tokens=24, seq_len=9, seed=0, batch_size=2)
    scores = self_fisher_scores(model, opts, rows=analysis.tensors)
    assert set(scores) == {r.key for r in analysis.tensors}
    assert sorted(k for k, v in scores.items() if v == 0.0) == [(n, -1) for n in sorted(QKV0)]
    chosen = select(analysis, "self-fisher", Budget(tensors=3), scores=scores)
    kappa = {r.name: r.kappa for r in analysis.tensors}
    assert [e.name for e in chosen.entries] == sorted(QKV0, key=lambda n: (kappa[n], n))
    # interference: no task gradient reaches them either, so they come last
    task = {k: 1.0 + i for i, k in enumerate(sorted(scores))}
    task.update({(n, -1): 0.0 for n in QKV0})
    ratio = interference_scores(task, scores)
    order = select(analysis, "interference", Budget(fraction=1.0), scores=ratio)
    assert sorted(e.name for e in order.entries[-3:]) == sorted(QKV0)
    assert [ratio[e.key] for e in order.entries] == sorted(ratio.values(), reverse=True)


def test_interference_is_task_over_self_and_orders_largest_first() -> None:
    rows = [r for r in ROWS if r.kappa == r.kappa][:4]
    own = {rows[0].key: 1.0, rows[1].key: 0.0, rows[2].key: 4.0, rows[3].key: 2.0}
    task = {rows[0].key: 3.0, rows[1].key: 0.0, rows[2].key: 4.0, rows[3].key: 8.0}
    ratio = interference_scores(task, own, damping=1.0)
    assert ratio == {rows[0].key: 1.5, rows[1].key: 0.0, rows[2].key: 0.8, rows[3].key: 8 / 3}
    got = get_policy("interference")(rows, PolicyContext(scores=ratio))
    assert [r.key for r in got] == [rows[i].key for i in (3, 0, 2, 1)]
    got = get_policy("self-fisher")(rows, PolicyContext(scores=own))
    assert [r.key for r in got] == [rows[i].key for i in (1, 0, 3, 2)]
    with pytest.raises(KappaTuneError, match="1 matrices have a self-Fisher but no task score"):
        interference_scores({}, {rows[0].key: 1.0})
    with pytest.raises(KappaTuneError, match="policy 'self-fisher' needs self-Fisher scores"):
        get_policy("self-fisher")(rows, PolicyContext())
    with pytest.raises(KappaTuneError, match="policy 'interference': 3 of 4 candidates have no"):
        get_policy("interference")(rows, PolicyContext(scores={rows[0].key: 1.0}))


def test_bad_input_encoders_and_zero_tokens() -> None:
    from transformers import BertConfig, BertModel

    bert = BertModel(BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                intermediate_size=32, vocab_size=50))  # fmt: skip
    with pytest.raises(KappaTuneError, match="BertModel cannot generate text: self-Fisher"):
        self_fisher_scores(bert, SelfFisherOptions(tokens=4, seq_len=5))
    with pytest.raises(KappaTuneError, match="--self-fisher-tokens must be at least 1, got 0"):
        SelfFisherOptions(tokens=0)
    assert SelfFisherOptions(tokens=254, seq_len=128).sequences == 2
    assert SelfFisherOptions(tokens=255, seq_len=128).sequences == 3


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_select_self_fisher_and_interference_from_the_cli(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from kappatune.analysis.self_fisher import policy_scores_for

    model_dir = save_tiny_model(tmp_path / "tiny")
    text = tmp_path / "t.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 3)
    for policy, extra in (
        ("self-fisher", []),
        ("interference", ["--fisher-data", str(text), "--fisher-tokens", "20"]),
    ):
        out_file = tmp_path / f"{policy}.json"
        argv = ["select", str(model_dir), "--policy", policy, "--self-fisher-tokens", "16",
                "--budget-tensors", "4", "-o", str(out_file), *extra]  # fmt: skip
        code, _, err = _run(argv, capsys)
        assert code == 0, err
        scores = policy_scores_for(
            policy, model_dir, SelfFisherOptions(tokens=16), task_files=[text], task_tokens=20
        )
        sign = 1 if policy == "self-fisher" else -1
        expected = sorted(scores, key=lambda k: (sign * scores[k], k))[:4]
        assert [e.key for e in Selection.load(out_file).entries] == expected


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["MODEL", "--policy", "self-fisher", "--self-fisher-tokens", "0"],
         "--self-fisher-tokens must be at least 1, got 0"),
        (["MODEL", "--policy", "interference"],
         "--policy interference needs --fisher-scores FILE or --fisher-data FILE"),
        (["MODEL", "--policy", "interference", "--fisher-data", "TEXT", "--fisher-tokens", "500"],
         "the data has 27 predicted tokens in 1 examples, fewer than the token budget of 500"),
        (["MODEL", "--policy", "self-fisher", "--fisher-data", "TEXT"],
         "--fisher-scores/--fisher-data only apply to --policy fisher or interference"),
    ],
)  # fmt: skip
def test_select_self_fisher_bad_input_one_line_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    model_dir = save_tiny_model(tmp_path / "tiny")
    text = tmp_path / "t.txt"
    text.write_text("a tiny task, not much data")
    argv = [{"MODEL": str(model_dir), "TEXT": str(text)}.get(a, a) for a in argv]
    capsys.readouterr()
    code, _, err = _run(["select", *argv, "-o", str(tmp_path / "o.json")], capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and message in lines[0], err
    assert not (tmp_path / "o.json").exists()


def test_bench_arms_order_by_their_own_scores() -> None:
    from kappatune.analysis.spectra import AnalyzeOptions, analyze
    from kappatune.bench.arms import ArmContext, arm_selection, candidate_rows, get_arm

    model = _deaf_llama()
    rows = candidate_rows(analyze(model, AnalyzeOptions(use_cache=False, workers=1)).tensors, model)
    scores = self_fisher_scores(model, SelfFisherOptions(tokens=16, seq_len=9), rows=rows)
    ctx = ArmContext(rows=tuple(rows), budget=Budget(tensors=3), total_params=10**6, seed=0,
                     fisher=scores)  # fmt: skip
    arm = get_arm("self-fisher")
    assert arm.needs_fisher and arm.policy == "self-fisher" and get_arm("interference").needs_fisher
    sel = arm_selection(arm, ctx)
    assert sel is not None and sorted(e.name for e in sel.entries) == sorted(QKV0)
