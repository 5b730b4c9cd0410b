"""The per-example Fisher estimator of :mod:`kappatune.analysis.fisher`, several examples per pass.

:func:`kappatune.analysis.fisher.fisher_diagonals` squares each example's gradient ``g_s``. Done one
example per backward pass, every pass is small. Here a batch of B examples shares one forward
and one backward pass per label set, and ``g_s`` of every weight is rebuilt per example from
what the pass already computes:

* ``nn.Linear`` weights: ``g_s = sum_t d_t a_t^T``, the output gradients ``d`` times the
  inputs ``a`` of example s's positions (summed over the positions, then squared);
* transformers' ``Conv1D`` weights: the module's own vector-Jacobian product for example s's
  output gradient (``torch.func.vjp``);
* weights used by an ``nn.Embedding`` (and subclasses) or by the last linear call of the
  forward (the output head), tied or not: :mod:`kappatune.analysis.fisher_rows` (the embedding's
  rows from its own sparse backward; the head's squared gradient computed once for all label
  sets except on the rows where their output gradients differ);
* a weight used by several such modules (tied input and output embeddings) sums the
  contributions of every use before squaring.

A weight owned by any other kind of module, or whose module sees inputs that are not laid out
example-first (tokens routed to experts), is left to the one-example-per-pass loop. Before any
batch, the rebuilt gradient of each weight on the first example (its data labels) is checked
against autograd's; a weight that disagrees (also used outside its module's forward) goes to
the loop as well. The labels are drawn in the loop's order from the same generator, so a seed
gives the same samples, and the result equals the loop's within floating-point rounding.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from kappatune.analysis.fisher_rows import (
    Call,
    RowSharedWeight,
    example_inputs,
    is_embedding,
    kind_weights,
)
from kappatune.constants import FISHER_BATCH

if TYPE_CHECKING:
    from kappatune.analysis.fisher import (
        BatchedObjective,
        Example,
        FisherOptions,
        Plan,
        ProgressHook,
    )

log = logging.getLogger(__name__)

DEFAULT_BATCH = FISHER_BATCH  # sequences per pass (declared in kappatune.constants)
_CHUNK_ELEMENTS = 1 << 24  # per-example gradients held at once, per weight


class Unbatchable(Exception):
    """Raised inside the batched pass when some weights need the loop instead (internal)."""

    def __init__(self, names: Sequence[str]) -> None:
        super().__init__(", ".join(names))
        self.names = tuple(names)


# --------------------------------------------------------------------------- which weights


def _is_linear(m: nn.Module) -> bool:
    return isinstance(m, nn.Linear) and type(m).forward is nn.Linear.forward


def _is_vjp_leaf(m: nn.Module) -> bool:
    return isinstance(m, nn.Embedding) or type(m).__name__ == "Conv1D"


def owners(
    model: nn.Module, named: Sequence[tuple[str, nn.Parameter]]
) -> tuple[dict[str, list[tuple[nn.Module, str]]], list[str]]:
    """``(owners, rest)``: for each batchable weight the modules (and attribute) that hold it;
    ``rest`` are the weights only the loop can handle, in model order."""
    found: dict[int, list[tuple[nn.Module, str]]] = {id(p): [] for _, p in named}
    for module in model.modules():
        for attr, p in module._parameters.items():
            if p is not None and id(p) in found:
                found[id(p)].append((module, attr))
    batchable: dict[str, list[tuple[nn.Module, str]]] = {}
    rest = []
    for name, p in named:
        mods = found[id(p)]
        if mods and all((_is_linear(m) and a == "weight") or _is_vjp_leaf(m) for m, a in mods):
            batchable[name] = mods
        else:
            rest.append(name)
    return batchable, rest


# --------------------------------------------------------------------------- capture


@dataclass
class _Capture:
    lead: tuple[int, ...] = ()
    calls: dict[int, list[Call]] = field(default_factory=dict)  # id(module) -> calls
    leaves: list[torch.Tensor] = field(default_factory=list)
    bad: set[int] = field(default_factory=set)
    order: list[Call] = field(default_factory=list)  # every call, in forward order

    def hook(
        self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: object
    ) -> torch.Tensor | None:
        if not isinstance(output, torch.Tensor) or not _leads_with(output, self.lead):
            self.bad.add(id(module))
            return None
        if not all(_leads_with(a, self.lead, 0) for a in args if isinstance(a, torch.Tensor)):
            self.bad.add(id(module))
            return None
        replaced = None
        if not output.requires_grad:  # nothing upstream needs a gradient: start the graph here
            replaced = output.detach().requires_grad_(True)
            self.leaves.append(replaced)
            output = replaced
        call = Call(module, tuple(args), dict(kwargs), output)
        self.calls.setdefault(id(module), []).append(call)
        self.order.append(call)
        return replaced


def _leads_with(t: torch.Tensor, lead: tuple[int, ...], extra: int = 1) -> bool:
    return t.ndim >= len(lead) + extra and tuple(t.shape[: len(lead)]) == lead


@contextmanager
def _hooks(modules: Sequence[nn.Module], capture: _Capture) -> Iterator[None]:
    handles = [m.register_forward_hook(capture.hook, with_kwargs=True) for m in modules]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


# --------------------------------------------------------------------------- per-example grads


def _vjp_one(call: Call, attr: str, weight: torch.Tensor, b: int, n: int) -> torch.Tensor:
    args, kwargs = example_inputs(call, b, n)

    def f(w: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = torch.func.functional_call(call.module, {attr: w}, args, kwargs)
        return out

    assert call.grad is not None
    _, vjp = torch.func.vjp(f, weight.detach())[:2]
    (g,) = vjp(call.grad[b : b + 1].detach())
    return g.detach()  # type: ignore[no-any-return]


def _linear_chunk(call: Call, lo: int, hi: int) -> torch.Tensor:
    assert call.grad is not None
    a = call.args[0][lo:hi].detach()
    d = call.grad[lo:hi].detach()
    a = a.reshape(hi - lo, -1, a.shape[-1]).to(d.dtype)
    d = d.reshape(hi - lo, -1, d.shape[-1])
    return torch.einsum("bto,bti->boi", d, a)


def per_example_grads(
    mods: Sequence[tuple[nn.Module, str]],
    calls: Mapping[int, list[Call]],
    weight: torch.Tensor,
    n: int,
) -> Iterator[torch.Tensor]:
    """The gradient of each example's loss for one weight, a chunk of examples at a time,
    as tensors ``(chunk, *weight.shape)``: every use of the weight summed."""
    step = max(1, _CHUNK_ELEMENTS // max(1, weight.numel()))
    uses = [(m, a, c) for m, a in mods for c in calls.get(id(m), []) if c.grad is not None]
    for lo in range(0, n, step):
        hi = min(n, lo + step)
        total: torch.Tensor | None = None
        for module, attr, call in uses:
            if _is_linear(module):
                part = _linear_chunk(call, lo, hi)
            else:
                part = torch.stack([_vjp_one(call, attr, weight, b, n) for b in range(lo, hi)])
            total = part if total is None else total + part
        if total is not None:  # no use at all: every example's gradient is 0
            yield total.to(_acc_dtype(weight))


def _acc_dtype(p: torch.Tensor) -> torch.dtype:
    return torch.promote_types(p.dtype, torch.float32)


# --------------------------------------------------------------------------- the batched pass


def _batches(plan: Plan, size: int) -> Iterator[list[tuple[Example, int]]]:
    """Consecutive plan entries whose tensors have equal shapes, at most ``size`` at a time."""
    batch: list[tuple[Example, int]] = []
    shape: tuple[tuple[str, tuple[int, ...]], ...] | None = None
    for ex, take in plan:
        s = tuple((k, tuple(v.shape)) for k, v in sorted(ex.items()))
        if batch and (len(batch) == size or s != shape):
            yield batch
            batch = []
        batch.append((ex, take))
        shape = s
    if batch:
        yield batch


@dataclass(frozen=True)
class _Job:
    model: nn.Module
    named: Mapping[str, nn.Parameter]
    owned: Mapping[str, list[tuple[nn.Module, str]]]
    objective: BatchedObjective
    options: FisherOptions
    accs: Mapping[str, Mapping[str, torch.Tensor]]  # kind -> name -> accumulator
    commons: dict[str, torch.Tensor] = field(default_factory=dict)  # rows all label sets share
    kind_weights: dict[str, float] = field(default_factory=dict)  # what they count for per kind


def _passes(
    logits: torch.Tensor, labels: torch.Tensor, job: _Job, generator: torch.Generator
) -> list[tuple[str, torch.Tensor, float]]:
    """``(kind, summed log-likelihood, weight)`` of each label set, drawn in the loop's order."""
    from kappatune.analysis.fisher import IGNORE_INDEX

    valid = labels != IGNORE_INDEX
    logp = torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
    zero = logp.new_zeros(())

    def total(target: torch.Tensor) -> torch.Tensor:
        picked = logp.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        return torch.where(valid, picked, zero).sum()

    out: list[tuple[str, torch.Tensor, float]] = []
    if "empirical" in job.options.kinds:
        out.append(("empirical", total(labels), 1.0))
    if "true" in job.options.kinds:
        probs = logp.detach().exp()
        samples = job.options.samples
        drawn = [torch.full_like(labels, IGNORE_INDEX) for _ in range(samples)]
        for b in range(labels.shape[0]):
            rows = probs[b][valid[b]]
            for s in range(samples):
                drawn[s][b][valid[b]] = torch.multinomial(rows, 1, generator=generator)[:, 0]
        out.extend(("true", total(d), 1.0 / samples) for d in drawn)
    return out


