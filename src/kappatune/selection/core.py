"""Selection: analysed rows -> policy order -> filters, quotas and a budget -> Selection.

A policy is a plain function ``(rows, ctx) -> list[SpectrumRow]`` that returns the candidates
in the order they should be trained (most wanted first), registered by name with
:func:`register_policy`. Every order is total and deterministic: ties break on
(kappa, name, expert), and nothing is ever taken from an unordered collection.

A :class:`Budget` says how many of the ordered candidates to keep (exactly one kind: a
number of tensors, a fraction of the candidates, a trainable-parameter count or percentage
of the model, or a kappa threshold). A parameter budget takes a *prefix* of the policy order:
candidates in order until the next one does not fit, the rest of the budget reported as the
shortfall. ``SelectOptions(fill="greedy")`` opts into skipping what does not fit and filling
on with later (smaller) candidates, which leaves earlier ones out. Every policy follows the
same rule, so selections of different policies stay comparable. The result is a :class:`Selection`, a value object with
a versioned JSON round trip.
"""

from __future__ import annotations

import math
import os
import random
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from typing import TYPE_CHECKING, Any

from kappatune.errors import KappaTuneError
from kappatune.jsonio import (
    atomic_write_json,
    check_schema,
    decode_float,
    encode_float,
    read_json_object,
)

if TYPE_CHECKING:  # the policy registry stays importable without torch (CLI choices)
    from kappatune.analysis.spectra import Analysis, SpectrumRow

SCHEMA_VERSION = 1
RowKey = tuple[str, int]


# --------------------------------------------------------------------------- policies


@dataclass(frozen=True)
class PolicyContext:
    """What a policy may need besides the rows."""

    seed: int = 0
    last_layers: int | None = None
    scores: Mapping[RowKey, float] | None = field(default=None, compare=False)


Policy = Callable[[Sequence["SpectrumRow"], PolicyContext], list["SpectrumRow"]]
_POLICIES: dict[str, Policy] = {}


def register_policy(name: str) -> Callable[[Policy], Policy]:
    """Decorator: make ``fn`` available as ``select(..., policy=name)``."""

    def deco(fn: Policy) -> Policy:
        if name in _POLICIES and _POLICIES[name] is not fn:
            raise ValueError(f"selection policy {name!r} is already registered")
        _POLICIES[name] = fn
        return fn

    return deco


def policy_names() -> tuple[str, ...]:
    return tuple(sorted(_POLICIES))


def get_policy(name: str) -> Policy:
    try:
        return _POLICIES[name]
    except KeyError:
        raise KappaTuneError(
            f"unknown selection policy {name!r} (known: {', '.join(policy_names())})"
        ) from None


def _kappa(row: SpectrumRow) -> float:
    return math.inf if math.isnan(row.kappa) else row.kappa


def kappa_order_key(row: SpectrumRow) -> tuple[bool, float, str, int]:
    """Ascending kappa, then name, then expert; NaN kappa sorts after everything, inf included."""
    return (math.isnan(row.kappa), _kappa(row), row.name, row.key[1])


@register_policy("lowest-kappa")
def lowest_kappa(rows: Sequence[SpectrumRow], ctx: PolicyContext) -> list[SpectrumRow]:
    """The paper's policy: least specialised (lowest condition number) first."""
    return sorted(rows, key=kappa_order_key)


@register_policy("highest-kappa")
def highest_kappa(rows: Sequence[SpectrumRow], ctx: PolicyContext) -> list[SpectrumRow]:
    """Control: most specialised first (NaN kappa last)."""
    return sorted(rows, key=lambda r: (math.isnan(r.kappa), -_kappa(r), r.name, r.key[1]))


@register_policy("random")
def random_order(rows: Sequence[SpectrumRow], ctx: PolicyContext) -> list[SpectrumRow]:
    """Control: a permutation fixed by ``ctx.seed`` (independent of the input order)."""
    out = sorted(rows, key=lambda r: r.key)
    random.Random(ctx.seed).shuffle(out)
    return out


@register_policy("all")
def all_rows(rows: Sequence[SpectrumRow], ctx: PolicyContext) -> list[SpectrumRow]:
    """Every candidate, in checkpoint order."""
    return list(rows)


