"""PyTorch weights as a Source: ``.bin``/``.pt`` files (``weights_only``), a module or a state dict."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch

from kappatune.analysis.source_base import TensorEntry, tensor_digest
from kappatune.errors import KappaTuneError


def _flatten_state(obj: object, prefix: str = "") -> dict[str, torch.Tensor]:
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
        return t, tensor_digest(t)


def _safe_torch_load(path: Path) -> object:
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
        return t, tensor_digest(t)
