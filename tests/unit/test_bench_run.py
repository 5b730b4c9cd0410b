import json
from pathlib import Path

import pytest
import torch

from kappatune.bench import run as run_mod
from kappatune.bench.inputs import EvalSizes
from kappatune.bench.run import BenchSettings, run_bench
from kappatune.bench.scenarios import DataSpec, Scenario
from kappatune.errors import KappaTuneError
from tests.unit._tiny_models import save_tiny_model


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Scenario]:
    root = tmp_path_factory.mktemp("bench")
    model = save_tiny_model(root / "tiny", seed=0)
    words = ["the", "cat", "sat", "on", "a", "mat", "and", "ran", "to", "the", "big", "red", "dog"]
    text = " ".join(words[(i * 7) % len(words)] for i in range(600))
    (root / "train.txt").write_text(text)
    (root / "held.txt").write_text(text[::-1])
    (root / "control.txt").write_text("x = 1 + 2\n" * 40)
    scenario = Scenario(
        "toy",
        DataSpec(str(root / "train.txt")),
        DataSpec(str(root / "held.txt")),
        DataSpec(str(root / "control.txt")),
    )
    return model, scenario


def _settings(model: Path, **kw: object) -> BenchSettings:
    base = dict(
        model=str(model),
        arms=("kappa", "random"),
        seeds=(0, 1),
        stop="both",
        steps=2,
        max_steps=3,
        budget="3072",
        batch_size=2,
        sizes=EvalSizes(seq_len=16, task_sequences=3, control_sequences=3),
    )
    base.update(kw)
    return BenchSettings(**base)  # type: ignore[arg-type]


def test_interrupted_bench_resumes_without_recomputing(
    setup: tuple[Path, Scenario], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, scenario = setup
    calls: list[tuple[str, int]] = []
    real = run_mod.train_one

    def flaky(loaded, prepared, arm, seed, *args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append((arm.name, seed))
        if len(calls) == 3:
            raise KeyboardInterrupt  # the user pressed Ctrl-C during the third run
        return real(loaded, prepared, arm, seed, *args, **kwargs)

    monkeypatch.setattr(run_mod, "train_one", flaky)
    with pytest.raises(KeyboardInterrupt):
        run_bench([scenario], _settings(model), tmp_path)
    runs = tmp_path / "runs" / "toy"
    assert sorted(p.name for p in runs.iterdir()) == [
        "base.json",
        "kappa-seed0.json",
        "kappa-seed1.json",
    ]
    before = {p.name: p.read_bytes() for p in runs.iterdir()}

    calls.clear()
    outcome = run_bench([scenario], _settings(model), tmp_path)
    assert calls == [("random", 0), ("random", 1)]  # finished runs were not recomputed
    assert len(outcome.runs) == 4
    for name, data in before.items():
        assert (runs / name).read_bytes() == data

    calls.clear()
    changed = _settings(model, lrs=(("random", 5e-4),))
    run_bench([scenario], changed, tmp_path)
    assert calls == [("random", 0), ("random", 1)]  # only the changed arm is stale
    assert json.loads((runs / "random-seed0.json").read_text())["details"]["lr"] == 5e-4


def test_results_hold_both_points_and_equal_budgets(
    setup: tuple[Path, Scenario], tmp_path: Path
) -> None:
    model, scenario = setup
    outcome = run_bench([scenario], _settings(model, seeds=(0,)), tmp_path)
    assert {r.arm for r in outcome.runs} == {"kappa", "random"}
    for r in outcome.runs:
        assert [p.rule for p in r.points] == ["steps", "loss"]
        assert r.points[0].step == 2
        # each arm trains a prefix of its own order: kappa 1.v, 0.k, 1.k (512 each; the next,
        # 2048, overshoots 3072); random (seed 0) 0.gate (2048) and 1.k (512)
        assert r.trainable_params == {"kappa": 1536, "random": 2560}[r.arm]
    base = outcome.bases["toy"]
    assert base.metrics.task["tokens"] > 0 and base.train_loss > 0


def test_bad_settings_fail_before_training(setup: tuple[Path, Scenario], tmp_path: Path) -> None:
    model, scenario = setup
    with pytest.raises(KappaTuneError, match="exceeds the"):
        run_bench([scenario], _settings(model, budget="10M"), tmp_path)
    assert not (tmp_path / "runs").exists()
    with pytest.raises(KappaTuneError, match="'base' is always measured"):
        _settings(model, arms=("base",))
    with pytest.raises(KappaTuneError, match="'full' is not among --arms"):
        _settings(model, lrs=(("full", 1e-5),))
    with pytest.raises(KappaTuneError, match="cannot read --target-loss"):
        _settings(model, target_loss="lots")
    with pytest.raises(KappaTuneError, match="cannot read parameter budget"):
        _settings(model, budget="many")
