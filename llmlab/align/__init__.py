"""Alignment: reward models, PPO with a KL penalty, DPO and IPO, GRPO, and data from a teacher model."""
