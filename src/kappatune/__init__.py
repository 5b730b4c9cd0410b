"""kappatune: condition-number guided fine-tuning that forgets less.

The public API, from files to decisions to training::

    from kappatune import Budget, analyze, apply_selection, load_causal_lm, select

    selection = select(analyze("gemma-3-270m"), "lowest-kappa", Budget.parse_params("5%"))
    model, tokenizer = load_causal_lm("gemma-3-270m")
    groups = apply_selection(model, selection, weight_decay=0.01)

The library is quiet (it only logs through ``logging.getLogger(__name__)``); the
``kappatune`` command line configures logging and progress output. Every name below is
imported on first use (PEP 562), so ``import kappatune`` and ``kappatune --help`` do not load
torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from kappatune.errors import KappaTuneError

if TYPE_CHECKING:
    from kappatune.analysis.fisher import FisherOptions, compute_fisher
    from kappatune.analysis.options import AnalyzeOptions
    from kappatune.analysis.spectra import Analysis, SkippedRow, SpectrumRow, analyze
    from kappatune.bench.run import run_bench
    from kappatune.integrations.hf_trainer import KappaTuneCallback, freeze_for_trainer
    from kappatune.integrations.lora import (
        all_linear_targets,
        lora_config,
        lora_param_count,
        peft_targets,
        rank_for_budget,
    )
    from kappatune.probe.run import ProbeReport, ProbeSettings, run_probe
    from kappatune.selection.budget import Budget, SelectOptions
    from kappatune.selection.core import Selection, select
    from kappatune.selection.policies import PolicySpec, policy_names, register_policy
    from kappatune.training.config import LoraSettings, StopRule, TrainConfig
    from kappatune.training.data import pack_texts
    from kappatune.training.freezing import apply_selection, check_frozen, frozen_digests
    from kappatune.training.methods import get_method, method_names
    from kappatune.training.models import analysis_source, load_causal_lm
    from kappatune.training.recipe import resume_training, run_training
    from kappatune.training.run_settings import RunSettings

from kappatune._version import __version__ as __version__

# public name -> the module that defines it
_LAZY: dict[str, str] = {
    **dict.fromkeys(
        ("Analysis", "SkippedRow", "SpectrumRow", "analyze"), "kappatune.analysis.spectra"
    ),
    "AnalyzeOptions": "kappatune.analysis.options",
    **dict.fromkeys(("Budget", "SelectOptions"), "kappatune.selection.budget"),
    **dict.fromkeys(("Selection", "select"), "kappatune.selection.core"),
    **dict.fromkeys(
        ("PolicySpec", "policy_names", "register_policy"), "kappatune.selection.policies"
    ),
    **dict.fromkeys(
        ("apply_selection", "check_frozen", "frozen_digests"), "kappatune.training.freezing"
    ),
    **dict.fromkeys(("lora_config", "rank_for_budget"), "kappatune.integrations.lora"),
    **dict.fromkeys(
        ("KappaTuneCallback", "freeze_for_trainer"), "kappatune.integrations.hf_trainer"
    ),
    **dict.fromkeys(("analysis_source", "load_causal_lm"), "kappatune.training.models"),
    **dict.fromkeys(("FisherOptions", "compute_fisher"), "kappatune.analysis.fisher"),
    **dict.fromkeys(("ProbeReport", "ProbeSettings", "run_probe"), "kappatune.probe.run"),
    **dict.fromkeys(("get_method", "method_names"), "kappatune.training.methods"),
    **dict.fromkeys(("resume_training", "run_training"), "kappatune.training.recipe"),
    "RunSettings": "kappatune.training.run_settings",
    "run_bench": "kappatune.bench.run",
    **dict.fromkeys(("LoraSettings", "StopRule", "TrainConfig"), "kappatune.training.config"),
    "pack_texts": "kappatune.training.data",
    **dict.fromkeys(
        ("all_linear_targets", "lora_param_count", "peft_targets"), "kappatune.integrations.lora"
    ),
}

__all__ = [
    "Analysis",
    "AnalyzeOptions",
    "Budget",
    "FisherOptions",
    "KappaTuneCallback",
    "KappaTuneError",
    "LoraSettings",
    "PolicySpec",
    "ProbeReport",
    "ProbeSettings",
    "RunSettings",
    "SelectOptions",
    "Selection",
    "SkippedRow",
    "SpectrumRow",
    "StopRule",
    "TrainConfig",
    "__version__",
    "all_linear_targets",
    "analysis_source",
    "analyze",
    "apply_selection",
    "check_frozen",
    "compute_fisher",
    "freeze_for_trainer",
    "frozen_digests",
    "get_method",
    "load_causal_lm",
    "lora_config",
    "lora_param_count",
    "method_names",
    "pack_texts",
    "peft_targets",
    "policy_names",
    "rank_for_budget",
    "register_policy",
    "resume_training",
    "run_bench",
    "run_probe",
    "run_training",
    "select",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'kappatune' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