def _forward(job: _Job, batch: Plan, grad: bool) -> tuple[_Capture, torch.Tensor, torch.Tensor]:
    """The batch's logits and labels (cut to each example's budget), its module calls recorded."""
    from kappatune.analysis.fisher import _limit_labels

    device = next(iter(job.named.values())).device
    examples = [{k: v.to(device) for k, v in ex.items()} for ex, _ in batch]
    modules = list({id(m): m for mods in job.owned.values() for m, _ in mods}.values())
    capture = _Capture(lead=job.objective.lead(examples))
    for name, p in job.named.items():
        p.requires_grad_(grad and name in job.owned)
    with _hooks(modules, capture):
        logits, labels = job.objective.batch_predictions(job.model, examples)
    bad = [n for n, mods in job.owned.items() if any(id(m) in capture.bad for m, _ in mods)]
    if bad:
        raise Unbatchable(bad)
    labels = torch.stack(
        [_limit_labels(lab, take) for lab, (_, take) in zip(labels, batch, strict=True)]
    )
    return capture, logits, labels


def _backward(
    capture: _Capture, loss: torch.Tensor, params: Sequence[torch.Tensor], retain: bool
) -> list[torch.Tensor | None]:
    """Set each recorded call's output gradient; return the gradients of ``params``."""
    calls = [c for cs in capture.calls.values() for c in cs]
    grads = torch.autograd.grad(
        loss, [c.output for c in calls] + list(params), retain_graph=retain, allow_unused=True
    )
    for c, g in zip(calls, grads, strict=False):
        c.grad = g
    return list(grads[len(calls) :])


