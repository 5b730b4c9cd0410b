"""The benchmark's answer: fronts per arm, forgetting at a matched task gain, gain within a
forgetting budget, and plain sentences that say what they show.

Each (arm, lr, checkpoint step) is one point. The matched gain is the highest task gain that
every arm reaches on every seed's own front (so no arm is read at the maximum of its own grid, and
every seed has a reading); each arm's forgetting is read there seed by seed, and two arms are
compared by their per-seed differences (same seed = same data order): a paired t-interval, which
the verdict rests on, beside the exact sign-flip permutation test (it cannot reach p < 0.25 with
3 seeds) and a bootstrap over seeds on the mean fronts (with 3 seeds it has 10 distinct
resamples and covers well under 95 %). A difference is "not distinguishable" when its t-interval
includes zero and "within noise" when it is smaller than the base model's noise floor. The same
comparison is repeated over a range of gains below the matched one, since its sign can change with
the gain.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from kappatune.bench.fronts import (
    FrontPoint,
    Interval,
    PairedTest,
    difference_at_gain_interval,
    forgetting_at_gain_interval,
    gain_within_budget,
    joint_front,
    mean_points,
    paired_difference_at_gain,
    paired_test,
    pareto_front,
    readings_at_gain,
    seedwise_matched_gain,
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


# the range of gains a comparison is repeated over, as fractions of the matched gain
LEVELS = (0.25, 0.5, 0.75, 1.0)
MEASURED_WITHIN = 0.02  # a front point this close to the gain (relative) is read, not a chord


@dataclass(frozen=True)
class ArmHeadline:
    arm: str
    front: tuple[FrontPoint, ...]
    at_matched: Interval  # bootstrap over seeds, on the mean front
    within_budget: float | None  # control ppl measure only
    seedwise: PairedTest | None = None  # per-seed readings at the matched gain, t-interval
    reading: str = ""  # how the mean front gives the figure: a measured point or a chord
    edge: str = ""  # where the arm's best point lies in its grid, when at an edge


@dataclass(frozen=True)
class Comparison:
    arm: str  # the other arm
    diff: (
        Interval  # bootstrap: reference minus arm at matched gain; negative: reference forgets less
    )
    verdict: str  # "forgets less", "forgets more", "not distinguishable", "within noise", ...
    test: PairedTest | None = None  # per-seed differences: the paired t-interval and sign flips


@dataclass(frozen=True)
class LevelReading:
    """Forgetting at one gain of the range below the matched gain."""

    gain: float
    fraction: float  # of the matched gain
    arms: tuple[tuple[str, float | None], ...]  # mean over seeds of the per-seed readings
    diffs: tuple[tuple[str, PairedTest], ...]  # reference minus each other arm


@dataclass(frozen=True)
class LengthReading:
    """The comparison as it stood after ``steps`` training steps: fronts from the points at or
    before that step, their own matched gain, each arm's forgetting there (mean over seeds of
    the per-seed readings) and the arms from least to most forgetting."""

    steps: int
    matched_gain: float | None
    forgetting: tuple[tuple[str, float | None], ...]
    order: tuple[str, ...]


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
    seeds: tuple[int, ...] = ()
    levels: tuple[LevelReading, ...] = ()
    lengths: tuple[LengthReading, ...] = ()

    def to_json(self) -> dict[str, Any]:
        def iv(i: Interval) -> dict[str, Any]:
            return {
                "estimate": None if i.estimate is None else encode_float(i.estimate),
                "low": None if i.low is None else encode_float(i.low),
                "high": None if i.high is None else encode_float(i.high),
                "reached": i.reached,
            }

        def pt(t: PairedTest | None) -> dict[str, Any] | None:
            if t is None:
                return None
            num = [t.estimate, t.low, t.high]
            return {
                "values": [encode_float(d) for d in t.diffs],
                "estimate": None if num[0] is None else encode_float(num[0]),
                "t_low": None if num[1] is None else encode_float(num[1]),
                "t_high": None if num[2] is None else encode_float(num[2]),
                "p_sign_flip": t.p_sign_flip,
            }

        return {
            "scenario": self.scenario,
            "measure": self.measure,
            "unit": self.unit.strip(),
            "noise_floor": encode_float(self.floor),
            "matched_gain": self.matched_gain,
            "seeds": list(self.seeds),
            "joint_front": list(self.joint),
            "reference": self.reference,
            "arms": [
                {
                    "arm": a.arm,
                    "front": [[p.gain, p.forgetting, p.label] for p in a.front],
                    "at_matched_gain": iv(a.at_matched),
                    "at_matched_gain_seedwise": pt(a.seedwise),
                    "reading": a.reading,
                    "grid_edge": a.edge,
                    "gain_within_budget": a.within_budget,
                }
                for a in self.arms
            ],
            "comparisons": [
                {
                    "arm": c.arm,
                    "difference": iv(c.diff),
                    "paired": pt(c.test),
                    "verdict": c.verdict,
                }
                for c in self.comparisons
            ],
            "levels": [
                {
                    "gain": lv.gain,
                    "fraction": lv.fraction,
                    "forgetting": {a: None if v is None else encode_float(v) for a, v in lv.arms},
                    "differences": {a: pt(t) for a, t in lv.diffs},
                }
                for lv in self.levels
            ],
            "by_training_length": [
                {
                    "steps": ln.steps,
                    "matched_gain": ln.matched_gain,
                    "forgetting": {
                        a: None if v is None else encode_float(v) for a, v in ln.forgetting
                    },
                    "order": list(ln.order),
                }
                for ln in self.lengths
            ],
        }


ONE_SEED = "one seed: no interval, cannot judge"


def classify(test: PairedTest, floor: float) -> str:
    """The reading of a paired comparison, from its t-interval over seeds."""
    if test.estimate is None:
        return "not reached"
    if test.n == 1:
        return ONE_SEED
    if not test.excludes_zero:
        return "not distinguishable"
    if math.isfinite(floor) and abs(test.estimate) < floor:
        return "within noise"
    return "forgets less" if test.estimate < 0 else "forgets more"


def front_reading(front: Sequence[FrontPoint], gain: float) -> str:
    """How the mean front gives the forgetting at ``gain``: a measured point (within 2 % of the
    gain), a chord between two points (and over what distance), or an upper bound."""
    if not front or gain > front[-1].gain:
        return "not reached"
    near = min(front, key=lambda p: abs(p.gain - gain))
    if abs(near.gain - gain) <= MEASURED_WITHIN * abs(gain):
        return f"measured ({near.label}, gain {near.gain:.2f})"
    if gain < front[0].gain:
        return (
            f"upper bound: its least-gain front point ({front[0].label}, gain {front[0].gain:.2f})"
        )
    lo = max((p for p in front if p.gain <= gain), key=lambda p: p.gain)
    hi = min((p for p in front if p.gain >= gain), key=lambda p: p.gain)
    return (
        f"interpolated over {hi.gain - lo.gain:.2f} of gain ({lo.label}, gain {lo.gain:.2f} to"
        f" {hi.label}, gain {hi.gain:.2f})"
    )


def grid_edge(
    front: Sequence[FrontPoint], gain: float | None, grid: Mapping[str, tuple[float, int]]
) -> str:
    """Where the arm's best-gain point, and the points it is read from at ``gain``, lie in its
    grid of learning rates and steps, when at an edge ("" when inside)."""
    if not front or not grid:
        return ""
    lrs = sorted({lr for lr, _ in grid.values()})
    last = max(step for _, step in grid.values())
    notes = []
    best = grid.get(front[-1].label)
    if best is not None:
        lr, step = best
        edges = [w for w, hit in (("its highest rate", lr == lrs[-1] and len(lrs) > 1),
                                  ("the last step", step == last)) if hit]  # fmt: skip
        if edges:
            notes.append(f"best gain at {front[-1].label}: {' and '.join(edges)}")
    if gain is not None and gain <= front[-1].gain:
        around = [p for p in front if p.gain >= gain][:1] + [p for p in front if p.gain <= gain][
            -1:
        ]
        for p in around:
            at = grid.get(p.label)
            if at is not None and len(lrs) > 1 and at == (lrs[0], last):
                notes.append(
                    f"read from {p.label}, its lowest rate at the last step (a lower rate or a"
                    " longer run may forget less)"
                )
                break
    return "; ".join(notes)


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
    present = [a for a in arms if any(k[0] == a for k in data)]
    # the seeds every arm has (a sweep cut short leaves some arms a seed behind)
    seeds = sorted(set.intersection(*({s for arm, s in data if arm == a} for a in present)))
    if not seeds:
        return None
    grids = {
        a: {point_label(p): (p.lr, p.step) for p in points if p.scenario == scenario and p.arm == a}
        for a in present
    }
    fronts = {a: pareto_front(mean_points(data, a, seeds)) for a in present}
    level = seedwise_matched_gain(data, present, seeds)
    heads = []
    for a in present:
        at = (
            forgetting_at_gain_interval(data, a, seeds, level, resamples)
            if level is not None
            else Interval(None, None, None, 0.0)
        )
        within = gain_within_budget(fronts[a], budget) if measure == "control ppl" else None
        seedwise = reading = None
        if level is not None:
            seedwise = paired_test(list(readings_at_gain(data, a, seeds, level).values()))
            reading = front_reading(fronts[a], level)
        heads.append(
            ArmHeadline(a, fronts[a], at, within, seedwise, reading or "",
                        grid_edge(fronts[a], level, grids[a]))
        )  # fmt: skip
    floor = floors.get(floor_key, math.nan) if floor_key else math.nan
    comparisons = []
    levels: list[LevelReading] = []
    ref = reference if reference in present else None
    if level is not None:
        for a in present:
            if ref is not None and a != ref:
                diff = difference_at_gain_interval(data, ref, a, seeds, level, resamples)
                test = paired_difference_at_gain(data, ref, a, seeds, level)
                comparisons.append(Comparison(a, diff, classify(test, floor), test))
        for fraction in LEVELS:
            g = level * fraction
            means = []
            for a in present:
                got = readings_at_gain(data, a, seeds, g)
                means.append((a, sum(got.values()) / len(got) if got else None))
            diffs = tuple(
                (a, paired_difference_at_gain(data, ref, a, seeds, g))
                for a in present if ref is not None and a != ref
            )  # fmt: skip
            levels.append(LevelReading(g, fraction, tuple(means), diffs))
    return MeasureVerdict(
        scenario, measure, unit, floor, level, tuple(heads), joint_front(fronts), ref,
        tuple(comparisons), tuple(seeds), tuple(levels),
        by_length(points, scenario, field, sign, present, seeds),
    )  # fmt: skip


def by_length(
    points: Sequence[SeedPoint],
    scenario: str,
    field: str,
    sign: int,
    arms: Sequence[str],
    seeds: Sequence[int],
) -> tuple[LengthReading, ...]:
    """How the comparison changes as training goes on: one reading per checkpoint step (none
    for a single step: that is the verdict itself)."""
    steps = sorted({p.step for p in points if p.scenario == scenario})
    if len(steps) < 2:
        return ()
    out = []
    for last in steps:
        data = by_seed([p for p in points if p.step <= last], scenario, field, sign)
        gain = seedwise_matched_gain(data, arms, seeds)
        means: list[tuple[str, float | None]] = []
        for a in arms:
            got = readings_at_gain(data, a, seeds, gain) if gain is not None else {}
            means.append((a, sum(got.values()) / len(got) if got else None))
        ranked = sorted((v, a) for a, v in means if v is not None)
        out.append(LengthReading(last, gain, tuple(means), tuple(a for _, a in ranked)))
    return tuple(out)


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


def paired_text(t: PairedTest | None, unit: str) -> str:
    if t is None or t.estimate is None:
        return "not reached"
    if t.low is None or t.high is None:
        return f"{t.estimate:+.3g}{unit} (one seed, no interval)"
    p = f"; sign-flip p = {t.p_sign_flip:.3g}" if t.p_sign_flip is not None else ""
    return f"{t.estimate:+.3g}{unit} [paired t 95% CI {t.low:+.3g}, {t.high:+.3g}; {t.n} seeds{p}]"


def _sign_story(tests: Sequence[PairedTest]) -> str:
    signs = {math.copysign(1, t.estimate) for t in tests if t.estimate is not None and t.estimate}
    return "its sign changes with the gain" if len(signs) > 1 else "it keeps its sign"


def sentences(v: MeasureVerdict, gain_unit: str) -> list[str]:
    out = [
        f"{v.scenario}, forgetting as {v.measure}: arms on the joint front (none of their points"
        f" is beaten on both task gain and forgetting): {', '.join(v.joint) or 'none'}."
    ]
    if v.matched_gain is None:
        out.append(
            "No task gain above zero is reached by every arm on every seed, so the arms cannot be"
            " compared at a matched gain."
        )
        return out
    n = len(v.seeds)
    floor_p = f"; the exact sign-flip test cannot go below p = {2 / 2**n:.3g} with {n} seeds"
    out.append(
        f"Matched task gain: {v.matched_gain:.2f}{gain_unit}, the highest gain every arm reaches"
        f" on each of its {n} seeds' own fronts; each arm is read there seed by seed and arms are"
        f" compared by their per-seed differences (the verdict rests on the paired t-interval"
        f"{floor_p if n > 1 else ''})."
    )
    for c in v.comparisons:
        text = paired_text(c.test, v.unit) + f", bootstrap {interval_text(c.diff, v.unit)}"
        if c.verdict == "forgets less":
            out.append(f"{v.reference} forgets less than {c.arm} at that gain: {text}.")
        elif c.verdict == "forgets more":
            out.append(f"{v.reference} forgets more than {c.arm} at that gain: {text}.")
        elif c.verdict == "within noise":
            out.append(
                f"{v.reference} vs {c.arm}: the difference ({text}) is smaller than the noise"
                f" floor ({v.floor:.2f}{v.unit}): within noise."
            )
        elif c.verdict == ONE_SEED:
            out.append(f"{v.reference} vs {c.arm}: {ONE_SEED} ({text}).")
        else:
            out.append(f"{v.reference} vs {c.arm}: not distinguishable ({text}).")
    fractions = "/".join(f"{lv.fraction * 100:.0f}" for lv in v.levels)
    for c in v.comparisons:
        tests = [dict(lv.diffs)[c.arm] for lv in v.levels if c.arm in dict(lv.diffs)]
        values = ", ".join(
            "not reached" if t.estimate is None else f"{t.estimate:+.3g}" for t in tests
        )
        held = sum(1 for t in tests if t.excludes_zero)
        out.append(
            f"{v.reference} − {c.arm} at {fractions} % of the matched gain: {values}{v.unit};"
            f" {_sign_story(tests)} (t-interval excludes zero at {held} of {len(tests)})."
        )
    if v.lengths:
        steps = "; ".join(
            f"after {ln.steps} steps "
            + ("no matched gain" if ln.matched_gain is None else
               f"(gain {ln.matched_gain:.2f}{gain_unit}) " + " < ".join(ln.order))
            for ln in v.lengths
        )  # fmt: skip
        out.append(f"Least to most forgetting as training goes on: {steps}.")
    return out


def one_line(vs: Sequence[MeasureVerdict]) -> str:
    """The bench's conclusion in one line: a clause per scenario and forgetting measure (the
    measures can disagree: control perplexity also moves with transfer, KL does not), each
    resting on a paired t-interval over seeds."""
    parts = []
    for v in vs:
        where = f"{v.scenario}, {v.measure}"
        if v.matched_gain is None or not v.comparisons:
            parts.append(f"{where}: no matched-gain comparison possible")
            continue
        if len(v.seeds) == 1:
            parts.append(f"{where}: {ONE_SEED}")
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
        parts.append(
            f"{where} (paired t, {len(v.seeds)} seeds): at a matched task gain of"
            f" {v.matched_gain:.3g} {v.reference} " + "; ".join(bits)
        )
    return ". ".join(parts) + "." if parts else "no verdict (no runs)."
