import base64
import csv
import io
import json
import math
from pathlib import Path

import pytest

from kappatune.bench import report, verdict
from kappatune.bench.store import BaseResult, Metrics, Point, RunResult
from kappatune.bench.summary import mean_std, seed_points, summarize

KNOW = {"accuracy": 0.8, "correct": 80.0, "total": 100.0}
BASES = {
    "code": BaseResult(
        "code", "b", Metrics({"perplexity": 10.0, "nll": 2.3}, {"perplexity": 20.0, "kl": 0.0},
                             KNOW),
        100, floors={"control_ppl": 9.0, "task_gain": 0.5, "knowledge": 4.0},
    ),
    "digits": BaseResult(
        "digits", "b", Metrics({"accuracy": 0.1, "label_nll": 3.0}, {"perplexity": 20.0}), 100
    ),
}  # fmt: skip
METRICS = {"code": "perplexity", "digits": "accuracy"}


def _run(scenario: str, arm: str, seed: int, pts: list[tuple[int, dict, float]]) -> RunResult:
    points = tuple(
        Point("checkpoint", step, 2.0, True,
              Metrics(task, {"perplexity": control, "kl": control / 100}, KNOW))
        for step, task, control in pts
    )  # fmt: skip
    return RunResult(scenario, arm, 1e-4, seed, "h", 1000 + seed, points, losses=(3.0, 2.5))


RUNS = [
    _run("code", "kappa", 0, [(2, {"perplexity": 9.5, "nll": 2.2}, 20.2),
                              (4, {"perplexity": 9.0, "nll": 2.2}, 21.0)]),
    _run("code", "kappa", 1, [(2, {"perplexity": 9.0, "nll": 2.1}, 20.6),
                              (4, {"perplexity": 8.0, "nll": 2.1}, 22.0)]),
    _run("code", "lora", 0, [(2, {"perplexity": 9.5, "nll": 2.2}, 20.0),
                             (4, {"perplexity": 9.0, "nll": 2.25}, 20.1)]),
    _run("code", "lora", 1, [(2, {"perplexity": 9.5, "nll": 2.2}, 20.0),
                             (4, {"perplexity": 8.0, "nll": 2.2}, 20.3)]),
    _run("digits", "kappa", 0, [(4, {"accuracy": 0.4, "label_nll": 1.0}, 20.0)]),
]  # fmt: skip


def test_mean_std() -> None:
    assert mean_std([1.0, 3.0]) == (2.0, pytest.approx(math.sqrt(2)))
    m, s = mean_std([5.0])
    assert m == 5.0 and math.isnan(s)
    assert all(math.isnan(x) for x in mean_std([math.nan]))


def test_summary_against_base() -> None:
    points = seed_points(RUNS, BASES, METRICS)
    assert len(points) == 9
    rows = summarize(points, BASES, METRICS, ["lora", "kappa"])
    keys = [(r.scenario, r.arm, r.step) for r in rows]
    assert keys == [
        ("code", "base", 0), ("code", "lora", 2), ("code", "lora", 4), ("code", "kappa", 2),
        ("code", "kappa", 4), ("digits", "base", 0), ("digits", "kappa", 4),
    ]  # fmt: skip
    kappa = rows[4]
    assert kappa.task_gain[0] == pytest.approx(15.0)
    assert kappa.task_gain[1] == pytest.approx(math.sqrt(50))
    assert kappa.forgetting[0] == pytest.approx(7.5)
    assert kappa.forgetting[1] == pytest.approx(math.sqrt(12.5))
    assert kappa.kl[0] == pytest.approx(0.215)
    assert kappa.knowledge_change[0] == 0.0
    assert kappa.trainable_params == 1001 and kappa.seeds == 2
    digits = rows[6]
    assert digits.task_gain[0] == pytest.approx(30.0)  # accuracy points
    assert math.isnan(digits.knowledge_change[0])  # digits' base has no knowledge control
    assert rows[5].task_value[0] == 0.1 and rows[5].forgetting[0] == 0.0


