"""KappaTune with TRL's SFTTrainer: supervised fine-tuning of the lowest-kappa tensors only.

    python examples/trl_sft_callback.py [MODEL] [--steps 10]

SFTTrainer tokenizes the ``text`` column itself. ``KappaTuneCallback`` freezes every tensor
outside the selection when the trainer is constructed, before it builds its optimizer, so
AdamW state exists only for the selected tensors, and (``verify_frozen``) checks at the end
that every frozen tensor is bit-identical.
"""

from __future__ import annotations

import argparse
import pydoc_data.topics
import tempfile
from collections.abc import Sequence

import datasets
from trl import SFTConfig, SFTTrainer

from kappatune import Budget, KappaTuneCallback, analysis_source, analyze, load_causal_lm, select


def main(argv: Sequence[str] | None = None) -> list[str]:
    """Train and return the names of the parameters that trained."""
    p = argparse.ArgumentParser()
    p.add_argument("model", nargs="?", default="gemma-3-270m")
    p.add_argument("--steps", type=int, default=10)
    args = p.parse_args(argv)

    selection = select(analyze(analysis_source(args.model)), "lowest-kappa", Budget(fraction=0.2))
    model, tokenizer = load_causal_lm(args.model)
    topics = pydoc_data.topics.topics
    texts = [{"text": topics[k]} for k in sorted(topics)[:20]]
    with tempfile.TemporaryDirectory() as out:
        trainer = SFTTrainer(
            model=model,
            args=SFTConfig(
                output_dir=out,
                max_steps=args.steps,
                per_device_train_batch_size=2,
                learning_rate=1e-4,
                warmup_steps=2,
                max_length=64,
                packing=True,
                report_to=[],
                save_strategy="no",
                logging_steps=1,
                use_cpu=True,
            ),
            train_dataset=datasets.Dataset.from_list(texts),
            processing_class=tokenizer,
            callbacks=[KappaTuneCallback(selection, verify_frozen=True)],
        )
        trainer.train()
    trained = [n for n, p in trainer.model.named_parameters() if p.requires_grad]
    print(f"trained {len(trained)} tensors ({selection.param_count:,} parameters) with SFTTrainer")
    return trained


if __name__ == "__main__":
    main()
