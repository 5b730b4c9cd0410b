import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest

from kappatune.bench import arms as arms_mod
from kappatune.bench import run as run_mod
from kappatune.bench.run import (
    NOT_IN_KEY,
    BenchSettings,
    lr_grid_around,
    run_bench,
    run_key,
    run_key_fields,
)
from kappatune.bench.scenarios import Scenario
from kappatune.bench.tokenized import EvalSizes
from kappatune.errors import KappaTuneError
from tests.unit._tiny_models import toy_scenario


@pytest.fixture(scope="module")
def setup(toy_bench: dict[str, Path]) -> tuple[Path, Scenario, Path]:
    return toy_bench["model"], toy_scenario(toy_bench), toy_bench["mc"]


def _settings(model: Path, mc: Path, **kw: Any) -> BenchSettings:
    base: dict[str, Any] = dict(
        model=str(model),
        arms=("kappa", "random"),
        seeds=(0, 1),
        steps=4,
        checkpoints=2,
        lr_grid=(("kappa", (1e-4,)), ("random", (1e-4, 3e-4))),
        budget="3072",
        batch_size=2,
        sizes=EvalSizes(seq_len=16, task_sequences=3, control_sequences=10, control_seq_len=16),
        knowledge=str(mc),
        bootstrap=20,
    )
    base.update(kw)
    return BenchSettings(**base)


# one changed value per field that is in the run key
CHANGED: dict[str, Any] = {
    "model": "other-model",
    "steps": 6,
    "checkpoints": 3,
    "checkpoint_at": (1, 4),
    "warmups": (("kappa", 3),),
    "budget": "4096",
    "batch_size": 3,
    "eval_batch_size": 2,
    "sizes": EvalSizes(seq_len=16, task_sequences=3, control_sequences=11, control_seq_len=16),
    "knowledge": "none",
    "knowledge_seed": 1,
    "lora_fraction": 0.5,
    "fisher_tokens": 2048,
    "weight_decay": 0.1,
    "max_grad_norm": 0.5,
    "dtype": "bfloat16",
    "autocast": True,
    "device": "cpu",
}
SIZES_CHANGED = {
    "seq_len": 32,
    "control_seq_len": 24,
    "task_sequences": 4,
    "task_examples": 7,
    "control_sequences": 12,
    "max_row_len": 600,
    "knowledge_questions": 401,
}


def test_every_setting_changes_the_run_key(setup: tuple[Path, Scenario, Path]) -> None:
    model, _, mc = setup
    names = {f.name for f in dataclasses.fields(BenchSettings)}
    assert set(CHANGED) | set(NOT_IN_KEY) == names  # a new field must be listed in one of them
    assert {f.name for f in dataclasses.fields(EvalSizes)} == set(SIZES_CHANGED)
    s = _settings(model, mc)
    arm = s.arm("kappa", 1e-4)
    key = run_key("b", arm, 1e-4, 0, s)
    seen = {key}
    for name, value in CHANGED.items():
        changed = dataclasses.replace(s, **{name: value})
        other = run_key("b", arm, 1e-4, 0, changed)
        assert other not in seen, name
        seen.add(other)
    for name, value in SIZES_CHANGED.items():
        sizes = dataclasses.replace(s.sizes, **{name: value})
        other = run_key("b", arm, 1e-4, 0, dataclasses.replace(s, sizes=sizes))
        assert other not in seen, name
        seen.add(other)
    # settings that do not change this run's result leave the key alone
    for name, value in {
        "arms": ("kappa", "random", "full"),
        "seeds": (0, 5),
        "lr_grid": (("kappa", (1e-4, 2e-4)),),
        "lr_count": 5,
        "forgetting_budget": 2.0,
        "bootstrap": 50,
        "kl_cache_mb": 0.0,
        "keep_state": True,
        "reference": "full",
    }.items():
        assert run_key("b", arm, 1e-4, 0, dataclasses.replace(s, **{name: value})) == key, name
    assert run_key("b", arm, 2e-4, 0, s) != key
    assert run_key("b", arm, 1e-4, 1, s) != key
    assert run_key("c", arm, 1e-4, 0, s) != key
    assert "fisher_tokens" in run_key_fields(s, "kappa")  # the field issue 12 found missing


def test_default_grid_spans_ten_times_around_the_usual_rate() -> None:
    assert lr_grid_around(1e-4) == (3.16e-05, 1e-4, 0.000316)
    assert lr_grid_around(1e-5, count=1) == (1e-5,)
    s = BenchSettings(arms=("full", "kappa"), lr_grid=(("full", (1e-5, 3e-5)),))
    assert s.lrs_for("full") == (1e-5, 3e-5)
    assert s.lrs_for("kappa") == lr_grid_around(arms_mod.get_arm("kappa").lr)


