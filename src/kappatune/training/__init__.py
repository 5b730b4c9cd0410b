"""Training: methods, the loop, freezing, data, models, engines, checkpoints and the run directory."""
