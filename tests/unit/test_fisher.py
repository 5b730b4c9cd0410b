"""The Fisher estimator against closed forms on one-layer models, plus its bookkeeping."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import pytest
import torch
from torch import nn

from kappatune.analysis.fisher import (
    ClassifierObjective,
    FisherOptions,
    FisherResult,
    FisherRow,
    compute_fisher,
    examples_from_ids,
    fisher_diagonals,
    fisher_scores,
)
from kappatune.errors import KappaTuneError
from tests.unit._tiny_models import tiny_llama

C, D = 3, 4  # classes, input features of the linear softmax model


class LinearSoftmax(nn.Module):
    """logits = W x: the per-example gradient of log p(y | x) is (e_y - p) x^T."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(D, C, bias=False, dtype=torch.float64)
        with torch.no_grad():
            self.proj.weight.copy_(
                torch.tensor([[0.5, -1.0, 0.3, 0.0], [0.2, 0.4, -0.6, 1.0], [-0.7, 0.1, 0.9, -0.2]])
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


class Bigram(nn.Module):
    """A causal LM whose position-t logits depend on token t only: W E[x_t]."""

    def __init__(self, vocab: int = 5, dim: int = 3, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.embed = nn.Embedding(vocab, dim, dtype=torch.float64)
        self.head = nn.Linear(dim, vocab, bias=False, dtype=torch.float64)
        with torch.no_grad():
            self.embed.weight.copy_(torch.randn(vocab, dim, generator=g, dtype=torch.float64))
            self.head.weight.copy_(torch.randn(vocab, dim, generator=g, dtype=torch.float64))

    def forward(
        self, ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        return self.head(self.embed(ids))


def _classifier_data() -> tuple[torch.Tensor, torch.Tensor, list[dict[str, torch.Tensor]]]:
    x = torch.tensor(
        [
            [1.0, 0.5, -0.3, 2.0],
            [-1.2, 0.7, 0.1, 0.4],
            [0.3, -0.9, 1.5, -0.6],
            [0.8, 0.2, 0.2, -1.1],
        ],
        dtype=torch.float64,
    )
    y = torch.tensor([0, 2, 1, 2])
    return x, y, [{"inputs": xi, "labels": yi} for xi, yi in zip(x, y, strict=True)]


def _true_fisher_linear(model: LinearSoftmax, x: torch.Tensor) -> torch.Tensor:
    """E_{y ~ p}[((e_y - p) x^T)^2] = p_c (1 - p_c) x_d^2, averaged over the examples."""
    with torch.no_grad():
        p = torch.softmax(model(x), dim=-1)
    return torch.einsum("nc,nd->cd", p * (1 - p), x * x) / len(x)


def test_empirical_fisher_of_linear_softmax_is_exact() -> None:
    model = LinearSoftmax()
    x, y, examples = _classifier_data()
    res = compute_fisher(
        model,
        examples,
        FisherOptions(kinds=("empirical",), tokens=4),
        objective=ClassifierObjective(),
    )
    with torch.no_grad():
        p = torch.softmax(model(x), dim=-1)
    resid = nn.functional.one_hot(y, C).double() - p
    expected = torch.einsum("nc,nd->cd", resid**2, x * x) / 4
    (row,) = res["empirical"].rows
    assert row.key == ("proj.weight", -1) and row.numel == C * D
    assert row.sum == pytest.approx(float(expected.sum()), rel=1e-12)
    assert row.mean == pytest.approx(float(expected.mean()), rel=1e-12)
    lam = 1e-8
    assert row.logvol == pytest.approx(float(0.5 * torch.log(expected + lam).sum()), rel=1e-12)


def test_true_fisher_single_draw_is_the_squared_gradient_of_the_drawn_labels() -> None:
    """With samples=1 the estimator is (1/N) sum_n ((e_{y_n} - p_n) x_n^T)^2 for y_n drawn in order."""
    model = LinearSoftmax()
    x, _, examples = _classifier_data()
    res = compute_fisher(
        model,
        examples,
        FisherOptions(kinds=("true",), tokens=4, seed=123),
        objective=ClassifierObjective(),
    )
    g = torch.Generator().manual_seed(123)
    with torch.no_grad():
        p = torch.softmax(model(x), dim=-1)
    drawn = torch.cat([torch.multinomial(p[i : i + 1], 1, generator=g)[0] for i in range(4)])
    resid = nn.functional.one_hot(drawn, C).double() - p
    expected = torch.einsum("nc,nd->cd", resid**2, x * x) / 4
    assert res["true"].rows[0].sum == pytest.approx(float(expected.sum()), rel=1e-12)


def _seed_mean_and_se(
    run: Callable[[int], torch.Tensor], seeds: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean of independent seeded estimates and its standard error."""
    vals = torch.stack([run(s) for s in range(seeds)])
    return vals.mean(0), vals.std(0) / math.sqrt(seeds)


def test_true_fisher_of_linear_softmax_converges_to_closed_form() -> None:
    model = LinearSoftmax()
    x, _, examples = _classifier_data()
    expected = _true_fisher_linear(model, x)

    def run(seed: int) -> torch.Tensor:
        opts = FisherOptions(kinds=("true",), tokens=4, seed=seed, samples=50)
        return fisher_diagonals(model, examples, opts, objective=ClassifierObjective()).tensors[
            "true"
        ]["proj.weight"]

    mean, se = _seed_mean_and_se(run, 20)  # 20 x 50 draws per example
    assert torch.all((mean - expected).abs() <= 6 * se), (mean, expected, se)
    assert torch.allclose(mean, expected, rtol=0.15)


def test_examples_and_budget_are_validated() -> None:
    model = LinearSoftmax()
    _, _, examples = _classifier_data()
    with pytest.raises(
        KappaTuneError,
        match="the data has 4 predicted tokens in 4 examples, fewer than the token budget of 5",
    ):
        compute_fisher(model, examples, FisherOptions(tokens=5), objective=ClassifierObjective())
    with pytest.raises(KappaTuneError, match=r"no candidate tensors .* among its 2 parameters"):
        compute_fisher(
            nn.LayerNorm(4), examples, FisherOptions(tokens=1), objective=ClassifierObjective()
        )
    with pytest.raises(KappaTuneError, match="unknown Fisher kind 'fake'"):
        FisherOptions(kinds=("fake",))
    with pytest.raises(KappaTuneError, match="--lambda must be a positive"):
        FisherOptions(damping=0.0)
    with pytest.raises(KappaTuneError, match="unknown Fisher measure 'median'"):
        fisher_scores(model, examples, measure="median", tokens=1, objective=ClassifierObjective())


# ----------------------------------------------------------------------------- causal LM


SEQS = torch.tensor([[0, 1, 1, 3, 1], [2, 4, 4, 0, 2]])  # repeated tokens: cross terms matter


def _bigram_parts(
    model: Bigram, ids: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inputs x_t, hidden h_t = E[x_t] and predictive p_t of the predicted positions."""
    x = ids[:-1]
    with torch.no_grad():
        h = model.embed.weight[x]
        p = torch.softmax(h @ model.head.weight.T, dim=-1)
    return x, h, p


def _bigram_grads(
    model: Bigram, ids: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Closed-form gradient of sum_t log p(y_t | x_t): (W, E) parts."""
    x, h, p = _bigram_parts(model, ids)
    r = nn.functional.one_hot(labels, p.shape[1]).double() - p  # (T, V)
    g_head = r.T @ h
    g_embed = torch.zeros_like(model.embed.weight).index_add_(0, x, r @ model.head.weight.detach())
    return g_head, g_embed


def test_empirical_fisher_of_causal_lm_is_the_per_sequence_squared_gradient() -> None:
    model = Bigram()
    res = fisher_diagonals(
        model, examples_from_ids(SEQS), FisherOptions(kinds=("empirical",), tokens=8)
    )
    want_head = torch.zeros_like(model.head.weight)
    want_embed = torch.zeros_like(model.embed.weight)
    for ids in SEQS:
        gh, ge = _bigram_grads(model, ids, ids[1:])
        want_head += gh**2 / 8
        want_embed += ge**2 / 8
    got = res.tensors["empirical"]
    assert list(got) == ["embed.weight", "head.weight"]
    torch.testing.assert_close(got["head.weight"], want_head, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(got["embed.weight"], want_embed, rtol=1e-12, atol=1e-15)


def test_token_budget_cuts_the_last_sequence_and_masks_padding() -> None:
    model = Bigram()
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    labels = SEQS.clone()
    labels[0, 2] = -100  # position 1 of the first sequence predicts nothing
    examples = examples_from_ids(SEQS, mask)
    examples[0]["labels"] = labels[0]
    res = fisher_diagonals(model, examples, FisherOptions(kinds=("empirical",), tokens=4))
    assert (res.tokens, res.examples) == (4, 2)
    # first sequence: targets at positions 0, 2, 3 (3 tokens); second: first target only
    _, h0, p0 = _bigram_parts(model, SEQS[0])
    r0 = nn.functional.one_hot(torch.tensor([1, 0, 3, 1]), 5).double() - p0
    r0[1] = 0.0  # ignored label
    g0 = r0.T @ h0
    _, h1, p1 = _bigram_parts(model, SEQS[1])
    g1 = torch.outer(nn.functional.one_hot(torch.tensor(4), 5).double() - p1[0], h1[0])
    torch.testing.assert_close(
        res.tensors["empirical"]["head.weight"], (g0**2 + g1**2) / 4, rtol=1e-12, atol=1e-15
    )
    with pytest.raises(
        KappaTuneError,
        match="the data has 5 predicted tokens in 2 examples, fewer than the token budget of 6",
    ):
        fisher_diagonals(model, examples, FisherOptions(tokens=6))


def test_true_fisher_of_causal_lm_is_unbiased_for_the_mean_per_token_fisher() -> None:
    """Sequence-level squared gradients of sampled labels: cross-position terms vanish in expectation."""
    model = Bigram()
    want_head = torch.zeros_like(model.head.weight)
    want_embed = torch.zeros_like(model.embed.weight)
    w = model.head.weight.detach()
    for ids in SEQS:
        x, h, p = _bigram_parts(model, ids)
        want_head += (p * (1 - p)).T @ (h * h)  # per token: p_c (1 - p_c) h_d^2
        mean_w = p @ w  # (T, D): E_c[W_c]
        var_w = p @ (w * w) - mean_w**2  # per token: Var_{c ~ p_t}(W_{c,d}) for row x_t
        want_embed.index_add_(0, x, var_w)
    want_head /= 8
    want_embed /= 8

    def run(seed: int) -> torch.Tensor:
        opts = FisherOptions(kinds=("true",), tokens=8, seed=seed, samples=40)
        t = fisher_diagonals(model, examples_from_ids(SEQS), opts).tensors["true"]
        return torch.cat([t["embed.weight"].flatten(), t["head.weight"].flatten()])

    mean, se = _seed_mean_and_se(run, 20)
    want = torch.cat([want_embed.flatten(), want_head.flatten()])
    assert torch.all((mean - want).abs() <= 6 * se + 1e-12), (mean - want) / se


# ----------------------------------------------------------------------------- tiny transformer


def _tiny_examples(n: int = 3, t: int = 12) -> list[dict[str, torch.Tensor]]:
    ids = torch.randint(1, 128, (n, t), generator=torch.Generator().manual_seed(1))
    return examples_from_ids(ids)


def _assert_rows_close(a: Sequence[FisherRow], b: Sequence[FisherRow]) -> None:
    assert [(r.key, r.numel) for r in a] == [(r.key, r.numel) for r in b]
    for x, y in zip(a, b, strict=True):
        for m in ("sum", "mean", "logvol"):
            assert x.measure(m) == pytest.approx(y.measure(m), rel=1e-6), (x.key, m)


def test_seed_determinism_and_shared_forward_for_both_kinds() -> None:
    model = tiny_llama().eval()
    examples = _tiny_examples()
    both = compute_fisher(
        model, examples, FisherOptions(kinds=("true", "empirical"), tokens=30, seed=4)
    )
    again = compute_fisher(
        model, examples, FisherOptions(kinds=("true", "empirical"), tokens=30, seed=4)
    )
    true_only = compute_fisher(model, examples, FisherOptions(kinds=("true",), tokens=30, seed=4))
    emp_only = compute_fisher(
        model, examples, FisherOptions(kinds=("empirical",), tokens=30, seed=4)
    )
    other = compute_fisher(model, examples, FisherOptions(kinds=("true",), tokens=30, seed=5))
    assert (
        both["true"].rows == again["true"].rows
        and both["empirical"].rows == again["empirical"].rows
    )
    # the same labels; the head's rows shared between label sets are summed in another grouping
    # when a kind runs alone (fisher_rows), so equal up to rounding, not bit for bit
    _assert_rows_close(both["true"].rows, true_only["true"].rows)
    _assert_rows_close(both["empirical"].rows, emp_only["empirical"].rows)
    assert other["true"].rows != true_only["true"].rows
    assert both["true"].tokens == 30 and both["true"].examples == 3  # 11 + 11 + 8 of 11


def test_rows_align_with_the_spectra_and_model_state_is_restored(
    monkeypatch: pytest.MonkeyPatch, tmp_path
) -> None:
    from kappatune.analysis.spectra import AnalyzeOptions, analyze

    monkeypatch.setenv("KAPPATUNE_CACHE", str(tmp_path))
    model = tiny_llama().eval()
    model.train()
    model.model.layers[0].self_attn.q_proj.weight.requires_grad_(False)
    flags = [p.requires_grad for p in model.parameters()]
    analysis = analyze(model, AnalyzeOptions(workers=1))
    res = compute_fisher(
        model, _tiny_examples(), FisherOptions(tokens=20), only=[r.name for r in analysis.tensors]
    )
    assert [r.key for r in res["true"].rows] == [r.key for r in analysis.tensors]
    assert [r.module_type for r in res["true"].rows] == [r.module_type for r in analysis.tensors]
    assert model.training and [p.requires_grad for p in model.parameters()] == flags
    assert all(p.grad is None for p in model.parameters())
    assert all(r.sum > 0 and r.mean == pytest.approx(r.sum / r.numel) for r in res["true"].rows)
    assert set(fisher_scores(model, _tiny_examples(), tokens=20, measure="logvol")) == {
        r.key for r in analysis.tensors
    }
    with pytest.raises(
        KappaTuneError,
        match="1 analysed tensors are not matrix parameters of the model: nope\\.weight",
    ):
        compute_fisher(model, _tiny_examples(), FisherOptions(tokens=20), only=["nope.weight"])


class FusedExperts(nn.Module):
    """A layer with a fused (experts x out x in) weight: expert e only sees inputs routed to it."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.embed = nn.Embedding(6, 4, dtype=torch.float64)
        self.experts = nn.Module()
        self.experts.gate_up_proj = nn.Parameter(
            torch.randn(3, 6, 4, generator=g, dtype=torch.float64)
        )

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids)  # (B, T, 4)
        w = self.experts.gate_up_proj[ids % 3]  # token id picks the expert
        return torch.einsum("btoi,bti->bto", w, h)


def test_fused_expert_tensors_give_one_row_per_expert_like_the_spectra() -> None:
    from kappatune.analysis.spectra import AnalyzeOptions, analyze

    model = FusedExperts()
    ids = torch.tensor([[0, 3, 1, 4, 0, 2], [5, 1, 0, 3, 3, 4]])  # expert 2 is used by ids 2 and 5
    diag = fisher_diagonals(
        model, examples_from_ids(ids), FisherOptions(kinds=("empirical",), tokens=10)
    )
    res = compute_fisher(
        model, examples_from_ids(ids), FisherOptions(kinds=("empirical",), tokens=10)
    )
    rows = res["empirical"].rows
    analysis = analyze(model, AnalyzeOptions(use_cache=False, workers=1))
    assert [r.key for r in rows] == [r.key for r in analysis.tensors]
    assert [r.key for r in rows][1:] == [("experts.gate_up_proj", e) for e in range(3)]
    full = diag.tensors["empirical"]["experts.gate_up_proj"]
    for e, row in enumerate(rows[1:]):
        assert row.numel == 24 and row.sum == pytest.approx(float(full[e].sum()), rel=1e-12)
    # predicted positions route to experts (0, 0, 1, 1, 0) and (2, 1, 0, 0, 0): all get Fisher
    assert all(r.sum > 0 for r in rows)


def test_result_json_round_trip() -> None:
    model = tiny_llama().eval()
    res = compute_fisher(
        model, _tiny_examples(), FisherOptions(kinds=("empirical",), tokens=10, damping=1e-6)
    )
    back = FisherResult.from_json(res["empirical"].to_json())
    assert back == res["empirical"]
    bad = {**res["empirical"].to_json(), "schema_version": 99}
    with pytest.raises(KappaTuneError, match="unsupported Fisher schema_version 99"):
        FisherResult.from_json(bad)


def test_fisher_policy_trains_least_fisher_first_with_these_scores() -> None:
    from kappatune.analysis.spectra import AnalyzeOptions, analyze
    from kappatune.selection.budget import Budget
    from kappatune.selection.core import select

    model = tiny_llama().eval()
    analysis = analyze(model, AnalyzeOptions(workers=1))
    scores = fisher_scores(model, _tiny_examples(), kind="empirical", measure="mean", tokens=30)
    assert set(scores) == {r.key for r in analysis.tensors}
    chosen = select(analysis, "fisher", Budget(tensors=4), scores=scores)
    expected = sorted(scores, key=lambda k: (scores[k], k))[:4]
    assert [e.key for e in chosen.entries] == expected
    # q/k projections of a random-init model carry the least information (near-uniform attention)
    assert {k[0] for k in expected} == {
        f"model.layers.{i}.self_attn.{p}.weight" for i in (0, 1) for p in ("q_proj", "k_proj")
    }
    full = select(analysis, "fisher", Budget(fraction=1.0), scores=scores)
    values = [scores[e.key] for e in full.entries]
    assert values == sorted(values) and len(values) == len(analysis.tensors)


def test_fisher_scores_for_a_saved_model_and_text_files(tmp_path) -> None:
    from kappatune.analysis.fisher import examples_from_tokenized, fisher_scores_for
    from kappatune.training.data import PackConfig, load_tokenized
    from kappatune.training.models import load_causal_lm
    from tests.unit._tiny_models import save_tiny_model

    model_dir = save_tiny_model(tmp_path / "model")
    text = tmp_path / "a.txt"
    text.write_text("Sphinx of black quartz, judge my vow. " * 6, encoding="utf-8")
    got = fisher_scores_for(
        model_dir, [text], kind="true", measure="sum", tokens=60, seq_len=32, seed=2
    )
    model, tok = load_causal_lm(model_dir)
    data = load_tokenized([text], tok, PackConfig(seq_len=32))
    assert int(data.input_ids[0, 0]) == tok.bos_token_id  # BOS starts every row
    examples = examples_from_tokenized(data)
    want = fisher_scores(model, examples, kind="true", measure="sum", tokens=60, seed=2)
    assert got == want
    assert len(got) == 16 and all(v > 0 for v in got.values())
    with pytest.raises(KappaTuneError, match="fewer than the token budget of 5000"):
        fisher_scores_for(model_dir, [text], tokens=5000, seq_len=32)
    with pytest.raises(KappaTuneError, match="unknown Fisher measure 'max'"):
        fisher_scores_for(model_dir, [text], measure="max")
