"""Scenarios: a task (train and held-out splits, a metric) and control data standing for prior
knowledge. Described by a typed frozen :class:`Scenario`, built in, or read from a YAML/JSON file.

Config file (YAML or JSON), one scenario or ``scenarios: [...]`` (built-in names allowed)::

    name: sentiment
    train: data/train.jsonl          # a path, builtin:NAME, or hf:NAME[/CONFIG]:SPLIT
    heldout: data/test.jsonl
    control: builtin:gcide-definitions
    task_metric: accuracy            # or perplexity
    options: [negative, positive]
    template: "Review: {text}\\nSentiment: "
    fields: {text: sentence, label: label}

Relative paths are resolved against the config file's directory.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kappatune.bench import records
from kappatune.bench.records import Fields, Split
from kappatune.errors import KappaTuneError
from kappatune.jsonio import check_schema

SCHEMA_VERSION = 1
TASK_METRICS = ("perplexity", "accuracy")
CONTROL_METRICS = ("perplexity",)
_HF = re.compile(r"^hf:(?P<name>[^:]+?)(?:/(?P<config>[^/:]+))?:(?P<split>[\w.\[\]%:-]+)$")
_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*$")


@dataclass(frozen=True)
class DataSpec:
    """Where one split comes from: a path, ``builtin:NAME`` or ``hf:NAME[/CONFIG]:SPLIT``."""

    source: str

    def __post_init__(self) -> None:
        if not self.source.strip():
            raise KappaTuneError("a data source must not be empty")
        if self.source.startswith("builtin:"):
            name = self.source.removeprefix("builtin:")
            if name not in records.BUILTIN_DATA:
                known = ", ".join(sorted(records.BUILTIN_DATA))
                raise KappaTuneError(f"unknown built-in data {name!r} (known: {known})")
        elif self.source.startswith("hf:") and not _HF.match(self.source):
            raise KappaTuneError(f"malformed dataset {self.source!r}: use hf:NAME[/CONFIG]:SPLIT")

    def load(self, options: tuple[str, ...], fields: Fields) -> Split:
        if self.source.startswith("builtin:"):
            return records.BUILTIN_DATA[self.source.removeprefix("builtin:")]()
        m = _HF.match(self.source)
        if m:
            return records.read_hf(m["name"], m["config"], m["split"], options, fields)
        return records.read_path(Path(self.source).expanduser(), options, fields)


@dataclass(frozen=True)
class ScenarioData:
    train: Split
    heldout: Split
    control: Split


@dataclass(frozen=True)
class Scenario:
    name: str
    train: DataSpec
    heldout: DataSpec
    control: DataSpec
    task_metric: str = "perplexity"
    options: tuple[str, ...] = ()
    control_metric: str = "perplexity"
    fields: Fields = field(default_factory=Fields)
    model: str | None = None

    def __post_init__(self) -> None:
        if not _NAME.match(self.name):
            raise KappaTuneError(
                f"scenario name {self.name!r} must be letters, digits, '.', '_' or '-'"
            )
        if self.task_metric not in TASK_METRICS:
            raise KappaTuneError(
                f"task_metric must be one of {', '.join(TASK_METRICS)}, got {self.task_metric!r}"
            )
        if self.control_metric not in CONTROL_METRICS:
            raise KappaTuneError(
                f"control_metric must be one of {', '.join(CONTROL_METRICS)},"
                f" got {self.control_metric!r}"
            )
        if self.task_metric == "accuracy":
            if len(self.options) < 2:
                raise KappaTuneError(
                    f"scenario {self.name}: an accuracy task needs at least 2 options,"
                    f" got {len(self.options)}"
                )
            if len(set(self.options)) != len(self.options):
                raise KappaTuneError(
                    f"scenario {self.name}: duplicate options in {list(self.options)}"
                )
        elif self.options:
            raise KappaTuneError(f"scenario {self.name}: options are only for task_metric accuracy")

    def load(self) -> ScenarioData:
        """Read all three splits and check they fit the metrics (every error names the split)."""
        data = ScenarioData(
            train=self.train.load(self.options, self.fields),
            heldout=self.heldout.load(self.options, self.fields),
            control=self.control.load(self.options, self.fields),
        )
        want = "labels" if self.task_metric == "accuracy" else None
        for label, split in (("train", data.train), ("heldout", data.heldout)):
            if want and split.kind != want:
                raise KappaTuneError(
                    f"scenario {self.name}: {label} split {split.origin} holds {split.kind}"
                    " records; an accuracy task needs text+label records"
                )
            if not want and split.kind == "labels":
                raise KappaTuneError(
                    f"scenario {self.name}: {label} split {split.origin} holds labelled records;"
                    " set task_metric: accuracy and its options"
                )
        if data.control.kind == "labels":
            raise KappaTuneError(
                f"scenario {self.name}: control {data.control.origin} must be text or"
                " prompt/completion records (its metric is perplexity)"
            )
        return data

    def to_json(self) -> dict[str, Any]:
        return {
            "schema_version": SCHEMA_VERSION,
            "name": self.name,
            "train": self.train.source,
            "heldout": self.heldout.source,
            "control": self.control.source,
            "task_metric": self.task_metric,
            "options": list(self.options),
            "control_metric": self.control_metric,
            "fields": vars(self.fields).copy(),
            "model": self.model,
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Scenario:
        return scenario_from_mapping(d, None)


BUILTIN_SCENARIOS: dict[str, Scenario] = {
    "code": Scenario(
        name="code",
        train=DataSpec("builtin:python-stdlib-train"),
        heldout=DataSpec("builtin:python-stdlib-heldout"),
        control=DataSpec("builtin:gcide-definitions"),
    ),
    "digits": Scenario(
        name="digits",
        train=DataSpec("builtin:digits-train"),
        heldout=DataSpec("builtin:digits-heldout"),
        control=DataSpec("builtin:gcide-definitions"),
        task_metric="accuracy",
        options=records.DIGIT_OPTIONS,
    ),
}

_KEYS = (
    "name", "train", "heldout", "control", "task_metric", "options", "control_metric", "fields",
    "template", "model",
)  # fmt: skip


def _source(value: Any, key: str, base: Path | None) -> DataSpec:
    if not isinstance(value, str):
        raise KappaTuneError(
            f"{key} must be a string (path, builtin:NAME or hf:...), got {value!r}"
        )
    if value.startswith(("builtin:", "hf:")) or base is None:
        return DataSpec(value)
    path = Path(value).expanduser()
    return DataSpec(str(path if path.is_absolute() else base / path))


def _fields(raw: Any, template: Any) -> Fields:
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise KappaTuneError(f"fields must be a mapping, got {raw!r}")
    unknown = sorted(set(raw) - {"text", "prompt", "completion", "label", "template"})
    if unknown:
        raise KappaTuneError(f"unknown fields key(s): {', '.join(map(str, unknown))}")
    kw = {str(k): str(v) for k, v in raw.items()}
    if template is not None:
        kw["template"] = str(template)
    return Fields(**kw)


def _option(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise KappaTuneError(
            f"option {value!r} is not a string (quote options such as yes/no/true in YAML)"
        )
    return str(value)


def scenario_from_mapping(d: Mapping[str, Any], base: Path | None) -> Scenario:
    check_schema(d, "scenario", SCHEMA_VERSION, required=False)
    unknown = sorted(set(map(str, d)) - {*_KEYS, "schema_version"})
    if unknown:
        raise KappaTuneError(
            f"unknown scenario key(s): {', '.join(unknown)} (known: {', '.join(_KEYS)})"
        )
    missing = [k for k in ("name", "train", "heldout", "control") if d.get(k) in (None, "")]
    if missing:
        raise KappaTuneError(f"scenario {d.get('name', '?')}: missing {', '.join(missing)}")
    options = d.get("options") or ()
    if isinstance(options, str) or not isinstance(options, list | tuple):
        raise KappaTuneError(f"options must be a list of strings, got {options!r}")
    return Scenario(
        name=str(d["name"]),
        train=_source(d["train"], "train", base),
        heldout=_source(d["heldout"], "heldout", base),
        control=_source(d["control"], "control", base),
        task_metric=str(d.get("task_metric", "perplexity")),
        options=tuple(_option(o) for o in options),
        control_metric=str(d.get("control_metric", "perplexity")),
        fields=_fields(d.get("fields"), d.get("template")),
        model=None if d.get("model") is None else str(d["model"]),
    )


def builtin_scenario(name: str) -> Scenario:
    if name not in BUILTIN_SCENARIOS:
        known = ", ".join(BUILTIN_SCENARIOS)
        raise KappaTuneError(f"unknown scenario {name!r} (built-in: {known}; or use --config FILE)")
    return BUILTIN_SCENARIOS[name]


def parse_config(obj: Any, base: Path | None) -> tuple[Scenario, ...]:
    items = obj.get("scenarios") if isinstance(obj, Mapping) and "scenarios" in obj else [obj]
    if not isinstance(items, list) or not items:
        raise KappaTuneError("scenarios must be a non-empty list")
    out: list[Scenario] = []
    for item in items:
        if isinstance(item, str):
            out.append(builtin_scenario(item))
        elif isinstance(item, Mapping):
            out.append(scenario_from_mapping(item, base))
        else:
            raise KappaTuneError(f"a scenario is a built-in name or a mapping, got {item!r}")
    names = [s.name for s in out]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise KappaTuneError(f"duplicate scenario name(s): {', '.join(dupes)}")
    return tuple(out)


def load_config(path: str | Path) -> tuple[Scenario, ...]:
    """Scenarios of a YAML (.yaml/.yml) or JSON config file."""
    p = Path(path).expanduser()
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise KappaTuneError(f"no such config file: {p}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise KappaTuneError(f"cannot read config {p}: {exc}") from None
    try:
        if p.suffix.lower() in (".yaml", ".yml"):
            import yaml

            obj = yaml.safe_load(text)
        else:
            obj = json.loads(text)
    except Exception as exc:  # yaml.YAMLError / json.JSONDecodeError
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise KappaTuneError(f"cannot parse config {p}: {first}") from None
    return parse_config(obj, p.resolve().parent)
