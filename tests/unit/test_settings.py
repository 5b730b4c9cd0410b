"""One source of truth for every setting: flags, JSON and keys derived from the dataclasses."""

from __future__ import annotations

import argparse
import ast
import copy
import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest

from kappatune import settings
from kappatune.analysis.fisher import FisherOptions
from kappatune.analysis.options import AnalyzeOptions
from kappatune.bench.config import BenchSettings, EvalSizes
from kappatune.cli.main import build_parser, main
from kappatune.demo import DemoSettings
from kappatune.errors import KappaTuneError
from kappatune.probe.run import ProbeSettings
from kappatune.selection.budget import SelectOptions
from kappatune.training.config import LoraSettings, PackConfig, StopRule, TrainConfig

SRC = Path(__file__).resolve().parents[2] / "src" / "kappatune"

# every settings dataclass, with a valid instance of it
DEFAULTS: dict[type, Any] = {
    AnalyzeOptions: AnalyzeOptions(),
    SelectOptions: SelectOptions(),
    FisherOptions: FisherOptions(),
    ProbeSettings: ProbeSettings(),
    BenchSettings: BenchSettings(),
    EvalSizes: EvalSizes(),
    DemoSettings: DemoSettings(),
    TrainConfig: TrainConfig(steps=10),
    StopRule: StopRule(),
    LoraSettings: LoraSettings(),
    PackConfig: PackConfig(),
}
# the declared fields that do not change results: exactly these
NON_KEY = {
    AnalyzeOptions: {"workers", "use_cache", "cache_dir", "verify_cache"},
    BenchSettings: {"arms", "seeds", "lr_grid", "lr_count", "forgetting_budget", "bootstrap",
                    "kl_cache_mb", "keep_state", "reference"},
}  # fmt: skip
# fields in the key only when set away from their default (added later: older keys hold)
KEY_WHEN_SET = {BenchSettings: {"checkpoint_at"}}
# one instance per class with every field away from its default where that is allowed
CHANGED: dict[type, Any] = {
    AnalyzeOptions: AnalyzeOptions(
        include="a", exclude="b", max_dim=9, device="cpu", workers=2, use_cache=False,
        cache_dir=Path("/tmp/c"), verify_cache=True, block_rows=7, memory_budget_mb=99,
        kappa_only=True,
    ),
    SelectOptions: SelectOptions(
        include="x", exclude="y", module_types=("q_proj", "v_proj"),
        quotas=(("v_proj", 4), ("q_proj", 2)), seed=3, last_layers=2, fill="greedy",
    ),
    FisherOptions: FisherOptions(
        kinds=("empirical", "true"), tokens=9, seed=2, damping=1e-6, samples=3
    ),
    ProbeSettings: ProbeSettings(
        kinds=("empirical",), tokens=99, seq_len=16, damping=1e-5, samples=2, seed=4,
        bootstrap=50, confidence=0.9,
    ),
    BenchSettings: BenchSettings(
        model="m", arms=("kappa", "full"), seeds=(4, 5), steps=8, checkpoints=2,
        checkpoint_at=(4, 8), keep_state=True, reference="full", lr_grid=(("full", (1e-5, 3e-5)),), lr_count=5, warmups=(("kappa", 2),), budget="5M",
        batch_size=2, eval_batch_size=3, sizes=EvalSizes(seq_len=32, control_sequences=12),
        knowledge="none", knowledge_seed=1, lora_fraction=0.5, fisher_tokens=2048,
        weight_decay=0.1, max_grad_norm=0.5, dtype="bfloat16", autocast=True, device="cpu",
        forgetting_budget=2.0, bootstrap=50, kl_cache_mb=0.0,
    ),
    EvalSizes: EvalSizes(8, 2, 3, 11, 600, 5, 12),
    DemoSettings: DemoSettings(
        model="m", budget="5%", steps=3, lr=1e-3, batch_size=1, seq_len=16, eval_sequences=2,
        seed=1, device="cpu",
    ),
    TrainConfig: TrainConfig(
        epochs=1.5, lr=2e-5, warmup_steps=3, scheduler="cosine", batch_size=2, grad_accum=4,
        seed=7, weight_decay=0.1, max_grad_norm=None, betas=(0.8, 0.9), shuffle=False,
    ),
    StopRule: StopRule(target_loss=1.5, ema_decay=0.5, min_steps=3, max_steps=9),
    LoraSettings: LoraSettings(r=None, alpha=32, dropout=0.1, budget_params=1000, greedy=True),
    PackConfig: PackConfig(seq_len=64, pack=False, add_eos=False),
}  # fmt: skip

