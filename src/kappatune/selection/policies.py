"""Policies: the order in which analysed weight matrices should be trained, registered by name.

A policy is a plain function ``(rows, ctx) -> list[SpectrumRow]`` that returns the candidates
in the order they should be trained (most wanted first), registered by name with
:func:`register_policy`, with a :class:`PolicySpec` saying what it needs (Fisher-type scores,
every singular value, ``--last-layers``): the CLI and the benchmark read it from here. Every order is total and deterministic: ties break on
(kappa, name, expert), and nothing is ever taken from an unordered collection.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from typing import TYPE_CHECKING

from kappatune.errors import KappaTuneError

if TYPE_CHECKING:  # the policy registry stays importable without torch (CLI choices)
    from kappatune.analysis.spectra import SpectrumRow


RowKey = tuple[str, int]


@dataclass(frozen=True)
class PolicyContext:
    """What a policy may need besides the rows."""

    seed: int = 0
    last_layers: int | None = None
    scores: Mapping[RowKey, float] | None = field(default=None, compare=False)


@dataclass(frozen=True)
class PolicySpec:
    """What a policy needs besides the rows; callers (CLI, benchmark) provide it.

    With both ``task_fisher`` and ``self_fisher``, ``ctx.scores`` are the task's squared
    gradients over the self-Fisher (:func:`kappatune.analysis.self_fisher.interference_scores`).
    """

    task_fisher: bool = False  # Fisher scores on task data (--fisher-data or --fisher-scores)
    self_fisher: bool = False  # Fisher scores on the model's own samples (data-free)
    full_spectrum: bool = False  # every singular value (SNR), not the faster kappa-only analysis
    kappa: bool = False  # ranks by kappa: candidates without one (NaN) are left out
    last_layers: bool = False  # needs --last-layers N
    keeps_all: bool = False  # without a budget, it keeps every candidate (others: the first 20%)

    @property
    def needs_scores(self) -> bool:
        """Needs Fisher-type scores in ``ctx.scores``."""
        return self.task_fisher or self.self_fisher


NEEDS_ROWS_ONLY = PolicySpec()
Policy = Callable[[Sequence["SpectrumRow"], PolicyContext], list["SpectrumRow"]]
_POLICIES: dict[str, tuple[Policy, PolicySpec]] = {}


def register_policy(name: str, needs: PolicySpec = NEEDS_ROWS_ONLY) -> Callable[[Policy], Policy]:
    """Decorator: make ``fn`` available as ``select(..., policy=name)``; ``needs`` says what it
    needs besides the rows (``kappatune select`` computes the Fisher scores it asks for)."""

    def deco(fn: Policy) -> Policy:
        if name in _POLICIES and _POLICIES[name] != (fn, needs):
            raise ValueError(f"selection policy {name!r} is already registered")
        _POLICIES[name] = (fn, needs)
        return fn

    return deco


def policy_names(where: Callable[[PolicySpec], bool] | None = None) -> tuple[str, ...]:
    """Registered policies, sorted; ``where``: only those whose spec it accepts."""
    return tuple(sorted(n for n, (_, spec) in _POLICIES.items() if where is None or where(spec)))


def _registered(name: str) -> tuple[Policy, PolicySpec]:
    try:
        return _POLICIES[name]
    except KeyError:
        raise KappaTuneError(
            f"unknown selection policy {name!r} (known: {', '.join(policy_names())})"
        ) from None


def get_policy(name: str) -> Policy:
    return _registered(name)[0]


def policy_spec(name: str) -> PolicySpec:
    """What the registered policy ``name`` needs (one line for an unknown name)."""
    return _registered(name)[1]


def row_kappa(row: SpectrumRow) -> float:
    return math.inf if math.isnan(row.kappa) else row.kappa


def kappa_order_key(row: SpectrumRow) -> tuple[bool, float, str, int]:
    """Ascending kappa, then name, then expert; NaN kappa sorts after everything, inf included."""
    return (math.isnan(row.kappa), row_kappa(row), row.name, row.key[1])


@register_policy("lowest-kappa", PolicySpec(kappa=True))
def lowest_kappa(rows: Sequence[SpectrumRow], ctx: PolicyContext) -> list[SpectrumRow]:
    """The paper's policy: least specialised (lowest condition number) first."""
    return sorted(rows, key=kappa_order_key)


@register_policy("highest-kappa", PolicySpec(kappa=True))
def highest_kappa(rows: Sequence[SpectrumRow], ctx: PolicyContext) -> list[SpectrumRow]:
    """Control: most specialised first (NaN kappa last)."""
    return sorted(rows, key=lambda r: (math.isnan(r.kappa), -row_kappa(r), r.name, r.key[1]))


@register_policy("random")
def random_order(rows: Sequence[SpectrumRow], ctx: PolicyContext) -> list[SpectrumRow]:
    """Control: a permutation fixed by ``ctx.seed`` (independent of the input order)."""
    out = sorted(rows, key=lambda r: r.key)
    random.Random(ctx.seed).shuffle(out)
    return out


@register_policy("all", PolicySpec(keeps_all=True))
def all_rows(rows: Sequence[SpectrumRow], ctx: PolicyContext) -> list[SpectrumRow]:
    """Every candidate, in checkpoint order."""
    return list(rows)


@register_policy("last-layers", PolicySpec(last_layers=True, keeps_all=True))
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


@register_policy("fisher", PolicySpec(task_fisher=True))
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


@register_policy("snr", PolicySpec(full_spectrum=True))
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


@register_policy("self-fisher", PolicySpec(self_fisher=True))
def least_self_fisher(rows: Sequence[SpectrumRow], ctx: PolicyContext) -> list[SpectrumRow]:
    """Data-free: least Fisher information on the model's own samples (per parameter) first."""
    scores = _scores_for(rows, ctx, "self-fisher", "self-Fisher")
    return sorted(rows, key=lambda r: (scores[r.key], *kappa_order_key(r)))


@register_policy("interference", PolicySpec(task_fisher=True, self_fisher=True))
def most_interference(rows: Sequence[SpectrumRow], ctx: PolicyContext) -> list[SpectrumRow]:
    """Task squared gradient over self-Fisher, largest first: matrices the task needs and the
    model's own behaviour hardly uses (``ctx.scores`` from
    :func:`kappatune.analysis.self_fisher.interference_scores`)."""
    scores = _scores_for(rows, ctx, "interference", "interference")
    return sorted(rows, key=lambda r: (-scores[r.key], *kappa_order_key(r)))
