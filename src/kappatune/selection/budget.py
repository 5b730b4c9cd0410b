"""Budgets, filters and quotas: how many of a policy's ordered candidates are kept.

A :class:`Budget` says how many of the ordered candidates to keep (exactly one kind: a
number of tensors, a fraction of the candidates, a trainable-parameter count or percentage
of the model, or a kappa threshold). A parameter budget takes a *prefix* of the policy order:
candidates in order until the next one does not fit, the rest of the budget reported as the
shortfall. ``SelectOptions(fill="greedy")`` opts into skipping what does not fit and filling
on with later (smaller) candidates, which leaves earlier ones out. Every policy follows the
same rule, so selections of different policies stay comparable.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from kappatune import settings
from kappatune.errors import KappaTuneError
from kappatune.jsonio import (
    decode_float,
    encode_float,
)

if TYPE_CHECKING:  # the policy registry stays importable without torch (CLI choices)
    from kappatune.analysis.spectra import SpectrumRow

from kappatune.selection.policies import row_kappa
from kappatune.settings import check_regexes, check_seed, name_matches, setting

_PARAM_SUFFIX = {"": 1, "k": 10**3, "m": 10**6, "b": 10**9, "g": 10**9}


@dataclass(frozen=True)
class Budget:
    """How much of the ordered candidates to train. Exactly one field is set."""

    tensors: int | None = None
    fraction: float | None = None
    params: int | None = None
    params_percent: float | None = None
    kappa_max: float | None = None

    def __post_init__(self) -> None:
        set_fields = [k for k, v in self._fields().items() if v is not None]
        if len(set_fields) != 1:
            raise KappaTuneError(
                f"a budget needs exactly one kind (tensors, fraction, params, params_percent,"
                f" kappa_max); got {len(set_fields)}: {', '.join(set_fields) or 'none'}"
            )
        if self.tensors is not None and self.tensors < 1:
            raise KappaTuneError(f"tensor budget must be at least 1, got {self.tensors}")
        if self.fraction is not None and not 0 < self.fraction <= 1:
            raise KappaTuneError(f"budget fraction must be in (0, 1], got {self.fraction}")
        if self.params is not None and self.params < 1:
            raise KappaTuneError(f"parameter budget must be at least 1, got {self.params}")
        if self.params_percent is not None and not 0 < self.params_percent <= 100:
            raise KappaTuneError(
                f"parameter budget percentage must be in (0, 100], got {self.params_percent}"
            )
        if self.kappa_max is not None and not self.kappa_max >= 1:  # kappa >= 1 always; NaN fails
            raise KappaTuneError(
                f"kappa threshold must be >= 1 (kappa is never below 1), got {self.kappa_max}"
            )

    def _fields(self) -> dict[str, Any]:
        return {
            "tensors": self.tensors,
            "fraction": self.fraction,
            "params": self.params,
            "params_percent": self.params_percent,
            "kappa_max": self.kappa_max,
        }

    @property
    def kind(self) -> str:
        return next(k for k, v in self._fields().items() if v is not None)

    def describe(self) -> str:
        kind, value = self.kind, self._fields()[self.kind]
        return {
            "tensors": f"{value} tensors",
            "fraction": f"{value:g} of candidates",
            "params": f"{value:,} parameters",
            "params_percent": f"{value:g}% of model parameters",
            "kappa_max": f"kappa <= {value:g}",
        }[kind]

    def to_json(self) -> dict[str, Any]:
        value = self._fields()[self.kind]
        return {self.kind: encode_float(value) if isinstance(value, float) else value}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Budget:
        if not isinstance(d, Mapping):
            raise KappaTuneError(f"a budget must be a JSON object, got {d!r}")
        unknown = set(d) - set(_BUDGET_FIELDS)
        if unknown:
            raise KappaTuneError(f"unknown budget field(s): {', '.join(sorted(unknown))}")
        return cls(**{k: _budget_value(k, v) for k, v in d.items()})

    @classmethod
    def parse_params(cls, text: str) -> Budget:
        """``"10%"`` -> percent of the model; ``"2500000"``, ``"2.5M"``, ``"300k"`` -> a count."""
        t = text.strip().lower().replace("_", "").replace(",", "")
        m = re.fullmatch(r"([0-9]*\.?[0-9]+(?:e[0-9]+)?)([kmbg]?)", t)
        if t.endswith("%") and re.fullmatch(r"[0-9]*\.?[0-9]+(?:e-?[0-9]+)?", t[:-1]):
            percent = float(t[:-1])
            if not 0 < percent <= 100:
                raise KappaTuneError(f"parameter budget {text!r}: a percentage must be in (0, 100]")
            return cls(params_percent=percent)
        if not m:
            raise KappaTuneError(
                f"cannot read parameter budget {text!r}: use a count (2500000, 2.5M, 300k) or a percentage (10%)"
            )
        value = float(m.group(1)) * _PARAM_SUFFIX[m.group(2)]
        if not value < MAX_PARAMS:  # inf from 1e400 too
            raise KappaTuneError(
                f"parameter budget {text!r} is too large (the limit is {MAX_PARAMS:.3g} parameters)"
            )
        if value != int(value):
            raise KappaTuneError(f"parameter budget {text!r} is not a whole number of parameters")
        return cls(params=int(value))


_BUDGET_FIELDS = ("tensors", "fraction", "params", "params_percent", "kappa_max")


@dataclass(frozen=True)
class BudgetFlag:
    """One kind of budget as a command-line flag: ``--<name> VALUE`` is ``make(type(VALUE))``."""

    name: str  # the flag without "--"
    metavar: str
    type: Callable[[str], Any]
    help: str
    make: Callable[[Any], Budget]

    @property
    def dest(self) -> str:
        return self.name.replace("-", "_")


#: The budget flags of ``select`` and ``train`` (one of them), in the order help shows them.
BUDGET_FLAGS = (
    BudgetFlag("budget-tensors", "N", int, "train the first N matrices",
               lambda n: Budget(tensors=n)),
    BudgetFlag("budget-fraction", "F", float, "train this fraction of the candidates",
               lambda f: Budget(fraction=f)),
    BudgetFlag("budget-params", "N|P%", str,
               "trainable parameters: a count (5M, 300k) or a percentage of the model",
               lambda text: Budget.parse_params(text)),
    BudgetFlag("kappa-max", "K", float, "train every candidate with kappa <= K",
               lambda k: Budget(kappa_max=k)),
)  # fmt: skip


def budget_from_flags(values: Mapping[str, Any]) -> Budget | None:
    """The budget of the one budget flag given (by argparse dest), or None when none is."""
    given = [f for f in BUDGET_FLAGS if values.get(f.dest) is not None]
    if len(given) > 1:
        raise KappaTuneError(
            f"give one budget flag, not {' and '.join('--' + f.name for f in given)}"
        )
    return given[0].make(values[given[0].dest]) if given else None


MAX_PARAMS = 2**53  # counts above this are not exact in a float (and no model is near it)


def _budget_value(kind: str, value: Any) -> Any:
    """A budget field from JSON: whole counts stay integers, thresholds may be "inf"."""
    if kind in ("tensors", "params"):
        if not isinstance(value, int) or isinstance(value, bool) or not value < MAX_PARAMS:
            raise KappaTuneError(f"budget {kind} must be a whole number, got {value!r}")
        return value
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise KappaTuneError(f"budget {kind} must be a number, got {value!r}")
    try:
        return decode_float(value)
    except ValueError:
        raise KappaTuneError(f"budget {kind} must be a number, got {value!r}") from None


# --------------------------------------------------------------------------- options


FILL_MODES = ("prefix", "greedy")


def _quotas(texts: Sequence[str]) -> tuple[tuple[str, int], ...]:
    return tuple(parse_quota(t) for t in texts)


def _quotas_from_json(d: Mapping[str, Any]) -> tuple[tuple[str, int], ...]:
    return tuple((str(k), int(v)) for k, v in d.items())


_POLICY = "selection policy"


@dataclass(frozen=True)
class SelectOptions:
    """Filters and per-module-type quotas applied around the policy."""

    include: str | None = setting(
        None, help="candidates whose name matches this regex", metavar="RE", group="filters"
    )
    exclude: str | None = setting(
        None, help="drop candidates whose name matches this regex", metavar="RE", group="filters"
    )
    module_types: tuple[str, ...] = setting(
        (), help="only these module types (e.g. q_proj v_proj)", metavar="TYPE", group="filters"
    )
    quotas: tuple[tuple[str, int], ...] = setting(  # (module type, count), Spectrum style
        (),
        flag="--quota",
        help="at most N of TYPE (Spectrum style); repeatable",
        action="append",
        type=str,
        metavar="TYPE=N",
        parse=_quotas,
        encode=dict,
        decode=_quotas_from_json,
        group="filters",
    )
    seed: int = setting(
        0, help="seed of the random policy (and of training in 'train'; default: 0)", group=_POLICY
    )
    last_layers: int | None = setting(
        None, help="layers kept by the last-layers policy", metavar="N", group=_POLICY
    )
    fill: str = setting(
        "prefix",
        choices=lambda: FILL_MODES,
        group="budget filling",
        help="for --budget-params: 'prefix' (default) takes the policy order until the next "
        "matrix does not fit and reports the shortfall; 'greedy' skips a matrix that does not "
        "fit and fills on with later, smaller ones (earlier ones are then left out)",
    )

    def __post_init__(self) -> None:
        if self.fill not in FILL_MODES:
            raise KappaTuneError(
                f"unknown fill mode {self.fill!r} (known: {', '.join(FILL_MODES)})"
            )
        check_regexes(include=self.include, exclude=self.exclude)
        check_seed(self.seed)
        seen: set[str] = set()
        for kind, count in self.quotas:
            if kind in seen:
                raise KappaTuneError(f"quota for module type {kind!r} given twice")
            seen.add(kind)
            if count < 1:
                raise KappaTuneError(f"quota {kind}={count}: a quota must be at least 1")

    def to_json(self) -> dict[str, Any]:
        return settings.to_json(self)

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> SelectOptions:
        return settings.from_json(cls, d, "selection options")


def parse_quota(text: str) -> tuple[str, int]:
    """``"q_proj=4"`` -> ("q_proj", 4)."""
    kind, eq, count = text.partition("=")
    try:
        if not eq or not kind.strip():
            raise ValueError
        return kind.strip(), int(count)
    except ValueError:
        raise KappaTuneError(
            f"cannot read quota {text!r}: expected TYPE=N, e.g. v_proj=4"
        ) from None


def filter_rows(rows: Sequence[SpectrumRow], options: SelectOptions) -> list[SpectrumRow]:
    """Candidates that pass the name and module-type filters, in their given order."""
    if options.module_types:
        known = {r.module_type for r in rows}
        unknown = [t for t in options.module_types if t not in known]
        if unknown:
            raise KappaTuneError(
                f"unknown module type(s) {', '.join(unknown)} (the model has: {', '.join(sorted(known))})"
            )
    out = []
    for r in rows:
        if options.include and not name_matches(options.include, r.name, "--include"):
            continue
        if options.exclude and name_matches(options.exclude, r.name, "--exclude"):
            continue
        if options.module_types and r.module_type not in options.module_types:
            continue
        out.append(r)
    return out


def apply_quotas(
    ordered: Sequence[SpectrumRow], quotas: Sequence[tuple[str, int]]
) -> list[SpectrumRow]:
    """The first N rows of each listed module type, in policy order; other types are dropped."""
    limit = dict(quotas)
    available: dict[str, int] = {}
    for r in ordered:
        available[r.module_type] = available.get(r.module_type, 0) + 1
    for kind, count in quotas:
        have = available.get(kind, 0)
        if have == 0:
            raise KappaTuneError(
                f"quota {kind}={count}: no {kind} candidates (types: {', '.join(sorted(available))})"
            )
        if count > have:
            raise KappaTuneError(f"quota {kind}={count} exceeds the {have} {kind} candidates")
    taken: dict[str, int] = {}
    out = []
    for r in ordered:
        if r.module_type in limit and taken.get(r.module_type, 0) < limit[r.module_type]:
            taken[r.module_type] = taken.get(r.module_type, 0) + 1
            out.append(r)
    return out


def take(
    ordered: list[SpectrumRow], budget: Budget | None, total_params: int, fill: str
) -> tuple[list[SpectrumRow], int | None]:
    n = len(ordered)
    available = sum(r.numel for r in ordered)
    if budget is None:
        return ordered, None
    if budget.tensors is not None:
        if budget.tensors > n:
            raise KappaTuneError(f"budget of {budget.tensors} tensors exceeds the {n} candidates")
        return ordered[: budget.tensors], None
    if budget.fraction is not None:
        return ordered[: max(1, int(n * budget.fraction))], None
    if budget.kappa_max is not None:
        chosen = [r for r in ordered if r.kappa <= budget.kappa_max]
        if not chosen:
            lowest = min((row_kappa(r) for r in ordered), default=math.nan)
            raise KappaTuneError(
                f"no candidate has kappa <= {budget.kappa_max:g} (lowest of {n} is {lowest:.4g})"
            )
        return chosen, None
    if budget.params is not None:
        target = budget.params
    else:
        assert budget.params_percent is not None
        target = int(total_params * budget.params_percent / 100)
        if target < 1:
            raise KappaTuneError(
                f"{budget.params_percent:g}% of {total_params:,} parameters is less than one parameter"
            )
    if target > available:
        raise KappaTuneError(
            f"parameter budget {target:,} exceeds the {available:,} parameters of the {n} candidates"
        )
    chosen = _fill(ordered, target, greedy=fill == "greedy")
    if not chosen:
        first = ordered[0]
        what = (
            f"the smallest candidate ({min(r.numel for r in ordered):,} parameters)"
            if fill == "greedy"
            else f"the first candidate in order, {first.name} ({first.numel:,} parameters);"
            " --fill greedy skips to smaller ones"
        )
        raise KappaTuneError(f"parameter budget {target:,} is smaller than {what}")
    return chosen, target


def _fill(ordered: Sequence[SpectrumRow], target: int, greedy: bool) -> list[SpectrumRow]:
    """Rows in order while they fit ``target``; ``greedy`` skips a misfit and goes on."""
    chosen, used = [], 0
    for r in ordered:
        if used + r.numel <= target:
            chosen.append(r)
            used += r.numel
        elif not greedy:
            break
    return chosen


def skipped_before_last(order: Sequence[SpectrumRow], chosen: Sequence[SpectrumRow]) -> int:
    """How many rows of ``order`` before the last chosen one were not chosen."""
    keys = {r.key for r in chosen}
    last = max((i for i, r in enumerate(order) if r.key in keys), default=-1)
    return sum(1 for r in order[: last + 1] if r.key not in keys)
