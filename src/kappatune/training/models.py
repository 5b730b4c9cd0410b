"""Load causal language models for training, and name them consistently for analysis.

``load_causal_lm(spec)`` accepts the built-in ``gemma-3-270m``, a ``.gguf`` file, a local
Hugging Face model directory, or a Hugging Face id already in the local cache (offline).
GGUF weights are dequantized once by transformers (about a minute for Gemma 3 270M) and
kept as a plain safetensors directory in the kappatune cache, keyed by the GGUF file's
content digest, so later loads take seconds.

``analysis_source(spec)`` gives the source to pass to :func:`kappatune.analysis.spectra.analyze` so
that the analysed row names are the names of ``model.named_parameters()``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from kappatune.analysis.cache import default_cache_dir
from kappatune.analysis.sources import BUILTIN_MODELS, builtin_path, hub_snapshot
from kappatune.errors import KappaTuneError

if TYPE_CHECKING:
    from torch import nn
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)

CAUSAL_BUILTINS = ("gemma-3-270m",)
_DEQUANT_FORMAT = 1
_DIGEST_MEMO: dict[tuple[str, int, int, int], str] = {}


@dataclass(frozen=True)
class ModelSpec:
    """Where a model's files are and how to name it for analysis."""

    spec: str
    kind: str  # "gguf" | "dir" | "hub"
    path: Path | None
    analysis_source: str


def resolve_model(spec: str | os.PathLike[str]) -> ModelSpec:
    """Classify what the user named; does no heavy work (no weights are read)."""
    text = os.fspath(spec)
    if text in BUILTIN_MODELS:
        if text not in CAUSAL_BUILTINS:
            raise KappaTuneError(
                f"built-in model {text!r} is not a causal language model"
                f" (causal built-ins: {', '.join(CAUSAL_BUILTINS)})"
            )
        return ModelSpec(text, "gguf", builtin_path(text), text)
    path = Path(text).expanduser()
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise KappaTuneError(
                f"{path} is a file: name a model directory (config.json + weights) or a .gguf file"
            )
        return ModelSpec(text, "gguf", path.resolve(), str(path.resolve()))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise KappaTuneError(f"{path} has no config.json: not a Hugging Face model directory")
        return ModelSpec(text, "dir", path.resolve(), str(path.resolve()))
    if "/" in text and not text.startswith((".", "/", "~")) and text.count("/") == 1:
        return ModelSpec(text, "hub", None, text)
    raise KappaTuneError(
        f"unknown model {text!r}: not a directory, a .gguf file, a built-in name"
        f" ({', '.join(CAUSAL_BUILTINS)}) or a Hugging Face id (owner/name)"
    )


def analysis_source(spec: str | os.PathLike[str]) -> str:
    """The source for ``analyze`` whose row names match the loaded model's parameter names."""
    return resolve_model(spec).analysis_source


def file_digest(path: Path) -> str:
    """blake2b of a file's bytes, memoised per (path, size, mtime, inode) in this process."""
    st = path.stat()
    memo_key = (str(path.resolve()), st.st_size, st.st_mtime_ns, st.st_ino)
    if memo_key not in _DIGEST_MEMO:
        h = hashlib.blake2b(digest_size=20)
        with path.open("rb") as fh:
            while block := fh.read(8 << 20):
                h.update(block)
        _DIGEST_MEMO[memo_key] = h.hexdigest()
    return _DIGEST_MEMO[memo_key]


def dequantized_dir(gguf: Path, cache_dir: Path | None = None) -> Path:
    """Cache directory (may not exist yet) holding the dequantized model of ``gguf``."""
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    stem = gguf.name.removesuffix(".gguf")
    return root / "models" / f"{stem}-{file_digest(gguf)[:20]}-v{_DEQUANT_FORMAT}"


def _complete(path: Path) -> bool:
    return all((path / f).is_file() for f in ("config.json", "model.safetensors", "kappatune.json"))


def _unique_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """State dict without aliases (tied weights kept once, under their first name)."""
    seen: set[int] = set()
    out: dict[str, torch.Tensor] = {}
    for name, t in model.state_dict().items():
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen:
            continue
        seen.add(ptr)
        out[name] = t.detach().to(torch.float32).contiguous()
    return out


