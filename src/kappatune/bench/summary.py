"""Aggregate run results against the base model: per (scenario, rule, arm) mean and std over seeds.

Conventions (signs chosen so that "up is good" for gain and "up is bad" for forgetting):

* task gain: for perplexity tasks, the relative drop of held-out perplexity in percent
  (``-100 (ppl - base) / base``); for accuracy tasks, the accuracy change in percentage points;
* forgetting: the relative rise of control perplexity in percent (``100 (ppl - base) / base``);
  also the mean per-token KL divergence from the base model on the control data, and the change
  of knowledge-question accuracy in percentage points.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from kappatune.bench.store import BaseResult, Point, RunResult, relative_change
from kappatune.jsonio import encode_float


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (NaN std for fewer than 2 finite values)."""
    xs = [v for v in values if math.isfinite(v)]
    if not xs:
        return math.nan, math.nan
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else math.nan)


def task_gain(
    point_task: Mapping[str, float], base_task: Mapping[str, float], metric: str
) -> float:
    if metric == "accuracy":
        return 100.0 * (point_task["accuracy"] - base_task["accuracy"])
    return -relative_change(point_task["perplexity"], base_task["perplexity"])


def forgetting(point_control: Mapping[str, float], base_control: Mapping[str, float]) -> float:
    return relative_change(point_control["perplexity"], base_control["perplexity"])


def knowledge_change(point: Mapping[str, float], base: Mapping[str, float]) -> float:
    """Knowledge accuracy change in percentage points (NaN without a knowledge control)."""
    if "accuracy" not in point or "accuracy" not in base:
        return math.nan
    return 100.0 * (point["accuracy"] - base["accuracy"])


@dataclass(frozen=True)
class SeedPoint:
    """One (scenario, arm, lr, seed, checkpoint step) against its base."""

    scenario: str
    arm: str
    lr: float
    seed: int
    step: int
    trainable_params: int
    train_loss: float
    task_value: float
    task_gain: float
    task_nll: float  # perplexity tasks: mean token NLL; accuracy tasks: mean label NLL
    control_ppl: float
    forgetting: float  # control perplexity rise, %
    forgetting_noise: float  # paired bootstrap half-width of that rise, % (NaN: not measured)
    task_gain_noise: float  # the same for the task perplexity drop (NaN: not measured)
    kl: float  # mean per-token KL(base || tuned) on the control data, nats
    knowledge: float  # knowledge accuracy, 0-1 (NaN without a knowledge control)
    knowledge_change: float  # percentage points
    knowledge_correct: int
    knowledge_total: int


MEASURED = (
    "steps", "train_loss", "task_value", "task_gain", "task_nll", "control_ppl", "forgetting",
    "forgetting_noise", "task_gain_noise", "kl", "knowledge", "knowledge_change",
)  # fmt: skip


@dataclass(frozen=True)
class ArmSummary:
    """Mean and sample std over seeds of one (scenario, arm, lr, step); the base has lr 0."""

    scenario: str
    arm: str
    lr: float
    step: int
    task_metric: str
    seeds: int
    trainable_params: int
    steps: tuple[float, float]
    train_loss: tuple[float, float]
    task_value: tuple[float, float]
    task_gain: tuple[float, float]
    task_nll: tuple[float, float]
    control_ppl: tuple[float, float]
    forgetting: tuple[float, float]
    forgetting_noise: tuple[float, float]
    task_gain_noise: tuple[float, float]
    kl: tuple[float, float]
    knowledge: tuple[float, float]
    knowledge_change: tuple[float, float]

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "scenario": self.scenario,
            "arm": self.arm,
            "lr": self.lr,
            "step": self.step,
            "task_metric": self.task_metric,
            "seeds": self.seeds,
            "trainable_params": self.trainable_params,
        }
        for name in MEASURED:
            m, s = getattr(self, name)
            out[f"{name}_mean"] = encode_float(m)
            out[f"{name}_std"] = encode_float(s)
        return out


def _nll(task: Mapping[str, float], metric: str) -> float:
    return task.get("label_nll" if metric == "accuracy" else "nll", math.nan)


