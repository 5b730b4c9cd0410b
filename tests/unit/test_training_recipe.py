"""The training recipe from Python (no CLI), the method registry and the Engine seam."""

from __future__ import annotations

import ast
import importlib.util
import inspect
import json
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from kappatune.analysis.spectra import AnalyzeOptions, analyze
from kappatune.errors import KappaTuneError
from kappatune.selection.budget import Budget
from kappatune.selection.core import select
from kappatune.training.data import PackConfig
from kappatune.training.loop import Engine, LocalEngine, TrainConfig
from kappatune.training.methods import get_method, method_names
from kappatune.training.recipe import resume_training, run_training
from kappatune.training.run_settings import RunSettings
from tests.unit._tiny_models import save_tiny_model

TEXT = "the quick brown fox jumps over the lazy dog. pack my box with five dozen liquor jugs.\n" * 6


class Recorder:
    """A RunReporter that keeps what it is told."""

    def __init__(self) -> None:
        self.events: list[tuple[Any, ...]] = []

    def unfit(self, data: Any, seq_len: int) -> None:
        self.events.append(("unfit", seq_len))

    def finished(self, output: Path) -> None:
        self.events.append(("finished", output))

    def header(self, model: str, method: str, data: Any, where: str) -> None:
        self.events.append(("header", method, len(data), where))

    def note(self, text: str) -> None:
        self.events.append(("note", text))

    def start(self, prepared: Any, resumed_at: int | None, total: int, checkpoint: Path) -> None:
        self.events.append(("start", resumed_at, total, checkpoint))

    def progress(self, total: int, start: int) -> None:
        self.events.append(("progress", total, start))

    def done(self, result: Any, output: Path, processes: int | None) -> None:
        self.events.append(("done", result.steps, output, processes))


@pytest.fixture(scope="module")
def settings(tmp_path_factory: pytest.TempPathFactory) -> RunSettings:
    root = tmp_path_factory.mktemp("recipe")
    model = save_tiny_model(root / "tiny", seed=0)
    data = root / "train.txt"
    data.write_text(TEXT)
    sel = select(analyze(model, AnalyzeOptions(workers=1)), "lowest-kappa", Budget(tensors=3))
    return RunSettings(
        model=str(model),
        data=(str(data),),
        method="selective",
        output=root / "run",
        train=TrainConfig(steps=3, batch_size=2, lr=1e-2),
        pack=PackConfig(seq_len=16),
        selection=sel,
        checkpoint_every=2,
        device="cpu",
    )