FIELDS = [(cls, f.name) for cls in DEFAULTS for f in dataclasses.fields(cls)]
FIELD_IDS = [f"{cls.__name__}.{name}" for cls, name in FIELDS]


def _classes_declaring_settings() -> set[str]:
    """Classes in the package source with a field declared through ``setting(...)``."""
    found: set[str] = set()
    for path in SRC.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.ClassDef):
                continue
            for stmt in node.body:
                value = stmt.value if isinstance(stmt, ast.AnnAssign) else None
                if isinstance(value, ast.Call) and getattr(value.func, "id", "") == "setting":
                    found.add(node.name)
    return found


def test_every_settings_class_is_covered_here() -> None:
    assert _classes_declaring_settings() == {cls.__name__ for cls in DEFAULTS}


@pytest.mark.parametrize("cls", list(DEFAULTS), ids=lambda c: c.__name__)
def test_every_field_is_declared_with_help(cls: type) -> None:
    for f in dataclasses.fields(cls):
        assert f.metadata.get("help"), f"{cls.__name__}.{f.name} has no help"


def _with(obj: Any, name: str, value: Any) -> Any:
    """``obj`` with one field replaced, unchecked (the key reads fields; validity is not its job)."""
    out = copy.copy(obj)
    object.__setattr__(out, name, value)
    return out


@pytest.mark.parametrize(("cls", "name"), FIELDS, ids=FIELD_IDS)
def test_changing_any_setting_changes_the_key_unless_declared(cls: type, name: str) -> None:
    base = DEFAULTS[cls]
    changed = _with(base, name, ("another value", name))
    declared = name in NON_KEY.get(cls, set())
    assert (settings.settings_key(changed) == settings.settings_key(base)) is declared


@pytest.mark.parametrize("cls", list(DEFAULTS), ids=lambda c: c.__name__)
def test_the_declared_non_key_fields_are_exactly_these(cls: type) -> None:
    non_key = settings.non_key_fields(cls)
    assert set(non_key) == NON_KEY.get(cls, set())
    assert all(len(why) > 10 for why in non_key.values())  # each says why
    when_set = KEY_WHEN_SET.get(cls, set())
    assert (
        set(settings.key_fields(DEFAULTS[cls]))
        == {f.name for f in dataclasses.fields(cls)} - set(non_key) - when_set
    )
    assert when_set <= set(settings.key_fields(CHANGED[cls]))


def test_a_nested_settings_field_is_keyed_by_each_of_its_own_fields() -> None:
    base = DEFAULTS[BenchSettings]
    keys = {settings.settings_key(base)}
    for f in dataclasses.fields(EvalSizes):
        sizes = _with(base.sizes, f.name, getattr(base.sizes, f.name) + 1)
        keys.add(settings.settings_key(_with(base, "sizes", sizes)))
    assert len(keys) == 1 + len(dataclasses.fields(EvalSizes))


