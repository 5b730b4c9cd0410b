"""KappaTune-LoRA with PEFT: LoRA only on the lowest-kappa modules, sized to a parameter budget.

    python examples/kappa_lora_peft.py [MODEL]

Compares the adapter with plain LoRA (rank 8 on every linear layer) at the same number
of trainable parameters.
"""

from __future__ import annotations

import argparse

from peft import get_peft_model

from kappatune import (
    Budget,
    SelectOptions,
    all_linear_targets,
    analysis_source,
    analyze,
    load_causal_lm,
    lora_config,
    lora_param_count,
    peft_targets,
    rank_for_budget,
    select,
)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("model", nargs="?", default="gemma-3-270m")
    args = p.parse_args()

    model, _ = load_causal_lm(args.model)
    budget = lora_param_count(model, all_linear_targets(model), r=8)  # what plain LoRA r=8 trains
    selection = select(analyze(analysis_source(args.model)), "lowest-kappa", Budget(fraction=0.2),
                       SelectOptions(include=r"\.layers\."))  # fmt: skip
    print("PEFT targets (kappa order):", peft_targets(selection)["target_modules"][:5], "...")
    plan = rank_for_budget(model, selection, budget)
    peft_model = get_peft_model(model, lora_config(selection, r=plan.r))
    peft_model.print_trainable_parameters()
    print(
        f"plain LoRA r=8 on all linear layers: {budget:,}; KappaTune-LoRA r={plan.r}: {plan.params:,}"
    )


if __name__ == "__main__":
    main()