@register_policy("last-layers")
def last_layers(rows: Sequence[SpectrumRow], ctx: PolicyContext) -> list[SpectrumRow]:
    """LLaMA-Factory's freeze mode: matrices of the last N layers, last layer first."""
    n = ctx.last_layers
    if n is None or n < 1:
        raise KappaTuneError(f"policy 'last-layers' needs --last-layers N >= 1, got {n}")
    layers = sorted({r.layer for r in rows if r.layer is not None})
    if not layers:
        raise KappaTuneError("policy 'last-layers': no candidate has a layer index in its name")
    if n > len(layers):
        raise KappaTuneError(
            f"--last-layers {n} exceeds the {len(layers)} layers among the candidates"
        )
    keep = set(layers[-n:])
    chosen = [r for r in rows if r.layer in keep]
    return sorted(chosen, key=lambda r: (-(r.layer or 0), *kappa_order_key(r)))


@register_policy("fisher")
def least_fisher(rows: Sequence[SpectrumRow], ctx: PolicyContext) -> list[SpectrumRow]:
    """Data-dependent control: least Fisher information (``ctx.scores[row.key]``) first."""
    scores = ctx.scores
    if not scores:
        raise KappaTuneError(
            "policy 'fisher' needs Fisher scores (compute them with kappatune.analysis.fisher)"
        )
    missing = [r.key for r in rows if r.key not in scores]
    if missing:
        shown = ", ".join(n if e < 0 else f"{n}[{e}]" for n, e in missing[:3])
        raise KappaTuneError(
            f"policy 'fisher': {len(missing)} of {len(rows)} candidates have no Fisher score (e.g. {shown})"
        )
    return sorted(rows, key=lambda r: (scores[r.key], *kappa_order_key(r)))


def _checked_snr(row: SpectrumRow) -> float:
    shown = row.name if row.expert is None else f"{row.name}[{row.expert}]"
    if row.snr is None:
        raise KappaTuneError(
            f"policy 'snr': {shown} has no SNR (the analysis predates it): re-run kappatune analyze"
        )
    if math.isnan(row.snr):
        dims = " x ".join(map(str, row.shape[-2:])) or "?"
        why = "one singular value" if min(row.shape[-2:] or (0,)) < 2 else "an all-zero matrix"
        raise KappaTuneError(
            f"policy 'snr': the Marchenko-Pastur noise edge of {shown} ({dims}, {why}) is"
            " undefined; leave it out with --exclude"
        )
    return row.snr


@register_policy("snr")
def spectrum_snr(rows: Sequence[SpectrumRow], ctx: PolicyContext) -> list[SpectrumRow]:
    """Spectrum's rule: highest SNR first within each module type, the types interleaved.

    A row's place is its rank within its module type as a fraction of that type's count
    ((k + 1) / n), so any budget takes about the same top fraction of every type and a
    fraction budget F takes exactly Spectrum's top int(n F) of a type whenever n F is whole.
    Ties: SNR (higher first), name, expert. A row whose noise edge is undefined (1 x N, nan)
    is an error, as is an analysis without SNR.
    """
    by_type: dict[str, list[SpectrumRow]] = {}
    for r in rows:
        _checked_snr(r)
        by_type.setdefault(r.module_type, []).append(r)
    placed: list[tuple[Fraction, float, str, int, SpectrumRow]] = []
    for group in by_type.values():
        group.sort(key=lambda r: (-_checked_snr(r), r.name, r.key[1]))
        for k, r in enumerate(group):
            placed.append((Fraction(k + 1, len(group)), -_checked_snr(r), r.name, r.key[1], r))
    placed.sort(key=lambda p: p[:4])
    return [p[4] for p in placed]


def _scores_for(
    rows: Sequence[SpectrumRow], ctx: PolicyContext, policy: str, what: str
) -> Mapping[RowKey, float]:
    """``ctx.scores``, checked to cover every candidate."""
    scores = ctx.scores
    if not scores:
        raise KappaTuneError(
            f"policy {policy!r} needs {what} scores (kappatune.analysis.self_fisher)"
        )
    missing = [r.key for r in rows if r.key not in scores]
    if missing:
        shown = ", ".join(n if e < 0 else f"{n}[{e}]" for n, e in missing[:3])
        raise KappaTuneError(
            f"policy {policy!r}: {len(missing)} of {len(rows)} candidates have no {what} score"
            f" (e.g. {shown})"
        )
    return scores


