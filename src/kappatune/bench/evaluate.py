"""Metrics of the forgetting benchmark: token-weighted perplexity and label log-likelihood accuracy.

Perplexity is ``exp(sum of token NLL / number of real target tokens)`` over the whole set, with
padding masked (never a mean of per-batch means). Label accuracy compares the summed
log-likelihood of each option's tokens after the prompt (never a string match of one generated
token). Inputs are token ids: every sequence already carries the BOS token the model needs.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from kappatune.errors import KappaTuneError

IGNORE = -100
Progress = Callable[[int], None]


@dataclass(frozen=True)
class EvalSequence:
    """One evaluation sequence: token ids and, optionally, which positions are targets.

    ``targets[i]`` says whether token ``i`` is scored (predicted from tokens ``< i``); token 0
    is never scored. ``None`` scores every token after the first.
    """

    ids: tuple[int, ...]
    targets: tuple[bool, ...] | None = None

    def __post_init__(self) -> None:
        if len(self.ids) < 2:
            raise KappaTuneError(
                f"an evaluation sequence needs at least 2 tokens, got {len(self.ids)}"
            )
        if self.targets is not None and len(self.targets) != len(self.ids):
            raise KappaTuneError(
                f"target mask has {len(self.targets)} entries for {len(self.ids)} tokens"
            )


@dataclass(frozen=True)
class PerplexityResult:
    nll_sum: float
    tokens: int

    @property
    def mean_nll(self) -> float:
        return self.nll_sum / self.tokens if self.tokens else math.nan

    @property
    def perplexity(self) -> float:
        return math.exp(self.mean_nll) if self.tokens else math.nan


@dataclass(frozen=True)
class LabelExample:
    """A prompt (token ids, BOS first) and the index of its correct option."""

    prompt: tuple[int, ...]
    label: int

    def __post_init__(self) -> None:
        if not self.prompt:
            raise KappaTuneError("a label example needs a non-empty prompt")
        if self.label < 0:
            raise KappaTuneError(f"label index must be >= 0, got {self.label}")


@dataclass(frozen=True)
class LabelResult:
    correct: int
    total: int
    label_nll_sum: float  # sum over examples of -log p(correct option | prompt)
    predictions: tuple[int, ...]

    @property
    def accuracy(self) -> float:
        return self.correct / self.total if self.total else math.nan

    @property
    def label_nll(self) -> float:
        return self.label_nll_sum / self.total if self.total else math.nan


def model_device(model: torch.nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def accepts_logits_to_keep(model: torch.nn.Module) -> bool:
    """Whether ``model(..., logits_to_keep=positions)`` computes logits only where asked.

    A PEFT wrapper forwards extra keyword arguments to its base model, so the base decides.
    """
    get_base = getattr(model, "get_base_model", None)
    target = get_base() if callable(get_base) else model
    try:
        return "logits_to_keep" in inspect.signature(target.forward).parameters
    except (TypeError, ValueError):
        return False


def _pad(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(list(r), dtype=torch.long)
        mask[i, : len(r)] = 1
    return ids, mask


def _labels(batch: Sequence[EvalSequence], width: int) -> torch.Tensor:
    labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
    for i, s in enumerate(batch):
        row = torch.tensor(s.ids, dtype=torch.long)
        if s.targets is not None:
            row = row.masked_fill(~torch.tensor(s.targets, dtype=torch.bool), IGNORE)
        labels[i, 1 : len(s.ids)] = row[1:]
    return labels


def batch_nll(
    model: torch.nn.Module, batch: Sequence[EvalSequence], pad_id: int
) -> tuple[float, int]:
    """Summed NLL and number of scored tokens of one batch (pads and non-targets masked)."""
    device = model_device(model)
    ids, mask = _pad([s.ids for s in batch], pad_id)
    labels = _labels(batch, ids.shape[1])
    logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).logits
    target = labels[:, 1:].to(device)
    nll = torch.nn.functional.cross_entropy(
        logits[:, :-1].float().reshape(-1, logits.shape[-1]),
        target.reshape(-1),
        ignore_index=IGNORE,
        reduction="sum",
    )
    return float(nll), int((target != IGNORE).sum())


def perplexity(
    model: torch.nn.Module,
    sequences: Sequence[EvalSequence],
    *,
    pad_id: int,
    batch_size: int = 4,
    progress: Progress | None = None,
) -> PerplexityResult:
    """Token-weighted perplexity of ``sequences``: one NLL sum and one token count over the set."""
    if not sequences:
        raise KappaTuneError("perplexity needs at least one sequence")
    if batch_size < 1:
        raise KappaTuneError(f"evaluation batch size must be at least 1, got {batch_size}")
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        with torch.inference_mode():
            for start in range(0, len(sequences), batch_size):
                batch = sequences[start : start + batch_size]
                nll, n = batch_nll(model, batch, pad_id)
                total += nll
                count += n
                if progress is not None:
                    progress(len(batch))
    finally:
        model.train(was_training)
    return PerplexityResult(nll_sum=total, tokens=count)


# --------------------------------------------------------------------------- label options


def tokenize_options(tokenizer: object, options: Sequence[str]) -> tuple[tuple[int, ...], ...]:
    """Token ids of each option as it follows the prompt (no special tokens).

    Raises KappaTuneError when an option yields no tokens, contains the unknown token, or two
    options tokenize to the same ids (their likelihoods could not be told apart).
    """
    if len(options) < 2:
        raise KappaTuneError(f"a label task needs at least 2 options, got {len(options)}")
    unk = getattr(tokenizer, "unk_token_id", None)
    out: list[tuple[int, ...]] = []
    seen: dict[tuple[int, ...], str] = {}
    for option in options:
        ids = tuple(int(i) for i in tokenizer.encode(option, add_special_tokens=False))  # type: ignore[attr-defined]
        if not ids:
            raise KappaTuneError(f"label option {option!r} does not tokenize (no tokens)")
        if unk is not None and unk in ids:
            raise KappaTuneError(f"label option {option!r} tokenizes to the unknown token {unk}")
        if ids in seen:
            raise KappaTuneError(
                f"label options {seen[ids]!r} and {option!r} tokenize to the same ids {list(ids)}"
            )
        seen[ids] = option
        out.append(ids)
    return tuple(out)


Options = Sequence[tuple[int, ...]]  # the token ids of each answer option


@dataclass(frozen=True)
class OptionRow:
    """One forward row of option scoring: an item's prompt followed by one of its options."""

    ids: tuple[int, ...]
    item: int
    option: int  # -1: a prompt-only row that scores every single-token option at once


