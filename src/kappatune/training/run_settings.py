"""The settings of one training run (:class:`RunSettings`), and how a run directory's
``run.json`` gives them back (:func:`settings_from_run`, to resume without the command line)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from kappatune.errors import KappaTuneError
from kappatune.selection.core import Selection
from kappatune.training.data import PackConfig
from kappatune.training.loop import LoraSettings, TrainConfig
from kappatune.training.methods import TrainingMethod, get_method
from kappatune.training.publish import SAVE_DTYPES

SelectionSource = Selection | Path | Callable[[], Selection]
LoraSource = LoraSettings | Callable[[int], LoraSettings]


@dataclass(frozen=True)
class RunSettings:
    """One training run. ``selection`` (methods that need one): a Selection, a selection
    JSON file, or a function that makes it (called on the main rank only). ``lora`` (LoRA
    methods; default rank 8): settings, or a function of the model's parameter count (a
    budget given as a share of the model)."""

    model: str
    data: tuple[str, ...]
    method: str
    output: Path
    train: TrainConfig
    pack: PackConfig = field(default_factory=PackConfig)
    selection: SelectionSource | None = None
    lora: LoraSource | None = None
    checkpoint_every: int = 50
    eval_data: tuple[str, ...] | None = None
    eval_every: int | None = None
    report_to: tuple[str, ...] = ()  # trackers: tensorboard, wandb
    device: str = "auto"
    trust_remote_code: bool = False
    save_dtype: str = "auto"  # selective, full: auto keeps the checkpoint's dtype
    other_weights: bool = False  # accept a selection made on other weights of this architecture
    bf16: bool = False  # bfloat16 autocast of the forward and backward passes (fp32 weights, AdamW)
    gradient_checkpointing: bool = False  # recompute activations in the backward pass

    def __post_init__(self) -> None:
        method = self.training_method
        if not self.data:
            raise KappaTuneError("no training data")
        if self.checkpoint_every < 1:
            raise KappaTuneError(
                f"--checkpoint-every must be at least 1, got {self.checkpoint_every}"
            )
        if method.needs_selection and self.selection is None:
            raise KappaTuneError(
                f"method {self.method!r} needs a selection (--selection FILE or policy flags)"
            )
        if not method.needs_selection and self.selection is not None:
            raise KappaTuneError(
                f"--selection only applies to --method selective or kappa-lora, not {self.method}"
            )
        if not method.lora and self.lora is not None:
            raise KappaTuneError(f"LoRA settings apply to LoRA methods, not {self.method}")
        if self.save_dtype not in SAVE_DTYPES:
            raise KappaTuneError(
                f"--save-dtype must be one of {', '.join(SAVE_DTYPES)}, got {self.save_dtype!r}"
            )
        if self.save_dtype != "auto" and method.lora:
            raise KappaTuneError(
                f"--save-dtype applies to --method selective or full, not {self.method}"
            )
        if self.eval_every is not None and self.eval_data is None:
            raise KappaTuneError("--eval-every needs --eval-data FILE")
        if self.eval_every is not None and self.eval_every < 1:
            raise KappaTuneError(f"--eval-every must be at least 1, got {self.eval_every}")

    @property
    def training_method(self) -> TrainingMethod:
        return get_method(self.method)


def settings_from_run(
    run_dir: str | Path,
    *,
    device: str = "auto",
    trust_remote_code: bool = False,
    report_to: tuple[str, ...] = (),
    eval_every: int | None = None,
    save_dtype: str = "auto",
    other_weights: bool = False,
) -> RunSettings:
    """The settings recorded in ``run_dir/run.json`` (and ``selection.json``); paths in it are
    as they were given, so resume from the directory the run was started in."""
    from kappatune.training.run_dir import RUN_FILE, RUN_FORMAT, SELECTION_FILE, read_record

    out = Path(run_dir)
    if not (out / RUN_FILE).is_file():
        raise KappaTuneError(f"{out} holds no kappatune run ({RUN_FILE})")
    record = read_record(out)
    try:
        if record["format"] != RUN_FORMAT:
            raise ValueError(f"unknown format {record['format']!r}")
        eval_data = record["eval_data"]
        return RunSettings(
            model=str(record["model"]),
            data=tuple(str(d) for d in record["data"]),
            method=str(record["method"]),
            output=out,
            train=TrainConfig.from_json(record["train"]),
            pack=PackConfig(seq_len=int(record["seq_len"]), pack=bool(record["pack"])),
            selection=None if record["selection"] is None else out / SELECTION_FILE,
            lora=None if record["lora"] is None else LoraSettings(**record["lora"]),
            checkpoint_every=int(record["checkpoint_every"]),
            eval_data=None if eval_data is None else tuple(str(d) for d in eval_data),
            eval_every=eval_every,
            report_to=report_to,
            device=device,
            trust_remote_code=trust_remote_code,
            save_dtype=save_dtype,
            other_weights=other_weights,
            bf16=bool(record.get("bf16", False)),
            gradient_checkpointing=bool(record.get("gradient_checkpointing", False)),
        )
    except KeyError as exc:
        raise KappaTuneError(f"cannot read {out / RUN_FILE}: it has no {exc.args[0]!r}") from None
    except (TypeError, ValueError) as exc:
        if isinstance(exc, KappaTuneError):
            raise
        raise KappaTuneError(f"cannot read {out / RUN_FILE}: {exc}") from None
