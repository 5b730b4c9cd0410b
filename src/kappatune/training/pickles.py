"""Refuse pickles that would call anything but data constructors, without unpickling them.

A multi-process checkpoint is read back by accelerate, DeepSpeed (``torch.load`` with
``weights_only=False``) and ``torch.distributed.checkpoint`` (``pickle.load`` of its
``.metadata``): code we do not control. Before they run, :func:`check_folder` walks every
pickle in the folder (the ``*.pkl`` members of ``torch.save`` zip files, and plain pickle
files) opcode by opcode and lists the globals it names. Only the globals that
``torch.load(weights_only=True)`` accepts, numpy's array and RNG-state types, and the
dataclasses of torch.distributed.checkpoint and DeepSpeed's checkpoints are allowed; a
pickle naming any other callable, or one the walk cannot follow, is refused.
"""

from __future__ import annotations

import pickletools
import zipfile
from collections.abc import Generator, Iterator
from functools import cache
from pathlib import Path

from kappatune.errors import KappaTuneError, one_line

_EXTRA = frozenset(
    {
        "numpy.core.multiarray._reconstruct",
        "numpy._core.multiarray._reconstruct",
        "numpy.core.multiarray.scalar",
        "numpy._core.multiarray.scalar",
        "numpy.ndarray",
        "numpy.dtype",
        "numpy.dtypes.UInt32DType",
        "numpy.dtypes.Float64DType",
        "numpy.dtypes.Int64DType",
        "builtins.slice",
        "torch.device",
        "torch._utils._rebuild_tensor_v2",
        # DeepSpeed ZeRO optimizer states (a plain class, an enum and a dataclass)
        "deepspeed.runtime.fp16.loss_scaler.LossScaler",
        "deepspeed.runtime.zero.config.ZeroStageEnum",
        "deepspeed.utils.tensor_fragment.fragment_address",
        # torch.distributed.checkpoint's .metadata (FSDP)
        "torch.distributed.checkpoint.filesystem._StorageInfo",
    }
)
_ALLOWED_MODULES = ("torch.distributed.checkpoint.metadata",)  # dataclasses and enums only
# read by safetensors, by torch.load(weights_only=True) (DCP shards), or never unpickled
_SKIP_SUFFIXES = (".safetensors", ".distcp", ".json", ".py", ".txt", ".md")
_STRING_OPS = {
    "SHORT_BINUNICODE",
    "BINUNICODE",
    "UNICODE",
    "BINUNICODE8",
    "SHORT_BINSTRING",
    "BINSTRING",
    "STRING",
}
_MEMO_PUT = {"BINPUT", "LONG_BINPUT", "PUT"}
_MEMO_GET = {"BINGET", "LONG_BINGET", "GET"}


class UnsafePickle(KappaTuneError):
    pass


@cache
def allowed_globals() -> frozenset[str]:
    from torch._weights_only_unpickler import _get_allowed_globals

    return frozenset(_get_allowed_globals()) | _EXTRA


def is_allowed(name: str) -> bool:
    if name in allowed_globals():
        return True
    module = name.rpartition(".")[0]
    return module in _ALLOWED_MODULES


class _NotAPickle(Exception):
    """The stream fails at its first opcode: an unpickler would stop there, having run nothing."""


def pickle_globals(data: bytes) -> Iterator[str]:
    """Every global (``module.name``) the pickles in ``data`` would import, in order.

    Pickles of any protocol follow each other until the data ends or stops being a pickle
    (bytes that fail at their first opcode, such as text or raw storage). Raises ValueError
    for a pickle the walk cannot follow: an extension-registry code, a STACK_GLOBAL whose
    names are not plain strings, or an opcode that fails after the first.
    """
    pos = 0
    while pos < len(data):
        try:
            pos = yield from _one_pickle(data, pos)
        except _NotAPickle:
            return


