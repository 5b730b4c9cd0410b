"""The most memory two training steps hold at once, from running them on the meta device.

:func:`simulate_steps` runs what :func:`kappatune.training.loop.train_loop` runs for one
micro-batch per step (forward with labels, backward, gradient clipping, AdamW, gradients set
to None), twice, on a model whose tensors are on PyTorch's meta device: every operator runs
with its real output shapes and dtypes, but nothing is computed or stored. A dispatch mode
sees every tensor an operator creates; its storage counts from creation until it is freed
(a weak reference's callback), so views, in-place updates and the autograd engine's own
buffers count exactly as often as they take memory. The result is the largest sum of live
bytes beyond the model's own tensors during the second step (the first one has no optimizer
state during its backward pass), split into what was alive at that moment.

Two choices follow the device the run would use: AdamW's multi-tensor ("foreach") update on
CUDA, its one-tensor-at-a-time update elsewhere (PyTorch's default), and attention through
the fused kernel (``scaled_dot_product_attention`` keeps its output and log-sum-exp, not the
attention matrix), which on the meta device would otherwise fall back to the unfused one.
Memory allocators round sizes up and keep freed blocks; that is not modelled.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import warnings
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

CATEGORIES = ("gradients", "optimizer", "activations", "temporaries")


@dataclass(frozen=True)
class StepPeak:
    """Bytes alive at the peak of a training step, beyond the model's own tensors."""

    gradients: int
    optimizer: int
    activations: int  # saved for the backward pass
    temporaries: int  # outputs, gradients of activations, the optimizer's scratch tensors
    phase: str  # "forward", "backward" or "optimizer step"

    @property
    def total(self) -> int:
        return self.gradients + self.optimizer + self.activations + self.temporaries


@dataclass(frozen=True)
class SimulatedSteps:
    peak: StepPeak  # of the second step
    saved_activations: int  # what its forward pass saved for backward


class LiveBytes(TorchDispatchMode):
    """Counts the bytes of every storage an operator creates while it is alive, by category
    (a new storage is a temporary until :meth:`tag` says otherwise)."""

    def __init__(self, known: Iterator[torch.Tensor]) -> None:
        super().__init__()
        self._known = {id(t.untyped_storage()) for t in known}  # not counted (the model's own)
        self._live: dict[int, tuple[int, str]] = {}  # id(storage) -> (bytes, category)
        self._refs: dict[int, weakref.ref[torch.UntypedStorage]] = {}  # their callbacks free them
        self.by_category = dict.fromkeys(CATEGORIES, 0)
        self._total = 0
        self.phase = "forward"
        self.peak: StepPeak | None = None
        self._peak_bytes = -1

    def reset_peak(self) -> None:
        self.peak, self._peak_bytes = None, -1

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:  # a lone tensor flattens to itself
            if isinstance(t, torch.Tensor):
                self._add(t.untyped_storage())
        return out

    def _add(self, storage: torch.UntypedStorage) -> None:
        key = id(storage)
        if key in self._known or key in self._live:
            return
        nbytes = storage.nbytes()
        self._live[key] = (nbytes, "temporaries")
        self.by_category["temporaries"] += nbytes
        self._refs[key] = weakref.ref(storage, functools.partial(self._free, key))
        self._total += nbytes
        if self._total > self._peak_bytes:
            self._peak_bytes = self._total
            self.peak = StepPeak(**self.by_category, phase=self.phase)

    def _free(self, key: int, _: object = None) -> None:
        del self._refs[key]
        nbytes, category = self._live.pop(key)
        self.by_category[category] -= nbytes
        self._total -= nbytes

    def tag(self, t: torch.Tensor, category: str, only_from: str | None = None) -> None:
        """Count ``t``'s storage as ``category`` from now on (when it is one this mode counts,
        and, with ``only_from``, only when it is counted as that category now)."""
        key = id(t.untyped_storage())
        if key not in self._live:
            return
        nbytes, old = self._live[key]
        if only_from is not None and old != only_from:
            return
        self._live[key] = (nbytes, category)
        self.by_category[old] -= nbytes
        self.by_category[category] += nbytes


