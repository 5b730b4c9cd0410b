"""Training memory of each method, predicted without loading weights (config + meta device).

The model is built on PyTorch's meta device from its config alone and prepared for the method
exactly as ``train`` prepares it (which parameters train; LoRA adapters). Two training steps
then run on it (:mod:`kappatune.training.step_memory`): forward with labels, backward,
gradient clipping and the AdamW update, with every tensor each operator creates counted while
it is alive. The prediction, in float32:

* weights: every parameter (adapters included);
* gradients: the trainable parameters;
* optimizer state: AdamW's two moments per trainable parameter;
* activations: what autograd saves for the backward pass in one forward pass;
* peak above the weights: the most bytes alive at once during a step (gradients, optimizer
  state, activations and every temporary: logits and their gradients, a tied embedding's two
  gradients and their sum, the optimizer's scratch tensors); not all of the above at once;
* runtime: the resident size of this process with torch, transformers, PEFT and the model's
  tokenizer loaded, measured (the same libraries a training process holds).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from kappatune.errors import KappaTuneError
from kappatune.training.step_memory import StepPeak, simulate_steps

if TYPE_CHECKING:
    from transformers import PretrainedConfig

    from kappatune.selection.core import Selection
    from kappatune.training.loop import LoraSettings

ADAM_MOMENTS = 2


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes one training method needs at a batch size and sequence length."""

    method: str
    params: int
    trainable: int
    weights: int
    gradients: int
    optimizer: int
    activations: int  # saved for backward in one forward pass
    peak: StepPeak  # what is alive at the step's peak, beyond the weights
    runtime: int = 0  # the process itself (libraries, tokenizer), measured; 0: not counted

    @property
    def peak_above_weights(self) -> int:
        return self.peak.total

    @property
    def total(self) -> int:
        return self.weights + self.peak_above_weights + self.runtime


def _from_model_files(
    spec: str | os.PathLike[str],
    auto: Any,
    trust_remote_code: bool,
    errors: tuple[type[BaseException], ...],
    what: str,
) -> Any:
    """``auto.from_pretrained`` (AutoConfig, AutoTokenizer) on the model's files only, with a
    one-line error naming ``what`` could not be read."""
    from kappatune.training.models import _first_line, _hub_snapshot, resolve_model

    resolved = resolve_model(spec)
    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code, "local_files_only": True}
    try:
        if resolved.kind == "gguf":
            assert resolved.path is not None
            return auto.from_pretrained(
                resolved.path.parent, gguf_file=resolved.path.name, **kwargs
            )
        where: Path = resolved.path if resolved.path is not None else _hub_snapshot(resolved.spec)
        return auto.from_pretrained(where, **kwargs)
    except errors as exc:
        raise KappaTuneError(f"{what} of {os.fspath(spec)!r}: {_first_line(exc)}") from None


def config_of(spec: str | os.PathLike[str], trust_remote_code: bool = False) -> PretrainedConfig:
    """The model's transformers config, read from its files only (no weights)."""
    from transformers import AutoConfig

    errors = (OSError, ValueError, KeyError)
    return _from_model_files(spec, AutoConfig, trust_remote_code, errors, "cannot read the config")


def meta_model(config: PretrainedConfig, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The causal LM of ``config`` with every tensor on the meta device (no memory)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.train()
    return model


def estimate(
    build: Callable[[], nn.Module],
    method: str,
    batch: int,
    seq_len: int,
    selection: Selection | None = None,
    lora: LoraSettings | None = None,
    *,
    foreach: bool = False,
    max_grad_norm: float | None = 1.0,
    runtime: int = 0,
) -> MemoryEstimate:
    """Memory of ``method`` on a fresh meta model from ``build`` (see the module text);
    ``foreach``: AdamW's multi-tensor update (PyTorch's default on CUDA)."""
    from kappatune.training.loop import prepare_model

    prepared = prepare_model(build(), method, selection, lora)
    model = prepared.model
    params = list(model.parameters())
    trainable = [p for p in params if p.requires_grad]
    train_bytes = sum(p.numel() * p.element_size() for p in trainable)
    step = simulate_steps(
        model, prepared.param_groups, batch, seq_len, foreach=foreach, max_grad_norm=max_grad_norm
    )
    return MemoryEstimate(
        method=method,
        params=sum(p.numel() for p in params),
        trainable=sum(p.numel() for p in trainable),
        weights=sum(p.numel() * p.element_size() for p in params),
        gradients=train_bytes,
        optimizer=ADAM_MOMENTS * train_bytes,
        activations=step.saved_activations,
        peak=step.peak,
        runtime=runtime,
    )


METHOD_ORDER = ("full", "selective", "lora", "kappa-lora")  # the order a table lists them in


def method_estimates(
    config: PretrainedConfig,
    batch: int,
    seq_len: int,
    selection: Selection | None,
    lora_for: Callable[[int], LoraSettings | None],
    *,
    foreach: bool = False,
    max_grad_norm: float | None = 1.0,
    runtime: int = 0,
) -> list[MemoryEstimate]:
    """One estimate per method of :data:`METHOD_ORDER` on the meta model of ``config``;
    ``lora_for(model parameters)`` gives the LoRA methods' settings."""
    from kappatune.training.methods import get_method

    model_params = sum(p.numel() for p in meta_model(config).parameters())
    build = functools.partial(meta_model, config)
    step = functools.partial(
        estimate, foreach=foreach, max_grad_norm=max_grad_norm, runtime=runtime
    )
    out = []
    for name in METHOD_ORDER:
        method = get_method(name)
        lora = lora_for(model_params) if method.lora else None
        sel = selection if method.needs_selection else None
        out.append(step(build, name, batch, seq_len, sel, lora))
    return out


def resident_bytes() -> int:
    """This process's resident set size now (Linux), else its peak so far."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        import resource
        import sys

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024


def runtime_bytes(spec: str | os.PathLike[str], trust_remote_code: bool = False) -> int:
    """The resident size of this process with what a training process holds besides the
    model: torch, transformers and PEFT imported, and the model's tokenizer loaded."""
    import peft  # noqa: F401
    import transformers  # noqa: F401

    tokenizer = load_tokenizer(spec, trust_remote_code)
    size = resident_bytes()
    del tokenizer
    return size


def load_tokenizer(spec: str | os.PathLike[str], trust_remote_code: bool = False) -> Any:
    """The model's tokenizer, from its files only."""
    from transformers import AutoTokenizer

    errors = (OSError, ValueError, KeyError, TypeError, ImportError)
    what = "cannot load the tokenizer"
    return _from_model_files(spec, AutoTokenizer, trust_remote_code, errors, what)
