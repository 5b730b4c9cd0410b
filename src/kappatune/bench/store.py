"""Results of the benchmark as versioned JSON files, one per (scenario, arm, seed), written
atomically as each run finishes, so an interrupted benchmark resumes where it stopped.

Layout under the output directory::

    runs/<scenario>/base.json                   the untouched model (computed once)
    runs/<scenario>/<arm>-lr<lr>-seed<k>.json   one trained run, its checkpoints so far

Every file records the key of everything that determines it (model, data, arm, learning rate,
every result-changing setting, seed). A file whose key differs from the current configuration
is stale: it is never reused, and is recomputed and overwritten. A run file is rewritten after
each checkpoint, so an interrupted run keeps the checkpoints it had evaluated.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from kappatune.errors import KappaTuneError
from kappatune.jsonio import atomic_write_json, check_schema, decode_float, encode_float

log = logging.getLogger(__name__)

SCHEMA_VERSION = 2
STOP_RULES = ("checkpoint",)


def config_hash(obj: Any) -> str:
    """Stable digest of a JSON-able object (keys sorted)."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.blake2b(text.encode("utf-8"), digest_size=12).hexdigest()


def _floats(d: Mapping[str, float]) -> dict[str, Any]:
    return {k: encode_float(v) for k, v in sorted(d.items())}


def _unfloats(d: Mapping[str, Any]) -> dict[str, float]:
    return {str(k): decode_float(v) for k, v in d.items()}


