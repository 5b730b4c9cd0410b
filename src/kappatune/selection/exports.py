"""A Selection in the formats trainers read: a JSON manifest, Axolotl YAML, PEFT targets.

* ``json``: the Selection itself (loadable with ``Selection.load`` and by ``kappatune train
  --selection``) plus a plain ``parameters`` list of names for any training loop;
* ``axolotl``: ``unfrozen_parameters:`` with anchored names in Axolotl's own pattern syntax
  (``^model.layers.3.self_attn.v_proj.weight$``: Axolotl's ``freeze_layers_except`` turns
  every ``.`` into a literal dot itself, so an escaped ``\\.`` would never match);
* ``peft``: PEFT's ``{"target_modules": [...], "target_parameters": [...] or None}``.

Each format is one function in :data:`EXPORTERS`; :func:`write_export` renders first and
writes atomically, so a failure leaves nothing behind.
"""

from __future__ import annotations

import json
import math
import os
import re
import shlex
from collections.abc import Callable

import yaml

from kappatune.errors import KappaTuneError
from kappatune.jsonio import atomic_write_text
from kappatune.selection.core import Selection
from kappatune.training.layout import locate_by_type

Exporter = Callable[[Selection, "str | None"], str]  # (selection, model_type) -> text


def manifest_json(selection: Selection, model_type: str | None = None) -> str:
    """The Selection itself, in the checkpoint files' names."""
    data = selection.to_json()
    data["parameters"] = list(selection.names)
    return json.dumps(data, indent=2, allow_nan=False) + "\n"


def axolotl_regex(name: str) -> str:
    """``name`` as one of Axolotl's ``unfrozen_parameters`` patterns, matching it exactly.

    Axolotl (``axolotl.utils.freeze.LayerNamePattern``) rewrites each ``.`` not followed by
    ``+`` into ``\\.`` before compiling, and reads a trailing ``[a:b]`` as a row range. So
    dots stay bare (``re.escape`` turns ``+`` into ``\\+``, so no ``.+`` can appear), every
    other regex character is escaped, and the pattern ends in ``$``, never in a range.
    """
    return "^" + re.escape(name).replace(r"\.", ".") + "$"


def axolotl_patterns(selection: Selection, model_type: str | None = None) -> list[str]:
    """Axolotl ``unfrozen_parameters`` for ``selection``, in the loaded model's names."""
    parts = locate_by_type(model_type, selection)
    names = dict.fromkeys(parts[e.key].param for e in selection.entries)
    return [axolotl_regex(n) for n in names]


def axolotl_yaml(selection: Selection, model_type: str | None = None) -> str:
    """Axolotl config fragment in the loaded model's names (``model_type``'s layout);
    fused expert tensors are unfrozen whole (noted in a comment)."""
    header = [
        f"# kappatune selection: {selection.describe()}",
        f"# source: {selection.source} (fingerprint {selection.fingerprint or 'n/a'})",
        f"# order: {selection.describe_order()}",
    ]
    parts = locate_by_type(model_type, selection)
    experts: dict[str, set[int]] = {}
    for part in parts.values():
        if part.expert is not None:
            experts.setdefault(part.param, set()).add(part.expert)
    for name, chosen in experts.items():
        header.append(
            f"# note: {name} is unfrozen whole; the selection chose experts {sorted(chosen)}"
            " (use kappatune's freezing to train only those)"
        )
    body = yaml.safe_dump(
        {"unfrozen_parameters": axolotl_patterns(selection, model_type)},
        sort_keys=False,
        default_flow_style=False,
        width=1000,
    )
    return "\n".join(header) + "\n" + body


def peft_json(selection: Selection, model_type: str | None = None) -> str:
    """PEFT targets in the loaded model's names (``model_type``'s layout, when given)."""
    from kappatune.integrations.lora import peft_targets

    return json.dumps(peft_targets(selection, model_type=model_type), indent=2) + "\n"


EXPORTERS: dict[str, Exporter] = {"json": manifest_json, "axolotl": axolotl_yaml, "peft": peft_json}


DEFAULT_NEXT_R = 16


def suggested_rank(selection: Selection) -> int:
    """A LoRA rank for the selected modules: the largest whose adapters fit the selection's own
    parameter budget (r x (out + in) per matrix), else 16."""
    per_rank = sum(e.shape[0] + math.prod(e.shape[1:]) for e in selection.entries if e.shape)
    if selection.budget_params and per_rank:
        return max(1, min(selection.budget_params // per_rank, 4096))
    return DEFAULT_NEXT_R


def next_steps(selection: Selection, fmt: str, output: str, source: str) -> list[str]:
    """What to do with the export just written, per format: commands and code to copy."""
    src = "MODEL" if source.lower().endswith(".json") else shlex.quote(source)  # an analysis
    out = shlex.quote(output)
    r = suggested_rank(selection)
    train = f"kappatune train {src} --data DATA --output RUN --selection {out}"
    if fmt == "json":
        return [
            f"train only these matrices: {train} --method selective",
            f"or LoRA on just these modules: {train} --method kappa-lora --lora-r {r}",
        ]
    if fmt == "peft":
        return [
            "build the LoraConfig from it (PEFT):",
            "  import json; from peft import LoraConfig, get_peft_model",
            f"  targets = json.load(open({output!r}))",
            f"  config = LoraConfig(r={r}, lora_alpha={2 * r}, task_type='CAUSAL_LM', **targets)",
            "  model = get_peft_model(model, config)",
            f"(r={r}: "
            + ("the largest rank whose adapters fit the selection's parameter budget)"
               if selection.budget_params else "a common default; the selection has no parameter budget)"),
        ]  # fmt: skip
    if fmt == "axolotl":
        return [
            f"copy the unfrozen_parameters list of {output} to the top level of your Axolotl"
            " config (beside base_model), then: axolotl train config.yml",
            "or let Axolotl select at start-up: plugins: [kappatune.integrations.axolotl."
            "KappaTunePlugin] with kappatune_budget_params (see the README)",
        ]
    return []


def render(selection: Selection, fmt: str, model_type: str | None = None) -> str:
    """``selection`` as ``fmt``; ``model_type`` (config.json's) names the loaded model's layout."""
    try:
        exporter = EXPORTERS[fmt]
    except KeyError:
        raise KappaTuneError(
            f"unknown export format {fmt!r} (known: {', '.join(EXPORTERS)})"
        ) from None
    return exporter(selection, model_type)


def write_export(
    selection: Selection, fmt: str, path: str | os.PathLike[str], model_type: str | None = None
) -> None:
    """Render ``selection`` as ``fmt`` and write it atomically to ``path``."""
    text = render(selection, fmt, model_type)
    atomic_write_text(path, text)
