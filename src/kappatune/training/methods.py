"""Training methods as registered objects: how each prepares a model and what it saves.

A :class:`TrainingMethod` says what differs between ``selective`` (KappaTune: freeze all but
the selection), ``kappa-lora`` (LoRA on the selected modules), ``lora`` (LoRA on every
linear layer) and ``full`` fine-tuning: whether it needs a selection, whether it trains a
LoRA adapter (and so saves ``adapter/`` rather than ``model/``), and the function that
prepares a model for it. :func:`method_names` lists them in registration order (the
``--method`` choices); :func:`get_method` finds one by name. Importing this module does not
import torch (the command line reads the names at start-up).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from kappatune.errors import KappaTuneError

if TYPE_CHECKING:
    from torch import nn

    from kappatune.selection.core import Selection
    from kappatune.training.config import LoraSettings

LoraTargets = dict[str, list[str] | None]


@dataclass
class PreparedModel:
    """A model ready to train: possibly PEFT-wrapped, with its optimizer groups."""

    model: nn.Module
    param_groups: list[dict[str, Any]]
    method: str
    trainable_params: int
    lora_r: int | None = None
    lora_targets: LoraTargets | None = None


Prepare = Callable[
    ["TrainingMethod", "nn.Module", "Selection | None", "LoraSettings", float], PreparedModel
]


@dataclass(frozen=True)
class TrainingMethod:
    """One way of fine-tuning; ``preparer(method, model, selection, lora, weight_decay)``
    sets ``requires_grad`` (or wraps the model in PEFT) and returns the optimizer groups."""

    name: str
    description: str
    needs_selection: bool  # trains (selective) or adapts (kappa-lora) a Selection's tensors
    lora: bool  # trains a LoRA adapter: LoRA settings apply, and adapter/ is saved
    preparer: Prepare

    def prepare(
        self,
        model: nn.Module,
        selection: Selection | None = None,
        lora: LoraSettings | None = None,
        weight_decay: float = 0.0,
    ) -> PreparedModel:
        """Set up ``model`` for this method and return it with its parameter groups."""
        from kappatune.training.config import LoraSettings

        if self.needs_selection and selection is None:
            raise KappaTuneError(
                f"method {self.name!r} needs a selection (--selection FILE or policy flags)"
            )
        return self.preparer(self, model, selection, lora or LoraSettings(), weight_decay)

    @property
    def output_name(self) -> str:
        """The folder a finished run saves: ``adapter`` (LoRA) or ``model`` (whole weights)."""
        return "adapter" if self.lora else "model"


_METHODS: dict[str, TrainingMethod] = {}


def register_method(method: TrainingMethod) -> TrainingMethod:
    if method.name in _METHODS and _METHODS[method.name] != method:
        raise ValueError(f"training method {method.name!r} is already registered")
    _METHODS[method.name] = method
    return method


def method_names() -> tuple[str, ...]:
    """Registered methods in registration order (the ``--method`` choices)."""
    return tuple(_METHODS)


def get_method(name: str | TrainingMethod) -> TrainingMethod:
    if isinstance(name, TrainingMethod):
        return name
    try:
        return _METHODS[name]
    except KeyError:
        raise KappaTuneError(
            f"unknown training method {name!r} (known: {', '.join(_METHODS)})"
        ) from None


def find_method(name: str) -> TrainingMethod | None:
    """The registered method called ``name``, or None (e.g. a benchmark's PEFT peer)."""
    return _METHODS.get(name)


# --------------------------------------------------------------------------- preparation


def decay_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Trainable parameters split into decay (ndim >= 2) and no-decay groups."""
    from kappatune.training.freezing import param_shape

    decay: list[tuple[str, nn.Parameter]] = []
    no_decay: list[tuple[str, nn.Parameter]] = []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (decay if len(param_shape(p)) >= 2 else no_decay).append((name, p))
    groups = [
        {
            "params": [p for _, p in decay],
            "names": [n for n, _ in decay],
            "weight_decay": weight_decay,
            "group": "decay",
        },
        {
            "params": [p for _, p in no_decay],
            "names": [n for n, _ in no_decay],
            "weight_decay": 0.0,
            "group": "no_decay",
        },
    ]
    return [g for g in groups if g["params"]]


def _prepare_full(
    method: TrainingMethod,
    model: nn.Module,
    selection: Selection | None,
    lora: LoraSettings,
    weight_decay: float,
) -> PreparedModel:
    for p in model.parameters():
        p.requires_grad_(True)
    groups = decay_groups(model, weight_decay)
    return PreparedModel(model, groups, method.name, sum(p.numel() for p in model.parameters()))


def _prepare_selective(
    method: TrainingMethod,
    model: nn.Module,
    selection: Selection | None,
    lora: LoraSettings,
    weight_decay: float,
) -> PreparedModel:
    from kappatune.training.freezing import apply_selection, trainable_parameters

    assert selection is not None
    groups = apply_selection(model, selection, weight_decay=weight_decay)
    return PreparedModel(model, groups, method.name, trainable_parameters(model))


def _prepare_lora(
    method: TrainingMethod,
    model: nn.Module,
    selection: Selection | None,
    lora: LoraSettings,
    weight_decay: float,
) -> PreparedModel:
    from peft import get_peft_model

    from kappatune.integrations.lora import config_from_targets

    targets, r = lora_plan(model, method, selection, lora)
    config = config_from_targets(targets, r, lora.alpha, dropout=lora.dropout)
    peft_model = get_peft_model(model, config)
    groups = decay_groups(peft_model, weight_decay)
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    return PreparedModel(peft_model, groups, method.name, trainable, lora_r=r, lora_targets=targets)


def lora_plan(
    model: nn.Module,
    method: str | TrainingMethod,
    selection: Selection | None,
    lora: LoraSettings,
) -> tuple[LoraTargets, int]:
    """The LoRA targets and rank of a LoRA method (budget-fitted when asked): every linear
    layer, or the selection's modules when the method needs a selection."""
    if get_method(method).needs_selection:
        assert selection is not None
        return _selection_plan(model, selection, lora)
    return _all_linear_plan(model, lora)


def _all_linear_plan(model: nn.Module, lora: LoraSettings) -> tuple[LoraTargets, int]:
    from kappatune.integrations import lora as kl

    targets = kl.all_linear_targets(model)
    if lora.budget_params is None:
        assert lora.r is not None
        return targets, lora.r
    per_rank = sum(c for _, c in kl.rank_costs(model, targets))
    r = lora.budget_params // per_rank
    if r < 1:
        raise KappaTuneError(
            f"LoRA budget {lora.budget_params:,} is below rank 1 on all linear layers ({per_rank:,})"
        )
    return targets, r


def _selection_plan(
    model: nn.Module, selection: Selection, lora: LoraSettings
) -> tuple[LoraTargets, int]:
    from kappatune.integrations import lora as kl

    if lora.budget_params is None:
        assert lora.r is not None
        return kl.peft_targets(selection, model), lora.r
    if lora.r is None:
        plan = kl.rank_for_budget(model, selection, lora.budget_params)
    else:
        plan = kl.modules_for_budget(
            model, selection, lora.r, lora.budget_params, greedy=lora.greedy
        )
    return plan.targets, plan.r


for _method in (
    TrainingMethod("selective", "KappaTune: train the selected tensors, freeze the rest",
                   needs_selection=True, lora=False, preparer=_prepare_selective),
    TrainingMethod("kappa-lora", "LoRA on the selected modules",
                   needs_selection=True, lora=True, preparer=_prepare_lora),
    TrainingMethod("lora", "LoRA on every linear layer",
                   needs_selection=False, lora=True, preparer=_prepare_lora),
    TrainingMethod("full", "full fine-tuning: every parameter",
                   needs_selection=False, lora=False, preparer=_prepare_full),
):  # fmt: skip
    register_method(_method)