def _row_shared(job: _Job, capture: _Capture, n: int) -> dict[str, RowSharedWeight]:
    """The weights whose squared gradients :mod:`kappatune.analysis.fisher_rows` shares between
    label sets: those used by an embedding or by the last linear call (the output head)."""
    last = capture.order[-1].module if capture.order else None
    out = {}
    for name, mods in job.owned.items():
        if not all(is_embedding(m) or _is_linear(m) for m, _ in mods):
            continue
        if not any(is_embedding(m) or m is last for m, _ in mods):
            continue
        calls = [(c, a) for m, a in mods for c in capture.calls.get(id(m), [])]
        calls = [(c, a) for c, a in calls if c.grad is not None]
        linears = [c for c, _ in calls if _is_linear(c.module)]
        embeddings = [(c, a) for c, a in calls if is_embedding(c.module)]
        if linears or embeddings:
            out[name] = RowSharedWeight(job.named[name], linears, embeddings, n)
    return out


def _check(job: _Job, first: tuple[Example, int]) -> None:
    """On the first example alone, with its data labels: the rebuilt gradient of each weight
    must equal autograd's (a weight also used outside its module's forward would differ)."""
    capture, logits, labels = _forward(job, [first], grad=True)
    logp = torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
    valid = labels >= 0
    picked = logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    loss = torch.where(valid, picked, picked.new_zeros(())).sum()
    names = list(job.owned)
    grads = _backward(capture, loss, [job.named[n] for n in names], retain=False)
    shared = _row_shared(job, capture, 1)
    for rows in shared.values():
        rows.add_pass()
    wrong = []
    for name, want in zip(names, grads, strict=True):
        if name in shared:
            got: torch.Tensor | None = shared[name].full_grad(0)
        else:
            chunks = list(per_example_grads(job.owned[name], capture.calls, job.named[name], 1))
            got = chunks[0][0] if chunks else None
        if not _agrees(got, want):
            wrong.append(name)
    if wrong:
        raise Unbatchable(wrong)


