"""Aggregate run results against the base model: per (scenario, rule, arm) mean and std over seeds.

Conventions (signs chosen so that "up is good" for gain and "up is bad" for forgetting):

* task gain: for perplexity tasks, the relative drop of held-out perplexity in percent
  (``-100 (ppl - base) / base``); for accuracy tasks, the accuracy change in percentage points;
* forgetting: the relative rise of control perplexity in percent (``100 (ppl - base) / base``).
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


@dataclass(frozen=True)
class SeedPoint:
    """One (scenario, rule, arm, seed) against its base."""

    scenario: str
    rule: str
    arm: str
    seed: int
    trainable_params: int
    step: int
    train_loss: float
    reached: bool
    task_value: float
    task_gain: float
    task_nll: float  # perplexity tasks: mean token NLL; accuracy tasks: mean label NLL
    control_ppl: float
    forgetting: float


@dataclass(frozen=True)
class ArmSummary:
    scenario: str
    rule: str
    arm: str
    task_metric: str
    seeds: int
    trainable_params: int
    steps: tuple[float, float]
    train_loss: tuple[float, float]
    reached: int
    task_value: tuple[float, float]
    task_gain: tuple[float, float]
    task_nll: tuple[float, float]
    control_ppl: tuple[float, float]
    forgetting: tuple[float, float]

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "scenario": self.scenario,
            "rule": self.rule,
            "arm": self.arm,
            "task_metric": self.task_metric,
            "seeds": self.seeds,
            "trainable_params": self.trainable_params,
            "reached": self.reached,
        }
        for name in (
            "steps",
            "train_loss",
            "task_value",
            "task_gain",
            "task_nll",
            "control_ppl",
            "forgetting",
        ):
            m, s = getattr(self, name)
            out[f"{name}_mean"] = encode_float(m)
            out[f"{name}_std"] = encode_float(s)
        return out


def _nll(task: Mapping[str, float], metric: str) -> float:
    return task.get("label_nll" if metric == "accuracy" else "nll", math.nan)


def seed_point(run: RunResult, point: Point, base: BaseResult, metric: str) -> SeedPoint:
    task, control = point.metrics.task, point.metrics.control
    return SeedPoint(
        scenario=run.scenario,
        rule=point.rule,
        arm=run.arm,
        seed=run.seed,
        trainable_params=run.trainable_params,
        step=point.step,
        train_loss=point.train_loss,
        reached=point.reached,
        task_value=task["accuracy" if metric == "accuracy" else "perplexity"],
        task_gain=task_gain(task, base.metrics.task, metric),
        task_nll=_nll(task, metric),
        control_ppl=control["perplexity"],
        forgetting=forgetting(control, base.metrics.control),
    )


def seed_points(
    runs: Sequence[RunResult], bases: Mapping[str, BaseResult], metrics: Mapping[str, str]
) -> list[SeedPoint]:
    out = []
    for run in runs:
        for point in run.points:
            metric = metrics[run.scenario]
            out.append(seed_point(run, point, bases[run.scenario], metric))
    return out


def base_summary(base: BaseResult, metric: str, rule: str) -> ArmSummary:
    task, control = base.metrics.task, base.metrics.control
    value = task["accuracy" if metric == "accuracy" else "perplexity"]
    nan2 = (math.nan, math.nan)
    return ArmSummary(
        scenario=base.scenario,
        rule=rule,
        arm="base",
        task_metric=metric,
        seeds=1,
        trainable_params=0,
        steps=(0.0, math.nan),
        train_loss=nan2,
        reached=0,
        task_value=(value, math.nan),
        task_gain=(0.0, math.nan),
        task_nll=(_nll(task, metric), math.nan),
        control_ppl=(control["perplexity"], math.nan),
        forgetting=(0.0, math.nan),
    )


def summarize(
    points: Sequence[SeedPoint],
    bases: Mapping[str, BaseResult],
    metrics: Mapping[str, str],
    arm_order: Sequence[str],
) -> list[ArmSummary]:
    """One row per (scenario, rule, arm): the base first, arms in ``arm_order``."""
    out: list[ArmSummary] = []
    order = {a: i for i, a in enumerate(arm_order)}
    keys = sorted(
        {(p.scenario, p.rule, p.arm) for p in points},
        key=lambda k: (k[0], k[1], order.get(k[2], len(order)), k[2]),
    )
    seen_base: set[tuple[str, str]] = set()
    for scenario, rule, arm in keys:
        metric = metrics[scenario]
        if (scenario, rule) not in seen_base and scenario in bases:
            seen_base.add((scenario, rule))
            out.append(base_summary(bases[scenario], metric, rule))
        group = [p for p in points if (p.scenario, p.rule, p.arm) == (scenario, rule, arm)]
        out.append(
            ArmSummary(
                scenario=scenario,
                rule=rule,
                arm=arm,
                task_metric=metric,
                seeds=len(group),
                trainable_params=max(p.trainable_params for p in group),
                steps=mean_std([float(p.step) for p in group]),
                train_loss=mean_std([p.train_loss for p in group]),
                reached=sum(p.reached for p in group),
                task_value=mean_std([p.task_value for p in group]),
                task_gain=mean_std([p.task_gain for p in group]),
                task_nll=mean_std([p.task_nll for p in group]),
                control_ppl=mean_std([p.control_ppl for p in group]),
                forgetting=mean_std([p.forgetting for p in group]),
            )
        )
    return out


@dataclass(frozen=True)
class Paired:
    """``arm`` minus ``reference`` over the seeds both have (same seed = same data order)."""

    scenario: str
    rule: str
    reference: str
    arm: str
    seeds: int
    gain_diff: tuple[float, float]
    forgetting_diff: tuple[float, float]
    less_forgetting: int  # seeds where the reference forgot less than ``arm``

    def to_json(self) -> dict[str, Any]:
        return {
            "scenario": self.scenario,
            "rule": self.rule,
            "reference": self.reference,
            "arm": self.arm,
            "seeds": self.seeds,
            "gain_diff_mean": encode_float(self.gain_diff[0]),
            "gain_diff_std": encode_float(self.gain_diff[1]),
            "forgetting_diff_mean": encode_float(self.forgetting_diff[0]),
            "forgetting_diff_std": encode_float(self.forgetting_diff[1]),
            "reference_forgot_less": self.less_forgetting,
        }


def paired(points: Sequence[SeedPoint], reference: str) -> list[Paired]:
    """For every other arm: per-seed differences (arm - reference) in gain and forgetting."""
    index = {(p.scenario, p.rule, p.arm, p.seed): p for p in points}
    groups = sorted({(p.scenario, p.rule, p.arm) for p in points if p.arm != reference})
    out = []
    for scenario, rule, arm in groups:
        pairs = [
            (index[(scenario, rule, arm, s)], ref)
            for (sc, ru, a, s), ref in sorted(index.items())
            if (sc, ru, a) == (scenario, rule, reference) and (scenario, rule, arm, s) in index
        ]
        if not pairs:
            continue
        out.append(
            Paired(
                scenario=scenario,
                rule=rule,
                reference=reference,
                arm=arm,
                seeds=len(pairs),
                gain_diff=mean_std([p.task_gain - r.task_gain for p, r in pairs]),
                forgetting_diff=mean_std([p.forgetting - r.forgetting for p, r in pairs]),
                less_forgetting=sum(r.forgetting < p.forgetting for p, r in pairs),
            )
        )
    return out