def _three_seeds() -> list[RunResult]:
    """kappa: (5 % gain, +2 %) at step 2, then (10/12/14 %, +5 %) by seed; lora: (5 %, 0 %),
    then (10/11/12 %, +1 %). Each arm at two learning rates' worth of labels: one lr, two steps."""
    out = []
    for seed, (k_ppl, l_ppl) in enumerate(((9.0, 9.0), (8.8, 8.9), (8.6, 8.8))):
        out.append(
            _run(
                "code",
                "kappa",
                seed,
                [
                    (2, {"perplexity": 9.5, "nll": 2.2}, 20.4),
                    (4, {"perplexity": k_ppl, "nll": 2.1}, 21.0),
                ],
            )
        )
        out.append(
            _run(
                "code",
                "lora",
                seed,
                [
                    (2, {"perplexity": 9.5, "nll": 2.2}, 20.0),
                    (4, {"perplexity": l_ppl, "nll": 2.2}, 20.2),
                ],
            )
        )
    return out  # fmt: skip


def test_verdict_at_matched_gain() -> None:
    points = seed_points(_three_seeds(), BASES, METRICS)
    floors = {"code": dict(BASES["code"].floors)}
    vs = verdict.verdicts(points, floors, ["kappa", "lora"], 1.0, 200, "kappa")
    ppl = next(v for v in vs if (v.scenario, v.measure) == ("code", "control ppl"))
    # the highest gain every arm reaches on every seed: seed 0's 10 % (not kappa's mean best, 12 %)
    assert ppl.matched_gain == pytest.approx(10.0)
    assert ppl.seeds == (0, 1, 2)
    assert ppl.joint == ("kappa", "lora")  # kappa's 12 % mean best is beyond lora's 11 %
    kappa = next(a for a in ppl.arms if a.arm == "kappa")
    # per seed on its own front at 10 %: 5, 2 + 3 * 5/7, 2 + 3 * 5/9
    assert kappa.seedwise is not None
    assert kappa.seedwise.diffs == pytest.approx((5.0, 2 + 15 / 7, 2 + 15 / 9))
    # kappa's mean front (5 %, +2 %), (12 %, +5 %): a chord over 7 points of gain
    assert kappa.reading.startswith("interpolated over 7.00 of gain (lr 0.0001 @ step 2")
    assert kappa.edge == "best gain at lr 0.0001 @ step 4: the last step"
    lora = next(a for a in ppl.arms if a.arm == "lora")
    assert lora.within_budget == pytest.approx(11.0)  # its best point forgets 1 %: the budget
    assert kappa.within_budget is None  # every kappa point forgets more than 1 %: not reached
    (comp,) = ppl.comparisons
    want = (4.0, 2 + 15 / 7 - 5 / 6, 2 + 15 / 9 - 5 / 7)
    assert comp.arm == "lora" and comp.test is not None
    assert comp.test.diffs == pytest.approx(want)
    assert comp.test.estimate == pytest.approx(sum(want) / 3)
    assert (comp.test.low, comp.test.high) == pytest.approx((2.097646, 4.743624), abs=1e-6)
    assert comp.test.p_sign_flip == 0.25  # 3 seeds: the least the exact test can give
    assert comp.verdict == "forgets more"  # from the paired t-interval
    # the range of gains: at 25 % and 50 % of 10 % every seed reads its step-2 point: +2 vs 0
    assert [lv.fraction for lv in ppl.levels] == [0.25, 0.5, 0.75, 1.0]
    low = dict(ppl.levels[0].diffs)["lora"]
    assert low.diffs == pytest.approx((2.0, 2.0, 2.0)) and low.excludes_zero
    # as training goes on: after step 2 only the step-2 points (5 %: kappa +2, lora 0), then all
    (two, four) = ppl.lengths
    assert (two.steps, four.steps) == (2, 4)
    assert two.matched_gain == pytest.approx(5.0) and four.matched_gain == pytest.approx(10.0)
    assert dict(two.forgetting) == {"kappa": pytest.approx(2.0), "lora": pytest.approx(0.0)}
    assert dict(four.forgetting)["kappa"] == pytest.approx((5 + 2 + 15 / 7 + 2 + 15 / 9) / 3)
    assert two.order == four.order == ("lora", "kappa")
    kl = next(v for v in vs if (v.scenario, v.measure) == ("code", "KL from base"))
    assert [(c.arm, c.verdict) for c in kl.comparisons] == [("lora", "forgets more")]
    assert verdict.one_line(vs) == (
        "code, control ppl (paired t, 3 seeds): at a matched task gain of 10 kappa forgets more"
        " than lora. code, KL from base (paired t, 3 seeds): at a matched task gain of 10 kappa"
        " forgets more than lora. code, knowledge (paired t, 3 seeds): at a matched task gain of"
        " 10 kappa is not distinguishable from lora."
    )
    text = " ".join(verdict.sentences(ppl, " %"))
    assert "arms on the joint front" in text and "kappa forgets more than lora" in text
    assert "paired t 95% CI +2.1, +4.74; 3 seeds; sign-flip p = 0.25" in text
    assert "cannot go below p = 0.25 with 3 seeds" in text
    assert "kappa − lora at 25/50/75/100 % of the matched gain: +2, +2," in text
    assert "it keeps its sign (t-interval excludes zero at 4 of 4)" in text
    assert (
        "as training goes on: after 2 steps (gain 5.00 %) lora < kappa; after 4 steps (gain"
        " 10.00 %) lora < kappa." in text
    )

    one_seed = [p for p in points if p.seed == 0]
    alone_v = next(
        v for v in verdict.verdicts(one_seed, floors, ["kappa", "lora"], 1.0, 50, "kappa")
        if v.measure == "control ppl"
    )  # fmt: skip
    (alone,) = alone_v.comparisons
    assert alone.verdict == "one seed: no interval, cannot judge" and alone.diff.low is None
    assert verdict.one_line([alone_v]) == (
        "code, control ppl: one seed: no interval, cannot judge."
    )

    # two seeds only (the first example's runs): a t-interval with 1 degree of freedom
    two = seed_points(RUNS, BASES, METRICS)
    vs2 = verdict.verdicts(two, floors, ["kappa", "lora"], 1.0, 200, "kappa")
    ppl2 = next(v for v in vs2 if (v.scenario, v.measure) == ("code", "control ppl"))
    assert ppl2.matched_gain == pytest.approx(10.0)
    (c2,) = ppl2.comparisons
    assert c2.test is not None and c2.test.diffs == pytest.approx((4.5, 2.5))
    assert c2.test.p_sign_flip == 0.5 and c2.verdict == "not distinguishable"
    assert verdict.one_line(vs2).endswith(
        "digits, control ppl: no matched-gain comparison possible."
        " digits, KL from base: no matched-gain comparison possible."
    )


