"""Hugging Face Trainer / TRL integration: freeze before the optimizer is built.

The Trainer builds its optimizer inside ``train()`` from the parameters that have
``requires_grad`` at that moment, so freezing at construction time is enough:

* ``KappaTuneCallback(selection)`` freezes in ``on_init_end`` (end of ``Trainer.__init__``),
  checks in ``on_train_begin`` that the optimizer holds exactly the selected tensors, and
  (``verify_frozen=True``) checks in ``on_train_end`` that every frozen tensor is bit-identical;
* ``freeze_for_trainer(model, selection)`` does the freezing by hand before the Trainer is
  constructed and returns the parameter groups, for ``optimizers=(AdamW(groups), None)``.

Works with TRL's ``SFTTrainer`` (a Trainer subclass) and with plain accelerate loops
(freeze, then ``accelerator.prepare(model, optimizer)``).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from kappatune.errors import KappaTuneError
from kappatune.selection.core import Selection
from kappatune.training.freezing import apply_selection, check_frozen, frozen_digests

if TYPE_CHECKING:
    from transformers import TrainerControl, TrainerState, TrainingArguments

log = logging.getLogger(__name__)

try:
    from transformers import TrainerCallback
except ImportError:  # pragma: no cover - transformers is an optional extra
    TrainerCallback = object  # type: ignore[assignment,misc]


def freeze_for_trainer(
    model: nn.Module, selection: Selection, weight_decay: float = 0.0
) -> list[dict[str, Any]]:
    """Freeze all but ``selection`` (call before building the Trainer); returns optimizer groups.

    The groups carry kappatune's ``names``/``group`` keys, which torch optimizers keep as
    metadata, so ``torch.optim.AdamW(groups, lr=...)`` works as it is.
    """
    return apply_selection(model, selection, weight_decay=weight_decay)


def _masked_expert_names(groups: list[dict[str, Any]]) -> list[str]:
    return [n for g in groups if g["group"] == "masked_experts" for n in g["names"]]


class KappaTuneCallback(TrainerCallback):  # type: ignore[misc,valid-type]
    """Freeze the Trainer's model to ``selection`` when the Trainer is constructed."""

    def __init__(self, selection: Selection, verify_frozen: bool = False) -> None:
        self.selection = selection
        self.verify_frozen = verify_frozen
        self._digests: dict[str, str] | None = None
        self._selected: set[int] = set()

    def on_init_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> TrainerControl:
        model: nn.Module | None = kwargs.get("model")  # the Trainer passes its model by keyword
        if model is None:
            raise KappaTuneError("KappaTuneCallback: the Trainer was built without a model")
        groups = apply_selection(model, self.selection)
        masked = _masked_expert_names(groups)
        decay = float(getattr(args, "weight_decay", 0.0) or 0.0)
        if masked and decay > 0:
            raise KappaTuneError(
                f"weight_decay={decay} would change the unselected experts of {masked[0]!r}"
                " (the Trainer decays whole tensors): set weight_decay=0 or build the optimizer"
                " from freeze_for_trainer()'s groups"
            )
        self._selected = {id(p) for p in model.parameters() if p.requires_grad}
        log.info("KappaTune: %d tensors trainable, the rest frozen", len(self._selected))
        return control

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> TrainerControl:
        model: nn.Module | None = kwargs.get("model")
        optimizer: torch.optim.Optimizer | None = kwargs.get("optimizer")
        if model is not None:
            extra = [
                n
                for n, p in model.named_parameters()
                if p.requires_grad and id(p) not in self._selected
            ]
            if extra:
                raise KappaTuneError(
                    f"{len(extra)} tensors were unfrozen after KappaTuneCallback froze the model (e.g. {extra[0]})"
                )
            if optimizer is not None:
                held = {id(p) for g in optimizer.param_groups for p in g["params"]}
                wanted = {id(p) for p in model.parameters() if p.requires_grad}
                if not held <= wanted:
                    raise KappaTuneError(
                        f"the optimizer holds {len(held - wanted)} frozen tensors: it was built before freezing"
                    )
            if self.verify_frozen:
                self._digests = frozen_digests(model)
        return control

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> TrainerControl:
        model: nn.Module | None = kwargs.get("model")  # the Trainer passes its model by keyword
        if self._digests is not None and model is not None:
            changed = check_frozen(model, self._digests)
            if changed:
                raise KappaTuneError(
                    f"{len(changed)} frozen tensors changed during training (e.g. {changed[0]})"
                )
        return control
