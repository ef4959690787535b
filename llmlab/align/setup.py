"""What every alignment loop starts from: the run directory, the policy and its optimizer, the data,
the reference, a resumed checkpoint; gathered in one `Context` the method's loop reads."""

from __future__ import annotations

import contextlib
import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from llmlab.align.config import PREFERENCE_METHODS, AlignConfig
from llmlab.align.policy import AlignModel, frozen_copy, load_policy, loader, saver
from llmlab.common import LlmlabError, choose_device, init_distributed, seed_everything
from llmlab.config import save_config
from llmlab.data.preference import PairExample, PromptExample, build_pairs, build_prompts
from llmlab.data.sft import hold_out
from llmlab.models import require_kind
from llmlab.models.io import read_config, resolve_model_dir
from llmlab.peft import trainable_parameters
from llmlab.tokenizer import load_tokenizer
from llmlab.tokenizer.chat import load_chat_template
from llmlab.track import check_loggers
from llmlab.train.checkpoint import save_checkpoint
from llmlab.train.core import Trainee, open_run, resolve_autocast, wrap_model
from llmlab.train.loop import Counters, check_run_dir, resume_run, run_settings, truncate_metrics
from llmlab.train.optim import build_optimizer


@dataclass
class Context:
    """A run ready for its loop."""

    cfg: AlignConfig
    device: torch.device
    rank: int
    world: int
    tokenizer: object
    template: object
    policy: AlignModel
    trainee: Trainee
    optimizer: torch.optim.Optimizer
    counters: Counters
    settings: dict
    out: Path
    train: list  # PairExample (rm, dpo, ipo) or PromptExample (ppo, grpo)
    val: list
    frozen: nn.Module | None  # the reference as a frozen copy (full fine-tuning), else None
    autocast: contextlib.AbstractContextManager
    stats: Counter  # what the data readers skipped, by reason
    rewards: object = None  # online.Rewards: the reward model or checker (every method but rm)

    @property
    def lora(self) -> bool:
        return self.cfg.peft == "lora"

    def start(self) -> None:
        """The first writes: config.yaml, and metrics.jsonl cut back to the resumed step."""
        if self.rank == 0:
            save_config(self.cfg, self.out / "config.yaml")
            truncate_metrics(self.out / "metrics.jsonl", self.counters.step)

    def open(self):
        """The run's outputs held open for the loop (`llmlab.train.core.open_run`)."""
        return open_run(self.cfg, self.counters, self.out, self.rank, self.world, self.device)

    def save(self, state: dict) -> None:
        """A checkpoint of the trained weights, optimizer, counters and RNGs (rank 0 writes it)."""
        if self.rank == 0:
            save_checkpoint(self.out / "checkpoints", self.counters.step, self.policy, self.optimizer,
                            {**state, "settings": self.settings}, self.cfg.ckpt.keep_last, self.cfg.base,
                            saver(self.cfg.lora if self.lora else None, self.cfg.base))

    def pad_id(self) -> int:
        return self.tokenizer.pad_id if self.tokenizer.pad_id is not None else 0