def test_resume_a_run_from_python(
    settings: RunSettings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ref = run_training(replace(settings, output=tmp_path / "ref"))
    assert ref.status == "new" and ref.result is not None and ref.target == tmp_path / "ref/model"
    original = LocalEngine.save_checkpoint

    def interrupted(engine: LocalEngine, folder: Path, state: Any) -> None:
        original(engine, folder, state)
        raise KeyboardInterrupt

    out = tmp_path / "run"
    monkeypatch.setattr(LocalEngine, "save_checkpoint", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_training(replace(settings, output=out))
    monkeypatch.setattr(LocalEngine, "save_checkpoint", original)
    assert sorted(p.name for p in out.iterdir()) == [
        "checkpoint",
        "log.jsonl",
        "run.json",
        "selection.json",
    ]
    seen = Recorder()
    resumed = resume_training(out, device="cpu", reporter=seen)
    assert resumed.status == "resume" and resumed.result is not None
    assert [e for e in seen.events if e[0] in ("start", "done")] == [
        ("start", 2, 3, out / "checkpoint"),
        ("done", 3, out, None),
    ]
    assert resumed.result.losses == pytest.approx(ref.result.losses, rel=1e-6)
    assert sorted(p.name for p in out.iterdir()) == [
        "log.jsonl",
        "model",
        "result.json",
        "run.json",
        "selection.json",
    ]
    a = load_file(str(out / "model" / "model.safetensors"))
    b = load_file(str(tmp_path / "ref" / "model" / "model.safetensors"))
    assert sorted(a) == sorted(b) and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert [json.loads(x)["step"] for x in (out / "log.jsonl").read_text().splitlines()] == [
        1,
        2,
        3,
    ]
    again = resume_training(out, device="cpu", reporter=(seen := Recorder()))
    assert (again.status, again.result, seen.events) == ("done", None, [("finished", out)])


def test_resume_needs_a_run_directory(tmp_path: Path) -> None:
    with pytest.raises(KappaTuneError) as err:
        resume_training(tmp_path)
    assert str(err.value) == f"{tmp_path} holds no kappatune run (run.json)"
    (tmp_path / "run.json").write_text(json.dumps({"format": 1, "model": "x"}))
    with pytest.raises(KappaTuneError) as err:
        resume_training(tmp_path)
    assert str(err.value) == f"cannot read {tmp_path / 'run.json'}: it has no 'eval_data'"
    (tmp_path / "run.json").write_text(json.dumps({"format": 2}))
    with pytest.raises(KappaTuneError) as err:
        resume_training(tmp_path)
    assert str(err.value) == f"cannot read {tmp_path / 'run.json'}: unknown format 2"


def test_run_settings_check_the_method(settings: RunSettings) -> None:
    with pytest.raises(KappaTuneError) as err:
        replace(settings, method="adapter")
    assert str(err.value) == (
        "unknown training method 'adapter' (known: selective, kappa-lora, lora, full)"
    )
    with pytest.raises(KappaTuneError, match="method 'selective' needs a selection"):
        replace(settings, selection=None)
    with pytest.raises(KappaTuneError, match="--selection only applies to --method selective"):
        replace(settings, method="full")
    with pytest.raises(KappaTuneError, match="--save-dtype applies to --method selective or full"):
        replace(settings, method="lora", selection=None, save_dtype="float16")


# --------------------------------------------------------------------------- methods


def test_method_registry() -> None:
    assert method_names() == ("selective", "kappa-lora", "lora", "full")
    table = {
        n: (m.needs_selection, m.lora, m.output_name)
        for n in method_names()
        for m in [get_method(n)]
    }
    assert table == {
        "selective": (True, False, "model"),
        "kappa-lora": (True, True, "adapter"),
        "lora": (False, True, "adapter"),
        "full": (False, False, "model"),
    }
    assert get_method(get_method("lora")) is get_method("lora")
    with pytest.raises(KappaTuneError) as err:
        get_method("qlora")
    assert str(err.value) == (
        "unknown training method 'qlora' (known: selective, kappa-lora, lora, full)"
    )


def test_cli_method_choices_and_dry_run_order_come_from_the_registry() -> None:
    import argparse

    from kappatune.cli import train
    from kappatune.training.memory import METHOD_ORDER

    parser = argparse.ArgumentParser()
    train.add_parser(parser.add_subparsers())
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    method = next(a for a in sub.choices["train"]._actions if a.dest == "method")
    assert tuple(method.choices or ()) == method_names()
    assert sorted(METHOD_ORDER) == sorted(method_names())


# --------------------------------------------------------------------------- engines


def _protocol_members() -> dict[str, Any]:
    members = {n: v for n, v in vars(Engine).items() if not n.startswith("_")}
    return members | dict.fromkeys(Engine.__annotations__)


def _fake_accelerate_engine() -> Any:
    from kappatune.training.accelerate_engine import AccelerateEngine

    acc = SimpleNamespace(num_processes=1, process_index=0, gradient_accumulation_steps=1)
    return AccelerateEngine(acc)


@pytest.mark.parametrize("make", [LocalEngine, _fake_accelerate_engine])
def test_engines_satisfy_the_protocol(make: Any) -> None:
    engine = make()
    members = _protocol_members()
    assert sorted(members) == [
        "accumulate", "backward", "clip", "collective", "device_of", "is_main",
        "load_checkpoint", "prepare", "rank", "save_checkpoint", "save_model", "total",
        "wait", "world",
    ]  # fmt: skip
    for name, spec in members.items():
        assert hasattr(engine, name), name
        if inspect.isfunction(spec):
            want = list(inspect.signature(spec).parameters)
            assert list(inspect.signature(getattr(type(engine), name)).parameters) == want, name
    assert (engine.world, engine.rank, engine.is_main) == (1, 0, True)


def test_local_engine_checkpoint_round_trip(tmp_path: Path) -> None:
    """LocalEngine's checkpoint (safetensors + JSON) restores the trained tensors only."""
    from kappatune.training.loop import LoopState, build_optimizer, lr_lambda, prepare_model

    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
    prepared = prepare_model(model, "full")
    config = TrainConfig(steps=4)
    optimizer = build_optimizer(prepared.param_groups, config)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(config, 4))
    engine = LocalEngine("cpu")
    engine.prepare(model, optimizer, scheduler)
    model(torch.ones(3, 2)).sum().backward()
    optimizer.step()
    scheduler.step()
    state = LoopState(optimizer, scheduler, step=1, losses=[1.5], step_times=[0.1], ema=0.15)
    engine.save_checkpoint(tmp_path / "checkpoint", state)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    assert engine.load_checkpoint(tmp_path / "missing", prepared, config, 4) is None
    loaded = engine.load_checkpoint(tmp_path / "checkpoint", prepared, config, 4)
    assert loaded is not None and (loaded["step"], loaded["losses"]) == (1, [1.5])
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


# --------------------------------------------------------------------------- the CLI is thin


def test_cli_train_has_no_launched_twin() -> None:
    assert importlib.util.find_spec("kappatune.cli.train_launched") is None
    import kappatune.cli as cli

    folder = Path(cli.__file__).parent
    for path in sorted(folder.glob("train*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        froms = [node for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)]
        imports = {n.module for n in froms if n.module} | {
            f"{n.module}.{a.name}" for n in froms for a in n.names
        }
        assert not any(m.startswith("kappatune.cli.train_launched") for m in imports), path.name
        if path.name != "train.py":  # no cycle: the helpers never import the command
            assert "kappatune.cli.train" not in imports, path.name