@pytest.mark.parametrize("cls", list(DEFAULTS), ids=lambda c: c.__name__)
def test_json_round_trip(cls: type) -> None:
    for obj in (DEFAULTS[cls], CHANGED[cls]):
        text = json.dumps(settings.to_json(obj))
        assert settings.from_json(cls, json.loads(text)) == obj
        assert settings.settings_key(settings.from_json(cls, json.loads(text))) == (
            settings.settings_key(obj)
        )
    moved = {
        f.name
        for f in dataclasses.fields(cls)
        if getattr(CHANGED[cls], f.name) != getattr(DEFAULTS[cls], f.name)
    }
    fixed = {"schema_version"} if cls is TrainConfig else set()
    assert moved == {f.name for f in dataclasses.fields(cls)} - fixed  # CHANGED moves them all


@pytest.mark.parametrize("cls", list(DEFAULTS), ids=lambda c: c.__name__)
def test_an_unknown_json_key_is_refused_in_one_line(cls: type) -> None:
    data = {**settings.to_json(DEFAULTS[cls]), "bogus_knob": 1}
    with pytest.raises(KappaTuneError, match=r"unknown .* setting\(s\): bogus_knob \(known: ") as e:
        settings.from_json(cls, data)
    assert "\n" not in str(e.value)


def test_json_forms_stay_as_files_hold_them() -> None:
    assert SelectOptions.from_json({"quotas": {"v_proj": 4}}).quotas == (("v_proj", 4),)
    assert CHANGED[SelectOptions].to_json()["quotas"] == {"v_proj": 4, "q_proj": 2}
    assert ProbeSettings().to_json() == {
        "kinds": ["true", "empirical"], "tokens": 2048, "seq_len": 128, "lambda": 1e-8,
        "samples": 1, "seed": 0, "bootstrap": 1000, "confidence": 0.95,
    }  # fmt: skip
    assert TrainConfig.from_json(TrainConfig(steps=3).to_json()) == TrainConfig(steps=3)
    with pytest.raises(KappaTuneError, match="unknown train config setting"):
        TrainConfig.from_json({**TrainConfig(steps=3).to_json(), "lr_typo": 1})
    with pytest.raises(KappaTuneError, match="unknown selection options setting"):
        SelectOptions.from_json({"sed": 1})


# --------------------------------------------------------------------------- flags


def _subparser(command: str) -> argparse.ArgumentParser:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[command]  # type: ignore[no-any-return]


COMMAND_SETTINGS = [
    ("analyze", AnalyzeOptions),
    ("select", SelectOptions),
    ("train", SelectOptions),
    ("train", TrainConfig),
    ("train", LoraSettings),
    ("train", PackConfig),
    ("probe", ProbeSettings),
    ("demo", DemoSettings),
    ("bench", BenchSettings),
    ("bench", EvalSizes),
]


@pytest.mark.parametrize(
    ("command", "cls"), COMMAND_SETTINGS, ids=lambda x: getattr(x, "__name__", x)
)
def test_every_setting_with_a_flag_is_a_flag_of_its_command(command: str, cls: type) -> None:
    actions = {a.dest: a for a in _subparser(command)._actions}
    for f in settings.cli_fields(cls):
        if (cls, f.name) == (TrainConfig, "seed"):
            continue  # train's --seed is the selection flags' (one seed for both)
        action = actions[settings.dest_of(f)]
        assert settings.flag_of(f) in (action.option_strings or [action.dest]), f.name
        assert str(f.metadata["help"]).replace("%", "%%") in str(action.help), f.name


def test_help_shows_the_field_defaults() -> None:
    def help_of(command: str, flag: str) -> str:
        action = next(a for a in _subparser(command)._actions if flag in a.option_strings)
        return str(action.help) % {}

    assert help_of("probe", "--lambda").endswith("(default: 1e-8)")
    assert help_of("demo", "--budget-params").endswith("(default: 2%)")
    assert help_of("bench", "--fisher-tokens").endswith("(default: 1024)")
    assert help_of("bench", "--autocast").endswith("(default: off)")
    assert help_of("bench", "--seeds").endswith("(default: 0 1 2)")
    assert help_of("train", "--lr").endswith("(default: 1e-4)")
    assert help_of("analyze", "--workers") == "parallel workers (default: cores, max 4)"


