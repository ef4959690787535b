"""AdamW with decoupled weight decay on matrices only, and the warmup + cosine schedule.

Loshchilov & Hutter 2019 ("Decoupled Weight Decay Regularization"). Decay is applied to 2-D
weights (linear layers, embeddings) and not to biases or norm gains, as in GPT-2/3 and LLaMA.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from llmlab.train.config import OptimConfig


def build_optimizer(model: nn.Module, cfg: OptimConfig, device: torch.device) -> torch.optim.Optimizer:
    """AdamW over two groups: matrices with weight decay, vectors (biases, norms) without.

    "adamw8bit" keeps both moment estimates in 8 bits with blockwise dynamic quantization (Dettmers
    et al., 2022, "8-bit Optimizers via Block-wise Quantization"); "paged_adamw8bit" also lets them
    spill to CPU memory under GPU memory pressure (QLoRA's paged optimizer). Both come from bitsandbytes.
    """
    decay, no_decay = [], []
    for p in model.parameters():  # parameters() yields a tied weight once
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg.name != "adamw":
        import bitsandbytes as bnb

        cls = bnb.optim.AdamW8bit if cfg.name == "adamw8bit" else bnb.optim.PagedAdamW8bit
        return cls(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)
    fused = device.type in ("cuda", "cpu")  # one pass over each tensor: 4x faster than for-each on CPUs
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, fused=fused)


def lr_at(step: int, max_steps: int, cfg: OptimConfig) -> float:
    """Learning rate for optimizer step `step` (0-based).

    lr_t = lr * (t + 1) / warmup                                   for t < warmup
    lr_t = lr * (r + (1 - r) * (1 + cos(pi * p)) / 2),  p = (t - warmup) / (max_steps - warmup)
    with r = min_lr_ratio, so the rate falls from lr to r * lr at the last step.
    """
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, max_steps - 1 - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))
