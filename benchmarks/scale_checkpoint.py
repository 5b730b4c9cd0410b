"""Synthetic checkpoints with the exact tensor names, shapes and dtype of real models.

Each matrix is ``W = H_u [diag(s) 0] H_v`` with two seeded Householder reflections, so its
singular values are exactly the seeded ``s`` (a geometric spectrum with a seeded kappa) and any
row block costs O(rows x cols) to build: a checkpoint of any size streams to disk in blocks,
never held in memory. Vectors (norms, biases) are ones / zeros. The designed kappa of every
matrix is written to ``expected_kappa.json`` beside the shards, so analyses are checkable.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import struct
from collections.abc import Iterator
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch

FAMILIES = ("qwen2", "gemma3")
SHARD_BYTES = 4 * 1024**3
BLOCK_ELEMENTS = 8 * 1024 * 1024


class ShapeError(ValueError):
    """The shape description is not a real architecture (one line, for the user)."""


@dataclass(frozen=True)
class Arch:
    """A decoder-only transformer's shapes, as in its Hugging Face config.json."""

    name: str
    family: str  # "qwen2" (q/k/v biases) or "gemma3" (q/k norms, four layer norms)
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if f.type == "int" and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ShapeError(f"shape {self.name!r}: {f.name} must be a positive integer")
        if self.family not in FAMILIES:
            raise ShapeError(
                f"shape {self.name!r}: family must be one of {', '.join(FAMILIES)}, got {self.family!r}"
            )
        if self.heads % self.kv_heads:
            raise ShapeError(
                f"shape {self.name!r}: heads ({self.heads}) must be a multiple of kv_heads ({self.kv_heads})"
            )
        if self.family == "qwen2" and self.heads * self.head_dim != self.hidden:
            raise ShapeError(
                f"shape {self.name!r}: qwen2 needs heads x head_dim = hidden"
                f" ({self.heads} x {self.head_dim} != {self.hidden})"
            )
        if self.intermediate < self.hidden // 8 or self.vocab < 256:
            raise ShapeError(
                f"shape {self.name!r}: intermediate {self.intermediate} / vocab {self.vocab}"
                " are not those of a language model"
            )


PRESETS = {
    "270m": Arch("gemma-3-270m", "gemma3", 18, 640, 2048, 4, 1, 256, 262144, True),
    "1b": Arch("gemma-3-1b", "gemma3", 26, 1152, 6912, 4, 1, 256, 262144, True),
    "3b": Arch("qwen2.5-3b", "qwen2", 36, 2048, 11008, 16, 2, 128, 151936, True),
    "7b": Arch("qwen2.5-7b", "qwen2", 28, 3584, 18944, 28, 4, 128, 152064, False),
}


def load_arch(spec: str) -> Arch:
    """A preset name or a JSON file with Arch's fields. Raises ShapeError."""
    if spec in PRESETS:
        return PRESETS[spec]
    path = Path(spec)
    if not path.is_file():
        raise ShapeError(f"unknown shape {spec!r}: not a preset ({', '.join(PRESETS)}) or a file")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ShapeError(f"cannot read shape file {spec}: {exc}") from None
    names = [f.name for f in fields(Arch)]
    if not isinstance(data, dict) or sorted(data) != sorted(names):
        raise ShapeError(
            f"shape file {spec} must be a JSON object with exactly: {', '.join(names)}"
        )
    return Arch(**data)


def tensors(arch: Arch) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every tensor, in the order of the real checkpoint's index."""
    h, q, kv = arch.hidden, arch.heads * arch.head_dim, arch.kv_heads * arch.head_dim
    out: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (arch.vocab, h))]
    for i in range(arch.layers):
        p = f"model.layers.{i}"
        out += [
            (f"{p}.input_layernorm.weight", (h,)),
            (f"{p}.mlp.down_proj.weight", (h, arch.intermediate)),
            (f"{p}.mlp.gate_proj.weight", (arch.intermediate, h)),
            (f"{p}.mlp.up_proj.weight", (arch.intermediate, h)),
            (f"{p}.post_attention_layernorm.weight", (h,)),
        ]
        if arch.family == "gemma3":
            out += [
                (f"{p}.post_feedforward_layernorm.weight", (h,)),
                (f"{p}.pre_feedforward_layernorm.weight", (h,)),
                (f"{p}.self_attn.k_norm.weight", (arch.head_dim,)),
            ]
        for m, rows in (("k", kv), ("o", h), ("q", q), ("v", kv)):
            shape = (h, q) if m == "o" else (rows, h)
            if arch.family == "qwen2" and m != "o":
                out.append((f"{p}.self_attn.{m}_proj.bias", (rows,)))
            out.append((f"{p}.self_attn.{m}_proj.weight", shape))
            if arch.family == "gemma3" and m == "q":
                out.append((f"{p}.self_attn.q_norm.weight", (arch.head_dim,)))
    out.append(("model.norm.weight", (h,)))
    if not arch.tied:
        out.append(("lm_head.weight", (arch.vocab, h)))
    return out


def checkpoint_bytes(arch: Arch) -> int:
    return sum(2 * math.prod(s) for _, s in tensors(arch))


