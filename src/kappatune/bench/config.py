"""The bench's settings (:class:`BenchSettings`, :class:`EvalSizes`), declared once and importable
without torch: ``kappatune bench``'s flags, its JSON and every run's key are derived from them.

A field changes results, and so is in the run key, unless its metadata says ``key=False`` with
why (see :data:`NOT_IN_KEY`).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from kappatune import settings
from kappatune.bench.arms import DEFAULT_ARMS as DEFAULT_ARMS  # the arms' own registry
from kappatune.constants import KAPPA_LORA_FRACTION
from kappatune.devices import DEVICES
from kappatune.errors import KappaTuneError
from kappatune.settings import setting

if TYPE_CHECKING:
    from kappatune.bench.arms import Arm
    from kappatune.selection.budget import Budget

DTYPE_NAMES = ("float32", "bfloat16", "float16")


def _arm_names() -> tuple[str, ...]:
    """The registered arms (:mod:`kappatune.bench.arms` loads no torch): ``--arms`` choices."""
    from kappatune.bench.arms import arm_names

    return arm_names()


def lr_grid_around(lr: float, count: int = 3, span: float = 10.0) -> tuple[float, ...]:
    """``count`` learning rates spread evenly in log space over ``span`` x, centred on ``lr``
    (3 significant digits): 1e-4 -> 3.16e-05, 0.0001, 0.000316."""
    if count == 1:
        return (lr,)
    lo = math.log10(lr) - math.log10(span) / 2
    step = math.log10(span) / (count - 1)
    return tuple(float(f"{10 ** (lo + i * step):.3g}") for i in range(count))


def checkpoint_steps(steps: int, count: int, at: Sequence[int] = ()) -> tuple[int, ...]:
    """``count`` steps spread evenly over a run of ``steps``, the last one at the end; or the
    steps ``at`` when given (increasing, the last one ``steps``: a run ends at its last point)."""
    if steps < 1:
        raise KappaTuneError(f"--steps must be at least 1, got {steps}")
    if at:
        shown = " ".join(map(str, at))
        if any(b <= a for a, b in itertools.pairwise(at)) or at[0] < 1:
            raise KappaTuneError(f"--checkpoint-at {shown}: steps must be positive and increasing")
        if at[-1] != steps:
            raise KappaTuneError(
                f"--checkpoint-at {shown}: the last checkpoint must be the run's end (--steps"
                f" {steps})"
            )
        return tuple(at)
    if not 1 <= count <= steps:
        raise KappaTuneError(
            f"--checkpoints {count} must be between 1 and --steps {steps} (one evaluation per step at most)"
        )
    return tuple(round(steps * (i + 1) / count) for i in range(count))


@dataclass(frozen=True)
class EvalSizes:
    """How much data each run trains on and is evaluated on."""

    seq_len: int = setting(64, help="tokens per packed training and held-out text row")
    task_sequences: int = setting(32, help="held-out rows for perplexity tasks")
    task_examples: int = setting(100, help="held-out examples for label tasks")
    control_sequences: int = setting(64, help="control rows (at least 10 for the noise floor)")
    max_row_len: int = setting(512, help="longest prompt+completion row allowed")
    knowledge_questions: int = setting(400, help="built-in knowledge questions")
    control_seq_len: int = setting(  # a row's first tokens, without context, dominate short rows
        256, help="tokens per packed control text row"
    )

    def __post_init__(self) -> None:
        for name in ("seq_len", "control_seq_len"):
            if getattr(self, name) < 4:
                flag = "--" + name.replace("_", "-")
                raise KappaTuneError(f"{flag} must be at least 4, got {getattr(self, name)}")
        for name in ("task_sequences", "task_examples", "control_sequences", "knowledge_questions"):
            if getattr(self, name) < 1:
                raise KappaTuneError(f"{name.replace('_', '-')} must be at least 1")
        if self.max_row_len < self.seq_len:
            raise KappaTuneError(
                f"max row length {self.max_row_len} is below --seq-len {self.seq_len}"
            )


_RUN_OWN = "the run's own {} is in the key"
_REPORTED = "read off the stored points when reporting"


@dataclass(frozen=True)
class BenchSettings:
    """Everything but the scenarios. Every field changes results unless it is listed in
    :data:`NOT_IN_KEY` (see :func:`kappatune.bench.run.run_key`)."""

    model: str = setting(
        "gemma-3-270m", help="causal LM: built-in name, directory, .gguf, cached hub id"
    )
    arms: tuple[str, ...] = setting(
        DEFAULT_ARMS,
        help="arms to train (listed below)",
        choices=_arm_names,
        metavar="ARM",
        key=False,
        why="the other arms run do not change this arm's runs (the arm is in the key)",
    )
    seeds: tuple[int, ...] = setting(
        (0, 1, 2),
        help="seeds; same seed = same data order",
        key=False,
        why=_RUN_OWN.format("seed"),
    )
    steps: int = setting(16, help="training steps per run")
    checkpoints: int = setting(4, help="evaluations per run, evenly spaced, the last at the end")
    checkpoint_at: tuple[int, ...] = setting(  # in the key only when given: older keys hold
        (),
        type=int,
        nargs="+",
        metavar="STEP",
        help="evaluate at these steps instead (increasing, the last = --steps), e.g. 16 32 64"
        " 128 256",
        key="set",
    )
    keep_state: bool = setting(
        False,
        help="keep each run's training state at every checkpoint (its trained tensors and"
        " AdamW's moments, under OUTPUT/state), so an interrupted run goes on from its last"
        " checkpoint instead of step 0",
        key=False,
        why="a run resumed from its kept state gives the numbers of an uninterrupted one",
    )
    lr_grid: tuple[tuple[str, tuple[float, ...]], ...] = setting(  # per-arm overrides
        (),
        flag="--lr-grid",
        type=str,
        nargs="+",
        metavar="[ARM=]LR,LR,...",
        help="learning rates per arm, e.g. full=1e-5,3e-5,1e-4 (default: --lr-count over 10x"
        " around each arm's usual rate)",
        key=False,
        why=_RUN_OWN.format("learning rate"),
    )
    lr_count: int = setting(  # default grid: this many rates over 10x around the arm's rate
        3,
        help="learning rates in the default grid",
        key=False,
        why=_RUN_OWN.format("learning rate"),
    )
    warmups: tuple[tuple[str, int], ...] = setting(  # in the key: the run's own arm's entry
        (),
        flag="--warmup",
        type=str,
        nargs="+",
        metavar="[ARM=]N",
        help="warm-up steps, e.g. --warmup full=4",
    )
    budget: str = setting(
        "2%",
        flag="--budget-params",
        help="trainable-parameter budget shared by all arms: N, 2.5M or P% of the model",
    )
    batch_size: int = setting(4, help="training rows per step")
    eval_batch_size: int = setting(4, help="rows per evaluation forward pass")
    sizes: EvalSizes = setting(
        default_factory=EvalSizes, cli=False, help="data sizes (their own flags)"
    )
    knowledge: str = setting(
        "builtin:dictd",
        metavar="builtin:dictd|FILE.jsonl|none",
        help="knowledge-retention questions: builtin:dictd (Debian's dict-elements and"
        " dict-gcide), a JSONL file, or none",
    )
    knowledge_seed: int = setting(0, help="seed of the built-in questions' choice and distractors")
    lora_fraction: float = setting(
        KAPPA_LORA_FRACTION, help="fraction of linear layers KappaTune-LoRA adapts"
    )
    fisher_tokens: int = setting(1024, help="training tokens for the fisher arm's scores")
    weight_decay: float = setting(0.0, cli=False, help="AdamW weight decay of every arm")
    max_grad_norm: float = setting(1.0, cli=False, help="gradient clipping of every arm")
    dtype: str = setting("float32", choices=lambda: DTYPE_NAMES, help="weights' dtype")
    autocast: bool = setting(  # bfloat16 autocast of the training steps (evaluation stays full)
        False,
        choices={"off": False, "bf16": True},
        help="bfloat16 autocast of training steps",
    )
    device: str = setting("auto", choices=lambda: DEVICES, help="where to train and evaluate")
    reference: str = setting(
        "kappa",
        help="the arm every other arm is compared with (the first arm when it does not run)",
        key=False,
        why=_REPORTED,
    )
    forgetting_budget: float = setting(  # headline 2: control perplexity up at most this many %
        1.0,
        help="headline 2: best gain with control ppl up at most this %",
        key=False,
        why=_REPORTED,
    )
    bootstrap: int = setting(
        1000,
        help="bootstrap resamples for intervals and noise floors",
        key=False,
        why="resamples for the reported intervals, computed from the stored points",
    )
    kl_cache_mb: float = setting(
        1024.0,
        help="memory for the base model's control log-probabilities; beyond it they are recomputed",
        key=False,
        why="cached or recomputed, the base log-probabilities are the same numbers",
    )

    def __post_init__(self) -> None:
        if not self.arms:
            raise KappaTuneError("no arms to run (the base model is always measured)")
        dupes = sorted({a for a in self.arms if self.arms.count(a) > 1})
        if dupes:
            raise KappaTuneError(f"arm(s) listed twice: {', '.join(dupes)}")
        from kappatune.bench import arms as arms_mod

        for a in self.arms:
            if a == "base":
                raise KappaTuneError("'base' is always measured; do not list it in --arms")
            arms_mod.get_arm(a)
        if len(self.seeds) < 1 or len(set(self.seeds)) != len(self.seeds):
            raise KappaTuneError(f"--seeds must be distinct integers, got {list(self.seeds)}")
        for seed in self.seeds:
            settings.check_seed(seed, "--seeds")
        settings.check_seed(self.knowledge_seed, "--knowledge-seed")
        for label, pairs in (("--lr-grid", self.lr_grid), ("--warmup", self.warmups)):
            for arm, value in pairs:
                if arm not in self.arms:
                    raise KappaTuneError(f"{label} {arm}={value}: {arm!r} is not among --arms")
        for arm, grid in self.lr_grid:
            if not grid or any(not (lr > 0 and math.isfinite(lr)) for lr in grid):
                shown = ",".join(f"{x:g}" for x in grid)
                raise KappaTuneError(
                    f"--lr-grid {arm}={shown}: every learning rate must be positive"
                )
            if len(set(grid)) != len(grid):
                raise KappaTuneError(f"--lr-grid {arm}: a learning rate is listed twice")
        if self.lr_count < 1:
            raise KappaTuneError(f"--lr-count must be at least 1, got {self.lr_count}")
        if self.batch_size < 1 or self.eval_batch_size < 1:
            raise KappaTuneError("batch sizes must be at least 1")
        if self.dtype not in DTYPE_NAMES:
            raise KappaTuneError(
                f"--dtype must be one of {', '.join(DTYPE_NAMES)}, got {self.dtype!r}"
            )
        if self.device not in DEVICES:
            raise KappaTuneError(f"--device must be auto, cpu or cuda, got {self.device!r}")
        if self.fisher_tokens < 1:
            raise KappaTuneError(f"--fisher-tokens must be at least 1, got {self.fisher_tokens}")
        arms_mod.get_arm(self.reference)  # a known arm (it may not run: then the first arm)
        if not self.forgetting_budget > 0:
            raise KappaTuneError("--forgetting-budget must be positive (percent of control ppl)")
        if self.bootstrap < 10:
            raise KappaTuneError("--bootstrap needs at least 10 resamples")
        self.checkpoint_steps()
        self.budget_spec()

    def budget_spec(self) -> Budget:
        from kappatune.selection.budget import Budget

        return Budget.parse_params(self.budget)

    def checkpoint_steps(self) -> tuple[int, ...]:
        return checkpoint_steps(self.steps, self.checkpoints, self.checkpoint_at)

    def lrs_for(self, name: str) -> tuple[float, ...]:
        from kappatune.bench import arms as arms_mod

        given = dict(self.lr_grid)
        if name in given:
            return tuple(given[name])
        return lr_grid_around(arms_mod.get_arm(name).lr, self.lr_count)

    def arm(self, name: str, lr: float | None = None) -> Arm:
        from kappatune.bench import arms as arms_mod

        warm = dict(self.warmups)
        return arms_mod.with_overrides(arms_mod.get_arm(name), lr, warm.get(name))

    def to_json(self) -> dict[str, Any]:
        """Every field (:func:`from_json` reads it back)."""
        return settings.to_json(self)

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> BenchSettings:
        return settings.from_json(cls, d, "bench settings")

    def resolved_json(self) -> dict[str, Any]:
        """The settings as the report shows them: every arm's learning rates and warm-up
        resolved, the data sizes inline."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "sizes":
                out.update(dataclasses.asdict(value))
            elif f.name == "lr_grid":
                out["lr_grid"] = {a: list(self.lrs_for(a)) for a in self.arms}
            elif f.name == "warmups":
                out["warmups"] = {a: self.arm(a).warmup for a in self.arms}
            elif isinstance(value, tuple):
                out[f.name] = list(value)
            else:
                out[f.name] = value
        return out