def _args(argv: list[str]) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def test_analyze_flags_make_the_options() -> None:
    args = _args(["analyze", "x", "--max-dim", "5", "--no-cache", "--workers", "2",
                  "--kappa-only", "--include", "q_", "--cache-dir", "/tmp/k", "--device", "cpu"])  # fmt: skip
    assert settings.from_args(AnalyzeOptions, args) == AnalyzeOptions(
        include="q_", max_dim=5, use_cache=False, workers=2, kappa_only=True,
        cache_dir=Path("/tmp/k"), device="cpu",
    )  # fmt: skip
    assert settings.from_args(AnalyzeOptions, _args(["analyze", "x"])) == AnalyzeOptions()


def test_select_and_train_flags_make_the_options() -> None:
    from kappatune.cli import select as cli_select
    from kappatune.cli import train as cli_train

    argv = ["--module-types", "q_proj", "v_proj", "--quota", "v_proj=4", "--quota", "q_proj=2",
            "--seed", "3", "--last-layers", "2", "--fill", "greedy", "--include", "x",
            "--exclude", "y"]  # fmt: skip
    want = dataclasses.replace(CHANGED[SelectOptions])
    assert cli_select.options_from_args(_args(["select", "s.json", *argv])) == want
    assert cli_select.options_from_args(_args(["select", "s.json"])) == SelectOptions()
    train = _args(["train", "m", "--data", "d.txt", "--method", "lora", "-o", "out", *argv,
                   "--epochs", "1.5", "--lr", "2e-5", "--warmup", "3", "--scheduler", "cosine",
                   "--batch-size", "2", "--grad-accum", "4", "--weight-decay", "0.1",
                   "--lora-r", "4", "--lora-alpha", "32", "--lora-dropout", "0.1"])  # fmt: skip
    assert cli_select.options_from_args(train) == want
    config = cli_train._train_config(train)
    assert config == dataclasses.replace(
        CHANGED[TrainConfig], seed=3, max_grad_norm=1.0, betas=(0.9, 0.999), shuffle=True
    )
    assert settings.from_args(TrainConfig, train) == config
    assert cli_train._lora_settings(train, None) == LoraSettings(
        r=4, alpha=32, dropout=0.1, greedy=True
    )
    plain = _args(["train", "m", "--data", "d.txt", "--method", "lora", "-o", "o", "--steps", "5"])
    assert settings.from_args(TrainConfig, plain) == TrainConfig(steps=5)
    assert cli_train._lora_settings(plain, None) == LoraSettings()


def test_probe_and_demo_flags_make_the_settings() -> None:
    from kappatune.cli import probe as cli_probe

    args = _args(["probe", "m", "--data", "d.txt", "--kind", "empirical", "--tokens", "99",
                  "--seq-len", "16", "--lambda", "1e-5", "--samples", "2", "--seed", "4",
                  "--bootstrap", "50", "--confidence", "0.9"])  # fmt: skip
    assert cli_probe._settings(args) == CHANGED[ProbeSettings]
    assert cli_probe._settings(_args(["probe", "m", "--data", "d"])) == ProbeSettings()
    demo = _args(["demo", "m", "--budget-params", "5%", "--steps", "3", "--lr", "1e-3",
                  "--batch-size", "1", "--seq-len", "16", "--eval-sequences", "2", "--seed", "1",
                  "--device", "cpu"])  # fmt: skip
    assert settings.from_args(DemoSettings, demo) == CHANGED[DemoSettings]
    assert settings.from_args(DemoSettings, _args(["demo"])) == DemoSettings()


