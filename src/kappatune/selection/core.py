"""Selection: analysed rows -> policy order -> filters, quotas and a budget -> Selection.

The stage that links :mod:`kappatune.selection.policies` (the order) and
:mod:`kappatune.selection.budget` (how many to keep). The result is a :class:`Selection`, a
value object with a versioned JSON round trip.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
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

from kappatune.selection.budget import (
    Budget,
    SelectOptions,
    apply_quotas,
    filter_rows,
    skipped_before_last,
    take,
)
from kappatune.selection.policies import PolicyContext, RowKey, get_policy, policy_spec

SCHEMA_VERSION = 1


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
    options: SelectOptions = field(default_factory=SelectOptions)
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
    if policy_spec(policy).kappa:
        candidates = _with_kappa(candidates, policy)
    ctx = PolicyContext(seed=options.seed, last_layers=options.last_layers, scores=scores)
    policy_order = ordered = fn(candidates, ctx)
    if options.quotas:
        ordered = apply_quotas(ordered, options.quotas)
    if not ordered:
        raise KappaTuneError(
            f"empty selection: policy {policy!r} kept 0 of {len(candidates)} candidates"
        )
    chosen, target = take(ordered, budget, total, options.fill)
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