# ``kappatune bench --preset NAME``: flag values (each a flag's destination and its parsed form);
# the built-in defaults fill the rest, and a flag given on the command line always wins.
PRESETS: dict[str, dict[str, Any]] = {
    # 4 arms x 3 lrs x 3 seeds = 36 runs of 8 steps, each evaluated twice: 210-250 s a run on a
    # quiet 2-core CPU, about 2.5 h in all; an evaluation is ~75 s, ~55 of them the control's
    # 6120 tokens over a 262k vocabulary, what a paired floor under 1 % takes
    # (benchmarks/results/bench_cpu_gcide/RUN.md: the runs' timings)
    "cpu": {
        "scenarios": ["code"], "model": "gemma-3-270m", "arms": ["full", "lora", "kappa", "random"],
        "seeds": [0, 1, 2], "steps": 8, "checkpoints": 2, "lr_count": 3, "seq_len": 64,
        "batch_size": 4, "eval_batch_size": 8, "task_sequences": 12, "control_sequences": 24,
        "control_seq_len": 256, "knowledge_questions": 400, "kl_cache_mb": 6400.0,
    },
    # the long-run verdict: 256 steps (65,536 training tokens) per run, evaluated at 16, 32, 64,
    # 128 and 256 steps, each arm at two rates: its cpu-grid lowest and 1/sqrt(10) of it (at 8
    # steps the lowest rates gave every arm's best points; the lower one reaches the matched gain
    # only late). 5 arms x 2 lrs x 3 seeds x 2 scenarios = 60 runs, 12-30 min each on 2 cores:
    # it resumes per checkpoint (--keep-state), so spread it over sittings.
    "cpu-long": {
        "scenarios": ["code", "digits"], "model": "gemma-3-270m",
        "arms": ["full", "lora", "kappa", "corda-kpm", "osf"], "seeds": [0, 1, 2],
        "steps": 256, "checkpoints": 5, "checkpoint_at": [16, 32, 64, 128, 256],
        "lr_grid": ["full=1e-06,3.16e-06", "lora=3e-05,9.49e-05", "kappa=1e-05,3.16e-05",
                    "corda-kpm=2e-06,6.32e-06", "osf=5e-06,1.58e-05"],
        "keep_state": True, "seq_len": 64, "batch_size": 4, "eval_batch_size": 8,
        "task_sequences": 12, "control_sequences": 24, "control_seq_len": 256,
        "knowledge_questions": 400, "kl_cache_mb": 6400.0,
    },
    # one GPU: every arm, 5 learning rates over 30x, longer runs, larger evaluation sets
    "gpu": {
        "scenarios": ["code", "digits"], "model": "gemma-3-270m",
        "arms": ["full", "lora", "kappa", "kappa-lora", "random", "highest", "fisher"],
        "seeds": [0, 1, 2], "steps": 200, "checkpoints": 5, "lr_count": 5, "seq_len": 256,
        "control_seq_len": 256,
        "batch_size": 16, "eval_batch_size": 16, "task_sequences": 256, "task_examples": 500,
        "control_sequences": 512, "knowledge_questions": 1000, "fisher_tokens": 16384,
        "device": "cuda",
    },
}  # fmt: skip


# Settings that do not change one run's result, and why: everything else is in the run key.
NOT_IN_KEY = settings.non_key_fields(BenchSettings)
PER_ARM = {"warmups"}  # only the run's own arm's entry is in the key
