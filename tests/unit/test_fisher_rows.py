"""The fast Fisher route (row-shared head and embedding) equals the one-example loop."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import kappatune.analysis.fisher as fisher
import kappatune.analysis.fisher_batched as fisher_batched
from kappatune.analysis.fisher import FisherOptions, examples_from_ids, fisher_diagonals
from kappatune.analysis.fisher_rows import RowSharedWeight
from tests.unit.test_fisher import Bigram


def _llama_with_biases(tied: bool) -> nn.Module:
    """A 2-layer Llama (vocab 128, hidden 32) with attention and MLP biases."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=128, max_position_embeddings=64, attention_bias=True,
        mlp_bias=True, tie_word_embeddings=tied, pad_token_id=0,
    )  # fmt: skip
    return LlamaForCausalLM(config).eval()


def _examples() -> list[dict[str, torch.Tensor]]:
    ids = torch.randint(1, 128, (6, 12), generator=torch.Generator().manual_seed(1))
    ids[2, 3] = ids[2, 7] = ids[2, 9]  # a token read three times in one example
    mask = torch.ones_like(ids)
    mask[4, 9:] = 0  # padding at the end of one example
    return examples_from_ids(ids, mask)


class _Routes:
    """Which weights took the loop, and the rows each row-shared weight computed per label set."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.looped: list[list[str]] = []
        self.differing: list[int] = []
        loop, differing = fisher._run_loop, RowSharedWeight._differing

        def spy_loop(model, named, *a, **k):  # type: ignore[no-untyped-def]
            self.looped.append([n for n, _ in named])
            return loop(model, named, *a, **k)

        def spy_differing(rows: RowSharedWeight, i: int) -> torch.Tensor:
            m = differing(rows, i)
            self.differing.append(len(m))
            return m

        monkeypatch.setattr(fisher, "_run_loop", spy_loop)
        monkeypatch.setattr(RowSharedWeight, "_differing", spy_differing)


def _assert_equal(loop: fisher.FisherDiagonals, fast: fisher.FisherDiagonals, names: list[str]):
    assert list(fast.tensors) == list(loop.tensors)
    for kind, per in loop.tensors.items():
        assert list(per) == names
        assert list(fast.tensors[kind]) == names
        for name, want in per.items():
            assert bool(want.any()), (kind, name)
            torch.testing.assert_close(fast.tensors[kind][name], want, rtol=1e-5, atol=0.0)


@pytest.mark.parametrize(
    ("tied", "kinds", "samples"),
    [(True, ("true", "empirical"), 2), (False, ("true",), 1), (True, ("empirical",), 1)],
)
def test_fast_route_equals_the_loop_on_a_llama_with_biases(tied, kinds, samples, monkeypatch):
    routes = _Routes(monkeypatch)
    model = _llama_with_biases(tied)
    names = [n for n, p in model.named_parameters() if p.ndim >= 2]
    assert any(n.endswith(".bias") for n, _ in model.named_parameters())  # biases: not scored
    opts = FisherOptions(kinds=kinds, tokens=60, seed=3, samples=samples)
    loop = fisher_diagonals(model, _examples(), opts, batch_size=1)
    fast = fisher_diagonals(model, _examples(), opts, batch_size=4)
    assert routes.looped == [names]  # the loop only for batch_size=1
    _assert_equal(loop, fast, names)
    assert (fast.tokens, fast.examples) == (60, 6)
    # one row-shared weight (tied) or two (embedding, head), once per example
    assert len(routes.differing) == (1 if tied else 2) * 6
    # the rows computed per label set are a few (tokens read, labels where the sets differ),
    # never the whole vocabulary of 128
    assert max(routes.differing) <= 12 + 2 * 11 * samples
    assert all(p.grad is None and p.requires_grad for p in model.parameters())


class _MixedHead(Bigram):
    """The head's output is mixed across the vocabulary before the softmax: label sets then
    differ in every column of the head's output-gradient, so no row can be shared."""

    def __init__(self) -> None:
        super().__init__(vocab=5, dim=3)
        mix = torch.eye(5, dtype=torch.float64) + 0.3 * torch.ones(5, 5, dtype=torch.float64)
        self.register_buffer("mix", mix)

    def forward(self, ids, attention_mask=None):  # type: ignore[no-untyped-def]
        return self.head(self.embed(ids)) @ self.mix


def test_every_row_is_computed_per_label_set_when_they_differ_everywhere(monkeypatch) -> None:
    routes = _Routes(monkeypatch)
    ids = torch.tensor([[0, 1, 1, 3, 1, 2], [2, 4, 4, 0, 2, 2], [1, 1, 1, 1, 3, 0]])
    opts = FisherOptions(kinds=("true", "empirical"), tokens=15, seed=5, samples=2)
    model = _MixedHead()
    loop = fisher_diagonals(model, examples_from_ids(ids), opts, batch_size=1)
    fast = fisher_diagonals(model, examples_from_ids(ids), opts, batch_size=3)
    _assert_equal(loop, fast, ["embed.weight", "head.weight"])
    assert routes.looped == [["embed.weight", "head.weight"]]
    # the embedding's rows (the tokens read), then every head row in all three examples
    assert routes.differing == [4, 3, 3, 5, 5, 5]


def test_embedding_rows_sum_repeated_tokens_and_skip_padding() -> None:
    from kappatune.analysis.fisher_rows import Call, embedding_rows

    emb = nn.Embedding(7, 2, padding_idx=0, dtype=torch.float64)
    ids = torch.tensor([[3, 5, 3, 0], [6, 6, 6, 6]])
    out = emb(ids)
    grad = torch.arange(16, dtype=torch.float64).reshape(2, 4, 2)
    call = Call(emb, (ids,), {}, out, grad)
    first = embedding_rows(call, "weight", emb.weight, 0, 2)
    assert first.index.tolist() == [3, 5]
    assert first.values.tolist() == [[0.0 + 4.0, 1.0 + 5.0], [2.0, 3.0]]
    second = embedding_rows(call, "weight", emb.weight, 1, 2)
    assert second.index.tolist() == [6]
    assert second.values.tolist() == [[8.0 + 10 + 12 + 14, 9.0 + 11 + 13 + 15]]
    assert emb.sparse is False  # restored


def test_the_check_still_sends_a_head_that_reads_the_embedding_directly_to_the_loop(
    monkeypatch,
) -> None:
    routes = _Routes(monkeypatch)

    class TiedByHand(Bigram):
        def forward(self, ids, attention_mask=None):  # type: ignore[no-untyped-def]
            h = self.embed(ids)
            return self.head(h) + h @ self.embed.weight.T

    opts = FisherOptions(kinds=("true", "empirical"), tokens=8)
    model = TiedByHand()
    ids = torch.tensor([[0, 1, 1, 3, 1], [2, 4, 4, 0, 2]])
    loop = fisher_diagonals(model, examples_from_ids(ids), opts, batch_size=1)
    fast = fisher_diagonals(model, examples_from_ids(ids), opts, batch_size=2)
    _assert_equal(loop, fast, ["embed.weight", "head.weight"])
    assert routes.looped == [["embed.weight", "head.weight"], ["embed.weight"]]
    assert fisher_batched.DEFAULT_BATCH >= 2