def test_reports_hold_the_numbers(tmp_path: Path) -> None:
    points = seed_points(RUNS, BASES, METRICS)
    rows = summarize(points, BASES, METRICS, ["lora", "kappa"])
    floors = verdict.with_change_floors(points, {n: dict(b.floors) for n, b in BASES.items()})
    assert floors["code"]["knowledge_n"] == 100.0
    assert "control_ppl_change" not in floors["code"]  # no per-sequence NLLs in these runs
    floors["code"]["control_ppl_change"] = 1.0
    vs = verdict.verdicts(points, floors, ["kappa", "lora"], 1.0, 100, "kappa")
    curves = {("code", "kappa"): [[3.0, 2.5]], ("code", "lora"): [[3.0, 2.9]]}
    meta = {"command": "kappatune bench code", "settings": {"steps": 5}}
    files = report.write_report(
        tmp_path, rows, points, vs, meta, ["a note"], METRICS, floors, "the verdict", curves
    )
    names = {f.name for f in files}
    assert names == {
        "pareto.png", "gain_vs_forgetting.png", "loss_curves.png", "summary.json", "summary.csv",
        "seeds.csv", "report.md", "report.html",
    }  # fmt: skip
    md = (tmp_path / "report.md").read_text()
    assert md.startswith("# kappatune bench\n\n**Verdict.** the verdict\n")
    assert "| code | kappa | 0.0001 | 4 | 1.0k |" in md
    assert "+15.0% ± 7.1%" in md and "+7.50% ± 3.54%" in md
    assert "+0.00% ± 0.00% (within noise)" in md  # lora at step 2: below the 1 % floor
    assert "+1.00% ± 0.71% |" in md  # lora at step 4: not below it
    assert "noise floors control perplexity ±9.00 % (base model, which text)" in md
    assert "control perplexity change ±1.00 % (paired" in md
    sized = {"code": {"control_ppl": 26.649, "control_rows": 24.0, "control_tokens": 1512.0}}
    assert report.floor_lines(sized) == [
        "code: noise floors control perplexity ±26.65 % (base model, which text; 24 rows, 1512"
        " tokens)"
    ]
    # knowledge unchanged (80 % of 100): binomial interval ±1.96 sqrt(2 * 0.16 / 100) = ±11.1 pp
    assert "+0.0 pp [-11.1, +11.1] (within noise)" in md
    assert "- a note" in md and "kappatune bench code" in md
    html = (tmp_path / "report.html").read_text()
    png = (tmp_path / "pareto.png").read_bytes()
    assert png.startswith(b"\x89PNG") and base64.b64encode(png).decode() in html
    table = list(csv.DictReader(io.StringIO((tmp_path / "summary.csv").read_text())))
    assert len(table) == len(rows)
    seeds = list(csv.DictReader(io.StringIO((tmp_path / "seeds.csv").read_text())))
    assert len(seeds) == 9
    data = json.loads((tmp_path / "summary.json").read_text())
    assert data["kind"] == "kappatune.bench.summary" and len(data["verdicts"]) == len(vs)
    assert report.markdown_table(rows).count("\n") == len(rows) + 2