def _one_pickle(data: bytes, start: int) -> Generator[str, None, int]:
    import io

    stream = io.BytesIO(data)
    stream.seek(start)
    memo: dict[int, str] = {}
    strings: list[str | None] = []  # the values pushed, as far as they matter (strings)
    memo_next = 0
    proto = 0
    ops = pickletools.genops(stream)
    decoded = 0
    while True:
        try:
            op, arg, _ = next(ops)
        except StopIteration:
            return stream.tell()
        except Exception as exc:  # pickletools raises ValueError, struct.error, ...
            if decoded == 0:
                raise _NotAPickle from None
            raise ValueError(f"malformed pickle at byte {stream.tell()}: {exc}") from None
        decoded += 1
        name = op.name
        if name == "PROTO":
            proto = int(str(arg))
        if name in _STRING_OPS:
            strings.append(arg.decode("latin-1") if isinstance(arg, bytes) else str(arg))
            continue
        if name in _MEMO_GET:
            strings.append(memo.get(int(str(arg))))
            continue
        if name in _MEMO_PUT or name == "MEMOIZE":
            index = memo_next if name == "MEMOIZE" else int(str(arg))
            memo_next = max(memo_next, index + 1)
            memo.pop(index, None)
            if strings and strings[-1] is not None:
                memo[index] = strings[-1]
            continue
        if name in ("GLOBAL", "INST"):
            module, _, attr = str(arg).partition(" ")
            yield _py3_name(module, attr, proto)
        elif name == "STACK_GLOBAL":
            if len(strings) < 2 or strings[-1] is None or strings[-2] is None:
                raise ValueError("a STACK_GLOBAL whose names cannot be followed")
            yield _py3_name(str(strings[-2]), str(strings[-1]), proto)
        elif name.startswith("EXT"):
            raise ValueError("an extension-registry global")
        strings.append(None)


def _py3_name(module: str, name: str, proto: int) -> str:
    """The global an unpickler imports: Python 2 names map to Python 3 ones below protocol 3."""
    if proto < 3:
        from _compat_pickle import IMPORT_MAPPING, NAME_MAPPING

        if (module, name) in NAME_MAPPING:
            module, name = NAME_MAPPING[(module, name)]
        elif module in IMPORT_MAPPING:
            module = IMPORT_MAPPING[module]
    return f"{module}.{name}"


def _pickles_of(path: Path) -> Iterator[tuple[str, bytes]]:
    with path.open("rb") as fh:
        head = fh.read(4)
    if head == b"PK\x03\x04":
        try:
            with zipfile.ZipFile(path) as zf:
                records = {m: zf.read(m) for m in zf.namelist() if m.endswith(".pkl")}
        except zipfile.BadZipFile:
            # torch.load reads archives with its own reader, which accepts some files that
            # Python's zipfile rejects: scan exactly the records torch would unpickle
            records = _torch_records(path)
        for member in sorted(records):
            yield f"{path}:{member}", records[member]
    elif not path.name.endswith(_SKIP_SUFFIXES):  # torch.load unpickles any other file
        yield str(path), path.read_bytes()


def _torch_records(path: Path) -> dict[str, bytes]:
    """The ``.pkl`` records of a torch archive as ``torch.load`` reads them."""
    import torch

    try:
        reader = torch._C.PyTorchFileReader(str(path))
        return {
            name: bytes(reader.get_record(name))
            for name in reader.get_all_records()
            if name.endswith(".pkl")
        }
    except RuntimeError as exc:
        raise ValueError(f"not a readable torch archive: {one_line(str(exc))}") from None


def check_folder(folder: Path) -> int:
    """Raise :class:`UnsafePickle` for the first pickle under ``folder`` that names a global
    outside the allow-list; return how many pickles were checked."""
    count = 0
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        try:
            for where, data in _pickles_of(path):
                bad = sorted({g for g in pickle_globals(data) if not is_allowed(g)})
                count += 1
                if bad:
                    raise UnsafePickle(
                        f"{where} would call {', '.join(bad[:3])} when loaded; it is not"
                        " loaded (remove the checkpoint to restart)"
                    )
        except (ValueError, zipfile.BadZipFile, OSError) as exc:
            if isinstance(exc, KappaTuneError):
                raise
            raise UnsafePickle(
                f"cannot check {path} ({exc}); it is not loaded (remove the checkpoint to restart)"
            ) from None
    return count
