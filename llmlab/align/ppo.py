"""`method=ppo`: reinforcement learning from a reward model or a checker, as InstructGPT trains it
(Ouyang et al. 2022; Ziegler et al. 2019; PPO: Schulman et al. 2017).

    for step ...:
        answers = sample the policy on B prompts (the generation engine, KV cache)
        score = reward model (or checker) of each answer
        r_t = -kl_coef (log pi - log pi_ref)_t, plus the score on the last answer token
        advantages, returns = GAE(r, V), with V from the value head on the policy's last hidden state
        for ppo.epochs passes, ppo.mini_batches updates each:
            loss = clipped policy loss + vf_coef clipped value loss (+ ptx_coef LM loss: PPO-ptx)

With LoRA the reference is the base with the adapters disabled; with full fine-tuning, a frozen copy.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from llmlab.align.losses import entropy_from_logits, gae, kl_penalized_rewards, masked_mean, ppo_policy_loss, \
    ppo_value_loss, whiten
from llmlab.align.online import (evaluate_prompts, logprobs_and_values, prompt_batch,
                                 reference_logprobs, rollout, usable)
from llmlab.align.setup import Context
from llmlab.common import LlmlabError
from llmlab.data.sft import Batches, build_examples
from llmlab.data.shards import TokenShards, is_prepared
from llmlab.data.windows import sample_batch
from llmlab.train.core import clip_gradients
from llmlab.train.loop import finite_step


class PretrainingMix:
    """PPO-ptx's language-modelling batches: records (every target token trains, as fine-tuning does)
    or a `data prepare` folder (random windows of its train split)."""

    def __init__(self, ctx: Context):
        cfg = ctx.cfg
        self.ctx = ctx
        if is_prepared(cfg.ppo.ptx_data):
            self.shards = TokenShards(cfg.ppo.ptx_data, "train")
            if self.shards.vocab_size > ctx.policy.config.vocab_size:
                raise LlmlabError(f"ppo.ptx_data={cfg.ppo.ptx_data}: prepared with another tokenizer (ids up to "
                                  f"{self.shards.vocab_size}); prepare it with the base's tokenizer")
            self.records = None
        else:
            self.shards = None
            examples = build_examples(cfg.ppo.ptx_data, ctx.tokenizer, ctx.template, cfg.seq_len)
            self.records = Batches(examples, cfg.seq_len, cfg.batch_size, packed=True, seed=cfg.seed,
                                   pad_id=ctx.pad_id())

    def loss(self, index: int) -> torch.Tensor:
        cfg, device = self.ctx.cfg, self.ctx.device
        if self.records is not None:
            batch = self.records.batch(index, device)
        else:
            x, y = sample_batch(self.shards, cfg.batch_size, cfg.seq_len, (cfg.seed, 6, index), device)
            batch = {"input_ids": x, "targets": y}
        return self.ctx.policy.model(**batch)


def train(ctx: Context) -> dict:
    cfg, counters, p = ctx.cfg, ctx.counters, ctx.cfg.ppo
    rewards_of = ctx.rewards
    ptx = PretrainingMix(ctx) if p.ptx_coef > 0 else None
    if ctx.rank == 0:
        print(f"ppo: rewards from the {rewards_of.judge}; reference: "
              f"{'the base with adapters disabled' if ctx.frozen is None else 'a frozen copy of the base'}")
    updates = p.epochs * p.mini_batches

    with ctx.open() as run:
        for step in range(counters.step, cfg.max_steps):
            t0 = time.time()
            lr = run.begin_step(step, ctx.optimizer)
            examples = prompt_batch(ctx, step)
            roll = rollout(ctx, examples, step, n=1)
            t_rollout = time.time() - t0
            scores, valid, failures = rewards_of(roll, examples)
            record = None
            if usable(ctx, scores, valid, failures, step):
                mask = roll.mask * valid.unsqueeze(1)
                with torch.no_grad(), ctx.autocast:
                    old_logprobs, old_values, _ = logprobs_and_values(ctx, ctx.policy, roll)
                    ref_logprobs = reference_logprobs(ctx, roll)
                old_values = old_values.float() * mask
                rewards, kl = kl_penalized_rewards(scores, old_logprobs, ref_logprobs, mask, p.kl_coef)
                advantages, returns = gae(rewards, old_values, mask, p.gamma, p.lam)
                if p.whiten:
                    advantages = whiten(advantages, mask) * mask
                # ppo.epochs passes over the rollout, each in ppo.mini_batches shuffled parts
                order = np.random.default_rng((cfg.seed, 8, step, ctx.rank))
                parts = [part for _ in range(p.epochs)
                         for part in torch.from_numpy(order.permutation(len(examples))).chunk(p.mini_batches)]
                stats = []
                for k, part in enumerate(parts):
                    out = update(ctx, roll, part, mask, old_logprobs, old_values, advantages, returns, ptx,
                                 step * updates + k)
                    if out is None:  # a non-finite loss, skipped (nonfinite=skip): the rollout is done
                        break
                    stats.append(out)
                if stats:
                    n_tokens = int(mask.sum())
                    counters.tokens += n_tokens
                    mean = {k: float(np.mean([s[k] for s in stats])) for k in stats[0]}
                    record = {"loss": mean["loss"], "lr": lr, "reward": scores[valid].mean().item(),
                              "kl": (kl.sum(1)[valid]).mean().item(), "response_length":
                              roll.mask.sum(1).mean().item(), **mean, "checker_failures": len(failures),
                              "tokens_per_s": int(roll.mask.sum()) / t_rollout,
                              "rollout_s": t_rollout, "step_s": time.time() - t0}
                else:
                    counters.skipped += 1
            else:
                counters.skipped += 1
            if run.after_step(step + 1, record, evaluate=(lambda: evaluate_prompts(ctx, rewards_of))
                              if ctx.val else None, save=ctx.save):
                break
    return {"stopped": run.stopped or "max_steps", "val_loss": run.val_loss, "evaluation": run.evaluation,
            "exit_code": run.exit_code}


def update(ctx: Context, roll, rows: torch.Tensor, mask, old_logprobs, old_values, advantages, returns,
           ptx: PretrainingMix | None, index: int) -> dict | None:
    """One optimizer step on the rollout rows `rows`; its statistics, or None when it was skipped."""
    p = ctx.cfg.ppo
    sub = type(roll)(roll.sequences[rows], roll.targets[rows], roll.mask[rows], roll.lengths[rows], [], [], [], [])
    m = mask[rows]
    with ctx.autocast:
        logprobs, values, logits = logprobs_and_values(ctx, ctx.trainee.forward, sub)
        policy = ppo_policy_loss(logprobs, old_logprobs[rows], advantages[rows], m, p.clip)
        value_loss = ppo_value_loss(values.float(), old_values[rows], returns[rows], m, p.value_clip)
        loss = policy.loss + p.vf_coef * value_loss
        ptx_loss = ptx.loss(index) if ptx is not None else None
        if ptx_loss is not None:
            loss = loss + p.ptx_coef * ptx_loss
    loss.backward()
    grad_norm = clip_gradients(ctx.trainee, ctx.cfg.optim.grad_clip)
    if not finite_step(loss.detach(), grad_norm, ctx.optimizer, ctx.cfg.nonfinite, ctx.counters.step):
        return None
    ctx.optimizer.step()
    ctx.optimizer.zero_grad(set_to_none=True)
    with torch.no_grad():
        entropy = masked_mean(entropy_from_logits(logits.detach()), m).item()
    out = {"loss": loss.item(), "policy_loss": policy.loss.item(), "value_loss": value_loss.item(),
           "clip_fraction": policy.clip_fraction.item(), "approx_kl": policy.approx_kl.item(), "entropy": entropy,
           "grad_norm": grad_norm.item()}
    if ptx_loss is not None:
        out["ptx_loss"] = ptx_loss.item()
    return out
