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


def test_verdict_at_matched_gain() -> None:
    points = seed_points(RUNS, BASES, METRICS)
    floors = {"code": dict(BASES["code"].floors)}
    vs = verdict.verdicts(points, floors, ["kappa", "lora"], 1.0, 200, "kappa")
    ppl = next(v for v in vs if (v.scenario, v.measure) == ("code", "control ppl"))
    # kappa's front: (7.5 % gain, +2 %) and (15 %, +7.5 %); lora's: (5 %, 0 %), (15 %, +1 %)
    assert ppl.matched_gain == pytest.approx(15.0)
    assert ppl.joint == ("lora",)
    kappa = next(a for a in ppl.arms if a.arm == "kappa")
    assert kappa.at_matched.estimate == pytest.approx(7.5)
    lora = next(a for a in ppl.arms if a.arm == "lora")
    assert lora.within_budget == pytest.approx(15.0)  # forgets 1 %: inside the 1 % budget
    assert kappa.within_budget is None  # every kappa point forgets more than 1 %: not reached
    (comp,) = ppl.comparisons
    assert comp.arm == "lora" and comp.diff.estimate == pytest.approx(6.5)
    assert comp.verdict == "forgets more"
    kl = next(v for v in vs if (v.scenario, v.measure) == ("code", "KL from base"))
    assert [(c.arm, c.verdict) for c in kl.comparisons] == [("lora", "forgets more")]
    assert kl.comparisons[0].diff.estimate == pytest.approx(0.013)
    assert verdict.one_line(vs) == (
        "code, control ppl: at matched task gain kappa forgets more than lora."
        " code, KL from base: at matched task gain kappa forgets more than lora."
        " code, knowledge: at matched task gain kappa is not distinguishable from lora."
        " digits, control ppl: no matched-gain comparison possible."
        " digits, KL from base: no matched-gain comparison possible."
    )
    one_seed = [p for p in points if p.seed == 0]
    (alone,) = next(
        v for v in verdict.verdicts(one_seed, floors, ["kappa", "lora"], 1.0, 50, "kappa")
        if v.measure == "control ppl"
    ).comparisons  # fmt: skip
    assert alone.verdict == "not distinguishable" and alone.diff.low is None
    text = " ".join(verdict.sentences(ppl, " %"))
    assert "arms on the joint front" in text and "kappa forgets more than lora" in text
    assert (
        "Matched task gain: 15.00 %, the best gain of the arm that learned least (kappa, lora)"
        in text
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
