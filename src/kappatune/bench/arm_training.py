"""Train one arm with :func:`kappatune.training.loop.train_loop`, evaluating at checkpoints on the way.

One run (warm-up, then a constant learning rate) gives several points of the learning/forgetting
curve: the model is evaluated in place at each checkpoint step, without retraining per length.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from kappatune.bench.config import checkpoint_steps as checkpoint_steps  # declared there
from kappatune.bench.evaluate import accepts_logits_to_keep
from kappatune.bench.store import Metrics, Point
from kappatune.training.data import IGNORE_INDEX, TokenizedData

if TYPE_CHECKING:
    from kappatune.training.loop import LoopState, TrainConfig

Evaluate = Callable[[nn.Module], Metrics]
StepHook = Callable[[int, float], None]
DONE = Mapping[int, Point]


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
class Trained:
    points: tuple[Point, ...]
    losses: tuple[float, ...]
    seconds_per_step: float


def _ema(losses: Sequence[float], decay: float) -> float:
    """Bias-corrected EMA of ``losses`` (as train_loop computes it)."""
    ema = 0.0
    for x in losses:
        ema = decay * ema + (1 - decay) * x
    return ema / (1 - decay ** len(losses)) if losses else math.nan


def train_with_checkpoints(
    model: nn.Module,
    param_groups: list[dict[str, Any]],
    data: TokenizedData,
    config: TrainConfig,
    checkpoints: Sequence[int],
    evaluate: Evaluate,
    *,
    done: DONE | None = None,
    on_point: Callable[[Point], None] | None = None,
    on_step: StepHook | None = None,
    autocast: bool = False,
    ema_decay: float = 0.8,
    resume: Mapping[str, Any] | None = None,
    on_state: Callable[[LoopState], None] | None = None,
) -> Trained:
    """Train ``config.steps`` steps; at each checkpoint evaluate (or take the stored point from
    ``done``, keyed by step) and hand the point to ``on_point`` (which stores it at once), then
    the loop state to ``on_state`` (which may keep it, to resume from). ``resume``: a loop
    state kept that way, the trained tensors already copied into ``model``; the run goes on
    from its step (the points before it come from ``done``)."""
    from kappatune.training.loop import StopRule, train_loop

    assert config.steps == max(checkpoints)
    wrapper = SparseLossLM(model)
    points: list[Point] = []
    stored = dict(done or {})

    def hook(state: LoopState) -> None:
        if on_step is not None:
            on_step(state.step, state.losses[-1])
        if state.step in checkpoints:
            ema = _ema(state.losses, ema_decay)
            if state.step in stored:
                point = stored[state.step]
            else:
                with torch.autocast(device, enabled=False):  # evaluate in full precision
                    metrics = evaluate(model)
                point = Point("checkpoint", state.step, ema, True, metrics)
                if on_point is not None:
                    on_point(point)
            points.append(point)
            if on_state is not None and state.step < max(checkpoints):
                on_state(state)

    device = "cuda" if next(model.parameters()).is_cuda else "cpu"
    cast = torch.autocast(device, dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
    with cast:
        result = train_loop(
            wrapper,
            data,
            config,
            StopRule(ema_decay=ema_decay, max_steps=config.steps),
            param_groups=param_groups,
            resume=resume,
            on_step=hook,
        )
    model.eval()
    if resume is not None:  # the points before the resumed step, in step order
        start = int(resume["step"])
        points[:0] = [stored[s] for s in checkpoints if s <= start and s in stored]
    times = list(result.step_times)
    return Trained(tuple(points), tuple(result.losses), sum(times) / max(1, len(times)))
