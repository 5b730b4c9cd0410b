"""Where a selected checkpoint matrix lives in the model that is trained.

Selections name tensors as the checkpoint files do. Usually those are the model's parameter
names (or a suffix of them, under a DDP or PEFT wrapper). transformers 5 and newer, though,
fuse the per-expert tensors of many mixture-of-experts checkpoints at load time: the files
hold ``mlp.experts.3.gate_proj.weight`` and ``mlp.experts.3.up_proj.weight``, the model one
``mlp.experts.gate_up_proj`` of shape (experts, gate rows + up rows, hidden). :func:`locate`
maps each selected matrix to its :class:`Part` of a model parameter, using the model's own
conversion rules (``transformers.conversion_mapping``), so training touches exactly the
selected rows of exactly the selected experts.
"""

from __future__ import annotations

import copy
import json
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, cast

from torch import nn

from kappatune.errors import KappaTuneError
from kappatune.selection.core import Selection, SelectionEntry
from kappatune.selection.policies import RowKey

if TYPE_CHECKING:
    from transformers.core_model_loading import WeightConverter, WeightTransform


@dataclass(frozen=True)
class Part:
    """A selected matrix inside a model parameter."""

    param: str  # the model's parameter name
    expert: int | None = None  # index along dim 0 of a fused experts tensor
    rows: tuple[int, int] | None = None  # [start, stop) rows of that expert's matrix

    @property
    def whole(self) -> bool:
        return self.expert is None and self.rows is None


def suffix_index(params: Sequence[str]) -> dict[str, list[str]]:
    """Every dotted suffix of every parameter name -> the names that end with it."""
    index: dict[str, list[str]] = {}
    for p in params:
        parts = p.split(".")
        for i in range(len(parts)):
            index.setdefault(".".join(parts[i:]), []).append(p)
    return index


def match_param(name: str, params: Sequence[str], index: dict[str, list[str]]) -> str | None:
    """The parameter called ``name``, or the unique one whose name ends in ``.name``."""
    hits = index.get(name, [])
    if name in hits:
        return name
    return hits[0] if len(hits) == 1 else None


# What transformers' conversion-mapping look-ups raise on a model or config they do not expect
# (a missing ``config.model_type``, a mapping keyed differently); anything else is a bug to see.
_LAYOUT_ERRORS = (AttributeError, KeyError, TypeError, ValueError)


def _conversions(model: nn.Module) -> list[WeightTransform]:
    """The model's checkpoint -> model weight transforms (transformers >= 5), in load order."""
    try:
        from transformers import PreTrainedModel
        from transformers.conversion_mapping import get_model_conversion_mapping
    except ImportError:
        return []
    inner = next((m for m in model.modules() if isinstance(m, PreTrainedModel)), None)
    if inner is None:
        return []
    try:
        transforms = get_model_conversion_mapping(inner)
    except _LAYOUT_ERRORS:  # an unexpected model layout: no conversions rather than a crash
        return []
    return copy.deepcopy(list(transforms))  # rename_source_key marks transforms as used


def model_type_of(source: str | os.PathLike[str]) -> str | None:
    """``model_type`` from the ``config.json`` beside a checkpoint (file or directory), if any."""
    path = Path(source)
    if not path.exists():  # a built-in name or a hub id: no files of the user's to read
        return None
    config = (path if path.is_dir() else path.parent) / "config.json"
    try:
        value = json.loads(config.read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, str) else None


def conversions_for_type(model_type: str | None) -> list[WeightTransform]:
    """The load-time transforms transformers applies to checkpoints of ``model_type``."""
    if not model_type:
        return []
    try:
        from transformers.conversion_mapping import get_checkpoint_conversion_mapping
    except ImportError:
        return []
    try:
        transforms = get_checkpoint_conversion_mapping(model_type)
    except _LAYOUT_ERRORS:  # a mapping transformers cannot build for this type: none to apply
        return []
    return copy.deepcopy(list(transforms or []))


def _expert_of(key: str, transform: WeightConverter, pattern: str) -> tuple[int, int, int] | str:
    """(expert, source position, number of sources) of a key that a WeightConverter fuses."""
    ops = [(type(op).__name__, getattr(op, "dim", None)) for op in transform.operations]
    sources = len(transform.source_patterns)
    expected = [("MergeModulelist", 0)] + ([("Concatenate", 1)] if sources > 1 else [])
    if ops != expected:
        return f"transformers fuses it with {ops}, which kappatune cannot map back to one matrix"
    regex = re.escape(pattern.strip(".")).replace(r"\*", r"(\d+)")
    found = re.search(rf"(?:^|\.){regex}$", key)
    if found is None or not found.groups():
        return f"no expert index in {key!r} for pattern {pattern!r}"
    return int(found.group(1)), transform.source_patterns.index(pattern), sources


