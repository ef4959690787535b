"""The config blocks every training verb shares (optimizer, evaluation cadence, checkpoints, system; and
`track`, the metric loggers, from `llmlab.track`),
the range checks their fields use, and `TrainConfig`: what the training core reads of a verb's config.

A verb's own config (`PretrainConfig`, `FinetuneConfig`, ...) composes these blocks with its data and
model fields; no verb imports another verb's module.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

from llmlab.track import TrackConfig


def check_at_least(cfg, **bounds) -> None:
    """ValueError naming the first field of `cfg` below its bound (fields that are None are not set yet)."""
    for name, low in bounds.items():
        value = getattr(cfg, name)
        if value is not None and value < low:
            raise ValueError(f"{name} must be >= {low}, got {value}")


def check_probability(cfg, *names: str) -> None:
    """ValueError naming the first of the fields `names` of `cfg` that is not in [0, 1]."""
    for name in names:
        if not 0.0 <= getattr(cfg, name) <= 1.0:
            raise ValueError(f"{name} must be a probability in [0, 1], got {getattr(cfg, name)}")


def check_seed(seed: int) -> None:
    if not 0 <= seed < 2**64:  # what NumPy's seed sequences and torch.manual_seed take
        raise ValueError(f"seed must be in [0, 2**64), got {seed}")


@dataclass
class OptimConfig:
    name: Literal["adamw", "adamw8bit", "paged_adamw8bit"] = "adamw"  # 8-bit states (bitsandbytes) save 75%
    lr: float = 3e-4  # peak learning rate
    min_lr_ratio: float = 0.1  # cosine floor as a fraction of lr
    warmup_steps: int = 100  # linear warmup from 0
    weight_decay: float = 0.1  # applied to matrices only
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping

    def __post_init__(self):
        bounds = {"lr": (self.lr > 0, "> 0"), "min_lr_ratio": (0 <= self.min_lr_ratio <= 1, "in [0, 1]"),
                  "warmup_steps": (self.warmup_steps >= 0, ">= 0"), "weight_decay": (self.weight_decay >= 0, ">= 0"),
                  "eps": (self.eps > 0, "> 0"), "grad_clip": (self.grad_clip >= 0, ">= 0 (0 disables clipping)"),
                  # decay rates of the moment averages: 1 would never forget the first gradient
                  "betas": (all(0 <= b < 1 for b in self.betas), "each in [0, 1)")}
        for name, (ok, expected) in bounds.items():
            if not ok:
                raise ValueError(f"{name} must be {expected}, got {getattr(self, name)}")


@dataclass
class EvalConfig:
    every: int = 100  # evaluate every N optimizer steps (and after the last)
    batches: int = 20  # validation micro-batches per evaluation
    patience: int = 0  # stop after N evaluations without a new best val loss; 0 = never

    def __post_init__(self):
        check_at_least(self, every=1, batches=1, patience=0)


@dataclass
class CheckpointConfig:
    every: int = 200  # save every N steps (and at the end, and on SIGINT/SIGTERM)
    keep_last: int = 3  # complete checkpoints kept on disk
    resume: str = "none"  # "none", "auto" (the newest intact checkpoint) or a checkpoint folder
    # on request only, since each step then sees other batches than in the run that saved the checkpoint:
    allow_batch_change: bool = False  # resume with another batch_size, seq_len or grad_accum x processes

    def __post_init__(self):
        check_at_least(self, every=1, keep_last=1)
        if not self.resume:
            raise ValueError('resume must be "none", "auto" or a checkpoint folder, got ""')


@dataclass
class SystemConfig:
    device: str = "auto"  # auto, cpu, cuda, cuda:1, mps
    # bf16 autocast with fp32 master weights; auto = bf16 where a probe at start finds bf16 matrix products
    # at least 1.5x as fast as fp32 on the device (GPUs, CPUs with AMX or AVX512-BF16), else none (recorded)
    autocast: Literal["auto", "none", "bf16"] = "auto"
    compile: bool = False  # torch.compile the model (GPUs)
    gradient_checkpointing: bool = False  # recompute activations in backward to save memory
    preflight: bool = True  # estimate peak memory first and refuse a run that cannot fit the device
    # with several processes: ddp keeps the whole model on each; fsdp shards parameters, gradients and
    # optimizer states over them (FSDP2), for models whose training state does not fit one device
    parallel: Literal["ddp", "fsdp"] = "ddp"


class Cadence(Protocol):
    """What the core reads of an evaluation block."""

    every: int
    patience: int


class TrainConfig(Protocol):
    """What the training core (`llmlab.train.core`, `llmlab.train.loop`) reads of a verb's config."""

    out_dir: str
    seed: int
    batch_size: int
    seq_len: int | None
    grad_accum: int
    max_steps: int
    max_minutes: float
    nonfinite: Literal["stop", "skip"]
    log_every: int
    optim: OptimConfig
    eval: Cadence
    ckpt: CheckpointConfig
    system: SystemConfig
    track: TrackConfig