def _rows(examples: Sequence[LabelExample], options: Options) -> list[OptionRow]:
    if all(len(o) == 1 for o in options):
        return [OptionRow(ex.prompt, i, -1) for i, ex in enumerate(examples)]
    return [
        OptionRow(ex.prompt + opt, i, j)
        for i, ex in enumerate(examples)
        for j, opt in enumerate(options)
    ]


def option_row_scores(
    model: torch.nn.Module,
    rows: Sequence[OptionRow],
    prompts: Sequence[tuple[int, ...]],
    options: Sequence[Options],
    pad_id: int,
) -> list[list[float]]:
    """For each row: log-likelihood of its option (or of every option for a prompt-only row);
    ``prompts[i]`` and ``options[i]`` are item i's."""
    device = model_device(model)
    ids, mask = _pad([r.ids for r in rows], pad_id)
    # positions whose next-token distribution is needed: the last prompt token onwards
    needed: list[list[int]] = []
    for r in rows:
        p = len(prompts[r.item])
        length = 1 if r.option < 0 else len(options[r.item][r.option])
        needed.append(list(range(p - 1, p - 1 + length)))
    keep = sorted({pos for ps in needed for pos in ps})
    kwargs: dict[str, object] = {}
    if accepts_logits_to_keep(model):
        kwargs["logits_to_keep"] = torch.tensor(keep, dtype=torch.long, device=device)
        index = {pos: k for k, pos in enumerate(keep)}
    else:
        index = {pos: pos for pos in keep}
    out = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False, **kwargs)
    logp = torch.log_softmax(out.logits.float(), dim=-1)
    scores: list[list[float]] = []
    for b, (r, ps) in enumerate(zip(rows, needed, strict=True)):
        if r.option < 0:
            at = logp[b, index[ps[0]]]
            scores.append([float(at[o[0]]) for o in options[r.item]])
        else:
            toks = options[r.item][r.option]
            scores.append(
                [sum(float(logp[b, index[pos], t]) for pos, t in zip(ps, toks, strict=True))]
            )
    return scores


