"""Train one arm with :func:`kappatune.training.train_loop` and evaluate it at every stopping rule.

Both rules share one trajectory (warm-up, then a constant learning rate, so where training
stops does not change the steps before it): the run trains until the smoothed training loss
reaches the target (or the cap), evaluating on the way when it passes the equal-steps point;
if the target came first, the same run continues (``resume``) to the equal-steps point.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from kappatune.bench.evaluate import accepts_logits_to_keep
from kappatune.bench.store import Metrics, Point
from kappatune.data import IGNORE_INDEX, TokenizedData
from kappatune.errors import KappaTuneError

Evaluate = Callable[[nn.Module], Metrics]
StepHook = Callable[[int, float], None]
STOPS = ("steps", "loss", "both")


class SparseLossLM(nn.Module):
    """Wraps a causal LM so the training loss computes logits only where a label follows.

    For label tasks (one labelled token after a long prompt) this skips the output layer at
    every other position, which with a 262k-token vocabulary is most of the cost. The loss is
    the same token-mean cross-entropy the model computes itself. Without ``labels`` (or when
    most positions are labelled) it calls the model unchanged.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.inner = model
        self.sparse = accepts_logits_to_keep(model)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> Any:
        if labels is None or not self.sparse:
            return self.inner(
                input_ids=input_ids, attention_mask=attention_mask, labels=labels, **kwargs
            )
        target = labels[:, 1:]
        positions = (target != IGNORE_INDEX).any(dim=0).nonzero().flatten()
        if 2 * len(positions) > target.shape[1]:
            return self.inner(
                input_ids=input_ids, attention_mask=attention_mask, labels=labels, **kwargs
            )
        out = self.inner(
            input_ids=input_ids,
            attention_mask=attention_mask,
            logits_to_keep=positions.to(input_ids.device),
            use_cache=False,
            **kwargs,
        )
        logits = out.logits
        picked = target[:, positions.to(target.device)].to(logits.device)
        loss = nn.functional.cross_entropy(
            logits.float().reshape(-1, logits.shape[-1]),
            picked.reshape(-1),
            ignore_index=IGNORE_INDEX,
        )
        return SimpleNamespace(loss=loss, logits=logits)


@dataclass(frozen=True)
class StopPlan:
    """Which points to evaluate: equal steps (``steps``), equal loss (``target``, ``cap``)."""

    stop: str
    steps: int
    target: float | None
    cap: int
    ema_decay: float = 0.8
    min_steps: int | None = None  # loss rule floor; None: the EMA's window, 1 / (1 - decay)

    def __post_init__(self) -> None:
        if self.stop not in STOPS:
            raise KappaTuneError(f"--stop must be one of {', '.join(STOPS)}, got {self.stop!r}")
        if self.steps < 1:
            raise KappaTuneError(f"--steps must be at least 1, got {self.steps}")
        if self.stop != "steps":
            if self.target is None or not math.isfinite(self.target):
                raise KappaTuneError("the loss stopping rule needs a finite --target-loss")
            if self.cap < 1:
                raise KappaTuneError(f"--max-steps must be at least 1, got {self.cap}")
        if self.stop == "both" and self.cap < self.steps:
            raise KappaTuneError(f"--max-steps {self.cap} is below --steps {self.steps}")
        if not 0 <= self.ema_decay < 1:
            raise KappaTuneError(f"--ema must be in [0, 1), got {self.ema_decay}")
        if self.min_steps is not None and self.min_steps < 1:
            raise KappaTuneError(f"minimum steps must be at least 1, got {self.min_steps}")

    @property
    def floor(self) -> int:
        """The loss rule does not stop before this step: a bias-corrected EMA of the first
        step or two is one batch's loss, so an easy first batch would end the run at once."""
        window = math.ceil(1 / (1 - self.ema_decay) - 1e-9)
        wanted = self.min_steps if self.min_steps is not None else window
        return max(1, min(wanted, self.cap))

    @property
    def horizon(self) -> int:
        return (
            self.steps
            if self.stop == "steps"
            else max(self.cap, self.steps if self.stop == "both" else 0)
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "stop": self.stop,
            "steps": self.steps,
            "target": self.target,
            "cap": self.cap,
            "ema_decay": self.ema_decay,
            "min_steps": self.floor if self.stop != "steps" else None,
        }


@dataclass(frozen=True)
class Trained:
    points: tuple[Point, ...]
    losses: tuple[float, ...]
    seconds_per_step: float


def _ema(losses: list[float], decay: float) -> float:
    """Bias-corrected EMA of ``losses`` (as train_loop computes it)."""
    ema = 0.0
    for x in losses:
        ema = decay * ema + (1 - decay) * x
    return ema / (1 - decay ** len(losses)) if losses else math.nan


def train_and_evaluate(
    model: nn.Module,
    param_groups: list[dict[str, Any]],
    data: TokenizedData,
    config: Any,
    plan: StopPlan,
    evaluate: Evaluate,
    on_step: StepHook | None = None,
) -> Trained:
    """Run ``train_loop`` once (plus a resumed stretch when needed); evaluate at each point."""
    from kappatune.training import StopRule, TrainConfig, train_loop

    assert isinstance(config, TrainConfig)
    wrapper = SparseLossLM(model)
    steps_point: list[Point] = []
    last: dict[str, Any] = {}

    def hook(state: Any) -> None:
        last["state"] = state
        if on_step is not None:
            on_step(state.step, state.losses[-1])
        if plan.stop != "loss" and state.step == plan.steps and not steps_point:
            ema = _ema(state.losses, plan.ema_decay)
            steps_point.append(Point("steps", state.step, ema, True, evaluate(model)))

    if plan.stop == "steps":
        rule = StopRule(ema_decay=plan.ema_decay, max_steps=plan.steps)
    else:
        rule = StopRule(
            target_loss=plan.target,
            ema_decay=plan.ema_decay,
            min_steps=plan.floor,
            max_steps=plan.cap,
        )
    result = train_loop(wrapper, data, config, rule, param_groups=param_groups, on_step=hook)
    points: list[Point] = []
    if plan.stop != "steps":
        reached = result.stopped_by == "target_loss"
        if steps_point and steps_point[0].step == result.steps:
            metrics = steps_point[0].metrics
        else:
            metrics = evaluate(model)
        points.append(Point("loss", result.steps, result.ema_loss, reached, metrics))
    losses = list(result.losses)
    times = list(result.step_times)
    if plan.stop == "both" and not steps_point:
        if result.steps >= plan.steps:  # pragma: no cover - the hook evaluates at plan.steps
            raise KappaTuneError("internal: the equal-steps point was passed without evaluation")
        rest = StopRule(ema_decay=plan.ema_decay, max_steps=plan.steps)
        more = train_loop(
            wrapper, data, config, rest, param_groups=param_groups,
            resume=last["state"].state_dict(), on_step=hook,
        )  # fmt: skip
        losses = list(more.losses)  # the resumed state carries the earlier steps
        times = list(more.step_times)
    points = steps_point + points
    model.eval()
    return Trained(tuple(points), tuple(losses), sum(times) / max(1, len(times)))