def test_interrupted_sweep_resumes_without_recomputing(
    setup: tuple[Path, Scenario, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, scenario, mc = setup
    evaluated: list[tuple[str, float, int, int]] = []
    real = run_mod.Evaluator.__call__
    current: dict[str, Any] = {"interrupt": True}

    def counting(self: Any, m: Any) -> Any:
        evaluated.append(current["run"])
        if current["interrupt"] and len(evaluated) == 4:  # Ctrl-C in the 2nd run's 2nd checkpoint
            current["interrupt"] = False
            raise KeyboardInterrupt
        return real(self, m)

    real_train = run_mod.train_one

    def tracking(loaded, evaluator, arm, seed, *args, **kwargs):  # type: ignore[no-untyped-def]
        current["run"] = (arm.name, arm.lr, seed)
        return real_train(loaded, evaluator, arm, seed, *args, **kwargs)

    monkeypatch.setattr(run_mod.Evaluator, "__call__", counting)
    monkeypatch.setattr(run_mod, "train_one", tracking)
    with pytest.raises(KeyboardInterrupt):
        run_bench([scenario], _settings(model, mc), tmp_path)
    runs = tmp_path / "runs" / "toy"
    assert sorted(p.name for p in runs.iterdir()) == [
        "base.json", "kappa-lr0.0001-seed0.json", "random-lr0.0001-seed0.json",
    ]  # fmt: skip
    partial = json.loads((runs / "random-lr0.0001-seed0.json").read_text())
    assert [p["step"] for p in partial["points"]] == [2]  # the checkpoint evaluated before Ctrl-C
    finished = (runs / "kappa-lr0.0001-seed0.json").read_bytes()

    # --report-only: nothing trained or evaluated, the one whole run reported, the rest named
    evaluated.clear()
    stored = run_bench([scenario], _settings(model, mc), tmp_path, train=False)
    assert evaluated == []
    assert [(r.arm, r.lr, r.seed) for r in stored.runs] == [("kappa", 1e-4, 0)]
    assert stored.notes[-1] == (
        "toy: report from the stored runs only: 5 of 6 runs not stored whole yet (random lr"
        " 0.0001 seed 0; random lr 0.0003 seed 0; kappa lr 0.0001 seed 1; random lr 0.0001 seed"
        " 1; random lr 0.0003 seed 1)"
    )
    with pytest.raises(KappaTuneError, match="no stored base result of scenario toy"):
        run_bench([scenario], _settings(model, mc), tmp_path / "empty", train=False)

    evaluated.clear()
    outcome = run_bench([scenario], _settings(model, mc), tmp_path)
    # the interrupted run re-trains but evaluates only its missing checkpoint; the rest is new,
    # seed by seed
    twice = [("random", 3e-4, 0)] * 2 + [("kappa", 1e-4, 1)] * 2
    twice += [("random", 1e-4, 1)] * 2 + [("random", 3e-4, 1)] * 2
    assert evaluated == [("random", 1e-4, 0), *twice]
    assert (runs / "kappa-lr0.0001-seed0.json").read_bytes() == finished
    assert len(outcome.runs) == 6
    assert all([p.step for p in r.points] == [2, 4] for r in outcome.runs)
    resumed = next(r for r in outcome.runs if (r.arm, r.lr, r.seed) == ("random", 1e-4, 0))
    assert resumed.points[0].to_json() == partial["points"][0]

    evaluated.clear()
    changed = _settings(model, mc, lr_grid=(("kappa", (1e-4,)), ("random", (1e-4, 2e-4))))
    run_bench([scenario], changed, tmp_path)
    assert evaluated == [("random", 2e-4, s) for s in (0, 1) for _ in (2, 4)]  # only new runs
    assert (runs / "random-lr0.0003-seed0.json").is_file()  # other results stay on disk

    base = outcome.bases["toy"]
    assert base.metrics.control["kl"] == 0.0 and base.metrics.knowledge["total"] == 12.0
    assert set(base.floors) == {"control_ppl", "task_gain", "knowledge"}
    assert len(base.task_tokens) == 3 and len(base.control_tokens) == 10
    for r in outcome.runs:
        assert r.points[-1].metrics.control["kl"] > 0
        assert len(r.points[-1].metrics.task_nlls) == 3  # for the paired noise of each change
        assert len(r.points[-1].metrics.control_nlls) == 10
        # each arm trains a prefix of its own order: kappa 1.v, 0.k, 1.k (512 each; the next,
        # 2048, overshoots 3072); random's order depends on the seed: 2560 for seed 0, 3072 for 1
        expected = {
            ("kappa", 0): 1536,
            ("kappa", 1): 1536,
            ("random", 0): 2560,
            ("random", 1): 3072,
        }
        assert r.trainable_params == expected[(r.arm, r.seed)]


class _Steps:
    """A reporter that records the training steps it is told of, run by run."""

    def __init__(self) -> None:
        self.steps: list[list[int]] = []

    def message(self, text: str) -> None:
        pass

    def run_started(self, scenario: str, arm: str, lr: float, seed: int, horizon: int) -> None:
        self.steps.append([])

    def step(self, step: int, loss: float) -> None:
        self.steps[-1].append(step)

    def run_finished(self, result: Any, reused: bool) -> None:
        pass


@pytest.mark.parametrize("arm", ["kappa", "lora", "full", "osf"])
def test_long_run_goes_on_from_its_kept_state(
    setup: tuple[Path, Scenario, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    arm: str,
) -> None:
    """--checkpoint-at with --keep-state: an interrupted run trains on from its last
    checkpoint's kept state, and its numbers are those of the uninterrupted run (selective,
    LoRA, full fine-tuning and a PEFT peer)."""
    model, scenario, mc = setup
    settings = _settings(
        model, mc, arms=(arm,), seeds=(0,), lr_grid=((arm, (3e-4,)),), steps=6,
        checkpoint_at=(1, 3, 6), keep_state=True,
    )  # fmt: skip
    assert settings.checkpoint_steps() == (1, 3, 6)
    whole = run_bench([scenario], settings, tmp_path / "whole").runs[0]

    real = run_mod.Evaluator.__call__
    calls = {"n": 0}

    def interrupting(self: Any, m: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 3:  # Ctrl-C in the evaluation at step 6
            raise KeyboardInterrupt
        return real(self, m)

    monkeypatch.setattr(run_mod.Evaluator, "__call__", interrupting)
    out = tmp_path / "cut"
    with pytest.raises(KeyboardInterrupt):
        run_bench([scenario], settings, out)
    kept = list((out / "state" / "toy").iterdir())
    assert len(kept) == 1 and (kept[0] / "manifest.json").is_file()
    monkeypatch.setattr(run_mod.Evaluator, "__call__", real)
    steps = _Steps()
    resumed = run_bench([scenario], settings, out, steps).runs[0]
    assert steps.steps == [[4, 5, 6]]  # trained on from step 3, not from step 0
    assert resumed.losses == whole.losses
    assert [p.to_json() for p in resumed.points] == [p.to_json() for p in whole.points]
    assert not (out / "state").exists()  # removed with the finished run

    # a kept state that does not fit (damaged) is left alone: the run trains from step 0
    with pytest.raises(KeyboardInterrupt):
        monkeypatch.setattr(run_mod.Evaluator, "__call__", interrupting)
        calls["n"] = 0
        run_bench([scenario], settings, tmp_path / "bad")
    monkeypatch.setattr(run_mod.Evaluator, "__call__", real)
    (folder,) = (tmp_path / "bad" / "state" / "toy").iterdir()
    victim = next(f for f in folder.iterdir() if f.suffix == ".safetensors")
    victim.write_bytes(victim.read_bytes()[:-8] + bytes(8))
    steps = _Steps()
    again = run_bench([scenario], settings, tmp_path / "bad", steps).runs[0]
    assert steps.steps == [[1, 2, 3, 4, 5, 6]]
    assert again.losses == whole.losses


def test_checkpoint_steps_given_explicitly() -> None:
    from kappatune.bench.config import checkpoint_steps

    assert checkpoint_steps(256, 5, (16, 32, 64, 128, 256)) == (16, 32, 64, 128, 256)
    assert checkpoint_steps(8, 2) == (4, 8)
    with pytest.raises(KappaTuneError, match="the last checkpoint must be the run's end"):
        checkpoint_steps(256, 5, (16, 32))
    with pytest.raises(KappaTuneError, match="positive and increasing"):
        checkpoint_steps(8, 2, (4, 4, 8))
    with pytest.raises(KappaTuneError, match="positive and increasing"):
        checkpoint_steps(8, 2, (0, 8))


def test_bad_settings_fail_before_anything_is_written(
    setup: tuple[Path, Scenario, Path], tmp_path: Path
) -> None:
    model, scenario, mc = setup
    with pytest.raises(KappaTuneError, match="every learning rate must be positive"):
        _settings(model, mc, lr_grid=(("kappa", (1e-4, 0.0)),))
    with pytest.raises(KappaTuneError, match="--checkpoints 5 must be between 1 and --steps 4"):
        _settings(model, mc, checkpoints=5)
    with pytest.raises(KappaTuneError, match="'base' is always measured"):
        _settings(model, mc, arms=("base",))
    with pytest.raises(KappaTuneError, match="'full' is not among --arms"):
        _settings(model, mc, lr_grid=(("full", (1e-5,)),))
    with pytest.raises(KappaTuneError, match="cannot read parameter budget"):
        _settings(model, mc, budget="many")
    small = _settings(
        model,
        mc,
        sizes=EvalSizes(seq_len=16, task_sequences=3, control_sequences=4, control_seq_len=16),
    )
    with pytest.raises(KappaTuneError, match="4 control sequences are too few for a noise floor"):
        run_bench([scenario], small, tmp_path)
    with pytest.raises(KappaTuneError, match="exceeds the"):
        run_bench([scenario], _settings(model, mc, budget="10M"), tmp_path)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "q", "options": [" a", "é"], "answer": " a"}) + "\n")
    with pytest.raises(KappaTuneError, match="option 'é' of 'q' does not tokenize"):
        run_bench([scenario], _settings(model, bad), tmp_path)
    assert not (tmp_path / "runs").exists()


def test_missing_dict_packages_skip_the_knowledge_control_with_a_reason(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(run_mod, "missing_packages", lambda: ["dict-gcide"])
    questions, why = run_mod.knowledge_questions(BenchSettings(arms=("kappa",)))
    assert questions == ()
    assert why == (
        "knowledge control skipped: dict-gcide not installed"
        " (apt-get install -y dict-gcide, or `make setup`)"
    )
    assert run_mod.knowledge_questions(BenchSettings(arms=("kappa",), knowledge="none")) == (
        (),
        None,
    )


def test_another_bootstrap_recomputes_the_floors_alone(
    setup: tuple[Path, Scenario, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, scenario, mc = setup
    one = dict(arms=("kappa",), seeds=(0,), lr_grid=(("kappa", (1e-4,)),), steps=2, checkpoints=1)
    first = run_bench([scenario], _settings(model, mc, **one), tmp_path)
    stored = tmp_path / "runs" / "toy" / "base.json"
    assert json.loads(stored.read_text())["floors_bootstrap"] == 20
    run_file = (tmp_path / "runs" / "toy" / "kappa-lr0.0001-seed0.json").read_bytes()
    trained: list[str] = []
    monkeypatch.setattr(run_mod, "train_one", lambda _l, _e, arm, *a, **k: trained.append(arm))
    again = run_bench([scenario], _settings(model, mc, bootstrap=20, **one), tmp_path)
    assert again.bases["toy"].to_json() == first.bases["toy"].to_json()
    changed = run_bench([scenario], _settings(model, mc, bootstrap=37, **one), tmp_path)
    base, old = changed.bases["toy"], first.bases["toy"]
    assert trained == []  # the run is reused: its key does not depend on the bootstrap count
    assert (tmp_path / "runs" / "toy" / "kappa-lr0.0001-seed0.json").read_bytes() == run_file
    assert base.config_hash == old.config_hash and base.metrics == old.metrics
    assert base.floors_bootstrap == 37 and set(base.floors) == set(old.floors)
    assert base.floors != old.floors
    assert json.loads(stored.read_text())["floors_bootstrap"] == 37
    legacy = {k: v for k, v in json.loads(stored.read_text()).items() if k != "floors_bootstrap"}
    stored.write_text(json.dumps(legacy))  # written before the count was stored: recomputed
    assert run_bench([scenario], _settings(model, mc, **one), tmp_path).bases["toy"].floors == (
        old.floors
    )


def test_stored_cpu_benchmark_runs_keep_their_keys() -> None:
    """The committed cpu-preset study stays reusable: every stored run's key is the one the
    documented command computes today (a changed key would silently recompute it all)."""
    from kappatune.bench.store import RunResult
    from kappatune.cli import bench as cli_bench
    from kappatune.cli.main import build_parser

    root = Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "bench_cpu_gcide"
    command = [
        "kappatune",
        "bench",
        "--preset",
        "cpu",
        "--output",
        "benchmarks/results/bench_cpu_gcide",
    ]
    settings = cli_bench.settings_from_args(
        cli_bench.resolve(build_parser().parse_args(command[1:]))
    )
    runs = sorted((root / "runs" / "code").glob("*-seed*.json"))
    base = json.loads((root / "runs" / "code" / "base.json").read_text())["config_hash"]
    assert len(runs) == 36  # 4 arms x 3 learning rates x 3 seeds
    points = set()
    for path in runs:
        r = RunResult.from_json(json.loads(path.read_text()))
        key = run_key(base, settings.arm(r.arm, r.lr), r.lr, r.seed, settings)
        assert key == r.config_hash, path.name
        points.add((r.arm, r.lr, r.seed))
    grid = {(a, lr, s) for a in settings.arms for lr in settings.lrs_for(a) for s in settings.seeds}
    assert points == grid
