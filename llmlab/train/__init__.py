"""Training: the visible pretraining loop, optimizers and schedules, checkpoints with exact resume."""