def option_scores(
    model: torch.nn.Module,
    rows: Sequence[OptionRow],
    prompts: Sequence[tuple[int, ...]],
    options: Sequence[Options],
    *,
    pad_id: int,
    batch_size: int,
    progress: Progress | None = None,
) -> list[list[float]]:
    """The log-likelihood of every option of every item (``[item][option]``), scoring
    ``rows`` in order, ``batch_size`` a pass, in eval mode (the model's mode is restored)."""
    table = [[-math.inf] * len(opts) for opts in options]
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for start in range(0, len(rows), batch_size):
                chunk = rows[start : start + batch_size]
                scored = option_row_scores(model, chunk, prompts, options, pad_id)
                for r, s in zip(chunk, scored, strict=True):
                    if r.option < 0:
                        table[r.item] = s
                    else:
                        table[r.item][r.option] = s[0]
                if progress is not None:
                    progress(len(chunk))
    finally:
        model.train(was_training)
    return table


def _argmax(scores: Sequence[float]) -> int:
    best = 0
    for j, v in enumerate(scores):
        if v > scores[best]:
            best = j
    return best


def label_accuracy(
    model: torch.nn.Module,
    examples: Sequence[LabelExample],
    options: Sequence[tuple[int, ...]],
    *,
    pad_id: int,
    batch_size: int = 8,
    progress: Progress | None = None,
) -> LabelResult:
    """Accuracy of argmax over options of the summed option-token log-likelihood after the prompt.

    Ties go to the lowest option index (deterministic). Also returns the mean NLL of the correct
    option, a smoother task metric than accuracy on small sets.
    """
    if not examples:
        raise KappaTuneError("label accuracy needs at least one example")
    if not options or any(not o for o in options):
        raise KappaTuneError("every label option needs at least one token")
    for ex in examples:
        if ex.label >= len(options):
            raise KappaTuneError(
                f"label index {ex.label} is out of range for {len(options)} options"
            )
    table = option_scores(
        model, _rows(examples, options), [ex.prompt for ex in examples], [options] * len(examples),
        pad_id=pad_id, batch_size=batch_size, progress=progress,
    )  # fmt: skip
    preds = tuple(_argmax(s) for s in table)
    correct = sum(int(p == ex.label) for p, ex in zip(preds, examples, strict=True))
    nll = -sum(table[i][ex.label] for i, ex in enumerate(examples))
    return LabelResult(correct=correct, total=len(examples), label_nll_sum=nll, predictions=preds)


# --------------------------------------------------------------------------- control: ppl + KL


@dataclass(frozen=True)
class ControlResult:
    """Per-sequence NLL sums and scored-token counts, and the summed per-token
    KL(base || model) over the full vocabulary (NaN when no base reference was given)."""

    nll_sums: tuple[float, ...]
    tokens: tuple[int, ...]
    kl_sum: float

    @property
    def perplexity(self) -> PerplexityResult:
        return PerplexityResult(sum(self.nll_sums), sum(self.tokens))

    @property
    def kl(self) -> float:
        n = sum(self.tokens)
        return self.kl_sum / n if n else math.nan


