import math

import pytest
import torch

from kappatune.bench.arm_training import SparseLossLM, checkpoint_steps, train_with_checkpoints
from kappatune.bench.store import Metrics, Point
from kappatune.errors import KappaTuneError
from kappatune.training.data import TokenizedData
from kappatune.training.loop import TrainConfig
from tests.unit._tiny_models import tiny_llama


def _rows(n: int, length: int, label_last_only: bool, seed: int = 0) -> TokenizedData:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, 128, (n, length), generator=g)
    ids[:, 0] = 2
    mask = torch.ones_like(ids)
    labels = ids.clone()
    labels[:, 0] = -100
    if label_last_only:
        labels[:, :-1] = -100
    mask[1, -2:] = 0  # one padded row: its pads carry no label
    ids[1, -2:] = 0
    labels[1, -2:] = -100
    if label_last_only:
        labels[1, -3] = ids[1, -3]
    return TokenizedData(ids, mask, labels)


@pytest.mark.parametrize("sparse", [True, False])
def test_sparse_loss_equals_the_models_own_loss_and_gradient(sparse: bool) -> None:
    model = tiny_llama(seed=1)
    data = _rows(3, 10, label_last_only=sparse)
    inputs = {
        "input_ids": data.input_ids,
        "attention_mask": data.attention_mask,
        "labels": data.labels,
    }
    ref = model(**inputs).loss
    ref.backward()
    ref_grad = model.model.layers[0].self_attn.q_proj.weight.grad.clone()
    model.zero_grad()
    wrapped = SparseLossLM(model)
    assert wrapped.sparse
    loss = wrapped(**inputs).loss
    loss.backward()
    assert float(loss) == pytest.approx(float(ref), rel=1e-5)
    grad = model.model.layers[0].self_attn.q_proj.weight.grad
    assert torch.allclose(grad, ref_grad, rtol=1e-4, atol=1e-7)


class _Counter:
    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, model: torch.nn.Module) -> Metrics:
        self.calls += 1
        return Metrics(task={"perplexity": float(self.calls)}, control={"perplexity": 1.0})


def _train(checkpoints: tuple[int, ...], done: dict | None = None, autocast: bool = False) -> tuple:
    model = tiny_llama(seed=0)
    data = _rows(8, 12, label_last_only=False)
    groups = [{"params": list(model.parameters()), "names": [], "weight_decay": 0.0}]
    config = TrainConfig(steps=max(checkpoints), lr=1e-3, batch_size=2, seed=0)
    counter = _Counter()
    steps: list[int] = []
    stored: list[Point] = []
    trained = train_with_checkpoints(
        model, groups, data, config, checkpoints, counter, done=done, on_point=stored.append,
        on_step=lambda s, _: steps.append(s), autocast=autocast,
    )  # fmt: skip
    return trained, counter, steps, stored


def test_checkpoints_are_evaluated_inside_one_run() -> None:
    trained, counter, steps, stored = _train((2, 4, 6))
    assert [p.step for p in trained.points] == [2, 4, 6]
    assert [p.metrics.task["perplexity"] for p in trained.points] == [1.0, 2.0, 3.0]
    assert steps == [1, 2, 3, 4, 5, 6] and counter.calls == 3 and stored == list(trained.points)
    assert len(trained.losses) == 6 and all(math.isfinite(p.train_loss) for p in trained.points)


def test_stored_checkpoints_are_not_evaluated_again() -> None:
    first, _, _, _ = _train((2, 4))
    again, counter, _, stored = _train((2, 4), done={2: first.points[0]})
    assert counter.calls == 1 and [p.step for p in stored] == [4]
    assert again.points[0] == first.points[0]
    assert again.losses == first.losses  # the same deterministic trajectory


def test_autocast_trains_in_bfloat16_and_evaluates_in_full_precision() -> None:
    seen: list[bool] = []

    class Probe(_Counter):
        def __call__(self, model: torch.nn.Module) -> Metrics:
            seen.append(torch.is_autocast_enabled("cpu"))
            return super().__call__(model)

    model = tiny_llama(seed=0)
    data = _rows(8, 12, label_last_only=False)
    groups = [{"params": list(model.parameters()), "names": [], "weight_decay": 0.0}]
    trained = train_with_checkpoints(
        model, groups, data, TrainConfig(steps=2, lr=1e-3, batch_size=2, seed=0), (2,), Probe(),
        autocast=True,
    )  # fmt: skip
    assert seen == [False] and len(trained.losses) == 2
    plain, _, _, _ = _train((2,))
    assert trained.losses[0] != plain.losses[0]  # bf16 matmuls change the numbers a little
    assert trained.losses[0] == pytest.approx(plain.losses[0], rel=2e-2)


def test_checkpoint_steps() -> None:
    assert checkpoint_steps(16, 4) == (4, 8, 12, 16)
    assert checkpoint_steps(10, 3) == (3, 7, 10)
    assert checkpoint_steps(5, 1) == (5,)
    with pytest.raises(KappaTuneError, match="--checkpoints 6 must be between 1 and --steps 5"):
        checkpoint_steps(5, 6)
    with pytest.raises(KappaTuneError, match="--checkpoints 0 must be between 1"):
        checkpoint_steps(5, 0)