def test_front_reading_and_grid_edges_say_where_a_figure_comes_from() -> None:
    from kappatune.bench.fronts import FrontPoint

    grid = {"lr 1e-05 @ step 4": (1e-5, 4), "lr 1e-05 @ step 8": (1e-5, 8),
            "lr 0.0001 @ step 4": (1e-4, 4), "lr 0.0001 @ step 8": (1e-4, 8)}  # fmt: skip
    front = (
        FrontPoint(3.0, 0.1, "lr 1e-05 @ step 4"),
        FrontPoint(6.0, 0.2, "lr 1e-05 @ step 8"),
        FrontPoint(9.0, 0.5, "lr 0.0001 @ step 8"),
    )
    assert verdict.front_reading(front, 6.05) == "measured (lr 1e-05 @ step 8, gain 6.00)"
    assert verdict.front_reading(front, 7.5) == (
        "interpolated over 3.00 of gain (lr 1e-05 @ step 8, gain 6.00 to lr 0.0001 @ step 8,"
        " gain 9.00)"
    )
    assert verdict.front_reading(front, 1.0) == (
        "upper bound: its least-gain front point (lr 1e-05 @ step 4, gain 3.00)"
    )
    assert verdict.front_reading(front, 9.5) == "not reached"
    # the best gain at the highest rate and the last step; read at 5 % from the lowest rate's
    # last step: a lower rate or a longer run may do better
    assert verdict.grid_edge(front, 5.0, grid) == (
        "best gain at lr 0.0001 @ step 8: its highest rate and the last step; read from lr 1e-05"
        " @ step 8, its lowest rate at the last step (a lower rate or a longer run may forget less)"
    )
    inside = (FrontPoint(3.0, 0.1, "lr 1e-05 @ step 4"),)  # best: a low rate, mid-run
    assert verdict.grid_edge(inside, 2.0, grid) == ""
