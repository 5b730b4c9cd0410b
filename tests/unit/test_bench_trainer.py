import math

import pytest
import torch

from kappatune.bench.store import Metrics
from kappatune.bench.trainer import SparseLossLM, StopPlan, train_and_evaluate
from kappatune.data import TokenizedData
from kappatune.errors import KappaTuneError
from kappatune.training import TrainConfig
from tests.unit._tiny_models import tiny_llama


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


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


def _train(plan: StopPlan) -> tuple:
    model = tiny_llama(seed=0)
    data = _rows(8, 12, label_last_only=False)
    groups = [{"params": list(model.parameters()), "names": [], "weight_decay": 0.0}]
    config = TrainConfig(steps=plan.horizon, lr=1e-3, batch_size=2, seed=0)
    counter = _Counter()
    steps: list[int] = []
    trained = train_and_evaluate(
        model, groups, data, config, plan, counter, lambda s, _: steps.append(s)
    )
    return trained, counter, steps


def test_both_rules_share_one_trajectory_when_the_target_comes_first() -> None:
    trained, counter, steps = _train(StopPlan("both", steps=4, target=100.0, cap=6, min_steps=1))
    loss_pt = next(p for p in trained.points if p.rule == "loss")
    steps_pt = next(p for p in trained.points if p.rule == "steps")
    assert loss_pt.step == 1 and loss_pt.reached  # any loss is below 100
    assert steps_pt.step == 4 and steps_pt.reached
    assert len(trained.losses) == 4 and steps == [1, 2, 3, 4]  # resumed, not restarted
    assert counter.calls == 2


def test_unreached_target_stops_at_the_cap_and_says_so() -> None:
    trained, counter, steps = _train(StopPlan("both", steps=2, target=1e-6, cap=3))
    loss_pt = next(p for p in trained.points if p.rule == "loss")
    assert loss_pt.step == 3 and not loss_pt.reached
    assert [p.rule for p in trained.points] == ["steps", "loss"]
    assert steps == [1, 2, 3] and counter.calls == 2
    assert math.isfinite(loss_pt.train_loss)


def test_steps_rule_alone_and_shared_evaluation_at_the_same_step() -> None:
    trained, counter, _ = _train(StopPlan("steps", steps=2, target=None, cap=0))
    assert [(p.rule, p.step) for p in trained.points] == [("steps", 2)] and counter.calls == 1
    trained, counter, _ = _train(StopPlan("both", steps=3, target=1e-6, cap=3))
    assert [(p.rule, p.step) for p in trained.points] == [("steps", 3), ("loss", 3)]
    assert counter.calls == 1  # same model state: evaluated once


def test_stop_plan_validation() -> None:
    with pytest.raises(KappaTuneError, match="--stop must be one of"):
        StopPlan("never", 1, None, 1)
    with pytest.raises(KappaTuneError, match="needs a finite --target-loss"):
        StopPlan("loss", 1, None, 5)
    with pytest.raises(KappaTuneError, match="--max-steps 2 is below --steps 5"):
        StopPlan("both", 5, 1.0, 2)
    assert StopPlan("both", 5, 1.0, 9).horizon == 9
    assert StopPlan("loss", 5, 1.0, 3).horizon == 3
    with pytest.raises(KappaTuneError, match="minimum steps must be at least 1, got 0"):
        StopPlan("loss", 1, 1.0, 5, min_steps=0)


def test_loss_rule_waits_for_the_ema_window() -> None:
    assert StopPlan("loss", 1, 1.0, 16, ema_decay=0.8).floor == 5
    assert StopPlan("loss", 1, 1.0, 16, ema_decay=0.9).floor == 10
    assert StopPlan("loss", 1, 1.0, 16, ema_decay=0.0).floor == 1
    assert StopPlan("loss", 1, 1.0, 3, ema_decay=0.9).floor == 3  # never past the cap
    trained, _, steps = _train(StopPlan("both", steps=2, target=100.0, cap=6, ema_decay=0.75))
    loss_pt = next(p for p in trained.points if p.rule == "loss")
    assert loss_pt.step == 4 and loss_pt.reached  # reachable at step 1, held to the window
    assert steps == [1, 2, 3, 4]
