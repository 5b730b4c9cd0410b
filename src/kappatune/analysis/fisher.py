"""Diagonal Fisher information of the weights, per tensor (or per expert), from a data sample.

This is the data-dependent "information in the weights" of Achille, Paolini and Soatto
("Where is the information in a deep neural network?", arXiv 1905.12213): about
1/2 log det(F + lambda I) for a Fisher F around the trained weights, measured so it can be set against kappa and used as a control policy.

The estimator (what is computed, exactly)
-----------------------------------------
The unit of the log-likelihood is one *example* (one sequence of a causal LM, one input of a
classifier), as in EWC's per-example practice: for each example ``s`` one backward pass gives
``g_s = grad_theta sum_{t in s} log p(y_{s,t} | x_{s,<t})`` over its predicted positions ``t``,
and the diagonal is accumulated as ``F_hat = (1/N) sum_s g_s * g_s`` where ``N`` is the number
of predicted tokens used (the token budget). No per-sample gradient is ever stored: the square
of each example's gradient is added to one accumulator per tensor.

* ``kind="true"``: the labels ``y_{s,t}`` are drawn, independently at every position, from the
  model's own predictive distribution given the data prefix (teacher forcing). Since
  ``E_y[grad log p(y | .)] = 0`` and the draws are independent, the cross-position products in
  ``g_s * g_s`` vanish in expectation and ``F_hat`` is an *unbiased* estimate of the mean
  per-token Fisher diagonal ``(1/N) sum_t E_{y_t ~ p}[(grad log p(y_t | x_<t))^2]`` at the cost
  of one backward pass per sequence instead of one per token. ``samples`` > 1 draws several
  label sets per example (averaged) to lower the variance.
* ``kind="empirical"``: the data's own labels. Then the cross-position products do not vanish:
  ``F_hat`` is the per-sequence empirical Fisher (squared gradient of each sequence's
  log-likelihood) divided by the number of tokens, which is what EWC-style code computes when it
  treats a sequence as one example.

Per tensor the result holds the sum of ``F_hat``, its mean per parameter, and the log-volume
information ``1/2 sum_i log(F_ii + lambda)`` (``damping`` = lambda). Fused 3-D expert tensors
give one row per expert so rows align with ``SpectrumRow.key``.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch

from kappatune import settings
from kappatune.analysis import names
from kappatune.constants import FISHER_BATCH, FISHER_TOKENS
from kappatune.errors import KappaTuneError
from kappatune.jsonio import check_schema, decode_float, encode_float
from kappatune.settings import setting

if TYPE_CHECKING:
    from kappatune.analysis.spectra import SpectrumRow
    from kappatune.training.data import TokenizedData
    from kappatune.training.layout import Part

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
KINDS = ("true", "empirical")
MEASURES = ("mean", "sum", "logvol")
IGNORE_INDEX = -100
ProgressHook = Callable[[int, int], None]
Example = Mapping[str, torch.Tensor]
Key = tuple[str, int]
Plan = Sequence[tuple[Example, int]]  # examples and the predicted tokens each one contributes


# --------------------------------------------------------------------------- options


@dataclass(frozen=True)
class FisherOptions:
    """How to estimate the Fisher diagonal. Validated on construction."""

    kinds: tuple[str, ...] = setting(
        ("true",),
        choices=lambda: KINDS,
        help="labels sampled from the model (true) and/or the data's labels (empirical)",
    )
    tokens: int = setting(FISHER_TOKENS, help="predicted tokens to use")
    seed: int = setting(0, help="seed of the data sample and of label sampling")
    damping: float = setting(
        1e-8, flag="--lambda", help="damping of the log-volume 1/2 sum log(F_ii + lambda)"
    )
    samples: int = setting(1, help="label draws per example for the true Fisher")

    def __post_init__(self) -> None:
        if not self.kinds:
            raise KappaTuneError("at least one Fisher kind is needed (true, empirical)")
        bad = [k for k in self.kinds if k not in KINDS]
        if bad:
            raise KappaTuneError(f"unknown Fisher kind {bad[0]!r} (known: {', '.join(KINDS)})")
        if len(set(self.kinds)) != len(self.kinds):
            raise KappaTuneError(f"Fisher kinds repeat: {', '.join(self.kinds)}")
        if self.tokens < 1:
            raise KappaTuneError(f"--tokens must be at least 1, got {self.tokens}")
        if not (math.isfinite(self.damping) and self.damping > 0.0):
            raise KappaTuneError(f"--lambda must be a positive finite number, got {self.damping}")
        if self.samples < 1:
            raise KappaTuneError(f"samples per example must be at least 1, got {self.samples}")

    def to_json(self) -> dict[str, Any]:
        return settings.to_json(self)

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> FisherOptions:
        return settings.from_json(cls, d, "Fisher options")


# --------------------------------------------------------------------------- objectives


class Objective(Protocol):
    """What a model predicts for one example, and the data's labels for it."""

    def count(self, example: Example) -> int:
        """Number of predicted positions with a label (without running the model)."""
        ...

    def predictions(
        self, model: torch.nn.Module, example: Example
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits ``(P, V)`` of the example's P positions and data labels ``(P,)`` (-100: ignore)."""
        ...


@runtime_checkable
class BatchedObjective(Objective, Protocol):
    """An objective that can also predict a batch of equally long examples in one pass."""

    def lead(self, examples: Sequence[Example]) -> tuple[int, ...]:
        """The leading (example, ...) dimensions of a batch's activations."""
        ...

    def batch_predictions(
        self, model: torch.nn.Module, examples: Sequence[Example]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits ``(B, P, V)`` and labels ``(B, P)`` of the batch."""
        ...


def _logits_of(output: object) -> torch.Tensor:
    logits = getattr(output, "logits", output)
    if isinstance(output, tuple | list):
        logits = output[0]
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"the model's forward returned {type(output).__name__}, not logits")
    return logits


@dataclass(frozen=True)
class CausalLMObjective:
    """Next-token prediction: logits at position t predict token t+1.

    An example holds ``input_ids`` (T,), optionally ``attention_mask`` (T,) (0 = padding) and
    ``labels`` (T,) aligned with the inputs as in Hugging Face (-100 = not predicted).
    """

    def _labels(self, example: Example) -> torch.Tensor:
        ids = example["input_ids"]
        labels = example.get("labels", ids).clone()
        mask = example.get("attention_mask")
        if mask is not None:
            labels[mask == 0] = IGNORE_INDEX
        return labels[1:]

    def count(self, example: Example) -> int:
        return int((self._labels(example) != IGNORE_INDEX).sum())

    def predictions(
        self, model: torch.nn.Module, example: Example
    ) -> tuple[torch.Tensor, torch.Tensor]:
        ids = example["input_ids"][None]
        mask = example.get("attention_mask")
        if mask is not None and bool((mask == 0).any()):
            output = model(ids, attention_mask=mask[None])
        else:
            output = model(ids)
        logits = _logits_of(output)[0, :-1]
        return logits, self._labels(example).to(logits.device)

    def lead(self, examples: Sequence[Example]) -> tuple[int, ...]:
        """The leading (example, position) dimensions of a batch's activations."""
        return (len(examples), int(examples[0]["input_ids"].shape[0]))

    def batch_predictions(
        self, model: torch.nn.Module, examples: Sequence[Example]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`predictions` of equally long examples in one pass: ``(B, P, V)``, ``(B, P)``."""
        ids = torch.stack([e["input_ids"] for e in examples])
        masks = [e.get("attention_mask") for e in examples]
        if any(m is not None and bool((m == 0).any()) for m in masks):
            mask = torch.stack([torch.ones_like(ids[0]) if m is None else m for m in masks])
            output = model(ids, attention_mask=mask)
        else:
            output = model(ids)
        logits = _logits_of(output)[:, :-1]
        labels = torch.stack([self._labels(e) for e in examples]).to(logits.device)
        return logits, labels


@dataclass(frozen=True)
class ClassifierObjective:
    """One prediction per example: ``inputs`` (any shape) and an integer ``labels`` scalar."""

    def count(self, example: Example) -> int:
        return int(int(example["labels"]) != IGNORE_INDEX)

    def predictions(
        self, model: torch.nn.Module, example: Example
    ) -> tuple[torch.Tensor, torch.Tensor]:
        logits = _logits_of(model(example["inputs"][None]))
        return logits.reshape(1, -1), example["labels"].reshape(1).to(logits.device)

    def lead(self, examples: Sequence[Example]) -> tuple[int, ...]:
        return (len(examples),)

    def batch_predictions(
        self, model: torch.nn.Module, examples: Sequence[Example]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        logits = _logits_of(model(torch.stack([e["inputs"] for e in examples])))
        labels = torch.stack([e["labels"].reshape(1) for e in examples])
        return logits.reshape(len(examples), 1, -1), labels.to(logits.device)


def examples_from_ids(
    input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
) -> list[dict[str, torch.Tensor]]:
    """Split a ``(N, T)`` batch of token ids (and mask) into N causal-LM examples."""
    if input_ids.ndim != 2:
        raise KappaTuneError(
            f"input_ids must be 2-D (sequences x tokens), got shape {tuple(input_ids.shape)}"
        )
    out = []
    for i in range(input_ids.shape[0]):
        ex = {"input_ids": input_ids[i]}
        if attention_mask is not None:
            ex["attention_mask"] = attention_mask[i]
        out.append(ex)
    return out


# --------------------------------------------------------------------------- results


@dataclass(frozen=True)
class FisherRow:
    """Fisher measures of one weight matrix (or one expert of a fused expert tensor)."""

    name: str
    expert: int | None
    numel: int
    sum: float
    mean: float
    logvol: float
    layer: int | None
    module_type: str

    def __post_init__(self) -> None:
        if self.numel < 1:
            raise ValueError(f"{self.name}: numel must be positive, got {self.numel}")

    @property
    def key(self) -> Key:
        return (self.name, -1 if self.expert is None else self.expert)

    def measure(self, measure: str) -> float:
        if measure not in MEASURES:
            raise KappaTuneError(
                f"unknown Fisher measure {measure!r} (known: {', '.join(MEASURES)})"
            )
        return float(getattr(self, measure))

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        for f in MEASURES:
            d[f] = encode_float(d[f])
        return d

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> FisherRow:
        return cls(
            name=str(d["name"]),
            expert=None if d.get("expert") is None else int(d["expert"]),
            numel=int(d["numel"]),
            layer=None if d.get("layer") is None else int(d["layer"]),
            module_type=str(d["module_type"]),
            **{f: decode_float(d[f]) for f in MEASURES},
        )


@dataclass(frozen=True)
class FisherResult:
    """Per-tensor Fisher rows of one kind, with what they were computed from."""

    kind: str
    tokens: int
    examples: int
    options: FisherOptions
    rows: tuple[FisherRow, ...]
    schema_version: int = SCHEMA_VERSION
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise KappaTuneError(f"unknown Fisher kind {self.kind!r} (known: {', '.join(KINDS)})")

    def scores(self, measure: str = "mean") -> dict[Key, float]:
        """``{(name, expert or -1): value}``: the keys of ``SpectrumRow.key``."""
        return {r.key: r.measure(measure) for r in self.rows}

    def to_json(self) -> dict[str, Any]:
        return {
            "schema_version": self.schema_version,
            "kind": self.kind,
            "tokens": self.tokens,
            "examples": self.examples,
            "options": self.options.to_json(),
            "rows": [r.to_json() for r in self.rows],
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> FisherResult:
        check_schema(d, "Fisher", SCHEMA_VERSION)
        try:
            return cls(
                kind=str(d["kind"]),
                tokens=int(d["tokens"]),
                examples=int(d["examples"]),
                options=FisherOptions.from_json(d["options"]),
                rows=tuple(FisherRow.from_json(r) for r in d["rows"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise KappaTuneError(f"malformed Fisher JSON: {exc}") from None


# --------------------------------------------------------------------------- planning


def candidate_parameters(
    model: torch.nn.Module, only: Collection[str] | None = None
) -> list[tuple[str, torch.nn.Parameter]]:
    """Floating-point parameters with ndim >= 2 (the tensors kappa is defined for), in model order.

    ``only`` restricts them to the given names (e.g. the rows of an analysis); names it lists
    that the model lacks are an error, so Fisher rows always align with the spectra.
    """
    params = [
        (n, p)
        for n, p in model.named_parameters()
        if p.ndim >= 2 and p.numel() > 0 and p.is_floating_point()
    ]
    if only is not None:
        wanted = set(only)
        missing = sorted(wanted - {n for n, _ in params})
        if missing:
            shown = ", ".join(missing[:3]) + (
                f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
            )
            raise KappaTuneError(
                f"{len(missing)} analysed tensors are not matrix parameters of the model: {shown}"
            )
        params = [(n, p) for n, p in params if n in wanted]
    if not params:
        total = sum(1 for _ in model.named_parameters())
        raise KappaTuneError(
            f"the model has no candidate tensors (floating-point, ndim >= 2) among its {total} parameters"
        )
    return params


def plan_examples(
    examples: Sequence[Example], objective: Objective, tokens: int
) -> list[tuple[Example, int]]:
    """The examples to use, in order, each with how many of its labelled positions count.

    The last one may be cut so exactly ``tokens`` positions are used. Too little data raises.
    """
    plan: list[tuple[Example, int]] = []
    used = 0
    for ex in examples:
        if used >= tokens:
            break
        n = objective.count(ex)
        if n == 0:
            continue
        take = min(n, tokens - used)
        plan.append((ex, take))
        used += take
    if used < tokens:
        raise KappaTuneError(
            f"the data has {used} predicted tokens in {len(examples)} examples,"
            f" fewer than the token budget of {tokens} (lower --tokens or add data)"
        )
    return plan


def _limit_labels(labels: torch.Tensor, take: int) -> torch.Tensor:
    """Keep the first ``take`` labelled positions, ignore the rest."""
    valid = labels != IGNORE_INDEX
    keep = valid & (torch.cumsum(valid.long(), 0) <= take)
    return torch.where(keep, labels, torch.full_like(labels, IGNORE_INDEX))


@contextmanager
def _grad_only_for(model: torch.nn.Module, params: Sequence[torch.nn.Parameter]) -> Iterator[None]:
    """Gradients for ``params`` only, eval mode; everything restored afterwards."""
    chosen = {id(p) for p in params}
    saved = [(p, p.requires_grad) for p in model.parameters()]
    was_training = model.training
    try:
        for p, _ in saved:
            p.requires_grad_(id(p) in chosen)
        model.eval()
        yield
    finally:
        for p, flag in saved:
            p.requires_grad_(flag)
        model.train(was_training)


# --------------------------------------------------------------------------- the estimator


def _accumulate(
    acc: list[torch.Tensor],
    loss: torch.Tensor,
    params: Sequence[torch.Tensor],
    weight: float,
    retain: bool,
) -> None:
    grads = torch.autograd.grad(loss, list(params), retain_graph=retain, allow_unused=True)
    for a, g in zip(acc, grads, strict=True):
        if g is not None:
            a.addcmul_(g, g, value=weight)


def _example_step(
    model: torch.nn.Module,
    objective: Objective,
    example: Example,
    take: int,
    params: Sequence[torch.Tensor],
    accs: Mapping[str, list[torch.Tensor]],
    options: FisherOptions,
    generator: torch.Generator,
) -> None:
    logits, labels = objective.predictions(model, example)
    labels = _limit_labels(labels, take)
    valid = labels != IGNORE_INDEX
    chosen = logits[valid]
    logp = torch.log_softmax(chosen.to(torch.promote_types(chosen.dtype, torch.float32)), dim=-1)
    passes: list[tuple[str, torch.Tensor, float]] = []
    if "empirical" in options.kinds:
        target = labels[valid].unsqueeze(1)
        passes.append(("empirical", logp.gather(1, target).sum(), 1.0))
    if "true" in options.kinds:
        probs = logp.detach().exp()
        for _ in range(options.samples):
            target = torch.multinomial(probs, 1, generator=generator)
            passes.append(("true", logp.gather(1, target).sum(), 1.0 / options.samples))
    for i, (kind, loss, weight) in enumerate(passes):
        _accumulate(accs[kind], loss, params, weight, retain=i < len(passes) - 1)


def _log_volume(f: torch.Tensor, damping: float, chunk: int = 1 << 22) -> float:
    """1/2 sum log(f + damping) in float64, a chunk at a time (no full float64 copy)."""
    total = 0.0
    for part in f.reshape(-1).split(chunk):
        total += float(torch.log(part.double() + damping).sum())
    return 0.5 * total


def _measure_of(f: torch.Tensor, measure: str, damping: float) -> float:
    if measure == "sum":
        return float(torch.sum(f, dtype=torch.float64))
    if measure == "mean":
        return float(torch.mean(f, dtype=torch.float64))
    return _log_volume(f, damping)


def _rows_of(name: str, diag: torch.Tensor, damping: float) -> list[FisherRow]:
    if names.is_fused_experts(name, diag.ndim):
        parts: list[tuple[int | None, torch.Tensor]] = [(e, diag[e]) for e in range(diag.shape[0])]
    else:
        parts = [(None, diag)]
    rows = []
    for expert, part in parts:
        rows.append(
            FisherRow(
                name=name,
                expert=expert,
                numel=int(part.numel()),
                sum=_measure_of(part, "sum", damping),
                mean=_measure_of(part, "mean", damping),
                logvol=_measure_of(part, "logvol", damping),
                layer=names.layer_index(name),
                module_type=names.module_type(name),
            )
        )
    return rows


@dataclass(frozen=True)
class FisherDiagonals:
    """Raw diagonal estimates ``F_hat`` per kind, keyed by parameter name (model order)."""

    tensors: dict[str, dict[str, torch.Tensor]]
    tokens: int
    examples: int
    options: FisherOptions


def fisher_diagonals(
    model: torch.nn.Module,
    examples: Sequence[Example],
    options: FisherOptions | None = None,
    *,
    objective: Objective | None = None,
    only: Collection[str] | None = None,
    progress: ProgressHook | None = None,
    batch_size: int = FISHER_BATCH,
) -> FisherDiagonals:
    """The diagonal Fisher estimate of every candidate tensor, for each kind in ``options``.

    ``examples`` are single examples (see :class:`CausalLMObjective`; :func:`examples_from_ids`
    splits a batch). They are used in order until ``options.tokens`` predicted tokens are
    consumed. ``progress(done, total)`` is called with token counts. Deterministic for a seed
    (on a given device and thread count). The model's gradients, ``requires_grad`` flags and
    train/eval mode are left as they were. Accumulators are float32 (float64 for float64 models).

    ``batch_size`` examples share a forward and backward pass and each one's gradient is rebuilt
    from the pass (:mod:`kappatune.analysis.fisher_batched`); weights that cannot be, and every weight
    when ``batch_size`` is 1, take one backward pass per example. Both give the same estimate
    (same labels for a seed) up to floating-point rounding.
    """
    options = options or FisherOptions()
    objective = objective or CausalLMObjective()
    if batch_size < 1:
        raise KappaTuneError(f"the Fisher batch size must be at least 1, got {batch_size}")
    named = candidate_parameters(model, only)
    plan = plan_examples(examples, objective, options.tokens)
    accs = {
        kind: {
            n: torch.zeros_like(p, dtype=torch.promote_types(p.dtype, torch.float32))
            for n, p in named
        }
        for kind in options.kinds
    }
    log.info(
        "Fisher (%s) of %d tensors over %d tokens in %d examples",
        "+".join(options.kinds),
        len(named),
        options.tokens,
        len(plan),
    )
    if progress is not None:
        progress(0, options.tokens)
    looped = [n for n, _ in named]
    with _grad_only_for(model, [p for _, p in named]):
        if batch_size > 1 and isinstance(objective, BatchedObjective):
            from kappatune.analysis.fisher_batched import run_batched

            looped = run_batched(model, named, plan, objective, options, accs, batch_size, progress)
        if looped:
            rest = [(n, p) for n, p in named if n in set(looped)]
            whole = len(rest) == len(named)
            _run_loop(model, rest, plan, objective, options, accs, progress if whole else None)
    tensors = {
        kind: {name: accs[kind][name].div_(options.tokens) for name, _ in named}
        for kind in options.kinds
    }
    return FisherDiagonals(tensors, options.tokens, len(plan), options)


def _run_loop(
    model: torch.nn.Module,
    named: Sequence[tuple[str, torch.nn.Parameter]],
    plan: Plan,
    objective: Objective,
    options: FisherOptions,
    accs: Mapping[str, Mapping[str, torch.Tensor]],
    progress: ProgressHook | None,
) -> None:
    """One forward and backward pass per example, for the weights in ``named``."""
    params = [p for _, p in named]
    device = params[0].device
    generator = torch.Generator(device=device).manual_seed(options.seed)
    lists = {kind: [accs[kind][n] for n, _ in named] for kind in options.kinds}
    done = 0
    with _grad_only_for(model, params):
        for example, take in plan:
            ex = {k: v.to(device) for k, v in example.items()}
            _example_step(model, objective, ex, take, params, lists, options, generator)
            done += take
            if progress is not None:
                progress(done, options.tokens)


def summarize(diagonals: FisherDiagonals) -> dict[str, FisherResult]:
    """Per-tensor (per-expert) sum, mean and log-volume of each kind's diagonal."""
    damping = diagonals.options.damping
    return {
        kind: FisherResult(
            kind=kind,
            tokens=diagonals.tokens,
            examples=diagonals.examples,
            options=diagonals.options,
            rows=tuple(row for name, f in per_name.items() for row in _rows_of(name, f, damping)),
        )
        for kind, per_name in diagonals.tensors.items()
    }


def compute_fisher(
    model: torch.nn.Module,
    examples: Sequence[Example],
    options: FisherOptions | None = None,
    *,
    objective: Objective | None = None,
    only: Collection[str] | None = None,
    progress: ProgressHook | None = None,
    batch_size: int = FISHER_BATCH,
) -> dict[str, FisherResult]:
    """:func:`fisher_diagonals` summarized per tensor: one :class:`FisherResult` per kind."""
    diagonals = fisher_diagonals(
        model, examples, options, objective=objective, only=only, progress=progress,
        batch_size=batch_size,
    )  # fmt: skip
    return summarize(diagonals)


def row_scores(
    parts: Mapping[Key, Part],
    diagonals: Mapping[str, torch.Tensor],
    rows: Sequence[SpectrumRow],
    measure: str,
    damping: float,
) -> dict[Key, float]:
    """The Fisher measure of each analysed matrix, keyed like ``SpectrumRow.key``.

    ``parts`` (from :func:`kappatune.training.layout.locate_entries`) place each row, named as in the
    checkpoint, in a model parameter: the tensor, one expert, or an expert's gate or up rows
    where transformers fused them at load time.
    """
    out: dict[Key, float] = {}
    for r in rows:
        part = parts[r.key]
        f = diagonals[part.param]
        if part.expert is not None:
            f = f[part.expert]
        if part.rows is not None:
            f = f[part.rows[0] : part.rows[1]]
        out[r.key] = _measure_of(f, measure, damping)
    return out


def fisher_scores(
    model: torch.nn.Module,
    examples: Sequence[Example],
    *,
    kind: str = "true",
    measure: str = "mean",
    tokens: int = 4096,
    seed: int = 0,
    damping: float = 1e-8,
    objective: Objective | None = None,
    only: Collection[str] | None = None,
    rows: Sequence[SpectrumRow] | None = None,
    progress: ProgressHook | None = None,
    batch_size: int = FISHER_BATCH,
) -> dict[Key, float]:
    """``{(name, expert or -1): Fisher measure}`` for the ``fisher`` selection policy.

    With ``rows`` (an analysis of the checkpoint files), the scores are those rows' (see
    :func:`row_scores`) and only the parameters they live in are measured.
    """
    options = _score_options(kind, measure, tokens, seed, damping)
    return _fisher_scores(
        model, examples, options, measure, rows=rows, progress=progress, objective=objective,
        only=only, batch_size=batch_size,
    )  # fmt: skip


def _score_options(
    kind: str, measure: str, tokens: int, seed: int, damping: float
) -> FisherOptions:
    if measure not in MEASURES:
        raise KappaTuneError(f"unknown Fisher measure {measure!r} (known: {', '.join(MEASURES)})")
    return FisherOptions(kinds=(kind,), tokens=tokens, seed=seed, damping=damping)


def _fisher_scores(
    model: torch.nn.Module,
    examples: Sequence[Example],
    options: FisherOptions,
    measure: str,
    *,
    rows: Sequence[SpectrumRow] | None,
    progress: ProgressHook | None,
    objective: Objective | None = None,
    only: Collection[str] | None = None,
    batch_size: int = FISHER_BATCH,
) -> dict[Key, float]:
    """:func:`fisher_scores` with its options built (and checked) already."""
    (kind,) = options.kinds
    if rows is None:
        result = compute_fisher(
            model, examples, options, objective=objective, only=only, progress=progress,
            batch_size=batch_size,
        )  # fmt: skip
        return result[kind].scores(measure)
    from kappatune.selection.core import SelectionEntry
    from kappatune.training.layout import locate_entries

    parts = locate_entries(model, [SelectionEntry.of(r) for r in rows])
    params = sorted({p.param for p in parts.values()})
    diagonals = fisher_diagonals(
        model, examples, options, objective=objective, only=params, progress=progress,
        batch_size=batch_size,
    )  # fmt: skip
    return row_scores(parts, diagonals.tensors[kind], rows, measure, options.damping)


def examples_from_tokenized(data: TokenizedData) -> list[dict[str, torch.Tensor]]:
    """Causal-LM examples from :class:`kappatune.training.data.TokenizedData` rows (labels kept)."""
    return [
        {
            "input_ids": data.input_ids[i],
            "attention_mask": data.attention_mask[i],
            "labels": data.labels[i],
        }
        for i in range(len(data))
    ]


def load_model_and_examples(
    model_spec: str | os.PathLike[str],
    data_files: Sequence[str | os.PathLike[str]],
    *,
    seq_len: int = 128,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.nn.Module, list[dict[str, torch.Tensor]], dict[str, int]]:
    """The model (eval mode) and its data packed into ``seq_len`` rows, each starting with what
    the tokenizer puts first (BOS for Gemma), with counts ``{"sequences", "label_tokens"}``."""
    from kappatune.training.data import PackConfig, load_tokenized
    from kappatune.training.models import load_causal_lm

    pack = PackConfig(seq_len=seq_len)  # validated before anything heavy is loaded
    model, tokenizer = load_causal_lm(model_spec, dtype=dtype)
    data = load_tokenized(list(data_files), tokenizer, pack)
    examples = examples_from_tokenized(data)
    stats = {
        "sequences": len(data),
        "label_tokens": sum(CausalLMObjective().count(e) for e in examples),
    }
    return model, examples, stats


def fisher_scores_for(
    model_spec: str | os.PathLike[str],
    data_files: Sequence[str | os.PathLike[str]],
    *,
    kind: str = "true",
    measure: str = "mean",
    tokens: int = 4096,
    seq_len: int = 128,
    seed: int = 0,
    damping: float = 1e-8,
    rows: Sequence[SpectrumRow] | None = None,
    progress: ProgressHook | None = None,
) -> dict[Key, float]:
    """Fisher scores of a causal LM (built-in name, .gguf, directory, cached HF id) on data files.

    Loads the model in float32 (:func:`kappatune.training.models.load_causal_lm`), packs the text/JSONL
    files into ``seq_len`` rows with :mod:`kappatune.training.data` (BOS first in each row), and returns
    :func:`fisher_scores` keyed like ``SpectrumRow.key``. For the select/train/bench commands.
    """
    options = _score_options(kind, measure, tokens, seed, damping)  # before anything heavy
    model, examples, _ = load_model_and_examples(model_spec, data_files, seq_len=seq_len)
    return _fisher_scores(model, examples, options, measure, rows=rows, progress=progress)
