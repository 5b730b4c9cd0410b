"""GGUF files as a Source: llama.cpp names mapped to Hugging Face ones, tensors dequantized."""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from kappatune.analysis.gguf_header import GGUFHeader
from kappatune.analysis.gguf_header import read_header as read_gguf_header
from kappatune.analysis.source_base import TensorEntry, content_digest, read_chunks
from kappatune.errors import KappaTuneError, short

if TYPE_CHECKING:
    from gguf.constants import GGMLQuantizationType

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
def _gguf_decodable(kind: GGMLQuantizationType) -> bool:
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
        for raw in read_chunks(path, offset, nbytes, rows * row_bytes):
            yield raw, self._decode(entry, raw, len(raw) // row_bytes) if decode else None
