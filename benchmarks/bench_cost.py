"""Where the time of `kappatune bench --preset cpu` goes, and whether bfloat16 autocast helps.

On Gemma 3 270M and the built-in ``code`` scenario at the cpu preset's sizes, measures:

* the base model's evaluation: task perplexity, control perplexity, control perplexity + KL
  (the first pass fills the cache of base log-probabilities, a second pass reads it), the
  knowledge questions, and the noise floors these sets give;
* the KL's memory choice: base log-probabilities cached (MiB) against recomputed per batch (s);
* training step time of ``kappa`` and ``full`` in float32 and with bfloat16 autocast, and how
  far apart the two runs' evaluations land after the same steps.

    python benchmarks/bench_cost.py [--steps 4] [--control 48] [--task 24] [--questions 400]
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import shlex
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).parent / "results"


def timed(fn: Any) -> tuple[Any, float]:
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def main() -> int:
    from kappatune.bench import fronts, knowledge
    from kappatune.bench.arm_training import train_with_checkpoints
    from kappatune.bench.evaluate import BaseReference, control_eval
    from kappatune.bench.run import BenchSettings, Evaluator, arm_context, load_model
    from kappatune.bench.scenarios import builtin_scenario
    from kappatune.bench.tokenized import EvalSizes, prepare
    from kappatune.training.data import special_tokens
    from kappatune.training.loop import TrainConfig

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--control", type=int, default=48)
    ap.add_argument("--control-len", type=int, default=256, help="tokens per control row")
    ap.add_argument("--task", type=int, default=24)
    ap.add_argument("--questions", type=int, default=400)
    ap.add_argument("--out", type=Path, default=RESULTS / "bench_cost")
    args = ap.parse_args()

    sizes = EvalSizes(
        seq_len=64, task_sequences=args.task, control_sequences=args.control,
        knowledge_questions=args.questions, control_seq_len=args.control_len,
    )  # fmt: skip
    settings = BenchSettings(arms=("kappa", "full"), sizes=sizes, steps=args.steps, checkpoints=1)
    loaded, t_load = timed(lambda: load_model("gemma-3-270m", settings))
    scenario = builtin_scenario("code")
    prepared = prepare(scenario, scenario.load(), loaded.tokenizer, sizes)
    questions, t_questions = timed(
        lambda: knowledge.builtin_questions(
            args.questions, accept=knowledge.single_token(loaded.tokenizer)
        )
    )
    items = knowledge.tokenize_questions(
        loaded.tokenizer, questions, special_tokens(loaded.tokenizer).prefix
    )
    base = loaded.model
    pad = prepared.pad_id
    rows: dict[str, Any] = {"load + analyze (s)": t_load, "build questions (s)": t_questions}
    task, rows["task ppl (s)"] = timed(
        lambda: control_eval(base, prepared.task_sequences, pad_id=pad, batch_size=4)
    )
    ctl, rows["control ppl (s)"] = timed(
        lambda: control_eval(base, prepared.control, pad_id=pad, batch_size=4)
    )
    cached = BaseReference(base, pad, cache_mb=1e9)
    _, rows["control ppl + KL, filling the cache (s)"] = timed(
        lambda: control_eval(base, prepared.control, pad_id=pad, batch_size=4, base=cached)
    )
    _, rows["control ppl + KL, cached (s)"] = timed(
        lambda: control_eval(base, prepared.control, pad_id=pad, batch_size=4, base=cached)
    )
    rows["KL cache (MiB)"] = cached._used
    nocache = BaseReference(base, pad, cache_mb=0)
    _, rows["control ppl + KL, recomputed (s)"] = timed(
        lambda: control_eval(base, prepared.control, pad_id=pad, batch_size=4, base=nocache)
    )
    mc, rows["knowledge questions (s)"] = timed(
        lambda: knowledge.mc_accuracy(base, items, pad_id=pad, batch_size=16)
    )
    by_source: dict[str, list[bool]] = {}
    for q, hit in zip(questions, mc.correct, strict=True):
        by_source.setdefault(q.source, []).append(hit)
    floors = {
        "control sequences": len(prepared.control),
        "control tokens": sum(ctl.tokens),
        "control ppl": ctl.perplexity.perplexity,
        "control ppl noise floor (%)": fronts.ppl_noise_floor(ctl.nll_sums, ctl.tokens),
        "task sequences": len(prepared.task_sequences),
        "task ppl noise floor (%)": fronts.ppl_noise_floor(task.nll_sums, task.tokens),
        "knowledge questions": len(items),
        "knowledge accuracy": mc.accuracy,
        **{f"knowledge accuracy, {k}": sum(v) / len(v) for k, v in sorted(by_source.items())},
        "knowledge noise floor (pp)": fronts.accuracy_noise_floor(mc.correct),
    }

    evaluator = Evaluator(prepared, 4, cached, items)
    training: list[dict[str, Any]] = []
    for arm_name in ("kappa", "full"):
        arm = settings.arm(arm_name)
        finals = {}
        for autocast in (False, True):
            model = copy.deepcopy(base)
            from kappatune.bench import arms as arms_mod

            ready = arms_mod.prepare_arm(model, arm, arm_context(loaded, settings, 0))
            config = TrainConfig(steps=args.steps, lr=arm.lr, warmup_steps=arm.warmup,
                                 batch_size=4, seed=0)  # fmt: skip
            torch.manual_seed(0)
            trained = train_with_checkpoints(
                ready.model, ready.param_groups, prepared.train, config, (args.steps,),
                lambda m: evaluator(m), autocast=autocast,
            )  # fmt: skip
            m = trained.points[-1].metrics
            finals[autocast] = m
            training.append({
                "arm": arm_name, "autocast": "bf16" if autocast else "off",
                "s/step": trained.seconds_per_step,
                "task ppl": m.task["perplexity"], "control ppl": m.control["perplexity"],
                "KL": m.control["kl"], "knowledge": m.knowledge["accuracy"],
            })  # fmt: skip
            del model, ready
        _, evaluation = timed(lambda: evaluator(base))
        rows[f"one checkpoint evaluation (s), {arm_name} run"] = evaluation

    command = shlex.join(["python", "benchmarks/bench_cost.py", *sys.argv[1:]])
    lines = [
        "# Cost of `kappatune bench --preset cpu` on this machine",
        "",
        f"Command: `{command}`  ",
        f"Machine: {platform.processor() or platform.machine()}, torch threads"
        f" {torch.get_num_threads()}, {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC",
        "",
        "| measure | value |",
        "|---|---|",
        *[f"| {k} | {v:.4g} |" for k, v in {**rows, **floors}.items()],
        "",
        "| arm | autocast | s/step | task ppl | control ppl | KL | knowledge |",
        "|---|---|---|---|---|---|---|",
        *[
            f"| {t['arm']} | {t['autocast']} | {t['s/step']:.2f} | {t['task ppl']:.3f} |"
            f" {t['control ppl']:.3f} | {t['KL']:.5f} | {t['knowledge']:.3f} |"
            for t in training
        ],
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".md").write_text(text)
    args.out.with_suffix(".json").write_text(
        json.dumps(
            {"command": command, "times": rows, "floors": floors, "training": training}, indent=2
        )
        + "\n"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
