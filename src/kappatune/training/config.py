"""Training settings (:class:`TrainConfig`, :class:`StopRule`, :class:`LoraSettings`), declared
once and importable without torch: ``kappatune train``'s flags are derived from them."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from kappatune import settings
from kappatune.errors import KappaTuneError
from kappatune.jsonio import check_schema
from kappatune.settings import setting

SCHEDULERS = ("constant", "linear", "cosine")
SCHEMA_VERSION = 1
DEFAULT_LORA_R = 8
_TRAINING = "training"
_LORA = "LoRA (lora, kappa-lora)"


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings. Exactly one of ``steps`` and ``epochs``."""

    steps: int | None = setting(None, help="optimizer steps", group=_TRAINING, exclusive="length")
    epochs: float | None = setting(
        None, help="passes over the data", group=_TRAINING, exclusive="length"
    )
    lr: float = setting(1e-4, help="peak learning rate", group=_TRAINING)
    warmup_steps: int = setting(0, flag="--warmup", help="linear warm-up steps", group=_TRAINING)
    scheduler: str = setting(
        "constant",
        choices=lambda: SCHEDULERS,
        help="learning rate after warm-up: constant, or decaying linearly / along a cosine"
        " to 0 at the last step",
        group=_TRAINING,
    )
    batch_size: int = setting(4, help="rows per micro-batch", group=_TRAINING)
    grad_accum: int = setting(1, help="micro-batches per step", group=_TRAINING)
    seed: int = setting(0, help="seed of the data order", group=_TRAINING)
    weight_decay: float = setting(0.0, help="AdamW weight decay", group=_TRAINING)
    max_grad_norm: float | None = setting(1.0, help="gradient clipping", group=_TRAINING)
    betas: tuple[float, float] = setting((0.9, 0.999), cli=False, help="AdamW's betas")
    shuffle: bool = setting(True, cli=False, help="shuffle the rows of each epoch")
    schema_version: int = setting(
        SCHEMA_VERSION, cli=False, help="version of this settings' JSON form"
    )

    def __post_init__(self) -> None:
        if (self.steps is None) == (self.epochs is None):
            raise KappaTuneError("give exactly one of --steps and --epochs")
        if self.steps is not None and self.steps < 1:
            raise KappaTuneError(f"--steps must be at least 1, got {self.steps}")
        if self.epochs is not None and not 0 < self.epochs < math.inf:
            raise KappaTuneError(f"--epochs must be a positive finite number, got {self.epochs}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise KappaTuneError(f"--lr must be a positive number, got {self.lr}")
        if self.warmup_steps < 0:
            raise KappaTuneError(f"--warmup must be at least 0, got {self.warmup_steps}")
        if self.scheduler not in SCHEDULERS:
            raise KappaTuneError(
                f"--scheduler must be one of {', '.join(SCHEDULERS)}, got {self.scheduler!r}"
            )
        if self.batch_size < 1:
            raise KappaTuneError(f"--batch-size must be at least 1, got {self.batch_size}")
        settings.check_seed(self.seed)
        if self.grad_accum < 1:
            raise KappaTuneError(f"--grad-accum must be at least 1, got {self.grad_accum}")
        if not 0 <= self.weight_decay < math.inf:
            raise KappaTuneError(
                f"--weight-decay must be a finite number >= 0, got {self.weight_decay}"
            )
        if self.max_grad_norm is not None and not 0 < self.max_grad_norm < math.inf:
            raise KappaTuneError(
                f"max grad norm must be a positive finite number or None, got {self.max_grad_norm}"
            )

    def total_steps(self, n_rows: int, world: int = 1) -> int:
        """Optimizer steps for a data set of ``n_rows`` rows (``world`` processes share a step)."""
        if self.steps is not None:
            return self.steps
        assert self.epochs is not None
        micro = math.ceil(n_rows / self.batch_size)
        return max(1, math.ceil(self.epochs * micro / (self.grad_accum * world)))

    def to_json(self) -> dict[str, Any]:
        return settings.to_json(self)

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> TrainConfig:
        check_schema(d, "train config", SCHEMA_VERSION)
        return settings.from_json(cls, d, "train config")


@dataclass(frozen=True)
class StopRule:
    """Stop early when the bias-corrected EMA of the training loss reaches ``target_loss``,
    and in any case after ``max_steps``."""

    target_loss: float | None = setting(
        None, cli=False, help="stop once the loss's moving average is at most this"
    )
    ema_decay: float = setting(0.9, cli=False, help="decay of the loss's moving average")
    min_steps: int = setting(1, cli=False, help="never stop before this many steps")
    max_steps: int | None = setting(None, cli=False, help="stop after this many steps")

    def __post_init__(self) -> None:
        if not 0 <= self.ema_decay < 1:
            raise KappaTuneError(f"EMA decay must be in [0, 1), got {self.ema_decay}")
        if self.max_steps is not None and self.max_steps < 1:
            raise KappaTuneError(f"max steps must be at least 1, got {self.max_steps}")
        if self.min_steps < 1:
            raise KappaTuneError(f"min steps must be at least 1, got {self.min_steps}")


@dataclass(frozen=True)
class LoraSettings:
    """LoRA for the ``lora`` and ``kappa-lora`` methods; with ``budget_params`` the rank
    (``r=None``) or the module count (``r`` given) is chosen to fit the budget."""

    r: int | None = setting(
        DEFAULT_LORA_R,
        flag="--lora-r",
        flag_default=None,  # unset: fitted to --budget-params, else DEFAULT_LORA_R
        help=f"rank (default: {DEFAULT_LORA_R}; with --budget-params, fitted to it unless given,"
        " and then the module count is fitted)",
        group=_LORA,
    )
    alpha: int | None = setting(
        None, flag="--lora-alpha", help="alpha (default: 2 x rank)", group=_LORA
    )
    dropout: float = setting(
        0.0, flag="--lora-dropout", help="dropout on the LoRA input", group=_LORA
    )
    budget_params: int | None = setting(
        None, cli=False, help="the adapters' trainable parameters (from --budget-params)"
    )
    greedy: bool = setting(
        False,
        cli=False,  # from --fill greedy
        help="fitting the module count: skip an adapter that does not fit and fill on with"
        " later ones (else stop at the first misfit)",
    )

    def __post_init__(self) -> None:
        if self.r is None and self.budget_params is None:
            raise KappaTuneError("LoRA needs a rank or a parameter budget")
        if self.r is not None and self.r < 1:
            raise KappaTuneError(f"LoRA rank must be at least 1, got {self.r}")
        if not 0 <= self.dropout < 1:
            raise KappaTuneError(f"LoRA dropout must be in [0, 1), got {self.dropout}")
        if self.budget_params is not None and self.budget_params < 1:
            raise KappaTuneError(
                f"LoRA parameter budget must be at least 1, got {self.budget_params}"
            )


@dataclass(frozen=True)
class PackConfig:
    """How examples become fixed-length rows."""

    seq_len: int = setting(128, help="tokens per row", group="training")
    pack: bool = setting(  # the flag is --no-pack
        True, help="one example per row instead of packing", group="training"
    )
    add_eos: bool = setting(True, cli=False, help="an EOS token after each packed document")

    def __post_init__(self) -> None:
        if self.seq_len < 2:
            raise KappaTuneError(f"sequence length must be at least 2 tokens, got {self.seq_len}")