def setup(cfg: AlignConfig, *, overwrite: bool) -> Context:
    """Everything up to the first step. Inputs are read and checked before the model loads."""
    device = choose_device(cfg.system.device, "system.device")
    rank, world = init_distributed(device)
    if world > 1 and cfg.system.parallel == "fsdp":
        raise LlmlabError("llmlab align runs data-parallel (system.parallel=ddp); fsdp is for pretraining and "
                          "fine-tuning")
    if cfg.method in ("dpo", "ipo") and cfg.dpo.reference == "adapters" and cfg.peft != "lora":
        raise LlmlabError("dpo.reference=adapters needs peft=lora (the base with adapters disabled); with "
                          "peft=none use dpo.reference=precompute")
    out = Path(cfg.out_dir)
    check_run_dir(out, resume=cfg.ckpt.resume, overwrite=overwrite, rank=rank,
                  inputs=[cfg.base, cfg.data.train, cfg.data.val or None, cfg.reward.model or None])
    check_loggers(cfg.track)
    try:
        cfg.base = str(resolve_model_dir(cfg.base))
    except LlmlabError as e:
        raise LlmlabError(f"base: {e}") from None
    cfg.system.autocast = resolve_autocast(cfg.system, device, rank, world)
    model_cfg, _ = read_config(cfg.base)
    require_kind(model_cfg, ("decoder",), "llmlab align", f"base={cfg.base}")
    if getattr(model_cfg, "num_labels", 0):
        raise LlmlabError(f"base={cfg.base}: a reward model (score head); align a language model")
    if cfg.seq_len is None:
        cfg.seq_len = model_cfg.max_seq_len
    if cfg.seq_len > model_cfg.max_seq_len:
        raise LlmlabError(f"seq_len={cfg.seq_len} exceeds the base model's context of {model_cfg.max_seq_len}")
    if cfg.method in ("ppo", "grpo") and cfg.rollout.max_new_tokens >= cfg.seq_len:
        raise LlmlabError(f"rollout.max_new_tokens={cfg.rollout.max_new_tokens} leaves no room for a prompt in "
                          f"seq_len={cfg.seq_len}")
    tokenizer = load_tokenizer(cfg.base)
    template = load_chat_template(cfg.base, cfg.data.template or None)
    stats: Counter = Counter()
    train, val = _data(cfg, tokenizer, template, stats, quiet=rank != 0)
    if cfg.batch_size > len(train):
        kind = "pairs" if cfg.method in PREFERENCE_METHODS else "prompts"
        raise LlmlabError(f"batch_size={cfg.batch_size} is more than the {len(train):,} training {kind}")
    if cfg.epochs > 0 and cfg.method in PREFERENCE_METHODS:
        cfg.max_steps = max(1, math.ceil(cfg.epochs * len(train) / (cfg.batch_size * cfg.grad_accum * world)))

    seed_everything(cfg.seed)
    lora = cfg.lora if cfg.peft == "lora" else None
    policy = load_policy(cfg.base, device, lora=lora, reward_head=cfg.method == "rm", value_head=cfg.method == "ppo")
    trained, total = trainable_parameters(policy)
    if rank == 0:
        print(f"{cfg.method}: training {trained:,} of {total:,} parameters ({100 * trained / total:.2f}%)"
              + (f", LoRA r={cfg.lora.r}" if lora else ""))
    frozen = frozen_copy(policy) if cfg.method in ("ppo", "grpo") and lora is None and \
        (cfg.method == "ppo" or cfg.grpo.beta > 0) else None
    policy.model.gradient_checkpointing = cfg.system.gradient_checkpointing
    trainee = wrap_model(policy, cfg.system, world)
    optimizer = build_optimizer(policy, cfg.optim, device)
    settings = run_settings(cfg, world, base=str(Path(cfg.base).resolve()), method=cfg.method)
    counters = resume_run(cfg, out / "checkpoints", rank, policy, optimizer, settings, loader(lora is not None))
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.system.autocast == "bf16")
    return Context(cfg, device, rank, world, tokenizer, template, policy, trainee, optimizer, counters, settings,
                   out, train, val, frozen, autocast, stats)


def _data(cfg: AlignConfig, tokenizer, template, stats: Counter, *, quiet: bool = False) -> tuple[list, list]:
    """Training and held-out examples: pairs for rm/dpo/ipo, prompts for ppo/grpo."""
    if cfg.method in PREFERENCE_METHODS:
        def build(path):
            return build_pairs(path, tokenizer, template, cfg.seq_len, stats)
        kind = "pairs"
    else:
        def build(path):
            return build_prompts(path, tokenizer, template, cfg.seq_len - cfg.rollout.max_new_tokens, stats)
        kind = "prompts"
    examples: list[PairExample] | list[PromptExample] = build(cfg.data.train)
    if cfg.data.val:
        val = build(cfg.data.val)
    else:
        examples, val = hold_out(examples, cfg.data.val_fraction, cfg.seed)
    if not examples:
        raise LlmlabError(f"data.train={cfg.data.train}: no training {kind} left after holding out validation")
    skipped = {k: n for k, n in stats.items() if n and k not in ("records",)}
    if not quiet:
        print(f"data: {len(examples):,} training and {len(val):,} validation {kind}"
              + "".join(f"; {n:,} {k.replace('_', ' ')}" for k, n in skipped.items()))
    return examples, val
