"""Training checkpoints on disk, with nothing that is ever unpickled.

A checkpoint folder holds ``trainable.safetensors`` (the trained tensors), ``loop.json``
plus ``loop.safetensors`` (the loop state: optimizer, scheduler, history; tensors by
reference) and, written last, ``manifest.json``: the format, each file's size and xxh3-128
digest, and the name, shape and dtype of every trained tensor. A checkpoint is applied only
when every file matches its digest and the tensors are exactly the ones the run trains,
with their shapes and dtypes; anything else is a one-line :class:`KappaTuneError`.

The loop state is encoded as JSON with tags: ``{"dict": [[key, value], ...]}`` (keys keep
their type), ``{"tuple": [...]}``, ``{"float": "inf"}`` and ``{"tensor": "t3"}``; lists,
strings, integers, finite floats, booleans and null are themselves.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import xxhash

from kappatune.errors import KappaTuneError
from kappatune.jsonio import atomic_write_json

FORMAT = 1
MANIFEST = "manifest.json"
TRAINABLE = "trainable.safetensors"
LOOP_JSON = "loop.json"
LOOP_TENSORS = "loop.safetensors"
_CHUNK = 1 << 22


@dataclass(frozen=True)
class TensorSpec:
    """What a trained tensor must look like: its shape and dtype (torch name, e.g. float32)."""

    shape: tuple[int, ...]
    dtype: str

    @staticmethod
    def of(t: torch.Tensor) -> TensorSpec:
        return TensorSpec(tuple(int(d) for d in t.shape), str(t.dtype).removeprefix("torch."))


# --------------------------------------------------------------------------- loop-state codec


def encode_state(obj: object, tensors: dict[str, torch.Tensor]) -> Any:
    """``obj`` as tagged JSON; its tensors go into ``tensors`` (keys t0, t1, ...)."""
    if obj is None or isinstance(obj, bool | int | str):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else {"float": repr(obj)}
    if isinstance(obj, torch.Tensor):
        key = f"t{len(tensors)}"
        tensors[key] = obj.detach().cpu().contiguous()
        return {"tensor": key}
    if isinstance(obj, list):
        return [encode_state(x, tensors) for x in obj]
    if isinstance(obj, tuple):
        return {"tuple": [encode_state(x, tensors) for x in obj]}
    if isinstance(obj, Mapping):
        return {
            "dict": [[encode_state(k, tensors), encode_state(v, tensors)] for k, v in obj.items()]
        }
    raise TypeError(f"cannot store a {type(obj).__name__} in a checkpoint")


def decode_state(obj: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    """The inverse of :func:`encode_state`; raises ValueError on anything it did not write."""
    if obj is None or isinstance(obj, bool | int | str | float):
        return obj
    if isinstance(obj, list):
        return [decode_state(x, tensors) for x in obj]
    if not isinstance(obj, dict) or len(obj) != 1:
        raise ValueError(f"unexpected value {str(obj)[:60]}")
    ((tag, value),) = obj.items()
    if tag == "float" and value in ("inf", "-inf", "nan"):
        return float(value)
    if tag == "tensor" and isinstance(value, str) and value in tensors:
        return tensors[value]
    if tag == "tuple" and isinstance(value, list):
        return tuple(decode_state(x, tensors) for x in value)
    if tag == "dict" and isinstance(value, list) and all(_is_pair(p) for p in value):
        return {_key(decode_state(k, tensors)): decode_state(v, tensors) for k, v in value}
    raise ValueError(f"unexpected value {str(obj)[:60]}")


def _is_pair(p: object) -> bool:
    return isinstance(p, list) and len(p) == 2


def _key(k: object) -> str | int | float | None:
    if k is None or isinstance(k, bool | int | str | float):
        return k
    raise ValueError(f"unexpected dictionary key {str(k)[:60]}")


# --------------------------------------------------------------------------- files


def file_digest(path: Path) -> str:
    h = xxhash.xxh3_128()
    with path.open("rb") as fh:
        while chunk := fh.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _file_entry(path: Path) -> dict[str, Any]:
    return {"bytes": path.stat().st_size, "xxh3_128": file_digest(path)}


def write_manifest(folder: Path, files: Iterable[str], extra: Mapping[str, Any]) -> None:
    """``manifest.json`` for ``files`` (paths relative to ``folder``), written last and atomically."""
    entries = {name: _file_entry(folder / name) for name in sorted(files)}
    atomic_write_json(folder / MANIFEST, {"format": FORMAT, "files": entries, **extra})


def write_checkpoint(
    folder: Path, trainable: Mapping[str, torch.Tensor], loop_state: Mapping[str, Any]
) -> None:
    """Trained tensors and loop state into the new folder ``folder``, manifest last."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    state = {n: t.detach().cpu().contiguous() for n, t in trainable.items()}
    save_file(state, str(folder / TRAINABLE))
    tensors: dict[str, torch.Tensor] = {}
    encoded = encode_state(dict(loop_state), tensors)
    save_file(tensors, str(folder / LOOP_TENSORS))
    atomic_write_json(folder / LOOP_JSON, {"format": FORMAT, "state": encoded})
    specs = {n: _spec_json(TensorSpec.of(t)) for n, t in sorted(state.items())}
    write_manifest(folder, (TRAINABLE, LOOP_TENSORS, LOOP_JSON), {"tensors": specs})


