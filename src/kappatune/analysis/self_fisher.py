"""Self-Fisher: the information in the weights measured on the model's own samples.

The Fisher diagonal of :mod:`kappatune.analysis.fisher` needs data that stands for what the model
should keep. Here the model supplies it: sequences are sampled from the base model itself
(each starts with BOS, then every token is drawn from the full predictive distribution at
temperature 1, no top-k or top-p, with a seeded generator), and the true Fisher diagonal is
measured on them (labels drawn again from the model at every position). No user data is read.

Two selection scores come from it (:mod:`kappatune.selection.core` policies ``self-fisher`` and
``interference``):

* the self-Fisher per parameter of each matrix (or expert): little of it means the model's
  own behaviour depends little on that matrix;
* the interference ratio ``task / (self + lambda)``: the squared gradient of the user's task
  data (empirical Fisher, mean per parameter) over the self-Fisher, large where the task pulls
  on a matrix the model's own behaviour hardly uses.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from kappatune.constants import FISHER_BATCH, SELF_FISHER_TOKENS
from kappatune.errors import KappaTuneError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from kappatune.analysis.fisher import Key, ProgressHook
    from kappatune.analysis.spectra import SpectrumRow

DEFAULT_TOKENS = SELF_FISHER_TOKENS  # benchmarks/results/self_fisher_stability.md
DEFAULT_SEQ_LEN = 128


@dataclass(frozen=True)
class SelfFisherOptions:
    """How many of the model's own tokens to sample and measure. Validated on construction."""

    tokens: int = DEFAULT_TOKENS
    seq_len: int = DEFAULT_SEQ_LEN
    seed: int = 0
    damping: float = 1e-8
    batch_size: int = FISHER_BATCH  # sequences sampled together

    def __post_init__(self) -> None:
        if self.tokens < 1:
            raise KappaTuneError(f"--self-fisher-tokens must be at least 1, got {self.tokens}")
        if self.seq_len < 2:
            raise KappaTuneError(
                f"the self-Fisher sequence length must be >= 2, got {self.seq_len}"
            )
        if self.batch_size < 1:
            raise KappaTuneError(f"the batch size must be at least 1, got {self.batch_size}")

    @property
    def sequences(self) -> int:
        """Sequences to sample: each predicts ``seq_len - 1`` tokens after its BOS."""
        return math.ceil(self.tokens / (self.seq_len - 1))


def check_generative(model: torch.nn.Module) -> None:
    """Raise unless ``model`` is a language model that can sample text."""
    can = getattr(model, "can_generate", None)
    if not callable(can) or not can():
        raise KappaTuneError(
            f"{type(model).__name__} cannot generate text: self-Fisher samples from the model,"
            " so it needs a causal language model (not an encoder)"
        )


def bos_of(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase | None = None) -> int:
    """The id every sample starts with: the tokenizer's BOS, else the config's, else EOS."""
    config = getattr(model, "config", None)
    for value in (
        getattr(tokenizer, "bos_token_id", None),
        getattr(config, "bos_token_id", None),
        getattr(config, "eos_token_id", None),
    ):
        if isinstance(value, list) and value:
            value = value[0]
        if isinstance(value, int):
            return value
    raise KappaTuneError("the model names no BOS (or EOS) token to start its samples with")


@torch.no_grad()
def sample_sequences(
    model: torch.nn.Module,
    count: int,
    seq_len: int,
    *,
    bos: int,
    seed: int = 0,
    batch_size: int = FISHER_BATCH,
) -> torch.Tensor:
    """``(count, seq_len)`` token ids: BOS, then ``seq_len - 1`` tokens drawn from the model.

    Temperature 1 over the whole vocabulary, one seeded generator, ``batch_size`` sequences
    sampled together with the model's key/value cache. The train/eval mode is restored.
    """
    check_generative(model)
    if count < 1:
        raise KappaTuneError(f"the number of sequences to sample must be at least 1, got {count}")
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    was_training = model.training
    model.eval()
    try:
        parts = []
        for lo in range(0, count, batch_size):
            n = min(batch_size, count - lo)
            parts.append(_sample_batch(model, n, seq_len, bos, generator, device))
    finally:
        model.train(was_training)
    return torch.cat(parts)


