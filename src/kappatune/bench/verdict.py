"""The benchmark's answer: fronts per arm, forgetting at a matched task gain, gain within a
forgetting budget, and plain sentences that say what they show.

Each (arm, lr, checkpoint step) is one point; its gain and forgetting are means over seeds.
Intervals come from a bootstrap over seeds (the same seeds drawn for every arm: same seed =
same data order). A difference is "not distinguishable" when its interval includes zero and
"within noise" when it is smaller than the base model's noise floor.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from kappatune.bench.fronts import (
    FrontPoint,
    Interval,
    difference_at_gain_interval,
    forgetting_at_gain_interval,
    gain_within_budget,
    joint_front,
    matched_gain,
    mean_points,
    pareto_front,
)
from kappatune.bench.summary import SeedPoint
from kappatune.jsonio import encode_float

# measure -> (SeedPoint field, unit, floor key in BaseResult.floors, sign: +1 when the field
# rises with forgetting, -1 when it falls)
MEASURES: dict[str, tuple[str, str, str, int]] = {
    "control ppl": ("forgetting", "%", "control_ppl_change", 1),
    "KL from base": ("kl", " nats/token", "", 1),
    "knowledge": ("knowledge_change", " pp lost", "knowledge", -1),
}


def point_label(p: SeedPoint) -> str:
    return f"lr {p.lr:g} @ step {p.step}"


def by_seed(
    points: Sequence[SeedPoint], scenario: str, field: str, sign: int
) -> dict[tuple[str, int], list[FrontPoint]]:
    out: dict[tuple[str, int], list[FrontPoint]] = {}
    for p in points:
        if p.scenario == scenario:
            value = sign * getattr(p, field)
            out.setdefault((p.arm, p.seed), []).append(
                FrontPoint(p.task_gain, value, point_label(p))
            )
    return out


@dataclass(frozen=True)
class ArmHeadline:
    arm: str
    front: tuple[FrontPoint, ...]
    at_matched: Interval
    within_budget: float | None  # control ppl measure only


@dataclass(frozen=True)
class Comparison:
    arm: str  # the other arm
    diff: Interval  # reference minus arm at matched gain; negative: the reference forgets less
    verdict: str  # "forgets less", "forgets more", "not distinguishable", "within noise"


@dataclass(frozen=True)
class MeasureVerdict:
    scenario: str
    measure: str
    unit: str
    floor: float  # NaN when there is none
    matched_gain: float | None
    arms: tuple[ArmHeadline, ...]
    joint: tuple[str, ...]
    reference: str | None
    comparisons: tuple[Comparison, ...]

    def to_json(self) -> dict[str, Any]:
        def iv(i: Interval) -> dict[str, Any]:
            return {
                "estimate": None if i.estimate is None else encode_float(i.estimate),
                "low": None if i.low is None else encode_float(i.low),
                "high": None if i.high is None else encode_float(i.high),
                "reached": i.reached,
            }

        return {
            "scenario": self.scenario,
            "measure": self.measure,
            "unit": self.unit.strip(),
            "noise_floor": encode_float(self.floor),
            "matched_gain": self.matched_gain,
            "joint_front": list(self.joint),
            "reference": self.reference,
            "arms": [
                {
                    "arm": a.arm,
                    "front": [[p.gain, p.forgetting, p.label] for p in a.front],
                    "at_matched_gain": iv(a.at_matched),
                    "gain_within_budget": a.within_budget,
                }
                for a in self.arms
            ],
            "comparisons": [
                {"arm": c.arm, "difference": iv(c.diff), "verdict": c.verdict}
                for c in self.comparisons
            ],
        }


def classify(diff: Interval, floor: float) -> str:
    if diff.estimate is None:
        return "not reached"
    if diff.low is None or diff.high is None or not diff.excludes_zero:
        return "not distinguishable"
    if math.isfinite(floor) and abs(diff.estimate) < floor:
        return "within noise"
    return "forgets less" if diff.estimate < 0 else "forgets more"


def measure_verdict(
    points: Sequence[SeedPoint],
    scenario: str,
    measure: str,
    arms: Sequence[str],
    floors: Mapping[str, float],
    budget: float,
    reference: str | None,
    resamples: int,
) -> MeasureVerdict | None:
    field, unit, floor_key, sign = MEASURES[measure]
    data = by_seed(points, scenario, field, sign)
    if not data or all(not math.isfinite(fp.forgetting) for v in data.values() for fp in v):
        return None
    seeds = sorted({s for _, s in data})
    present = [a for a in arms if any(k[0] == a for k in data)]
    fronts = {a: pareto_front(mean_points(data, a, seeds)) for a in present}
    level = matched_gain(fronts)
    heads = []
    for a in present:
        at = (
            forgetting_at_gain_interval(data, a, seeds, level, resamples)
            if level is not None
            else Interval(None, None, None, 0.0)
        )
        within = gain_within_budget(fronts[a], budget) if measure == "control ppl" else None
        heads.append(ArmHeadline(a, fronts[a], at, within))
    floor = floors.get(floor_key, math.nan) if floor_key else math.nan
    comparisons = []
    ref = reference if reference in present else None
    if ref is not None and level is not None:
        for a in present:
            if a != ref:
                diff = difference_at_gain_interval(data, ref, a, seeds, level, resamples)
                comparisons.append(Comparison(a, diff, classify(diff, floor)))
    return MeasureVerdict(
        scenario, measure, unit, floor, level, tuple(heads), joint_front(fronts), ref,
        tuple(comparisons),
    )  # fmt: skip


def with_change_floors(
    points: Sequence[SeedPoint], floors: Mapping[str, Mapping[str, float]]
) -> dict[str, dict[str, float]]:
    """``floors`` plus, per scenario, ``control_ppl_change``: the median over its points of the
    paired bootstrap half-width of the control perplexity change (the evaluation noise of a
    change; the base model's own floor is far wider, as it also counts which text was drawn),
    and ``knowledge_n``, the number of knowledge questions."""
    import statistics

    out = {k: dict(v) for k, v in floors.items()}
    for scenario in sorted({p.scenario for p in points}):
        mine = [p for p in points if p.scenario == scenario]
        entry = out.setdefault(scenario, {})
        for key, field in (("control_ppl_change", "forgetting_noise"),
                           ("task_gain_change", "task_gain_noise")):  # fmt: skip
            noise = [getattr(p, field) for p in mine if math.isfinite(getattr(p, field))]
            if noise:
                entry[key] = statistics.median(noise)
        totals = {p.knowledge_total for p in mine if p.knowledge_total}
        if totals:
            entry["knowledge_n"] = float(max(totals))
    return out


def verdicts(
    points: Sequence[SeedPoint],
    floors: Mapping[str, Mapping[str, float]],
    arms: Sequence[str],
    budget: float,
    resamples: int,
    reference: str = "kappa",
) -> list[MeasureVerdict]:
    out = []
    for scenario in sorted({p.scenario for p in points}):
        for measure in MEASURES:
            v = measure_verdict(
                points, scenario, measure, arms, floors.get(scenario, {}), budget, reference,
                resamples,
            )  # fmt: skip
            if v is not None:
                out.append(v)
    return out


# --------------------------------------------------------------------------- sentences


def interval_text(i: Interval, unit: str) -> str:
    if i.estimate is None:
        return "not reached"
    if i.low is None or i.high is None:
        return f"{i.estimate:+.3g}{unit} (no interval)"
    return f"{i.estimate:+.3g}{unit} [95% CI {i.low:+.3g}, {i.high:+.3g}]"


def sentences(v: MeasureVerdict, gain_unit: str) -> list[str]:
    out = [
        f"{v.scenario}, forgetting as {v.measure}: arms on the joint front (none of their points"
        f" is beaten on both task gain and forgetting): {', '.join(v.joint) or 'none'}."
    ]
    if v.matched_gain is None:
        out.append(
            "No task gain above zero is reached by every arm, so the arms cannot be compared"
            " at a matched gain."
        )
        return out
    weakest = [a.arm for a in v.arms if a.front and a.front[-1].gain == v.matched_gain]
    out.append(
        f"Matched task gain: {v.matched_gain:.2f}{gain_unit}, the best gain of the arm that"
        f" learned least ({', '.join(weakest)}); each arm's forgetting is read off its front there."
    )
    for c in v.comparisons:
        text = interval_text(c.diff, v.unit)
        if c.verdict == "forgets less":
            out.append(f"{v.reference} forgets less than {c.arm} at that gain: {text}.")
        elif c.verdict == "forgets more":
            out.append(f"{v.reference} forgets more than {c.arm} at that gain: {text}.")
        elif c.verdict == "within noise":
            out.append(
                f"{v.reference} vs {c.arm}: the difference ({text}) is smaller than the noise"
                f" floor ({v.floor:.2f}{v.unit}): within noise."
            )
        else:
            out.append(f"{v.reference} vs {c.arm}: not distinguishable ({text}).")
    return out


def one_line(vs: Sequence[MeasureVerdict]) -> str:
    """The bench's conclusion in one line: a clause per scenario and forgetting measure (the
    measures can disagree: control perplexity also moves with transfer, KL does not)."""
    parts = []
    for v in vs:
        where = f"{v.scenario}, {v.measure}"
        if v.matched_gain is None or not v.comparisons:
            parts.append(f"{where}: no matched-gain comparison possible")
            continue
        less = [c.arm for c in v.comparisons if c.verdict == "forgets less"]
        more = [c.arm for c in v.comparisons if c.verdict == "forgets more"]
        same = [c.arm for c in v.comparisons if c.verdict not in ("forgets less", "forgets more")]
        bits = []
        if less:
            bits.append(f"forgets less than {', '.join(less)}")
        if more:
            bits.append(f"forgets more than {', '.join(more)}")
        if same:
            bits.append(f"is not distinguishable from {', '.join(same)}")
        parts.append(f"{where}: at matched task gain {v.reference} " + "; ".join(bits))
    return ". ".join(parts) + "." if parts else "no verdict (no runs)."
