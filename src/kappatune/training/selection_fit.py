"""Refuse a selection made for another model before a run writes anything.

A selection names matrices by name; a model of another size, or of the same architecture with
other weights (another checkpoint, a fine-tuned variant), has the same names, so training would
start, exit 0 and train matrices chosen for different weights. Two checks, both from the model
in memory (no file needed): every selected matrix has the shape the selection recorded, and its
condition number, computed again exactly as the analysis computes it, is the one the selection
recorded (a digest of the matrix's content that the selection already carries).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import nn

from kappatune.errors import KappaTuneError
from kappatune.selection.core import Selection, SelectionEntry
from kappatune.selection.policies import RowKey
from kappatune.training.freezing import is_partitioned, param_shape
from kappatune.training.layout import Part

KAPPA_RTOL = 1e-4  # the same weights give the same kappa to ~1e-9; other weights differ far more
ACCEPT_FLAG = "--selection-other-weights"


def _matrix(p: torch.Tensor, part: Part) -> torch.Tensor:
    t = p.detach()
    if part.expert is not None:
        t = t[part.expert]
    if part.rows is not None:
        t = t[part.rows[0] : part.rows[1]]
    return t.reshape(t.shape[0], -1) if t.ndim > 2 else t


def _expected_shape(p: torch.Tensor, part: Part) -> tuple[int, ...] | None:
    shape = param_shape(p)
    if part.rows is not None:
        return None  # a slice of a fused parameter: its shape is the conversion's
    return tuple(shape[1:]) if part.expert is not None else tuple(shape)


def _same(a: float, b: float) -> bool:
    if math.isinf(a) or math.isinf(b):
        return a == b
    return abs(a - b) <= KAPPA_RTOL * max(abs(a), abs(b))


def check_selection_fits(
    model: nn.Module,
    selection: Selection,
    parts: Mapping[RowKey, Part],
    *,
    other_weights: bool = False,
) -> int:
    """Raise, in one line, when ``selection`` was made for another model: a selected matrix of
    another shape (always), or of other content by its kappa (unless ``other_weights``, for a
    selection reused on purpose on a model of the same architecture). Returns how many kappas
    were compared (0 when ``other_weights``, or for parameters ZeRO-3 has partitioned)."""
    from kappatune.analysis.spectra import AnalyzeOptions, analyze

    params = dict(model.named_parameters(remove_duplicate=False))
    wrong = []
    for entry in selection.entries:
        p = params[parts[entry.key].param]
        want = _expected_shape(p, parts[entry.key])
        if entry.shape and want is not None and tuple(entry.shape) != want:
            wrong.append(f"{entry.name} is {list(entry.shape)} there, {list(want)} here")
    if wrong:
        more = f" (and {len(wrong) - 1} more)" if len(wrong) > 1 else ""
        raise KappaTuneError(
            f"--selection was made for another model: {wrong[0]}{more}; select again for this model"
        )
    if other_weights:
        return 0
    checked: dict[str, tuple[SelectionEntry, torch.Tensor]] = {}
    for i, entry in enumerate(selection.entries):
        p = params[parts[entry.key].param]
        if is_partitioned(p) or math.isnan(entry.kappa):
            continue
        checked[f"selected.{i}"] = (entry, _matrix(p, parts[entry.key]))
    if not checked:
        return 0
    rows = analyze(
        {name: t for name, (_, t) in checked.items()},
        AnalyzeOptions(kappa_only=True, use_cache=False, workers=1),
    )
    got = {r.name: r.kappa for r in rows.tensors}
    for name, (entry, _) in checked.items():
        if name in got and not _same(got[name], entry.kappa):
            raise KappaTuneError(
                f"--selection was made for other weights: {entry.name} has kappa"
                f" {entry.kappa:.6g} there and {got[name]:.6g} in this model; select again for"
                f" this model, or add {ACCEPT_FLAG} to train it on purpose"
            )
    return len(checked)
