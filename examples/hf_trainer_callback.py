"""KappaTune with the Hugging Face Trainer (TRL's SFTTrainer: examples/trl_sft_callback.py).

    python examples/hf_trainer_callback.py [MODEL] [--steps 10]

The callback freezes the model when the Trainer is constructed, before the Trainer builds
its optimizer, so AdamW state exists only for the selected tensors.
"""

from __future__ import annotations

import argparse
import pydoc_data.topics
import tempfile

import datasets
from transformers import Trainer, TrainingArguments

from kappatune import (
    Budget,
    KappaTuneCallback,
    analysis_source,
    analyze,
    load_causal_lm,
    pack_texts,
    select,
)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("model", nargs="?", default="gemma-3-270m")
    p.add_argument("--steps", type=int, default=10)
    args = p.parse_args()

    selection = select(analyze(analysis_source(args.model)), "lowest-kappa", Budget(fraction=0.2))
    model, tokenizer = load_causal_lm(args.model)
    topics = pydoc_data.topics.topics
    rows = pack_texts(tokenizer, [topics[k] for k in sorted(topics)[:20]], seq_len=64).rows()
    with tempfile.TemporaryDirectory() as out:
        trainer = Trainer(
            model=model,
            args=TrainingArguments(
                output_dir=out,
                max_steps=args.steps,
                per_device_train_batch_size=2,
                learning_rate=1e-4,
                warmup_steps=2,
                report_to=[],
                save_strategy="no",
                logging_steps=1,
                use_cpu=True,
            ),
            train_dataset=datasets.Dataset.from_list(rows),
            callbacks=[KappaTuneCallback(selection, verify_frozen=True)],
        )
        trainer.train()
    print(f"trained {selection.tensor_count} tensors ({selection.param_count:,} parameters)")


if __name__ == "__main__":
    main()