def hf_config(arch: Arch) -> dict[str, object]:
    """A config.json transformers can build the model from (for PEFT's helper)."""
    common = {
        "hidden_size": arch.hidden,
        "intermediate_size": arch.intermediate,
        "num_hidden_layers": arch.layers,
        "num_attention_heads": arch.heads,
        "num_key_value_heads": arch.kv_heads,
        "head_dim": arch.head_dim,
        "vocab_size": arch.vocab,
        "tie_word_embeddings": arch.tied,
        "torch_dtype": "bfloat16",
        "max_position_embeddings": 32768,
    }
    if arch.family == "qwen2":
        return {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", **common}
    return {"architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text", **common}


def designed_kappa(name: str) -> float:
    """The seeded kappa of a matrix: 10 ** U(0.5, 2.5), from its name."""
    return float(10 ** (0.5 + 2.0 * _rng(name).random()))


def _rng(name: str) -> np.random.Generator:
    return np.random.default_rng(
        int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest())
    )


def matrix_blocks(name: str, shape: tuple[int, int]) -> Iterator[torch.Tensor]:
    """Row blocks (float32) of W = H_u [diag(s) 0] H_v = D - 2 a v^T - 2 u b^T."""
    r, c = shape
    k = min(r, c)
    rng = _rng(name)
    kappa = float(10 ** (0.5 + 2.0 * rng.random()))
    s = 0.05 * np.geomspace(1.0, 1.0 / kappa, k)
    u = rng.standard_normal(r)
    u /= np.linalg.norm(u)
    v = rng.standard_normal(c)
    v /= np.linalg.norm(v)
    a = np.zeros(r)
    a[:k] = s * v[:k]  # D v
    b = np.zeros(c)
    b[:k] = u[:k] * s  # u^T D ...
    b -= 2.0 * float(u[:k] @ a[:k]) * v  # ... H_v: u^T D H_v
    # float32 blocks (the stored matrix is bf16 anyway): two rank-1 updates as one GEMM
    left = torch.from_numpy(np.stack([a, u], axis=1).astype(np.float32) * -2.0)
    right = torch.from_numpy(np.stack([v, b]).astype(np.float32))
    rows = max(1, BLOCK_ELEMENTS // c)
    for i0 in range(0, r, rows):
        i1 = min(r, i0 + rows)
        block = left[i0:i1] @ right
        if i0 < k:
            diag = torch.arange(i0, min(i1, k))
            block[diag - i0, diag] += torch.from_numpy(s[i0 : min(i1, k)].astype(np.float32))
        yield block


def _bf16_bytes(t: torch.Tensor) -> bytes:
    return t.to(torch.bfloat16).view(torch.int16).numpy().tobytes()


def _tensor_bytes(name: str, shape: tuple[int, ...]) -> Iterator[bytes]:
    if len(shape) == 2:
        for block in matrix_blocks(name, (shape[0], shape[1])):
            yield _bf16_bytes(block)
    else:
        fill = 0.0 if name.endswith(".bias") else 1.0
        yield _bf16_bytes(torch.full(shape, fill))


def _shards(arch: Arch) -> list[list[tuple[str, tuple[int, ...]]]]:
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in tensors(arch):
        n = 2 * math.prod(shape)
        if shards[-1] and size + n > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += n
    return shards


def _write_shard(path: Path, items: list[tuple[str, tuple[int, ...]]]) -> None:
    header: dict[str, object] = {}
    offset = 0
    for name, shape in items:
        n = 2 * math.prod(shape)
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    tmp = path.with_suffix(".tmp")
    with tmp.open("wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for name, shape in items:
            for chunk in _tensor_bytes(name, shape):
                f.write(chunk)
    tmp.replace(path)


def check_disk(root: Path, arch: Arch) -> None:
    """Raises ShapeError-like OSError text when the checkpoint would not fit (checked first)."""
    need = checkpoint_bytes(arch) + 256 * 1024**2
    free = shutil.disk_usage(root).free
    if free < need:
        raise NoSpace(
            f"not enough disk in {root} for the {arch.name} checkpoint:"
            f" need {need / 1024**3:.1f} GiB, {free / 1024**3:.1f} GiB free"
        )


class NoSpace(ValueError):
    """Not enough free disk for the synthetic checkpoint."""


def write_checkpoint(root: Path, arch: Arch) -> int:
    """Writes the sharded checkpoint, its index, config.json and the designed kappas."""
    root.mkdir(parents=True, exist_ok=True)
    check_disk(root, arch)
    shards = _shards(arch)
    weight_map: dict[str, str] = {}
    for i, items in enumerate(shards, start=1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        _write_shard(root / fname, items)
        weight_map.update(dict.fromkeys((n for n, _ in items), fname))
    index = {"metadata": {"total_size": checkpoint_bytes(arch)}, "weight_map": weight_map}
    (root / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (root / "config.json").write_text(json.dumps(hf_config(arch), indent=2))
    expected = {n: designed_kappa(n) for n, s in tensors(arch) if len(s) == 2}
    (root / "expected_kappa.json").write_text(json.dumps({"arch": asdict(arch), "kappa": expected}))
    return checkpoint_bytes(arch)
