"""The batched per-example Fisher equals the one-pass-per-example loop, weight by weight."""

from __future__ import annotations

import pytest
import torch

import kappatune.analysis.fisher as fisher
from kappatune.analysis.fisher import (
    ClassifierObjective,
    FisherOptions,
    examples_from_ids,
    fisher_diagonals,
)
from kappatune.errors import KappaTuneError
from tests.unit._tiny_models import tiny_llama
from tests.unit.test_fisher import SEQS, Bigram, FusedExperts, LinearSoftmax, _classifier_data


def _examples(n: int = 6, t: int = 12) -> list[dict[str, torch.Tensor]]:
    ids = torch.randint(1, 128, (n, t), generator=torch.Generator().manual_seed(1))
    return examples_from_ids(ids)


class _Spy:
    """Records which weights went through the one-example loop."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.looped: list[list[str]] = []
        orig = fisher._run_loop

        def spy(model, named, *a, **k):  # type: ignore[no-untyped-def]
            self.looped.append([n for n, _ in named])
            return orig(model, named, *a, **k)

        monkeypatch.setattr(fisher, "_run_loop", spy)


def _assert_same(a: fisher.FisherDiagonals, b: fisher.FisherDiagonals, rtol: float) -> None:
    assert list(a.tensors) == list(b.tensors)
    for kind, per in a.tensors.items():
        assert list(per) == list(b.tensors[kind])
        for name, x in per.items():
            assert bool(x.any()), (kind, name)
            torch.testing.assert_close(b.tensors[kind][name], x, rtol=rtol, atol=0.0)


@pytest.mark.parametrize("tied", [False, True])
def test_batched_equals_the_loop_on_a_tiny_llama(tied: bool, monkeypatch) -> None:
    spy = _Spy(monkeypatch)
    model = tiny_llama(tied=tied).eval()
    opts = FisherOptions(kinds=("true", "empirical"), tokens=60, seed=3, samples=2)
    loop = fisher_diagonals(model, _examples(), opts, batch_size=1)
    assert len(spy.looped) == 1  # every weight
    batched = fisher_diagonals(model, _examples(), opts, batch_size=4)
    assert len(spy.looped) == 1  # none: the tied embedding is rebuilt from both of its uses
    _assert_same(loop, batched, rtol=2e-5)
    assert (batched.tokens, batched.examples) == (60, 6)  # 5 x 11 tokens + 5 of the sixth
    assert all(p.grad is None for p in model.parameters())
    assert all(p.requires_grad for p in model.parameters())


def test_batched_equals_the_loop_for_the_bigram_with_padding_and_cut_labels(monkeypatch) -> None:
    spy = _Spy(monkeypatch)
    model = Bigram()
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    examples = examples_from_ids(SEQS, mask)
    examples[0]["labels"] = SEQS[0].clone()
    examples[0]["labels"][2] = -100
    for kinds in (("empirical",), ("true",), ("true", "empirical")):
        opts = FisherOptions(kinds=kinds, tokens=4, seed=7, samples=3)
        loop = fisher_diagonals(model, examples, opts, batch_size=1)
        batched = fisher_diagonals(model, examples, opts, batch_size=2)
        _assert_same(loop, batched, rtol=1e-12)
    assert [len(x) for x in spy.looped] == [2, 2, 2]  # the batch_size=1 runs only


def test_batched_classifier_equals_the_loop() -> None:
    model = LinearSoftmax()
    _, _, examples = _classifier_data()
    opts = FisherOptions(kinds=("true", "empirical"), tokens=4, seed=1)
    obj = ClassifierObjective()
    loop = fisher_diagonals(model, examples, opts, objective=obj, batch_size=1)
    _assert_same(loop, fisher_diagonals(model, examples, opts, objective=obj, batch_size=3), 1e-12)


def test_fused_experts_and_weights_used_outside_their_module_take_the_loop(monkeypatch) -> None:
    spy = _Spy(monkeypatch)
    ids = torch.tensor([[0, 3, 1, 4, 0, 2], [5, 1, 0, 3, 3, 4]])
    opts = FisherOptions(kinds=("empirical", "true"), tokens=10)
    model = FusedExperts()
    loop = fisher_diagonals(model, examples_from_ids(ids), opts, batch_size=1)
    batched = fisher_diagonals(model, examples_from_ids(ids), opts, batch_size=2)
    _assert_same(loop, batched, rtol=1e-12)
    assert spy.looped[1] == ["experts.gate_up_proj"]  # the embedding was batched

    class TiedByHand(Bigram):
        """The head also reads the embedding matrix directly: the check must catch it."""

        def forward(self, ids, attention_mask=None):  # type: ignore[no-untyped-def]
            h = self.embed(ids)
            return self.head(h) + h @ self.embed.weight.T

    spy.looped.clear()
    model2 = TiedByHand()
    opts = FisherOptions(kinds=("empirical", "true"), tokens=8)
    loop = fisher_diagonals(model2, examples_from_ids(SEQS), opts, batch_size=1)
    batched = fisher_diagonals(model2, examples_from_ids(SEQS), opts, batch_size=2)
    _assert_same(loop, batched, rtol=1e-12)
    assert spy.looped == [["embed.weight", "head.weight"], ["embed.weight"]]


def test_batch_size_is_validated() -> None:
    with pytest.raises(KappaTuneError, match="the Fisher batch size must be at least 1, got 0"):
        fisher_diagonals(Bigram(), examples_from_ids(SEQS), FisherOptions(tokens=2), batch_size=0)
