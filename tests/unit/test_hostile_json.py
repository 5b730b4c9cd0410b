"""Fuzzing the analysis- and selection-JSON readers: any value in any field ends in a loaded
object or one KappaTuneError, never another exception (Hypothesis, bounded in time)."""

from __future__ import annotations

import copy
import math
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kappatune.analysis.spectra import Analysis, SkippedRow
from kappatune.errors import KappaTuneError
from kappatune.selection.budget import Budget
from kappatune.selection.core import Selection, select
from tests.unit.test_selection import ROWS

ANALYSIS = Analysis("src", "fp", ROWS, (SkippedRow("model.norm.weight", (8,), "1-D"),)).to_json()
SELECTION = select(ROWS, "lowest-kappa", Budget(tensors=3)).to_json()

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.sampled_from(["", "inf", "-inf", "nan", "x", "1e999", "12"]),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3)
    ),
    max_leaves=6,
)
FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _paths(doc: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix]
    if isinstance(doc, dict):
        for k, v in doc.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            out += _paths(v, (*prefix, i))
    return out


def _set(doc: Any, path: tuple[Any, ...], value: Any) -> Any:
    if not path:
        return value
    doc = copy.deepcopy(doc)
    parent = doc
    for key in path[:-1]:
        parent = parent[key]
    parent[path[-1]] = value
    return doc


def _only_kappatune_errors(fn: Any) -> Any:
    try:
        return fn()
    except KappaTuneError as exc:
        assert str(exc) and "\n" not in str(exc)
        return None


POLICIES = ["lowest-kappa", "highest-kappa", "random", "all", "last-layers"]
BUDGETS = [
    Budget(tensors=2),
    Budget(params=150),
    Budget(params_percent=50),
    Budget(kappa_max=math.inf),
]


@FAST
@given(
    path=st.sampled_from(_paths(ANALYSIS)),
    value=json_values,
    policy=st.sampled_from(POLICIES),
    budget=st.sampled_from(BUDGETS),
)
def test_analysis_json_reader_and_select_never_crash(
    path: tuple[Any, ...], value: Any, policy: str, budget: Budget
) -> None:
    doc = _set(ANALYSIS, path, value)
    analysis = _only_kappatune_errors(
        lambda: Analysis.from_json(doc) if isinstance(doc, dict) else None
    )
    if analysis is not None:
        from kappatune.selection.budget import SelectOptions

        options = SelectOptions(last_layers=1)
        _only_kappatune_errors(lambda: select(analysis, policy, budget, options))


@FAST
@given(path=st.sampled_from(_paths(SELECTION)), value=json_values)
def test_selection_json_reader_never_crashes(path: tuple[Any, ...], value: Any) -> None:
    doc = _set(SELECTION, path, value)
    if isinstance(doc, dict):
        sel = _only_kappatune_errors(lambda: Selection.from_json(doc))
        if sel is not None:
            sel.describe()


@pytest.mark.parametrize(
    "text", ["1e400", "150%", "0%", "-1", "nan%", "inf", "1e999k", "5.5", "%", "1e-3%"]
)
def test_parameter_budget_text_is_a_budget_or_one_error(text: str) -> None:
    _only_kappatune_errors(lambda: Budget.parse_params(text))