def _spec_json(spec: TensorSpec) -> dict[str, Any]:
    return {"shape": list(spec.shape), "dtype": spec.dtype}


def _remove(path: Path) -> None:
    """Remove ``path`` whatever it is: a link (never what it points to), a file or a folder."""
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
    elif path.exists():
        shutil.rmtree(path, ignore_errors=True)


def swap_in(tmp: Path, final: Path) -> None:
    """Replace the folder ``final`` by ``tmp`` (the old one is removed after the rename; a
    symbolic link in its place is replaced, never followed)."""
    old = final.parent / f".{final.name}.old"
    _remove(old)
    if final.is_symlink() or final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    _remove(old)


class CheckpointError(KappaTuneError):
    def __init__(self, folder: Path, problem: str) -> None:
        super().__init__(f"checkpoint {folder} {problem}; remove it to restart")


def verify_files(folder: Path) -> dict[str, Any]:
    """The manifest of ``folder``, after checking every file it lists (size, digest)."""
    path = folder / MANIFEST
    if not path.is_file():
        raise CheckpointError(
            folder, f"has no {MANIFEST} (incomplete, or written by an older kappatune)"
        )
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        files = manifest["files"]
        if manifest["format"] != FORMAT or not isinstance(files, dict):
            raise ValueError("unknown format")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(folder, f"has an unreadable {MANIFEST} ({exc})") from None
    for name, entry in sorted(files.items()):
        _verify_file(folder, name, entry)
    return dict(manifest)


def _verify_file(folder: Path, name: object, entry: object) -> None:
    if (
        not (isinstance(name, str) and isinstance(entry, dict))
        or Path(name).is_absolute()
        or ".." in Path(name).parts
    ):
        raise CheckpointError(folder, f"lists an invalid file {str(name)[:80]!r} in {MANIFEST}")
    path = folder / name
    if not path.is_file():
        raise CheckpointError(folder, f"is missing {name}")
    size = path.stat().st_size
    if size != entry.get("bytes"):
        raise CheckpointError(
            folder, f"has a damaged {name}: {size} bytes, the manifest says {entry.get('bytes')}"
        )
    if file_digest(path) != entry.get("xxh3_128"):
        raise CheckpointError(folder, f"has a damaged {name}: its digest differs from the manifest")


def _load_tensors(folder: Path, name: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(folder / name))
    except Exception as exc:  # safetensors raises SafetensorError, OSError, ...
        raise CheckpointError(folder, f"has an unreadable {name} ({exc})") from None