def _write_dequantized(gguf: Path, target: Path) -> None:
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("dequantizing %s into %s (once; later loads use the cache)", gguf, target)
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32
        )
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise KappaTuneError(f"cannot load GGUF model {gguf}: {_first_line(exc)}") from None
    config: dict[str, Any] = model.config.to_dict()
    config.pop("quantization_config", None)
    config.pop("_name_or_path", None)
    config["architectures"] = [type(model).__name__]
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        tokenizer.save_pretrained(tmp)
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        save_file(_unique_state(model), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        marker = {"format": _DEQUANT_FORMAT, "gguf": str(gguf), "digest": file_digest(gguf)}
        (tmp / "kappatune.json").write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")
        try:
            os.replace(tmp, target)
        except OSError:
            if not _complete(target):  # not a concurrent writer that finished first
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def ensure_dequantized(gguf: Path, cache_dir: Path | None = None) -> Path:
    """Path of a plain Hugging Face directory equivalent to ``gguf``, creating it if needed."""
    target = dequantized_dir(gguf, cache_dir)
    if not _complete(target):
        if target.exists():
            shutil.rmtree(target, ignore_errors=True)
        _write_dequantized(gguf, target)
    return target


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _hub_snapshot(repo_id: str) -> Path:
    return hub_snapshot(
        repo_id,
        f"cannot load causal LM {repo_id!r}: not in the local Hugging Face cache"
        " (download it first while online, or name a local directory)",
    )


def _load_from(
    where: str | Path, dtype: torch.dtype, trust_remote_code: bool, label: str
) -> tuple[nn.Module, PreTrainedTokenizerBase]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code, "local_files_only": True}
    try:
        model = AutoModelForCausalLM.from_pretrained(where, dtype=dtype, **kwargs)
    except (OSError, ValueError, KeyError, RuntimeError, ImportError) as exc:
        raise KappaTuneError(f"cannot load causal LM {label}: {_first_line(exc)}") from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(where, **kwargs)
    except (OSError, ValueError, KeyError, TypeError, ImportError) as exc:
        raise KappaTuneError(f"cannot load the tokenizer of {label}: {_first_line(exc)}") from None
    if isinstance(tokenizer, bool) or tokenizer is None:
        raise KappaTuneError(
            f"{label} has no tokenizer files (tokenizer.json or tokenizer_config.json)"
        )
    return model, tokenizer


def load_causal_lm(
    spec: str | os.PathLike[str],
    *,
    dtype: torch.dtype = torch.float32,
    trust_remote_code: bool = False,
    cache_dir: Path | None = None,
) -> tuple[nn.Module, PreTrainedTokenizerBase]:
    """(model, tokenizer) for a built-in name, a .gguf file, a local directory or a cached hub id.

    Hub ids are resolved offline (``local_files_only``); remote code runs only when
    ``trust_remote_code`` is True.
    """
    resolved = resolve_model(spec)
    if resolved.kind == "gguf":
        assert resolved.path is not None
        where: str | Path = ensure_dequantized(resolved.path, cache_dir)
    elif resolved.kind == "dir":
        assert resolved.path is not None
        where = resolved.path
    else:
        where = _hub_snapshot(resolved.spec)
    model, tokenizer = _load_from(where, dtype, trust_remote_code, label=repr(resolved.spec))
    model.eval()
    return model, tokenizer


def parameter_names(model: torch.nn.Module) -> list[str]:
    """Every parameter name of ``model``, aliases of tied weights included, in module order."""
    return [n for n, _ in model.named_parameters(remove_duplicate=False)]


def total_parameters(model: torch.nn.Module) -> int:
    """Number of distinct parameter elements (tied weights counted once)."""
    return sum(p.numel() for p in model.parameters())


def portable_name(spec: str | os.PathLike[str]) -> str:
    """How to name the model outside this machine: the built-in name or the hub id as given,
    else the name the user gave (a local directory or .gguf file), never a cache path."""
    resolved = resolve_model(spec)
    return resolved.spec


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def checkpoint_dtype(spec: str | os.PathLike[str]) -> torch.dtype:
    """The dtype the model's checkpoint stores (``dtype``/``torch_dtype`` of its config.json);
    float32 for GGUF models (dequantized to float32) and when the config names none."""
    resolved = resolve_model(spec)
    if resolved.kind == "gguf":
        return torch.float32
    where = resolved.path if resolved.kind == "dir" else _hub_snapshot(resolved.spec)
    assert where is not None
    try:
        config = json.loads((where / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return torch.float32
    name = config.get("dtype") or config.get("torch_dtype")
    return _DTYPES.get(str(name), torch.float32)


def parse_dtype(name: str) -> torch.dtype:
    """``float32``, ``bfloat16`` or ``float16`` as a torch dtype."""
    if name not in _DTYPES:
        raise KappaTuneError(f"dtype must be one of {', '.join(_DTYPES)}, got {name!r}")
    return _DTYPES[name]


_CONTEXT_KEYS = (
    "max_position_embeddings",
    "n_positions",
    "max_sequence_length",
    "seq_length",
    "n_ctx",
)
_NO_LIMIT = 10**9  # above this a tokenizer's model_max_length is transformers' "no limit" marker


def context_length(model: nn.Module, tokenizer: PreTrainedTokenizerBase) -> tuple[int, str] | None:
    """(tokens, where it comes from): the model config's position limit, or the tokenizer's
    ``model_max_length`` when that is real and smaller; None when neither says."""
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        config = config.get_text_config()
    found: list[tuple[int, str]] = []
    for key in _CONTEXT_KEYS:
        value = getattr(config, key, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            found.append((value, f"config {key}"))
            break
    value = getattr(tokenizer, "model_max_length", None)
    if isinstance(value, int) and not isinstance(value, bool) and 0 < value < _NO_LIMIT:
        found.append((value, "tokenizer model_max_length"))
    return min(found) if found else None


def check_seq_len(seq_len: int, model: nn.Module, tokenizer: PreTrainedTokenizerBase) -> None:
    """Raise when rows of ``seq_len`` tokens do not fit the model's context."""
    limit = context_length(model, tokenizer)
    if limit is not None and seq_len > limit[0]:
        raise KappaTuneError(
            f"--seq-len {seq_len} exceeds the model's context length of {limit[0]} tokens"
            f" ({limit[1]})"
        )