def _sample_batch(
    model: torch.nn.Module,
    n: int,
    seq_len: int,
    bos: int,
    generator: torch.Generator,
    device: torch.device,
) -> torch.Tensor:
    import inspect

    # transformers 5 calls the key/value cache ``cache``, earlier versions ``past_key_values``
    params = inspect.signature(model.forward).parameters
    key = "cache" if "cache" in params else "past_key_values"
    ids = torch.full((n, 1), bos, dtype=torch.long, device=device)
    step, past = ids, None
    for _ in range(seq_len - 1):
        out = model(input_ids=step, use_cache=True, **({key: past} if past is not None else {}))
        probs = torch.softmax(out.logits[:, -1].float(), dim=-1)
        step = torch.multinomial(probs, 1, generator=generator)
        ids = torch.cat([ids, step], dim=1)
        past = getattr(out, key, None)
    return ids.cpu()


def self_fisher_scores(
    model: torch.nn.Module,
    options: SelfFisherOptions | None = None,
    *,
    bos: int | None = None,
    measure: str = "mean",
    rows: Sequence[SpectrumRow] | None = None,
    only: Sequence[str] | None = None,
    progress: ProgressHook | None = None,
) -> dict[Key, float]:
    """``{(name, expert or -1): true Fisher measure}`` on ``options.tokens`` sampled tokens.

    Keys and ``rows``/``only`` as in :func:`kappatune.analysis.fisher.fisher_scores` (per expert for
    fused expert tensors). Deterministic for a seed on a given device and thread count.
    """
    from kappatune.analysis.fisher import examples_from_ids, fisher_scores

    options = options or SelfFisherOptions()
    check_generative(model)
    ids = sample_sequences(
        model,
        options.sequences,
        options.seq_len,
        bos=bos_of(model) if bos is None else bos,
        seed=options.seed,
        batch_size=options.batch_size,
    )
    return fisher_scores(
        model, examples_from_ids(ids), kind="true", measure=measure, tokens=options.tokens,
        seed=options.seed, damping=options.damping, only=only, rows=rows, progress=progress,
    )  # fmt: skip


def interference_scores(
    task: Mapping[Key, float], own: Mapping[Key, float], damping: float = 1e-8
) -> dict[Key, float]:
    """``task / (own + damping)`` for every key of ``own`` (both mean per parameter)."""
    missing = sorted(set(own) - set(task))
    if missing:
        raise KappaTuneError(f"{len(missing)} matrices have a self-Fisher but no task score")
    return {k: task[k] / (own[k] + damping) for k in own}


def policy_scores_for(
    policy: str,
    model_spec: str | os.PathLike[str],
    options: SelfFisherOptions,
    *,
    rows: Sequence[SpectrumRow] | None = None,
    task_files: Sequence[str | os.PathLike[str]] = (),
    task_scores: Mapping[Key, float] | None = None,
    task_tokens: int = 4096,
    progress: ProgressHook | None = None,
) -> dict[Key, float]:
    """Scores of a policy that needs self-Fisher (``self-fisher``, ``interference``) for a causal
    LM on disk.

    A policy that needs task Fisher too (``interference``) needs the task's squared gradients:
    ``task_scores`` (mean per parameter) or ``task_files`` packed like
    :func:`kappatune.analysis.fisher.load_model_and_examples`.
    """
    from kappatune.analysis.fisher import fisher_scores, load_model_and_examples
    from kappatune.selection.policies import policy_spec
    from kappatune.training.models import load_causal_lm

    spec = policy_spec(policy)
    if not spec.self_fisher:
        raise KappaTuneError(f"no self-Fisher scores for policy {policy!r}")
    if spec.task_fisher and task_scores is None and not task_files:
        raise KappaTuneError(f"policy {policy!r} needs task data (--fisher-data FILE...)")
    if task_files and task_scores is None:
        model, examples, _ = load_model_and_examples(
            model_spec, task_files, seq_len=options.seq_len
        )
        task_scores = fisher_scores(
            model, examples, kind="empirical", tokens=task_tokens, seed=options.seed,
            damping=options.damping, rows=rows,
        )  # fmt: skip
        tokenizer = None
    else:
        model, tokenizer = load_causal_lm(model_spec)
    own = self_fisher_scores(
        model, options, bos=bos_of(model, tokenizer), rows=rows, progress=progress
    )
    if not spec.task_fisher:
        return own
    assert task_scores is not None
    return interference_scores(task_scores, own, options.damping)
