"""Planning before training: memory, FLOPs, time, cost and energy, and compute-optimal sizing."""
