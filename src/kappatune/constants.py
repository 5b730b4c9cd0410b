"""Defaults shared by the library and the CLI, in a module that imports nothing heavy."""

# Tokens the model samples itself for the self-Fisher scores: 4 sequences of 128
# (benchmarks/results/self_fisher_stability.md).
SELF_FISHER_TOKENS = 508

# Predicted tokens of the task data for the Fisher scores (FisherOptions, select --fisher-tokens).
FISHER_TOKENS = 4096
# sequences per pass of the batched Fisher estimator (benchmarks/results/fisher_speed.md)
FISHER_BATCH = 4

# Share of the candidate matrices kappa-lora adapts when no budget is given (select and train's
# default for the LoRA methods, the bench's KappaTune-LoRA arm).
KAPPA_LORA_FRACTION = 0.2
