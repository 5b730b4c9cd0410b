"""Which objectives the batched Fisher pass takes: only those with both batch methods."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from kappatune.analysis.fisher import (
    BatchedObjective,
    ClassifierObjective,
    FisherOptions,
    fisher_diagonals,
)
from tests.unit.test_fisher import LinearSoftmax, _classifier_data


class _HalfBatched(ClassifierObjective):
    """A classifier objective with ``batch_predictions`` but no ``lead`` (not batchable)."""

    lead = None  # type: ignore[assignment]

    def batch_predictions(self, model: torch.nn.Module, examples: Any) -> Any:
        raise AssertionError("the batched pass needs lead() too; this objective has none")


def test_only_objectives_with_lead_and_batch_predictions_are_batched(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert isinstance(ClassifierObjective(), BatchedObjective)
    assert not isinstance(_HalfBatched(), BatchedObjective)
    batched: list[int] = []
    monkeypatch.setattr(
        "kappatune.analysis.fisher_batched.run_batched",
        lambda *a, **k: batched.append(1) or [],
    )
    model = LinearSoftmax()
    _, _, examples = _classifier_data()
    opts = FisherOptions(kinds=("empirical",), tokens=4, seed=1)
    # before: hasattr(objective, "batch_predictions") sent it to the batched pass, which then
    # failed on the missing lead(); now it takes the one-example loop
    half = fisher_diagonals(model, examples, opts, objective=_HalfBatched(), batch_size=3)
    assert batched == []
    loop = fisher_diagonals(model, examples, opts, objective=ClassifierObjective(), batch_size=1)
    for name, x in loop.tensors["empirical"].items():
        assert torch.equal(half.tensors["empirical"][name], x)