def read_checkpoint(
    folder: Path, expected: Mapping[str, TensorSpec]
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(trained tensors, loop state) of ``folder``, verified against its manifest and ``expected``
    (the tensors the run trains): the same names, shapes and dtypes, nothing more or less."""
    manifest = verify_files(folder)
    if sorted(manifest["files"]) != sorted((TRAINABLE, LOOP_TENSORS, LOOP_JSON)):
        raise CheckpointError(folder, "does not list the files of a single-process run")
    tensors = _load_tensors(folder, TRAINABLE)
    check_tensors(folder, tensors, expected)
    return tensors, read_loop_state(folder)


def check_tensors(
    folder: Path, tensors: Mapping[str, torch.Tensor], expected: Mapping[str, TensorSpec]
) -> None:
    extra = sorted(set(tensors) - set(expected))
    if extra:
        raise CheckpointError(
            folder, f"holds {len(extra)} tensor(s) this run does not train (e.g. {extra[0]})"
        )
    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise CheckpointError(
            folder, f"lacks {len(missing)} tensor(s) this run trains (e.g. {missing[0]})"
        )
    for name in sorted(tensors):
        got, want = TensorSpec.of(tensors[name]), expected[name]
        if got != want:
            raise CheckpointError(
                folder,
                f"holds {name} as {got.dtype} {list(got.shape)}, the run trains"
                f" {want.dtype} {list(want.shape)}",
            )


def read_loop_state(folder: Path) -> dict[str, Any]:
    try:
        doc = json.loads((folder / LOOP_JSON).read_text(encoding="utf-8"))
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise ValueError("unknown format")
        tensors = _load_tensors(folder, LOOP_TENSORS) if (folder / LOOP_TENSORS).exists() else {}
        state = decode_state(doc["state"], tensors)
        if not isinstance(state, dict):
            raise ValueError("not a dictionary")
        check_history(state)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        if isinstance(exc, KappaTuneError):
            raise
        raise CheckpointError(folder, f"has an unreadable {LOOP_JSON} ({exc})") from None
    return state


def check_history(state: Mapping[str, Any]) -> None:
    """``step``, ``losses``, ``step_times`` and ``ema`` of a loop state, typed and consistent."""
    step = state["step"]
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise ValueError(f"step {step!r} is not a count")
    for key in ("losses", "step_times"):
        values = state[key]
        if not isinstance(values, list) or len(values) != step:
            raise ValueError(f"{key} does not hold {step} values")
        if not all(_is_number(v) for v in values):
            raise ValueError(f"{key} holds a value that is not a number")
    if not _is_number(state["ema"]):
        raise ValueError("ema is not a number")


def _is_number(v: object) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def check_optimizer_state(
    folder: Path, optimizer: Any, shapes: list[list[tuple[int, ...]]]
) -> None:
    """An optimizer state dict whose groups hold ``shapes`` (per group, in order) and whose
    per-parameter tensors are scalars or have the parameter's shape."""
    try:
        groups = optimizer["param_groups"]
        state = optimizer["state"]
        sizes = [len(g["params"]) for g in groups]
        if sizes != [len(s) for s in shapes] or not isinstance(state, dict):
            raise ValueError(
                f"parameter groups of sizes {sizes}, the run has {[len(s) for s in shapes]}"
            )
        flat = [shape for group in shapes for shape in group]
        ids = [i for g in groups for i in g["params"]]
        for pid, entry in state.items():
            if pid not in ids or not isinstance(entry, dict):
                raise ValueError(f"state for an unknown parameter {pid!r}")
            want = flat[ids.index(pid)]
            for key, value in entry.items():
                if isinstance(value, torch.Tensor) and value.ndim and tuple(value.shape) != want:
                    raise ValueError(
                        f"{key} of shape {list(value.shape)} for a parameter of shape {list(want)}"
                    )
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(
            folder, f"holds an optimizer state that does not fit this run ({exc})"
        ) from None


_ADAM_STATE = ("step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq")


def check_loop_state(
    folder: Path,
    state: Mapping[str, Any],
    reference: Mapping[str, Any],
    shapes: list[list[tuple[int, ...]]],
) -> None:
    """``state`` (a checkpoint's) has the structure of ``reference`` (a fresh run's): the same
    keys, value types and parameter groups; AdamW entries of the parameters' shapes; and a
    scheduler that is as far as the loop."""
    try:
        _same_structure(
            _without(state, "step", "losses", "step_times", "ema"),
            _without(reference, "step", "losses", "step_times", "ema"),
            "",
        )
        check_optimizer_state(folder, state["optimizer"], shapes)
        for pid, entry in state["optimizer"]["state"].items():
            if set(entry) - set(_ADAM_STATE) or not all(
                isinstance(v, torch.Tensor) for v in entry.values()
            ):
                raise ValueError(f"optimizer state of parameter {pid} is not AdamW's")
        if state["scheduler"]["last_epoch"] != state["step"]:
            raise ValueError(
                f"the scheduler is at step {state['scheduler']['last_epoch']}, the loop at {state['step']}"
            )
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        if isinstance(exc, KappaTuneError):
            raise
        raise CheckpointError(
            folder, f"holds a loop state that does not fit this run ({exc})"
        ) from None


def _without(d: Mapping[str, Any], *keys: str) -> dict[str, Any]:
    return {k: v for k, v in d.items() if k not in keys}


def _same_structure(got: Any, want: Any, where: str) -> None:
    if isinstance(want, dict):
        if not isinstance(got, dict):
            raise ValueError(f"{where or 'state'} is not a dictionary")
        if where.endswith("optimizer") and "state" in want:  # per-parameter entries vary
            got, want = _without(got, "state"), _without(want, "state")
        if set(got) != set(want):
            raise ValueError(
                f"{where or 'state'} has keys {sorted(map(str, got))}, expected {sorted(map(str, want))}"
            )
        for k in want:
            _same_structure(got[k], want[k], f"{where}.{k}".lstrip("."))
    elif isinstance(want, list | tuple):
        if type(got) is not type(want) or len(got) != len(want):
            raise ValueError(f"{where} is not a {type(want).__name__} of {len(want)}")
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            _same_structure(g, w, f"{where}[{i}]")
    elif want is None:
        if got is not None:
            raise ValueError(f"{where} is {got!r}, expected null")
    elif isinstance(want, bool | int | float | str):
        if type(got) is not type(want) and not _both_real(got, want):
            raise ValueError(f"{where} is {type(got).__name__}, expected {type(want).__name__}")
    elif isinstance(want, torch.Tensor) and not _same_tensor_spec(got, want):
        raise ValueError(f"{where} is not a tensor like the run's")


def _both_real(got: object, want: object) -> bool:
    """An int where a float is expected (e.g. a learning rate written as 1)."""
    return isinstance(want, float) and isinstance(got, int) and not isinstance(got, bool)


def _same_tensor_spec(got: object, want: torch.Tensor) -> bool:
    return isinstance(got, torch.Tensor) and TensorSpec.of(got) == TensorSpec.of(want)