class BaseReference:
    """The base model's log-probabilities at the scored control positions, batch by batch.

    Kept in memory (float32) when they fit ``cache_mb``; otherwise recomputed from the base
    model for every batch (it stays loaded anyway: every arm trains a copy of it).
    """

    def __init__(self, model: torch.nn.Module, pad_id: int, cache_mb: float = 1024.0) -> None:
        self.model = model
        self.pad_id = pad_id
        self.cache_mb = cache_mb
        self._cache: dict[tuple[int, ...], torch.Tensor] = {}
        self._used = 0.0

    def log_probs(self, batch: Sequence[EvalSequence]) -> torch.Tensor:
        key = tuple(hash(s.ids) for s in batch)
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        with torch.inference_mode():
            logits, target = _logits_and_targets(self.model, batch, self.pad_id)
            out = torch.log_softmax(logits[target != IGNORE].float(), dim=-1)
        size = out.numel() * 4 / 2**20
        if self._used + size <= self.cache_mb:
            self._cache[key] = out
            self._used += size
        return out


def _logits_and_targets(
    model: torch.nn.Module, batch: Sequence[EvalSequence], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    device = model_device(model)
    ids, mask = _pad([s.ids for s in batch], pad_id)
    labels = _labels(batch, ids.shape[1])
    logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).logits
    return logits[:, :-1], labels[:, 1:].to(device)


KL_CHUNK = 16  # positions per step: 16 x a 262k vocabulary is 16 MiB, reused by the allocator


def _scored_nll_and_kl(
    logits: torch.Tensor, target: torch.Tensor, ref: torch.Tensor | None
) -> tuple[list[float], float]:
    """Per-row NLL sums over the scored positions of ``logits`` (batch, positions, vocab) and,
    given ``ref`` (the base model's log-probabilities at those positions, in row-major order),
    the summed KL(ref || model).

    The scored positions are taken a few at a time: whole-batch temporaries of the vocabulary's
    size (half a gigabyte per batch for a 262k vocabulary) cost more in fresh memory than in
    arithmetic. Sums are accumulated in float64.
    """
    rows, _, vocab = logits.shape  # a view (the last position cut off): indexed, not reshaped
    row_of, pos_of = (target != IGNORE).nonzero(as_tuple=True)  # row-major, as ``ref``
    picked_all = torch.empty(len(row_of), dtype=torch.float64, device=logits.device)
    if ref is not None and ref.shape != (len(row_of), vocab):
        raise KappaTuneError(
            f"base log-probabilities cover {tuple(ref.shape)}, not {len(row_of)} scored positions"
        )
    kl = torch.zeros((), dtype=torch.float64, device=logits.device)
    for start in range(0, len(row_of), KL_CHUNK):
        r_i, p_i = row_of[start : start + KL_CHUNK], pos_of[start : start + KL_CHUNK]
        logp = torch.log_softmax(logits[r_i, p_i].float(), dim=-1)
        picked_all[start : start + len(r_i)] = logp.gather(1, target[r_i, p_i].unsqueeze(1))[:, 0]
        if ref is not None:
            r = ref[start : start + len(r_i)].to(logp.device)
            kl += (r.exp() * (r - logp)).sum(dtype=torch.float64)
    sums = torch.zeros(rows, dtype=torch.float64, device=logits.device)
    sums.index_add_(0, row_of, -picked_all)
    return [float(x) for x in sums], float(kl) if ref is not None else 0.0


def control_eval(
    model: torch.nn.Module,
    sequences: Sequence[EvalSequence],
    *,
    pad_id: int,
    batch_size: int = 4,
    base: BaseReference | None = None,
) -> ControlResult:
    """Per-sequence token NLL and, against ``base``, the summed per-token KL(base || model)."""
    if not sequences:
        raise KappaTuneError("control evaluation needs at least one sequence")
    was = model.training
    model.eval()
    nlls: list[float] = []
    counts: list[int] = []
    kl = 0.0 if base is not None else math.nan
    try:
        with torch.inference_mode():
            for start in range(0, len(sequences), batch_size):
                batch = sequences[start : start + batch_size]
                logits, target = _logits_and_targets(model, batch, pad_id)
                ref = base.log_probs(batch) if base is not None else None
                sums, kl_batch = _scored_nll_and_kl(logits, target, ref)
                nlls.extend(float(x) for x in sums)
                counts.extend(int(n) for n in (target != IGNORE).sum(dim=1))
                kl += kl_batch
    finally:
        model.train(was)
    return ControlResult(tuple(nlls), tuple(counts), kl)
