"""`llmlab align` configuration: one config for every method, the method a field.

    llmlab align configs/align/dpo-cpu-tiny.yaml method=ipo dpo.beta=0.5
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from llmlab.peft import LoraConfig
from llmlab.track import TrackConfig
from llmlab.train.config import (CheckpointConfig, OptimConfig, SystemConfig, check_at_least, check_probability,
                                 check_seed)

METHODS = ("rm", "dpo", "ipo", "ppo", "grpo")
PREFERENCE_METHODS = ("rm", "dpo", "ipo")  # trained on preference pairs; ppo and grpo on prompts
MAX_GROUP = 1024


@dataclass
class AlignDataConfig:
    train: str = "runs/synth-pref/train.jsonl"  # pairs (rm, dpo, ipo) or prompts with answers (ppo, grpo)
    val: str = ""  # held-out pairs or prompts; "" = hold out val_fraction of train
    val_fraction: float = 0.05  # share of the training records held out when val is ""
    template: str = ""  # chat template: a built-in name or a Jinja file; "" = the base's own, else llmlab's

    def __post_init__(self):
        if not self.train:
            raise ValueError("train is empty: name the preference pairs or prompts (.jsonl)")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction}")


@dataclass
class DPOConfig:
    beta: float = 0.1  # strength of the KL constraint to the reference (DPO's and IPO's beta)
    label_smoothing: float = 0.0  # conservative DPO: the share of preferences assumed flipped (dpo only)
    # where the reference's log-probabilities come from: "precompute" scores every pair once with the
    # starting model; "adapters" runs the base with LoRA disabled at each step (peft=lora only)
    reference: Literal["precompute", "adapters"] = "precompute"
    # RPO (Pang et al. 2024): adds sft_weight x the chosen answers' negative log-likelihood per token,
    # which keeps DPO from lowering the chosen answers' likelihood with the rejected ones'
    sft_weight: float = 0.0

    def __post_init__(self):
        if not self.sft_weight >= 0:
            raise ValueError(f"sft_weight must be >= 0, got {self.sft_weight}")
        if not self.beta > 0:
            raise ValueError(f"beta must be > 0, got {self.beta}")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ValueError(f"label_smoothing must be in [0, 0.5), got {self.label_smoothing}")


@dataclass
class RewardConfig:
    model: str = ""  # a reward model (`method=rm` output) scores the answers; "" = the checker does
    # checker of verifiable answers: "exact_match" (1 if the answer equals the record's, spaces aside,
    # else 0), or "module:function" taking (prompt, completion, answer) and returning a number
    checker: str = "exact_match"
    timeout: float = 10.0  # seconds one check may take; a slower check scores nothing (counted as failed)

    def __post_init__(self):
        if not self.checker:
            raise ValueError('checker is empty: use "exact_match" or "module:function"')
        if not 0 < self.timeout <= 3600:
            raise ValueError(f"timeout must be in (0, 3600] seconds, got {self.timeout}")


@dataclass
class RolloutConfig:
    max_new_tokens: int = 32  # answer length limit when sampling
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0

    def __post_init__(self):
        check_at_least(self, max_new_tokens=1, top_k=0)
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0 (rollouts sample), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


@dataclass
class PPOConfig:
    kl_coef: float = 0.05  # beta of the per-token KL penalty to the reference
    gamma: float = 1.0  # discount
    lam: float = 0.95  # GAE lambda
    clip: float = 0.2  # policy ratio clip epsilon
    value_clip: float = 0.2  # value clip around the rollout's values
    vf_coef: float = 0.1  # weight of the value loss
    epochs: int = 4  # optimisation passes over each rollout batch
    mini_batches: int = 1  # optimizer steps per pass
    whiten: bool = True  # normalise advantages over each rollout batch
    ptx_coef: float = 0.0  # PPO-ptx: weight of a language-modelling loss mixed into every update
    ptx_data: str = ""  # records or a `data prepare` folder for that loss (needed when ptx_coef > 0)

    def __post_init__(self):
        check_at_least(self, epochs=1, mini_batches=1, kl_coef=0.0, vf_coef=0.0, ptx_coef=0.0)
        check_probability(self, "gamma", "lam")
        for name in ("clip", "value_clip"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.ptx_coef > 0 and not self.ptx_data:
            raise ValueError("ptx_coef > 0 needs ptx_data: the records or prepared folder of the pretraining mix")


@dataclass
class GRPOConfig:
    group_size: int = 8  # answers sampled per prompt
    beta: float = 0.04  # weight of the KL term to the reference; 0 = no reference
    clip: float = 0.2  # ratio clip epsilon
    epochs: int = 1  # optimisation passes over each group batch (1: the ratio is 1, the gradient on-policy)
    normalize: Literal["sequence", "token"] = "sequence"  # mean per answer then over answers, or over all tokens
    scale_rewards: bool = True  # divide by the group's standard deviation (False: Dr. GRPO)

    def __post_init__(self):
        check_at_least(self, group_size=2, epochs=1, beta=0.0)
        if self.group_size > MAX_GROUP:
            raise ValueError(f"group_size must be at most {MAX_GROUP} (answers held per prompt), got {self.group_size}")
        if not self.clip > 0:
            raise ValueError(f"clip must be > 0, got {self.clip}")


@dataclass
class AlignEvalConfig:
    every: int = 50  # evaluate every N steps (and after the last)
    batches: int = 10  # validation batches per evaluation (pairs), or prompts x batch_size (ppo, grpo)
    patience: int = 0  # stop after N evaluations without a new best val loss; 0 = never
    # the report before and after: held-out prompts answered greedily, scored by exact match against
    # their answers and judged against the starting model's answers (win rate)
    answers: int = 64

    def __post_init__(self):
        check_at_least(self, every=1, batches=1, patience=0, answers=0)


@dataclass
class AlignConfig:
    method: Literal["rm", "dpo", "ipo", "ppo", "grpo"] = "dpo"
    base: str = "runs/ft/final"  # the model to align (rm: the model the reward model is built from)
    out_dir: str = "runs/align"  # run directory: config.yaml, metrics.jsonl, checkpoints/, final/, report.json
    data: AlignDataConfig = field(default_factory=AlignDataConfig)
    peft: Literal["none", "lora"] = "lora"  # lora: the reference is the base with adapters disabled
    lora: LoraConfig = field(default_factory=lambda: LoraConfig(r=16, alpha=32, targets=["all-linear"]))
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=5e-4, warmup_steps=10, weight_decay=0.0))
    seq_len: int | None = None  # tokens per sequence, prompt and answer; null = the base's context
    batch_size: int = 8  # pairs (rm, dpo, ipo) or prompts (ppo, grpo) per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step (rm, dpo, ipo)
    max_steps: int = 100  # optimizer steps (rm, dpo, ipo) or rollout batches (ppo, grpo)
    epochs: float = 0.0  # when > 0 (rm, dpo, ipo), max_steps is set to this many passes over the pairs
    max_minutes: float = 0.0  # also stop (with a checkpoint) after this much wall time; 0 = no limit
    nonfinite: Literal["stop", "skip"] = "stop"  # on a NaN/inf loss or reward: stop the run, or skip the step
    log_every: int = 10  # plain log line every N steps when stderr is not a terminal
    seed: int = 0
    dpo: DPOConfig = field(default_factory=DPOConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    eval: AlignEvalConfig = field(default_factory=AlignEvalConfig)
    ckpt: CheckpointConfig = field(default_factory=lambda: CheckpointConfig(every=50))
    system: SystemConfig = field(default_factory=SystemConfig)
    track: TrackConfig = field(default_factory=TrackConfig)  # metric loggers: TensorBoard, MLflow

    def __post_init__(self):
        check_at_least(self, seq_len=2, batch_size=1, grad_accum=1, max_steps=1, epochs=0, max_minutes=0,
                       log_every=1)
        check_seed(self.seed)
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.method in ("ppo", "grpo") and self.grad_accum != 1:
            raise ValueError(f"grad_accum applies to rm, dpo and ipo; {self.method} sets its updates with "
                             f"{'ppo.mini_batches' if self.method == 'ppo' else 'grpo.epochs'}")