def test_bench_flags_make_the_settings_and_every_one_moves_the_run_key() -> None:
    from kappatune.bench.run import run_key
    from kappatune.cli import bench as cli_bench

    def bench(*argv: str) -> BenchSettings:
        return cli_bench.settings_from_args(cli_bench.resolve(_args(["bench", *argv])))  # type: ignore[no-any-return]

    assert bench() == BenchSettings()
    flags = ["--model", "m", "--arms", "kappa", "full", "--seeds", "4", "5", "--steps", "8",
             "--checkpoints", "2", "--checkpoint-at", "4", "8", "--keep-state", "--reference", "full", "--lr-grid", "full=1e-5,3e-5", "--lr-count", "5", "--warmup",
             "kappa=2", "--budget-params", "5M", "--batch-size", "2", "--eval-batch-size", "3",
             "--seq-len", "32", "--control-sequences", "12", "--knowledge", "none",
             "--knowledge-seed", "1", "--lora-fraction", "0.5", "--fisher-tokens", "2048",
             "--dtype", "bfloat16", "--autocast", "bf16", "--device", "cpu",
             "--forgetting-budget", "2", "--bootstrap", "50", "--kl-cache-mb", "0"]  # fmt: skip
    assert bench(*flags) == dataclasses.replace(
        CHANGED[BenchSettings], weight_decay=0.0, max_grad_norm=1.0
    )  # the two without a flag
    base = BenchSettings(arms=("kappa",))
    key = run_key("b", base.arm("kappa"), 1e-4, 0, base)
    moved = {
        flag: run_key("b", s.arm("kappa"), 1e-4, 0, s)
        for flag, value in (("--fisher-tokens", "2048"), ("--steps", "8"), ("--seq-len", "32"),
                            ("--knowledge-seed", "1"), ("--autocast", "bf16"),
                            ("--warmup", "kappa=3"), ("--budget-params", "5M"))
        for s in [bench("--arms", "kappa", flag, value)]
    }  # fmt: skip
    assert key not in moved.values() and len(set(moved.values())) == len(moved)
    same = bench("--arms", "kappa", "--bootstrap", "50", "--forgetting-budget", "3")
    assert run_key("b", same.arm("kappa"), 1e-4, 0, same) == key


def test_canonical_bench_command_spells_out_every_setting() -> None:
    from kappatune.cli import bench as cli_bench

    command = cli_bench.canonical_command(cli_bench.resolve(_args(["bench", "--steps", "9"])))
    for f in [*settings.cli_fields(BenchSettings), *settings.cli_fields(EvalSizes)]:
        # unset: the defaults; an empty --checkpoint-at and a switch left off are not spelled
        if f.name not in ("arms", "lr_grid", "warmups", "checkpoint_at", "keep_state"):
            assert f" {settings.flag_of(f)} " in command, f.name
    assert " --steps 9 " in command and " --autocast off " in command
    assert "--keep-state" not in command and "--checkpoint-at" not in command
    long = cli_bench.canonical_command(cli_bench.resolve(_args(["bench", "--preset", "cpu-long"])))
    assert " --checkpoint-at 16 32 64 128 256 --keep-state " in long


# --------------------------------------------------------------------------- registries