def _run_batch(job: _Job, batch: Plan, generator: torch.Generator) -> None:
    capture, logits, labels = _forward(job, batch, grad=False)
    passes = _passes(logits, labels, job, generator)
    shared: dict[str, RowSharedWeight] = {}
    for i, (kind, loss, weight) in enumerate(passes):
        _backward(capture, loss, (), retain=i < len(passes) - 1)
        if i == 0:
            shared = _row_shared(job, capture, len(batch))
        for name in job.owned:
            if name in shared:
                shared[name].add_pass()
                continue
            acc = job.accs[kind][name]
            for chunk in per_example_grads(
                job.owned[name], capture.calls, job.named[name], len(batch)
            ):
                for g in chunk:
                    acc.addcmul_(g, g, value=weight)
    for name, rows in shared.items():
        if name not in job.commons:
            job.commons[name] = torch.zeros_like(job.accs[passes[0][0]][name])
        rows.accumulate(job.commons[name], [(job.accs[k][name], w) for k, _, w in passes])
    job.kind_weights.update(kind_weights(passes))


def _flush(job: _Job) -> None:
    """Add the rows every label set shared to each kind, with the kind's total weight."""
    for name, common in job.commons.items():
        for kind, weight in job.kind_weights.items():
            job.accs[kind][name].add_(common, alpha=weight)
    job.commons.clear()


def _agrees(summed: torch.Tensor | None, batch_grad: torch.Tensor | None) -> bool:
    if summed is None or batch_grad is None:
        return (summed is None or not bool(summed.any())) and (
            batch_grad is None or not bool(batch_grad.any())
        )
    norm = torch.linalg.vector_norm
    scale = float(norm(batch_grad)) + float(norm(summed))
    return float(norm(summed - batch_grad)) <= 1e-4 * scale + 1e-30


def run_batched(
    model: nn.Module,
    named: Sequence[tuple[str, nn.Parameter]],
    plan: Plan,
    objective: BatchedObjective,
    options: FisherOptions,
    accs: Mapping[str, Mapping[str, torch.Tensor]],
    batch_size: int,
    progress: ProgressHook | None = None,
) -> list[str]:
    """Accumulate ``F_hat * tokens`` of every weight it can into ``accs``, ``batch_size``
    examples per pass; returns the names left for the one-example loop (in model order)."""
    owned, rest = owners(model, named)
    while owned:
        job = _Job(model, dict(named), owned, objective, options, accs)
        try:
            _check(job, plan[0])
            _run_all(job, plan, batch_size, progress)
            _flush(job)
            break
        except Unbatchable as exc:
            log.info("per-example gradients by the loop for %d tensors: %s", len(exc.names), exc)
            for kind in accs.values():
                for acc in kind.values():
                    acc.zero_()
            owned = {n: m for n, m in owned.items() if n not in exc.names}
            rest = [n for n, _ in named if n not in owned]
    return rest


def _run_all(job: _Job, plan: Plan, batch_size: int, progress: ProgressHook | None) -> None:
    device = next(iter(job.named.values())).device
    generator = torch.Generator(device=device).manual_seed(job.options.seed)
    done = 0
    for batch in _batches(plan, batch_size):
        _run_batch(job, batch, generator)
        done += sum(take for _, take in batch)
        if progress is not None:
            progress(done, job.options.tokens)
