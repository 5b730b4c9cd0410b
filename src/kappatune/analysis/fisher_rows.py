"""Per-example squared gradients of row-sparse weights: embeddings and the output head.

In a language model the (often tied) embedding and output head hold most of the parameters
(Gemma 3 270M: 168M of 268M), and the batched estimator of :mod:`kappatune.analysis.fisher_batched`
spent most of its time on them: a dense ``V x d`` gradient per example and label set, the
embedding's part built from a zero-filled dense tensor, summed and squared.

Two facts make that work shareable without changing a single term of the estimator:

* an embedding's per-example gradient touches only the rows of the tokens the example reads;
* the output-gradient of the head, ``d log p(y_t) / d logits_t = onehot(y_t) - p_t``, is the same
  for every label set (true, empirical, each sample) except in the columns of the labels.

So for each example the head's gradient ``G = D^T X`` is computed once from the first label
set's ``D``, in blocks of rows, squared and added to a *shared* accumulator, except on the few
rows ``M`` where some label set (or an embedding use) differs; those rows are computed exactly
for every label set, ``D_k[:, M]^T X`` plus the embedding's rows, and squared per set. The
shared accumulator is added to each kind's at the end with the kind's total weight. The rows
that differ are found by comparing the output-gradients themselves, so nothing is assumed
about the loss: if they differ everywhere, every row is computed per set (slower, still exact).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn


@dataclass
class Call:
    """One captured call of a module in the forward pass: its inputs, output and (after the
    backward pass) the gradient of the loss with respect to that output."""

    module: nn.Module
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    output: torch.Tensor
    grad: torch.Tensor | None = None


_BLOCK_ELEMENTS = 1 << 21  # rows of the head's dense gradient computed (and squared) at once


def _slice(x: object, b: int, lead: int) -> object:
    if isinstance(x, torch.Tensor) and x.ndim > 0 and x.shape[0] == lead:
        return x[b : b + 1]
    return x


def _detach(x: object) -> object:
    return x.detach() if isinstance(x, torch.Tensor) else x


def example_inputs(call: Call, b: int, n: int) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The positional and keyword inputs of ``call`` for example ``b`` of ``n`` (tensors whose
    first axis is the batch sliced to ``b``), detached."""
    args = tuple(_detach(_slice(a, b, n)) for a in call.args)
    kwargs = {k: _detach(_slice(v, b, n)) for k, v in call.kwargs.items()}
    return args, kwargs


def embedding_rows(call: Call, attr: str, weight: torch.Tensor, b: int, n: int) -> _Rows:
    """Example ``b``'s gradient of an embedding's weight, as (sorted unique rows, their values):
    the module's own backward with ``sparse=True``, so no dense ``V x d`` tensor is made."""
    assert call.grad is not None
    module = call.module
    args, kwargs = example_inputs(call, b, n)
    w = weight.detach().requires_grad_(True)
    sparse = getattr(module, "sparse", False)
    try:
        setattr(module, "sparse", True)  # noqa: B010 (nn.Module's __setattr__ is typed for tensors)
        with torch.enable_grad():
            out = torch.func.functional_call(module, {attr: w}, args, kwargs)
    finally:
        setattr(module, "sparse", sparse)  # noqa: B010
    (g,) = torch.autograd.grad(out, w, grad_outputs=call.grad[b : b + 1].detach())
    if g.is_sparse:
        g = g.coalesce()
        return _Rows(g.indices()[0], g.values())
    rows = g.reshape(g.shape[0], -1).ne(0).any(1).nonzero()[:, 0]  # a subclass ignoring sparse
    return _Rows(rows, g[rows])


@dataclass(frozen=True)
class _Rows:
    index: torch.Tensor  # (R,) sorted unique rows
    values: torch.Tensor  # (R, *row shape)


