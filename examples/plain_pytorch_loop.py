"""KappaTune selective fine-tuning in a plain PyTorch loop: no wrapper, any optimizer.

    python examples/plain_pytorch_loop.py [MODEL] [--steps 20] [--budget-params 5%]

MODEL is anything `kappatune train` accepts (default: the built-in gemma-3-270m).
"""

from __future__ import annotations

import argparse
import pydoc_data.topics

import torch

from kappatune import (
    Budget,
    SelectOptions,
    analysis_source,
    analyze,
    apply_selection,
    check_frozen,
    frozen_digests,
    load_causal_lm,
    pack_texts,
    select,
)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("model", nargs="?", default="gemma-3-270m")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--budget-params", default="5%")
    args = p.parse_args()

    # 1. spectra of the checkpoint (cached by content) -> 2. a selection of the lowest-kappa matrices
    analysis = analyze(analysis_source(args.model))
    selection = select(
        analysis,
        "lowest-kappa",
        Budget.parse_params(args.budget_params),
        SelectOptions(include=r"\.layers\."),
    )
    print(selection.describe())

    # 3. freeze everything else; the optimizer only ever sees the selected tensors
    model, tokenizer = load_causal_lm(args.model)
    groups = apply_selection(model, selection, weight_decay=0.01)
    optimizer = torch.optim.AdamW(groups, lr=1e-4)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 5))

    # 4. any data: here Python's own documentation, packed with BOS at the start of every row
    topics = pydoc_data.topics.topics
    data = pack_texts(tokenizer, [topics[k] for k in sorted(topics)[:20]], seq_len=64)
    frozen = frozen_digests(model)
    model.train()
    batches = data.batches(2, shuffle=True, seed=0)
    for step in range(args.steps):
        batch = next(batches, None)
        if batch is None:
            batches = data.batches(2, shuffle=True, seed=step)
            batch = next(batches)
        loss = model(**batch.model_inputs()).loss
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        print(f"step {step + 1}: loss {loss.item():.4f}")
    assert check_frozen(model, frozen) == [], "a frozen tensor changed"
    print(
        f"optimizer state for {len(optimizer.state)} tensors; every frozen tensor is bit-identical"
    )


if __name__ == "__main__":
    main()