@register_policy("self-fisher")
def least_self_fisher(rows: Sequence[SpectrumRow], ctx: PolicyContext) -> list[SpectrumRow]:
    """Data-free: least Fisher information on the model's own samples (per parameter) first."""
    scores = _scores_for(rows, ctx, "self-fisher", "self-Fisher")
    return sorted(rows, key=lambda r: (scores[r.key], *kappa_order_key(r)))


@register_policy("interference")
def most_interference(rows: Sequence[SpectrumRow], ctx: PolicyContext) -> list[SpectrumRow]:
    """Task squared gradient over self-Fisher, largest first: matrices the task needs and the
    model's own behaviour hardly uses (``ctx.scores`` from
    :func:`kappatune.analysis.self_fisher.interference_scores`)."""
    scores = _scores_for(rows, ctx, "interference", "interference")
    return sorted(rows, key=lambda r: (-scores[r.key], *kappa_order_key(r)))


# --------------------------------------------------------------------------- budgets

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


@dataclass(frozen=True)
class SelectOptions:
    """Filters and per-module-type quotas applied around the policy."""

    include: str | None = None
    exclude: str | None = None
    module_types: tuple[str, ...] = ()
    quotas: tuple[tuple[str, int], ...] = ()  # (module type, count), Spectrum style
    seed: int = 0
    last_layers: int | None = None
    fill: str = "prefix"  # parameter budgets: "prefix" of the order, or "greedy" filling

    def __post_init__(self) -> None:
        if self.fill not in FILL_MODES:
            raise KappaTuneError(
                f"unknown fill mode {self.fill!r} (known: {', '.join(FILL_MODES)})"
            )
        for label, pattern in (("include", self.include), ("exclude", self.exclude)):
            if pattern is not None:
                try:
                    re.compile(pattern)
                except re.error as exc:
                    raise KappaTuneError(f"invalid --{label} regex {pattern!r}: {exc}") from None
        seen: set[str] = set()
        for kind, count in self.quotas:
            if kind in seen:
                raise KappaTuneError(f"quota for module type {kind!r} given twice")
            seen.add(kind)
            if count < 1:
                raise KappaTuneError(f"quota {kind}={count}: a quota must be at least 1")

    def to_json(self) -> dict[str, Any]:
        return {
            "include": self.include,
            "exclude": self.exclude,
            "module_types": list(self.module_types),
            "quotas": {k: v for k, v in self.quotas},
            "seed": self.seed,
            "last_layers": self.last_layers,
            "fill": self.fill,
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> SelectOptions:
        return cls(
            include=d.get("include"),
            exclude=d.get("exclude"),
            module_types=tuple(d.get("module_types") or ()),
            quotas=tuple((str(k), int(v)) for k, v in (d.get("quotas") or {}).items()),
            seed=int(d.get("seed", 0)),
            last_layers=d.get("last_layers"),
            fill=str(d.get("fill", "prefix")),
        )


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


# --------------------------------------------------------------------------- selection


@dataclass(frozen=True)
class SelectionEntry:
    """One selected matrix: a whole tensor (expert None) or one expert of a fused tensor."""

    name: str
    expert: int | None
    kappa: float
    numel: int
    module_type: str = ""
    layer: int | None = None
    shape: tuple[int, ...] = ()  # of the matrix: the tensor's, or one expert's

    @property
    def key(self) -> RowKey:
        return (self.name, -1 if self.expert is None else self.expert)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "expert": self.expert,
            "kappa": encode_float(self.kappa),
            "numel": self.numel,
            "module_type": self.module_type,
            "layer": self.layer,
            "shape": list(self.shape),
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> SelectionEntry:
        return cls(
            name=str(d["name"]),
            expert=None if d.get("expert") is None else int(d["expert"]),
            kappa=decode_float(d["kappa"]),
            numel=int(d["numel"]),
            module_type=str(d.get("module_type", "")),
            layer=None if d.get("layer") is None else int(d["layer"]),
            shape=tuple(int(x) for x in d.get("shape") or ()),
        )

    @classmethod
    def of(cls, row: SpectrumRow) -> SelectionEntry:
        return cls(
            row.name, row.expert, row.kappa, row.numel, row.module_type, row.layer, row.shape
        )


@dataclass(frozen=True)
class Selection:
    """Ordered matrices to train, with the numbers that explain how they were chosen."""

    entries: tuple[SelectionEntry, ...]
    policy: str
    budget: Budget | None
    source: str
    fingerprint: str
    candidates: int
    candidate_params: int
    total_params: int
    options: SelectOptions = SelectOptions()
    budget_params: int | None = None  # resolved parameter target, for parameter budgets
    skipped_in_order: int = 0  # candidates before the last entry in policy order left out
    schema_version: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        if not self.entries:
            raise KappaTuneError("empty selection: no tensor was selected")
        keys = [e.key for e in self.entries]
        if len(set(keys)) != len(keys):
            dup = next(k for i, k in enumerate(keys) if k in keys[:i])
            raise KappaTuneError(f"selection lists {dup[0]!r} (expert {dup[1]}) twice")
        whole = {e.name for e in self.entries if e.expert is None}
        mixed = sorted(whole & {e.name for e in self.entries if e.expert is not None})
        if mixed:
            raise KappaTuneError(f"selection lists {mixed[0]!r} both whole and per expert")

    # ---- counts
    @property
    def entry_count(self) -> int:
        return len(self.entries)

    @property
    def names(self) -> tuple[str, ...]:
        """Distinct parameter names in selection order."""
        return tuple(dict.fromkeys(e.name for e in self.entries))

    @property
    def tensor_count(self) -> int:
        return len(self.names)

    @property
    def param_count(self) -> int:
        return sum(e.numel for e in self.entries)

    @property
    def is_prefix(self) -> bool:
        """True when the entries are the first ones of the policy order, none left out between."""
        return self.skipped_in_order == 0

    @property
    def shortfall(self) -> int | None:
        """Parameters below a parameter budget (0 when met exactly); None for other budgets."""
        return None if self.budget_params is None else self.budget_params - self.param_count

    def experts(self) -> dict[str, tuple[int, ...] | None]:
        """Per parameter name: None when the whole tensor is selected, else the selected experts."""
        out: dict[str, list[int] | None] = {}
        for e in self.entries:
            if e.expert is None:
                out[e.name] = None
            else:
                cur = out.setdefault(e.name, [])
                assert cur is not None
                cur.append(e.expert)
        return {k: None if v is None else tuple(sorted(v)) for k, v in out.items()}

    def describe(self) -> str:
        budget = self.budget.describe() if self.budget else "no budget"
        text = (
            f"{self.policy}, {budget}: {self.entry_count} of {self.candidates} candidates,"
            f" {self.param_count:,} parameters ({100 * self.param_count / max(1, self.total_params):.2f}%"
            " of the model)"
        )
        if self.shortfall:
            text += f", {self.shortfall:,} short of the {self.budget_params:,}-parameter budget"
        return text

    def describe_order(self) -> str:
        """Whether the entries are a prefix of the policy order, in words."""
        if self.is_prefix:
            return f"a prefix of the {self.policy} order: its first {self.entry_count} candidates"
        return (
            f"NOT a prefix of the {self.policy} order: {self.skipped_in_order} earlier"
            f" candidate(s) left out ({self._why_not_prefix()})"
        )

    def _why_not_prefix(self) -> str:
        if self.options.quotas:
            return "per-type quotas"
        if self.options.fill == "greedy" and self.budget_params is not None:
            return "greedy filling"
        return "kappa threshold on another order"

    # ---- JSON
    def to_json(self) -> dict[str, Any]:
        return {
            "schema_version": self.schema_version,
            "kind": "kappatune.selection.core",
            "policy": self.policy,
            "budget": None if self.budget is None else self.budget.to_json(),
            "budget_description": self.budget.describe() if self.budget else None,
            "options": self.options.to_json(),
            "source": self.source,
            "fingerprint": self.fingerprint,
            "candidates": self.candidates,
            "candidate_params": self.candidate_params,
            "total_params": self.total_params,
            "budget_params": self.budget_params,
            "tensor_count": self.tensor_count,
            "param_count": self.param_count,
            "shortfall": self.shortfall,
            "skipped_in_order": self.skipped_in_order,
            "is_prefix": self.is_prefix,
            "entries": [e.to_json() for e in self.entries],
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Selection:
        check_schema(d, "selection", SCHEMA_VERSION)
        try:
            return cls(
                entries=tuple(SelectionEntry.from_json(e) for e in d["entries"]),
                policy=str(d["policy"]),
                budget=None if d.get("budget") is None else Budget.from_json(d["budget"]),
                source=str(d["source"]),
                fingerprint=str(d["fingerprint"]),
                candidates=int(d["candidates"]),
                candidate_params=int(d["candidate_params"]),
                total_params=int(d["total_params"]),
                options=SelectOptions.from_json(d.get("options") or {}),
                budget_params=None if d.get("budget_params") is None else int(d["budget_params"]),
                skipped_in_order=int(d.get("skipped_in_order", 0)),
            )
        except (KeyError, TypeError, ValueError, AttributeError, OverflowError) as exc:
            if isinstance(exc, KappaTuneError):
                raise
            raise KappaTuneError(f"malformed selection JSON: {type(exc).__name__}: {exc}") from None

    def save(self, path: str | os.PathLike[str]) -> None:
        atomic_write_json(path, self.to_json())

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Selection:
        return cls.from_json(read_json_object(path, "selection", "no such selection file"))


# --------------------------------------------------------------------------- the stage


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
        if options.include and not re.search(options.include, r.name):
            continue
        if options.exclude and re.search(options.exclude, r.name):
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


def _take(
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
            lowest = min((_kappa(r) for r in ordered), default=math.nan)
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


KAPPA_POLICIES = ("lowest-kappa", "highest-kappa")


def _with_kappa(rows: Sequence[SpectrumRow], policy: str) -> list[SpectrumRow]:
    """The rows a kappa policy can rank: a NaN kappa (no spectrum) is no candidate."""
    kept = [r for r in rows if not math.isnan(r.kappa)]
    if not kept:
        raise KappaTuneError(
            f"policy {policy!r}: none of the {len(rows)} candidates has a kappa (all are NaN);"
            " re-run the analysis or choose another policy"
        )
    return kept


def _total_params(analysis: Analysis) -> int:
    skipped = sum(math.prod(s.shape) if s.shape else 1 for s in analysis.skipped)
    return sum(r.numel for r in analysis.tensors) + skipped


def select(
    analysis_or_rows: Analysis | Sequence[SpectrumRow],
    policy: str = "lowest-kappa",
    budget: Budget | None = None,
    options: SelectOptions | None = None,
    *,
    scores: Mapping[RowKey, float] | None = None,
    total_params: int | None = None,
    source: str | None = None,
    fingerprint: str | None = None,
) -> Selection:
    """Order the candidates with ``policy``, filter, apply quotas and ``budget``.

    ``total_params`` (the model's parameter count, for percentage budgets and reports)
    defaults to every tensor of the analysis, matrices and skipped ones alike.
    """
    from kappatune.analysis.spectra import Analysis

    options = options or SelectOptions()
    fn = get_policy(policy)
    if isinstance(analysis_or_rows, Analysis):
        rows: Sequence[SpectrumRow] = analysis_or_rows.tensors
        total = total_params if total_params is not None else _total_params(analysis_or_rows)
        source = source if source is not None else analysis_or_rows.source
        fingerprint = fingerprint if fingerprint is not None else analysis_or_rows.fingerprint
    else:
        rows = list(analysis_or_rows)
        total = total_params if total_params is not None else sum(r.numel for r in rows)
    if not rows:
        raise KappaTuneError("nothing to select from: the analysis has 0 candidate matrices")
    candidates = filter_rows(rows, options)
    if not candidates:
        raise KappaTuneError(
            f"empty selection: the filters (include={options.include!r}, exclude={options.exclude!r},"
            f" module types={list(options.module_types)}) leave 0 of {len(rows)} candidates"
        )
    if policy in KAPPA_POLICIES:
        candidates = _with_kappa(candidates, policy)
    ctx = PolicyContext(seed=options.seed, last_layers=options.last_layers, scores=scores)
    policy_order = ordered = fn(candidates, ctx)
    if options.quotas:
        ordered = apply_quotas(ordered, options.quotas)
    if not ordered:
        raise KappaTuneError(
            f"empty selection: policy {policy!r} kept 0 of {len(candidates)} candidates"
        )
    chosen, target = _take(ordered, budget, total, options.fill)
    return Selection(
        entries=tuple(SelectionEntry.of(r) for r in chosen),
        policy=policy,
        budget=budget,
        source=source or "",
        fingerprint=fingerprint or "",
        candidates=len(ordered),
        candidate_params=sum(r.numel for r in ordered),
        total_params=total,
        options=options,
        budget_params=target,
        skipped_in_order=skipped_before_last(policy_order, chosen),
    )