def test_a_newly_registered_policy_is_accepted_by_select(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from kappatune.analysis.spectra import Analysis
    from kappatune.selection import policies
    from kappatune.selection.core import Selection
    from tests.unit.test_selection import ROWS

    def by_name_descending(rows: Any, ctx: policies.PolicyContext) -> list[Any]:
        return sorted(rows, key=lambda r: (r.name, r.key[1]), reverse=True)

    monkeypatch.setattr(policies, "_POLICIES", dict(policies._POLICIES))
    policies.register_policy("name-descending")(by_name_descending)
    path = tmp_path / "spectra.json"
    rows = tuple(r for r in ROWS if r.kappa == r.kappa)
    Analysis("tiny-src", "fp", rows).save(path)
    out = tmp_path / "sel.json"
    argv = ["select", str(path), "--policy", "name-descending", "--budget-tensors", "2"]
    assert main([*argv, "-o", str(out)]) == 0, capsys.readouterr().err
    want = sorted(((r.name, r.expert) for r in rows), key=lambda k: (k[0], k[1] or -1))
    assert [(e.name, e.expert) for e in Selection.load(out).entries] == want[::-1][:2]
    assert "name-descending" in _subparser("select").format_help()


@pytest.mark.parametrize(
    ("command", "flag", "registry"),
    [
        ("select", "--policy", "kappatune.selection.policies:policy_names"),
        ("select", "--fill", "kappatune.selection.budget:FILL_MODES"),
        ("train", "--scheduler", "kappatune.training.config:SCHEDULERS"),
        ("bench", "--device", "kappatune.devices:DEVICES"),
        ("bench", "--dtype", "kappatune.bench.config:DTYPE_NAMES"),
        ("bench", "--preset", "kappatune.bench.config:PRESETS"),
        ("bench", "--task-metric", "kappatune.bench.scenarios:TASK_METRICS"),
        ("bench", "--arms", "kappatune.bench.arms:arm_names"),
    ],
)
def test_cli_choices_come_from_their_registries(command: str, flag: str, registry: str) -> None:
    import importlib

    module, name = registry.split(":")
    value = getattr(importlib.import_module(module), name)
    known = tuple(value()) if callable(value) else tuple(value)
    action = next(a for a in _subparser(command)._actions if flag in a.option_strings)
    assert tuple(action.choices or ()) == known


def test_select_formats_are_the_exporters() -> None:
    from kappatune.cli.select import FORMATS
    from kappatune.selection.exports import EXPORTERS

    assert tuple(FORMATS) == tuple(EXPORTERS)  # the exporters import torch; the CLI may not
    action = next(a for a in _subparser("select")._actions if "--format" in a.option_strings)
    assert tuple(action.choices or ()) == tuple(EXPORTERS)


# --------------------------------------------------------------------------- the module itself


def test_setting_metadata_is_checked() -> None:
    with pytest.raises(TypeError, match="needs help"):
        settings.setting(1)
    with pytest.raises(TypeError, match="needs a 'why'"):
        settings.setting(1, help="x", key=False)
    with pytest.raises(TypeError, match="unknown setting metadata: hepl"):
        settings.setting(1, help="x", hepl="y")


def test_from_json_refuses_a_non_object_and_a_bad_value_in_one_line() -> None:
    with pytest.raises(KappaTuneError, match="StopRule must be a JSON object, got list"):
        settings.from_json(StopRule, [1])  # type: ignore[arg-type]
    with pytest.raises(KappaTuneError, match="EMA decay must be in"):
        settings.from_json(StopRule, {"ema_decay": 2})


@pytest.mark.parametrize(
    "cls", [AnalyzeOptions, SelectOptions, ProbeSettings, DemoSettings, BenchSettings, EvalSizes]
)
def test_flag_values_round_trip(cls: type) -> None:
    obj = CHANGED[cls]
    args = argparse.Namespace(**settings.to_args(cls, obj))
    given = {
        f.name: getattr(obj, f.name)
        for f in dataclasses.fields(cls)
        if not f.metadata.get("cli", True)
    }
    if cls is SelectOptions:  # --quota takes TYPE=N words
        args.quota = [f"{k}={v}" for k, v in obj.quotas]
    if cls is BenchSettings:  # per-arm words: the CLI parses them knowing the arms
        given |= {"lr_grid": obj.lr_grid, "warmups": obj.warmups}
    assert settings.from_args(cls, args, **given) == obj


def test_bench_presets_name_only_bench_flags() -> None:
    from kappatune.cli import bench as cli_bench

    known = set(cli_bench._defaults()) | {"scenarios"}
    for name, preset in cli_bench.PRESETS.items():
        assert set(preset) <= known, name
