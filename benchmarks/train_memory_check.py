"""Predicted training memory (``kappatune train --dry-run``) against measured peaks on Gemma 3 270M.

The measured figures are those of benchmarks/train_cost.py (results/train_cost.json): the
training peak RSS above the resident size before training (gradients, optimizer state,
activations, transients), and the training peak RSS itself. The prediction is
kappatune.training.memory's (what ``train --dry-run --device cpu`` prints), for the same four
arms with the same batch, sequence length, LoRA rank and budget, from the config alone (two
training steps simulated on the meta device); its runtime term is this process's resident
size with torch, transformers, PEFT and the tokenizer loaded, measured first.

    python benchmarks/train_memory_check.py
"""

from __future__ import annotations

import functools
import json
import shlex
import sys
from datetime import datetime, timezone
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
MB = 2**20


def _mb(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.0f}"


def main() -> int:
    from kappatune.analysis.spectra import AnalyzeOptions, analyze
    from kappatune.selection.budget import Budget, SelectOptions
    from kappatune.selection.core import select
    from kappatune.training import memory
    from kappatune.training.loop import LoraSettings
    from kappatune.training.models import analysis_source

    measured = json.loads((RESULTS / "train_cost.json").read_text())
    model, batch, seq = measured["model"], measured["batch"], measured["seq_len"]
    runtime = memory.runtime_bytes(model)  # before anything else grows the process
    config = memory.config_of(model)
    analysis = analyze(analysis_source(model), AnalyzeOptions(kappa_only=True))
    layers = SelectOptions(include=r"\.layers\.")
    rows = []
    for arm in measured["arms"]:
        name, budget = arm["arm"], arm["budget_params"]
        sel, lora = None, None
        if name == "selective":
            sel = select(analysis, "lowest-kappa", Budget(params=budget), layers)
        elif name == "lora":
            lora = LoraSettings(r=arm["lora_r"] or 8)
        elif name == "kappa-lora":
            sel = select(analysis, "lowest-kappa", Budget(fraction=0.2), layers)
            lora = LoraSettings(r=None, budget_params=budget)
        build = functools.partial(memory.meta_model, config)
        est = memory.estimate(build, name, batch, seq, sel, lora, runtime=runtime)
        above = arm["training_peak_rss_mb"] - arm["rss_after_load_mb"]
        rows.append(
            {
                "arm": name,
                "trainable_predicted": est.trainable,
                "trainable_measured": arm["trainable_params"],
                "predicted_above_weights_mb": est.peak_above_weights / MB,
                "measured_above_weights_mb": above,
                "error_above_weights": est.peak_above_weights / MB / above - 1,
                "predicted_peak_phase": est.peak.phase,
                "predicted_runtime_mb": runtime / MB,
                "measured_runtime_mb": arm.get("runtime_mb"),
                "predicted_optimizer_mb": est.optimizer / MB,
                "measured_optimizer_mb": arm["optimizer_state_mb"],
                "predicted_weights_plus_peak_mb": est.total / MB,
                "measured_training_peak_mb": arm["training_peak_rss_mb"],
                "error_total": est.total / MB / arm["training_peak_rss_mb"] - 1,
            }
        )
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    lines = [
        f"# Predicted vs measured training memory: {model}, batch {batch} x {seq} tokens, AdamW",
        "",
        f"Command: `{command}` ({datetime.now(timezone.utc).isoformat(timespec='seconds')});"
        " measured: results/train_cost.md",
        "",
        "Above weights: training peak RSS minus the resident size before training, against the"
        " simulated peak above the weights. Runtime: predicted, this process's resident size"
        " with torch, transformers, PEFT and the tokenizer loaded; measured, the training"
        " process's resident size before training minus its weights and buffers. Total: weights"
        " + peak above weights + runtime against the measured training peak RSS.",
        "",
        "| arm | trainable (pred / meas) | optimizer MB (pred / meas) | above weights MB (pred / meas) | error | peak in | runtime MB (pred / meas) | total MB (pred / meas) | error |",
        "|---|---:|---:|---:|---:|---|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['arm']} | {r['trainable_predicted']:,} / {r['trainable_measured']:,}"
            f" | {r['predicted_optimizer_mb']:.1f} / {r['measured_optimizer_mb']:.1f}"
            f" | {r['predicted_above_weights_mb']:.0f} / {r['measured_above_weights_mb']:.0f}"
            f" | {r['error_above_weights']:+.1%} | {r['predicted_peak_phase']}"
            f" | {r['predicted_runtime_mb']:.0f} / {_mb(r['measured_runtime_mb'])}"
            f" | {r['predicted_weights_plus_peak_mb']:.0f} / {r['measured_training_peak_mb']:.0f}"
            f" | {r['error_total']:+.1%} |"
        )
    text = "\n".join(lines) + "\n"
    (RESULTS / "train_memory_check.md").write_text(text)
    (RESULTS / "train_memory_check.json").write_text(
        json.dumps({"command": command, "rows": rows}, indent=2) + "\n"
    )
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