@dataclass(frozen=True)
class Metrics:
    """Evaluation of one model state: task and control numbers by name.

    Task: ``perplexity``/``nll``/``tokens`` or ``accuracy``/``label_nll``/``examples``;
    control: ``perplexity``/``nll``/``tokens``/``kl`` (mean per-token KL from the base model);
    knowledge (empty when there is no knowledge control): ``accuracy``/``correct``/``total``.
    ``control_nlls``/``task_nlls``: the summed token NLL of each control / held-out task
    sequence (for paired bootstraps; perplexity tasks only for the task).
    """

    task: dict[str, float]
    control: dict[str, float]
    knowledge: dict[str, float] = field(default_factory=dict)
    control_nlls: tuple[float, ...] = ()
    task_nlls: tuple[float, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {
            "task": _floats(self.task),
            "control": _floats(self.control),
            "knowledge": _floats(self.knowledge),
            "control_nlls": [encode_float(x) for x in self.control_nlls],
            "task_nlls": [encode_float(x) for x in self.task_nlls],
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Metrics:
        return cls(
            task=_unfloats(d["task"]),
            control=_unfloats(d["control"]),
            knowledge=_unfloats(d.get("knowledge") or {}),
            control_nlls=tuple(decode_float(x) for x in d.get("control_nlls") or ()),
            task_nlls=tuple(decode_float(x) for x in d.get("task_nlls") or ()),
        )


@dataclass(frozen=True)
class Point:
    """The model at one checkpoint of a run."""

    rule: str  # "checkpoint"
    step: int
    train_loss: float  # the smoothed training loss at this step
    reached: bool
    metrics: Metrics

    def __post_init__(self) -> None:
        if self.rule not in STOP_RULES:
            raise KappaTuneError(f"unknown stopping rule {self.rule!r}")

    def to_json(self) -> dict[str, Any]:
        return {
            "rule": self.rule,
            "step": self.step,
            "train_loss": encode_float(self.train_loss),
            "reached": self.reached,
            "metrics": self.metrics.to_json(),
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Point:
        return cls(
            rule=str(d["rule"]),
            step=int(d["step"]),
            train_loss=decode_float(d["train_loss"]),
            reached=bool(d["reached"]),
            metrics=Metrics.from_json(d["metrics"]),
        )


@dataclass(frozen=True)
class RunResult:
    """One (scenario, arm, lr, seed): trainable parameters, losses, metrics at each checkpoint."""

    scenario: str
    arm: str
    lr: float
    seed: int
    config_hash: str
    trainable_params: int
    points: tuple[Point, ...]
    losses: tuple[float, ...] = ()  # raw training loss per step
    seconds: float = 0.0
    details: dict[str, Any] = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION

    def point(self, step: int) -> Point | None:
        return next((p for p in self.points if p.step == step), None)

    def to_json(self) -> dict[str, Any]:
        return {
            "schema_version": self.schema_version,
            "kind": "kappatune.bench.run",
            "scenario": self.scenario,
            "arm": self.arm,
            "lr": self.lr,
            "seed": self.seed,
            "config_hash": self.config_hash,
            "trainable_params": self.trainable_params,
            "points": [p.to_json() for p in self.points],
            "losses": [encode_float(x) for x in self.losses],
            "seconds": round(self.seconds, 3),
            "details": self.details,
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> RunResult:
        check_schema(d, "bench run", SCHEMA_VERSION, kind="kappatune.bench.run")
        return cls(
            scenario=str(d["scenario"]),
            arm=str(d["arm"]),
            lr=float(d["lr"]),
            seed=int(d["seed"]),
            config_hash=str(d["config_hash"]),
            trainable_params=int(d["trainable_params"]),
            points=tuple(Point.from_json(p) for p in d["points"]),
            losses=tuple(decode_float(x) for x in d.get("losses", ())),
            seconds=float(d.get("seconds", 0.0)),
            details=dict(d.get("details") or {}),
        )


@dataclass(frozen=True)
class BaseResult:
    """The untouched model's metrics for one scenario, and the noise floors measured on it."""

    scenario: str
    config_hash: str
    metrics: Metrics
    total_params: int
    seconds: float = 0.0
    train_loss: float = math.nan  # on a fixed subset of training rows
    # half-widths of 95 % bootstrap bands: control ppl (%), task gain, knowledge accuracy (pp)
    floors: dict[str, float] = field(default_factory=dict)
    knowledge_correct: tuple[bool, ...] = ()
    control_tokens: tuple[int, ...] = ()  # scored tokens per control sequence
    task_tokens: tuple[int, ...] = ()  # scored tokens per held-out task sequence
    floors_bootstrap: int | None = None  # resamples the floors took (None: not recorded)
    schema_version: int = SCHEMA_VERSION

    def to_json(self) -> dict[str, Any]:
        return {
            "schema_version": self.schema_version,
            "kind": "kappatune.bench.base",
            "train_loss": encode_float(self.train_loss),
            "scenario": self.scenario,
            "config_hash": self.config_hash,
            "metrics": self.metrics.to_json(),
            "total_params": self.total_params,
            "seconds": round(self.seconds, 3),
            "floors": _floats(self.floors),
            "knowledge_correct": [int(c) for c in self.knowledge_correct],
            "control_tokens": list(self.control_tokens),
            "task_tokens": list(self.task_tokens),
            "floors_bootstrap": self.floors_bootstrap,
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> BaseResult:
        check_schema(d, "bench base", SCHEMA_VERSION, kind="kappatune.bench.base")
        return cls(
            scenario=str(d["scenario"]),
            config_hash=str(d["config_hash"]),
            metrics=Metrics.from_json(d["metrics"]),
            total_params=int(d["total_params"]),
            seconds=float(d.get("seconds", 0.0)),
            train_loss=decode_float(d.get("train_loss")),
            floors=_unfloats(d.get("floors") or {}),
            knowledge_correct=tuple(bool(c) for c in d.get("knowledge_correct") or ()),
            control_tokens=tuple(int(t) for t in d.get("control_tokens") or ()),
            task_tokens=tuple(int(t) for t in d.get("task_tokens") or ()),
            floors_bootstrap=None
            if d.get("floors_bootstrap") is None
            else int(d["floors_bootstrap"]),
        )


_Result = TypeVar("_Result", RunResult, BaseResult)


class ResultStore:
    """Reads and writes result files under ``root``; only current-hash files count as done."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def run_path(self, scenario: str, arm: str, lr: float, seed: int) -> Path:
        return self.root / "runs" / scenario / f"{arm}-lr{lr:g}-seed{seed}.json"

    def base_path(self, scenario: str) -> Path:
        return self.root / "runs" / scenario / "base.json"

    def _read(self, path: Path) -> dict[str, Any] | None:
        if not path.is_file():
            return None
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError, UnicodeDecodeError):
            log.warning("unreadable result file %s: recomputing it", path)
            return None
        return data if isinstance(data, dict) else None

    def load_run(
        self, scenario: str, arm: str, lr: float, seed: int, want_hash: str
    ) -> RunResult | None:
        return self._load(self.run_path(scenario, arm, lr, seed), RunResult, want_hash)

    def load_base(self, scenario: str, want_hash: str) -> BaseResult | None:
        return self._load(self.base_path(scenario), BaseResult, want_hash)

    def _load(self, path: Path, kind: type[_Result], want_hash: str) -> _Result | None:
        """A stored result made with ``want_hash``, or None (with a warning) to recompute it."""
        data = self._read(path)
        if data is None:
            return None
        try:
            result = kind.from_json(data)
        except (KappaTuneError, KeyError, TypeError, ValueError):
            log.warning("malformed result file %s: recomputing it", path)
            return None
        if result.config_hash != want_hash:
            log.warning("%s was made with another configuration: recomputing it", path)
            return None
        return result

    def save_run(self, result: RunResult) -> Path:
        path = self.run_path(result.scenario, result.arm, result.lr, result.seed)
        atomic_write_json(path, result.to_json())
        return path

    def save_base(self, result: BaseResult) -> Path:
        path = self.base_path(result.scenario)
        atomic_write_json(path, result.to_json())
        return path


def relative_change(value: float, base: float) -> float:
    """(value - base) / base in percent; NaN when base is 0 or either is not finite."""
    if not (math.isfinite(value) and math.isfinite(base)) or base == 0:
        return math.nan
    return 100.0 * (value - base) / base
