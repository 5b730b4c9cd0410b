"""A training run's directory: what it holds and how a rerun finds where it stands.

``run.json`` records the resolved configuration (:func:`run_record`); a rerun with the
same configuration resumes from ``checkpoint/`` (:func:`run_status`), a different one is
refused, and a finished run (``result.json``) is left alone. ``selection.json`` holds the
selection (selective, kappa-lora); at the end ``model/`` or ``adapter/`` and
``result.json`` are written and the checkpoint is removed. The checkpoint's format belongs
to the engine that wrote it (:meth:`kappatune.training.loop.Engine.save_checkpoint`).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from kappatune.errors import KappaTuneError

if TYPE_CHECKING:
    from kappatune.selection.core import Selection
    from kappatune.training.data import PackConfig, TokenizedData
    from kappatune.training.loop import LoraSettings, TrainConfig

RUN_FORMAT = 1
RUN_FILE = "run.json"
RESULT_FILE = "result.json"
SELECTION_FILE = "selection.json"
CHECKPOINT = "checkpoint"
VOLATILE = ("checkpoint_every",)  # run.json keys a rerun may change without a new directory

RunStatus = Literal["new", "resume", "done"]


def run_record(
    *,
    model: str,
    method: str,
    data: tuple[str, ...],
    pack: PackConfig,
    train: TrainConfig,
    lora: LoraSettings | None,
    selection: Selection | None,
    checkpoint_every: int,
    eval_data: tuple[str, ...] | None,
    processes: int | None = None,
    bf16: bool = False,
    gradient_checkpointing: bool = False,
) -> dict[str, Any]:
    """``run.json``: the resolved configuration (``processes`` for a launched run)."""
    from kappatune._version import __version__

    record: dict[str, Any] = {
        "format": RUN_FORMAT,
        "kappatune_version": __version__,
        "model": model,
        "method": method,
        "data": list(data),
        "seq_len": pack.seq_len,
        "pack": pack.pack,
        "train": train.to_json(),
        "lora": None if lora is None else asdict(lora),
        "selection": None
        if selection is None
        else {
            "policy": selection.policy,
            "fingerprint": selection.fingerprint,
            "names": list(selection.names),
        },
        "checkpoint_every": checkpoint_every,
        "eval_data": None if eval_data is None else list(eval_data),
    }
    if processes is not None:
        record["processes"] = processes
    for name, on in (("bf16", bf16), ("gradient_checkpointing", gradient_checkpointing)):
        if on:  # recorded only when on, so the records of earlier runs still match
            record[name] = True
    return record


def read_record(out: Path) -> dict[str, Any]:
    """The ``run.json`` of the run directory ``out``."""
    run_file = out / RUN_FILE
    try:
        record = json.loads(run_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise KappaTuneError(f"cannot read {run_file}: {exc}") from None
    if not isinstance(record, dict):
        raise KappaTuneError(f"cannot read {run_file}: not a JSON object")
    return record


def run_status(out: Path, record: dict[str, Any]) -> RunStatus:
    """'new', 'resume' or 'done' for a run of ``record`` in ``out``; raises if ``out`` holds
    something else."""
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return "new"
    if not (out / RUN_FILE).is_file():
        raise KappaTuneError(
            f"--output {out} is not empty and holds no kappatune run (run.json); choose a new directory"
        )
    checkpoint = out / CHECKPOINT
    if checkpoint.is_symlink() or (checkpoint.exists() and not checkpoint.is_dir()):
        what = "a symbolic link" if checkpoint.is_symlink() else "not a directory"
        raise KappaTuneError(
            f"--output {out}: its {CHECKPOINT}/ is {what}; a run's checkpoint must be a"
            f" directory of its own (remove {checkpoint} to restart the run)"
        )
    previous = read_record(out)
    keys = sorted(
        k
        for k in set(previous) | set(record)
        if k not in VOLATILE and previous.get(k) != record.get(k)
    )
    done = (out / RESULT_FILE).is_file()
    grown = steps_grown(previous, record)
    if keys == ["train"] and grown is not None:
        if done:
            raise KappaTuneError(
                f"--output {out} holds a finished run of {grown[0]} steps; a finished run keeps no"
                " optimizer state to go on from (--steps can grow only while it has a checkpoint):"
                " choose a new directory"
            )
        return "resume"
    if keys:
        fields = (
            [f"train.{f}" for f in differing_train_fields(previous, record)]
            if keys == ["train"]
            else keys
        )
        raise KappaTuneError(
            f"--output {out} holds a run with a different configuration (differs in:"
            f" {', '.join(fields)}); choose a new directory"
        )
    return "done" if done else "resume"


def differing_train_fields(previous: dict[str, Any], record: dict[str, Any]) -> list[str]:
    a, b = previous.get("train") or {}, record.get("train") or {}
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


def steps_grown(previous: dict[str, Any], record: dict[str, Any]) -> tuple[int, int] | None:
    """(old, new) --steps when the training settings differ only in a larger --steps (a run
    may be made longer while it has a checkpoint), else None."""
    if differing_train_fields(previous, record) != ["steps"]:
        return None
    old, new = previous["train"].get("steps"), record["train"].get("steps")
    if isinstance(old, int) and isinstance(new, int) and new > old:
        return old, new
    return None


def write_run_files(out: Path, record: dict[str, Any], selection: Selection | None) -> None:
    from kappatune.jsonio import atomic_write_json

    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / RUN_FILE, record)
    if selection is not None:
        selection.save(out / SELECTION_FILE)


def unfit_counts(data: TokenizedData) -> dict[str, int]:
    """result.json's record of what packing off (one example per row) left out or cut."""
    return {"dropped_examples": data.dropped, "truncated_examples": data.truncated}


def finish(out: Path, report: dict[str, Any]) -> None:
    """Write ``result.json`` and remove the checkpoint: the run is done."""
    from kappatune.jsonio import atomic_write_json

    atomic_write_json(out / RESULT_FILE, report)
    shutil.rmtree(out / CHECKPOINT, ignore_errors=True)
