"""Training memory of each method, predicted without loading weights (config + meta device).

The model is built on PyTorch's meta device from its config alone, prepared for the method
exactly as ``train`` prepares it (which parameters train; LoRA adapters), and run forward on
meta input ids of the given batch and sequence length under a saved-tensor hook: the bytes
autograd keeps for the backward pass are the activations, counted once per storage and
without the parameters themselves. Then, for AdamW in float32:

* weights: every parameter (adapters included);
* gradients: the trainable parameters;
* optimizer state: two moments per trainable parameter;
* transient peak: the larger of the backward pass's (saved activations plus the logits'
  gradient chain, three logits-sized tensors) and the optimizer step's (one temporary the size
  of the trainable parameters, from the multi-tensor AdamW square root).

The process's own runtime (Python, torch, tokenizer; a few hundred MB) is not included.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from kappatune.errors import KappaTuneError

if TYPE_CHECKING:
    from transformers import PretrainedConfig

    from kappatune.selection.core import Selection
    from kappatune.training.loop import LoraSettings

LOGITS_CHAIN = 3  # logits-sized tensors alive at once in the loss backward (grad, upcast, softmax)
ADAM_MOMENTS = 2
ADAM_TEMPORARIES = 1


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes one training method needs at a batch size and sequence length."""

    method: str
    params: int
    trainable: int
    weights: int
    gradients: int
    optimizer: int
    activations: int  # saved for backward
    backward_transient: int
    step_transient: int

    @property
    def peak_above_weights(self) -> int:
        """Gradients, optimizer state and the larger of the two transient phases."""
        backward = self.activations + self.backward_transient
        return self.gradients + self.optimizer + max(backward, self.step_transient)

    @property
    def total(self) -> int:
        return self.weights + self.peak_above_weights


def config_of(spec: str | os.PathLike[str], trust_remote_code: bool = False) -> PretrainedConfig:
    """The model's transformers config, read from its files only (no weights)."""
    from transformers import AutoConfig

    from kappatune.training.models import _hub_snapshot, resolve_model

    resolved = resolve_model(spec)
    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code, "local_files_only": True}
    try:
        if resolved.kind == "gguf":
            assert resolved.path is not None
            return AutoConfig.from_pretrained(
                resolved.path.parent, gguf_file=resolved.path.name, **kwargs
            )
        where: Path = resolved.path if resolved.path is not None else _hub_snapshot(resolved.spec)
        return AutoConfig.from_pretrained(where, **kwargs)
    except (OSError, ValueError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise KappaTuneError(f"cannot read the config of {os.fspath(spec)!r}: {first}") from None


def meta_model(config: PretrainedConfig, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The causal LM of ``config`` with every tensor on the meta device (no memory)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.train()
    return model


def saved_activation_bytes(model: nn.Module, batch: int, seq_len: int) -> int:
    """Bytes autograd saves for backward in one forward pass on meta input ids."""
    params = {id(p) for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        base = t._base if t._base is not None else t
        if id(base) not in params and id(t) not in params:
            saved[id(base)] = base.numel() * base.element_size()
        return t

    ids = torch.zeros((batch, seq_len), dtype=torch.long, device="meta")
    with (
        warnings.catch_warnings(),
        torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t),
    ):
        warnings.simplefilter("ignore", FutureWarning)  # transformers deprecation notices
        model(input_ids=ids, labels=ids)
    return sum(saved.values())


def _logits_bytes(model: nn.Module, batch: int, seq_len: int) -> int:
    out: Any = getattr(model, "get_output_embeddings")()  # noqa: B009 (nn.Module typing)
    vocab = int(out.weight.shape[0]) if out is not None else 0
    return batch * seq_len * vocab * 4


def estimate(
    build: Callable[[], nn.Module],
    method: str,
    batch: int,
    seq_len: int,
    selection: Selection | None = None,
    lora: LoraSettings | None = None,
) -> MemoryEstimate:
    """Memory of ``method`` on a fresh meta model from ``build`` (see the module text)."""
    from kappatune.training.loop import prepare_model

    prepared = prepare_model(build(), method, selection, lora)
    model = prepared.model
    params = list(model.parameters())
    weights = sum(p.numel() * p.element_size() for p in params)
    trainable = [p for p in params if p.requires_grad]
    train_bytes = sum(p.numel() * p.element_size() for p in trainable)
    return MemoryEstimate(
        method=method,
        params=sum(p.numel() for p in params),
        trainable=sum(p.numel() for p in trainable),
        weights=weights,
        gradients=train_bytes,
        optimizer=ADAM_MOMENTS * train_bytes,
        activations=saved_activation_bytes(model, batch, seq_len),
        backward_transient=LOGITS_CHAIN * _logits_bytes(model, batch, seq_len),
        step_transient=ADAM_TEMPORARIES * train_bytes,
    )


METHOD_ORDER = ("full", "selective", "lora", "kappa-lora")  # the order a table lists them in


def method_estimates(
    config: PretrainedConfig,
    batch: int,
    seq_len: int,
    selection: Selection | None,
    lora_for: Callable[[int], LoraSettings | None],
) -> list[MemoryEstimate]:
    """One estimate per method of :data:`METHOD_ORDER` on the meta model of ``config``;
    ``lora_for(model parameters)`` gives the LoRA methods' settings."""
    from kappatune.training.methods import get_method

    out = []
    for name in METHOD_ORDER:
        method = get_method(name)
        model_params = sum(p.numel() for p in meta_model(config).parameters())
        lora = lora_for(model_params) if method.lora else None
        sel = selection if method.needs_selection else None
        out.append(estimate(lambda: meta_model(config), name, batch, seq_len, sel, lora))
    return out