class FusedAttention(TorchFunctionMode):
    """``scaled_dot_product_attention`` through the fused kernel (output and log-sum-exp
    saved for backward, no attention matrix), as on CPU and CUDA; the meta device would
    otherwise take the unfused route."""

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func is not torch.nn.functional.scaled_dot_product_attention:
            return func(*args, **kwargs)
        return _fused_sdpa(*args, **kwargs)


def _fused_sdpa(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> torch.Tensor:
    # the kernel takes fewer key/value heads than query heads as they are (grouped-query attention)
    out = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        query, key, value, dropout_p, is_causal, attn_mask=attn_mask, scale=scale
    )
    return out[0]


def simulate_steps(
    model: nn.Module,
    param_groups: list[dict[str, Any]],
    batch: int,
    seq_len: int,
    *,
    foreach: bool = False,
    max_grad_norm: float | None = 1.0,
    fused_attention: bool = True,
) -> SimulatedSteps:
    """The peak of the second of two training steps of ``model`` (on the meta device, prepared
    for its method) on ``batch`` rows of ``seq_len`` tokens; see the module text.
    ``fused_attention=False`` leaves attention to the device's own choice (a real device)."""
    groups = [{k: v for k, v in g.items() if k != "names"} for g in param_groups]
    optimizer = torch.optim.AdamW(groups, lr=1e-5, foreach=foreach)
    trainable = [p for g in groups for p in g["params"]]
    ids = torch.zeros((batch, seq_len), dtype=torch.long, device=next(model.parameters()).device)
    mode = LiveBytes(itertools.chain(_own_tensors(model), [ids]))  # the batch is not counted
    handles = [
        p.register_post_accumulate_grad_hook(lambda p: mode.tag(p.grad, "gradients"))
        for p in trainable
    ]
    model.train()
    attention = FusedAttention() if fused_attention else contextlib.nullcontext()
    try:
        with _quiet(), mode, attention, _saved_as_activations(mode):
            # the loop's ``out``: a step's output lives until the next forward ends
            held: list[Any] = []
            for step in range(2):
                if step == 1:
                    mode.reset_peak()
                saved = _step(model, ids, optimizer, trainable, max_grad_norm, mode, held)
            held.clear()
    finally:
        for h in handles:
            h.remove()
    assert mode.peak is not None
    return SimulatedSteps(mode.peak, saved)


def _step(
    model: nn.Module,
    ids: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    trainable: list[torch.Tensor],
    max_grad_norm: float | None,
    mode: LiveBytes,
    held: list[Any],
) -> int:
    """One step as train_loop takes it (its output replaces ``held``'s); returns the bytes its
    forward pass saved for backward."""
    mode.phase = "forward"
    held[:] = [model(input_ids=ids, labels=ids)]  # packed rows: no padding mask
    out = held[0]
    saved = mode.by_category["activations"]
    mode.phase = "backward"
    out.loss.backward()
    mode.phase = "optimizer step"
    if max_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_(trainable, max_grad_norm)
    optimizer.step()
    for state in optimizer.state.values():
        for v in state.values():
            if isinstance(v, torch.Tensor):
                mode.tag(v, "optimizer")
    optimizer.zero_grad(set_to_none=True)
    return saved


def _own_tensors(model: nn.Module) -> Iterator[torch.Tensor]:
    yield from model.parameters()
    yield from model.buffers()


@contextlib.contextmanager
def _saved_as_activations(mode: LiveBytes) -> Iterator[None]:
    def pack(t: torch.Tensor) -> torch.Tensor:
        mode.tag(t, "activations", only_from="temporaries")
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # transformers deprecation notices
        yield