Followed = tuple[str, tuple[int, int, int] | None]  # model-side name, (expert, position, sources)


def follow(name: str, transforms: Sequence[WeightTransform]) -> Followed | str:
    """Where transformers' load-time renamings and fusions take the checkpoint tensor ``name``.

    Returns the model-side name and, for a fused tensor, (expert, position among the fused
    sources, number of sources); or why kappatune cannot map it.
    """
    key = name
    for transform in transforms:
        renamed, pattern = transform.rename_source_key(key)
        if pattern is None:
            continue
        if type(transform).__name__ != "WeightConverter":
            key = renamed
            continue
        fused = _expert_of(key, cast("WeightConverter", transform), pattern)
        return fused if isinstance(fused, str) else (renamed, fused)
    return key, None


def _through_conversions(
    entry: SelectionEntry,
    transforms: Sequence[WeightTransform],
    params: Sequence[str],
    index: dict[str, list[str]],
    shapes: dict[str, tuple[int, ...]],
) -> Part | str:
    """The model parameter (and expert rows) a checkpoint tensor became at load time."""
    followed = follow(entry.name, transforms)
    if isinstance(followed, str):
        return followed
    key, fused = followed
    param = match_param(key, params, index)
    if fused is None:  # renamed only (legacy names)
        return Part(param, entry.expert) if param is not None else "not a parameter of the model"
    if param is None:
        return f"transformers puts it in {key!r}, which the model does not have"
    expert, position, sources = fused
    shape = shapes[param]
    if len(shape) != 3 or not 0 <= expert < shape[0] or shape[1] % sources:
        return f"it would be expert {expert} of {param!r}, whose shape is {shape}"
    height = shape[1] // sources
    if entry.shape and tuple(entry.shape) != (height, shape[2]):
        return f"its shape {tuple(entry.shape)} does not fit {param!r} of shape {shape}"
    rows = None if sources == 1 else (position * height, (position + 1) * height)
    return Part(param, expert, rows)


def locate_by_type(model_type: str | None, selection: Selection) -> dict[RowKey, Part]:
    """:func:`locate` without a model: the names a model of ``model_type`` will have.

    For exports made from the files alone. Fused experts get their expert but no rows (the
    shapes are the model's); names no conversion touches are kept.
    """
    transforms = conversions_for_type(model_type)
    out: dict[RowKey, Part] = {}
    for entry in selection.entries:
        followed = follow(entry.name, transforms) if transforms else (entry.name, None)
        if isinstance(followed, str):
            raise KappaTuneError(f"cannot export {entry.name!r}: {followed}")
        key, fused = followed
        out[entry.key] = Part(key, entry.expert) if fused is None else Part(key, fused[0])
    return out


def locate(model: nn.Module, selection: Selection) -> dict[RowKey, Part]:
    """Each selected matrix's place in ``model``; raises naming what the model lacks."""
    return locate_entries(model, selection.entries)


def locate_entries(model: nn.Module, entries: Iterable[SelectionEntry]) -> dict[RowKey, Part]:
    """:func:`locate` for any matrices (e.g. every row of an analysis)."""
    named = list(model.named_parameters(remove_duplicate=False))
    params = [n for n, _ in named]
    shapes = {n: tuple(getattr(p, "ds_shape", None) or p.shape) for n, p in named}
    index = suffix_index(params)
    transforms: list[WeightTransform] | None = None
    out: dict[RowKey, Part] = {}
    problems: list[tuple[str, str]] = []
    for entry in entries:
        direct = match_param(entry.name, params, index)
        if direct is not None:
            out[entry.key] = Part(direct, entry.expert)
            continue
        if transforms is None:
            transforms = _conversions(model)
        found = _through_conversions(entry, transforms, params, index, shapes)
        if isinstance(found, str):
            problems.append((entry.name, found))
        else:
            out[entry.key] = found
    if problems:
        raise_missing(problems, params)
    return out


def raise_missing(problems: Iterable[tuple[str, str]], params: Sequence[str]) -> None:
    problems = list(problems)
    shown = ", ".join(n for n, _ in problems[:5]) + (", ..." if len(problems) > 5 else "")
    reasons = sorted({why for _, why in problems if why != "not a parameter of the model"})
    extra = f"; {reasons[0]}" if reasons else ""
    raise KappaTuneError(
        f"{len(problems)} selected tensor(s) are not parameters of the model ({shown}){extra};"
        f" the model has {len(params)} parameters, e.g. {params[0] if params else 'none'}"
        " (was the selection made for another model?)"
    )