def seed_point(run: RunResult, point: Point, base: BaseResult, metric: str) -> SeedPoint:
    task, control, know = point.metrics.task, point.metrics.control, point.metrics.knowledge
    return SeedPoint(
        scenario=run.scenario,
        arm=run.arm,
        lr=run.lr,
        seed=run.seed,
        step=point.step,
        trainable_params=run.trainable_params,
        train_loss=point.train_loss,
        task_value=task["accuracy" if metric == "accuracy" else "perplexity"],
        task_gain=task_gain(task, base.metrics.task, metric),
        task_nll=_nll(task, metric),
        control_ppl=control["perplexity"],
        forgetting=forgetting(control, base.metrics.control),
        forgetting_noise=_paired_noise(
            point.metrics.control_nlls, base.metrics.control_nlls, base.control_tokens
        ),
        task_gain_noise=_paired_noise(
            point.metrics.task_nlls, base.metrics.task_nlls, base.task_tokens
        ),
        kl=control.get("kl", math.nan),
        knowledge=know.get("accuracy", math.nan),
        knowledge_change=knowledge_change(know, base.metrics.knowledge),
        knowledge_correct=int(know.get("correct", 0)),
        knowledge_total=int(know.get("total", 0)),
    )


def _paired_noise(
    nlls: Sequence[float], ref: Sequence[float], tokens: Sequence[int], resamples: int = 1000
) -> float:
    from kappatune.bench.fronts import paired_ppl_noise

    if not nlls or len(nlls) != len(ref) or len(tokens) != len(ref):
        return math.nan
    return paired_ppl_noise(ref, nlls, tokens, resamples)


def seed_points(
    runs: Sequence[RunResult], bases: Mapping[str, BaseResult], metrics: Mapping[str, str]
) -> list[SeedPoint]:
    out = []
    for run in runs:
        for point in run.points:
            metric = metrics[run.scenario]
            out.append(seed_point(run, point, bases[run.scenario], metric))
    return out


def base_summary(base: BaseResult, metric: str) -> ArmSummary:
    task, control, know = base.metrics.task, base.metrics.control, base.metrics.knowledge
    value = task["accuracy" if metric == "accuracy" else "perplexity"]
    nan2 = (math.nan, math.nan)
    return ArmSummary(
        scenario=base.scenario,
        arm="base",
        lr=0.0,
        step=0,
        task_metric=metric,
        seeds=1,
        trainable_params=0,
        steps=(0.0, math.nan),
        train_loss=(base.train_loss, math.nan),
        task_value=(value, math.nan),
        task_gain=(0.0, math.nan),
        task_nll=(_nll(task, metric), math.nan),
        control_ppl=(control["perplexity"], math.nan),
        forgetting=(0.0, math.nan),
        forgetting_noise=nan2,
        task_gain_noise=nan2,
        kl=(0.0, math.nan),
        knowledge=(know.get("accuracy", math.nan), math.nan),
        knowledge_change=(0.0, math.nan) if know else nan2,
    )


def summarize(
    points: Sequence[SeedPoint],
    bases: Mapping[str, BaseResult],
    metrics: Mapping[str, str],
    arm_order: Sequence[str],
) -> list[ArmSummary]:
    """One row per (scenario, arm, lr, step): the base first, arms in ``arm_order``."""
    out: list[ArmSummary] = []
    order = {a: i for i, a in enumerate(arm_order)}
    keys = sorted(
        {(p.scenario, p.arm, p.lr, p.step) for p in points},
        key=lambda k: (k[0], order.get(k[1], len(order)), k[1], k[2], k[3]),
    )
    seen_base: set[str] = set()
    for scenario, arm, lr, step in keys:
        metric = metrics[scenario]
        if scenario not in seen_base and scenario in bases:
            seen_base.add(scenario)
            out.append(base_summary(bases[scenario], metric))
        group = [
            p for p in points if (p.scenario, p.arm, p.lr, p.step) == (scenario, arm, lr, step)
        ]
        stats = {
            name: mean_std([float(p.step) if name == "steps" else getattr(p, name) for p in group])
            for name in MEASURED
        }
        out.append(
            ArmSummary(
                scenario=scenario,
                arm=arm,
                lr=lr,
                step=step,
                task_metric=metric,
                seeds=len(group),
                trainable_params=max(p.trainable_params for p in group),
                **stats,  # type: ignore[arg-type]
            )
        )
    return out
