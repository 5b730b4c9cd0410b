import json
import math
from pathlib import Path

from kappatune.bench.store import (
    BaseResult,
    Metrics,
    Point,
    ResultStore,
    RunResult,
    config_hash,
    relative_change,
)


def _run(hash_: str = "h1", seed: int = 0) -> RunResult:
    m = Metrics(task={"perplexity": 10.0, "nll": math.log(10)}, control={"perplexity": math.inf})
    return RunResult(
        scenario="code",
        arm="kappa",
        lr=1e-4,
        seed=seed,
        config_hash=hash_,
        trainable_params=123,
        points=(Point("checkpoint", 5, 2.5, True, m), Point("checkpoint", 7, math.nan, True, m)),
        losses=(3.0, 2.0),
        seconds=1.5,
        details={"lr": 1e-4},
    )


def test_run_round_trip_keeps_non_finite_numbers(tmp_path: Path) -> None:
    store = ResultStore(tmp_path)
    run = _run()
    path = store.save_run(run)
    assert path == tmp_path / "runs" / "code" / "kappa-lr0.0001-seed0.json"
    json.loads(path.read_text())  # strict JSON
    back = store.load_run("code", "kappa", 1e-4, 0, "h1")
    assert back is not None
    assert back.points[0] == run.points[0]
    assert math.isnan(back.points[1].train_loss)
    assert back.points[1].metrics.control["perplexity"] == math.inf
    assert back.losses == run.losses and back.details == run.details


def test_stale_missing_and_malformed_results_are_not_reused(tmp_path: Path) -> None:
    store = ResultStore(tmp_path)
    assert store.load_run("code", "kappa", 1e-4, 0, "h1") is None
    store.save_run(_run("old"))
    assert store.load_run("code", "kappa", 1e-4, 0, "new") is None
    store.run_path("code", "kappa", 1e-4, 1).write_text("{not json")
    assert store.load_run("code", "kappa", 1e-4, 1, "h1") is None
    store.run_path("code", "kappa", 1e-4, 2).write_text('{"schema_version": 9}')
    assert store.load_run("code", "kappa", 1e-4, 2, "h1") is None


def test_base_round_trip(tmp_path: Path) -> None:
    store = ResultStore(tmp_path)
    base = BaseResult(
        "digits", "hb", Metrics({"accuracy": 0.1}, {"perplexity": 30.0}, {"accuracy": 0.5}),
        1000, 2.0, 4.5, floors={"control_ppl": 0.8}, knowledge_correct=(True, False),
    )  # fmt: skip
    store.save_base(base)
    assert store.load_base("digits", "hb") == base
    assert store.load_base("digits", "other") is None


def test_config_hash_is_order_independent_and_sensitive() -> None:
    assert config_hash({"a": 1, "b": [1, 2]}) == config_hash({"b": [1, 2], "a": 1})
    assert config_hash({"a": 1}) != config_hash({"a": 2})


def test_relative_change() -> None:
    assert relative_change(11.0, 10.0) == 10.0
    assert math.isnan(relative_change(1.0, 0.0))
    assert math.isnan(relative_change(math.inf, 1.0))