@dataclass
class RowSharedWeight:
    """One row-sparse weight of a batch: its head (linear) and embedding uses, every pass."""

    weight: torch.Tensor
    linears: Sequence[Call]
    embeddings: Sequence[tuple[Call, str]]
    n: int
    base: list[torch.Tensor] = field(default_factory=list)  # per linear use: (n, N, out)
    inputs: list[torch.Tensor] = field(default_factory=list)  # per linear use: (n, N, in)
    diffs: list[list[list[_Rows]]] = field(default_factory=list)  # pass, use, example
    rows: list[list[list[_Rows]]] = field(default_factory=list)  # pass, use, example

    def add_pass(self) -> None:
        """Record the current pass's output-gradients (set on the calls by the backward)."""
        first = not self.base
        diffs = []
        for u, call in enumerate(self.linears):
            assert call.grad is not None
            d = call.grad.detach().reshape(self.n, -1, call.grad.shape[-1])
            if first:
                self.base.append(d)
                x = call.args[0].detach()
                self.inputs.append(x.reshape(self.n, -1, x.shape[-1]).to(d.dtype))
                continue
            cols = (d != self.base[u]).any(1)  # (n, out): where this pass's D differs
            per = []
            for i in range(self.n):
                c = cols[i].nonzero()[:, 0]
                per.append(_Rows(c, d[i][:, c].T))  # values (|c|, N)
            diffs.append(per)
        self.diffs.append(diffs)  # empty for the first pass, the base
        self.rows.append(
            [
                [embedding_rows(call, attr, self.weight, i, self.n) for i in range(self.n)]
                for call, attr in self.embeddings
            ]
        )

    def _differing(self, i: int) -> torch.Tensor:
        parts = [r[i].index for per_pass in self.diffs for r in per_pass]
        parts += [r[i].index for per_pass in self.rows for r in per_pass]
        device = self.weight.device
        if not parts:
            return torch.zeros(0, dtype=torch.long, device=device)
        return torch.unique(torch.cat(parts))

    def _pass_rows(self, k: int, i: int, m: torch.Tensor) -> torch.Tensor:
        """Pass ``k``'s gradient of example ``i`` on rows ``m``: ``(|m|, *row shape)``."""
        shape = self.weight.shape[1:]
        out = torch.zeros((len(m), *shape), dtype=self._dtype(), device=self.weight.device)
        flat = out.reshape(len(m), -1)
        for u in range(len(self.linears)):
            cols = self.base[u][i][:, m].T.contiguous()  # (|m|, N)
            if k > 0:
                diff = self.diffs[k][u][i]
                cols[torch.searchsorted(m, diff.index)] = diff.values
            flat.addmm_(cols, self.inputs[u][i])
        for r in self.rows[k]:
            out.index_add_(0, torch.searchsorted(m, r[i].index), r[i].values.to(out.dtype))
        return out

    def _dtype(self) -> torch.dtype:
        if self.base:
            return self.base[0].dtype
        return self.rows[0][0][0].values.dtype

    def full_grad(self, i: int) -> torch.Tensor:
        """Example ``i``'s whole gradient in the first pass (for the check against autograd)."""
        everything = torch.arange(self.weight.shape[0], device=self.weight.device)
        return self._pass_rows(0, i, everything).reshape(self.weight.shape)

    def accumulate(
        self, common: torch.Tensor, targets: Sequence[tuple[torch.Tensor, float]]
    ) -> None:
        """Add every example's squared gradient: the rows all passes share to ``common`` (once),
        the others to each pass's ``(accumulator, weight)`` in ``targets``."""
        for i in range(self.n):
            m = self._differing(i)
            if self.linears:
                self._shared_rows(i, m, common)
            if len(m):
                for k, (acc, weight) in enumerate(targets):
                    g = self._pass_rows(k, i, m).to(acc.dtype)
                    acc.index_add_(0, m, g * g, alpha=weight)

    def _shared_rows(self, i: int, m: torch.Tensor, common: torch.Tensor) -> None:
        rows = self.weight.shape[0]
        width = self.inputs[0].shape[-1]
        step = max(1, _BLOCK_ELEMENTS // max(1, width))
        buf = torch.empty((min(step, rows), width), dtype=self._dtype(), device=common.device)
        flat = common.reshape(rows, -1)
        for lo in range(0, rows, step):
            hi = min(rows, lo + step)
            out = buf[: hi - lo]
            torch.mm(self.base[0][i][:, lo:hi].T, self.inputs[0][i], out=out)
            for u in range(1, len(self.linears)):
                out.addmm_(self.base[u][i][:, lo:hi].T, self.inputs[u][i])
            inside = m[(m >= lo) & (m < hi)] - lo
            out.index_fill_(0, inside, 0.0)
            g = out.to(flat.dtype)
            flat[lo:hi].addcmul_(g, g)


def is_embedding(m: nn.Module) -> bool:
    return isinstance(m, nn.Embedding)


def kind_weights(passes: Sequence[tuple[str, Any, float]]) -> Mapping[str, float]:
    """The total weight of each kind's passes: what the shared rows count for in that kind."""
    out: dict[str, float] = {}
    for kind, _, weight in passes:
        out[kind] = out.get(kind, 0.0) + weight
    return out
