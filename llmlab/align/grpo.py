"""`method=grpo`: Group Relative Policy Optimization (Shao et al. 2024, DeepSeekMath): no value model;
each answer's advantage is its reward against the other answers to the same prompt.

    for step ...:
        G answers to each of B prompts (the generation engine, KV cache)
        r = checker (or reward model) of each answer
        A_i = (r_i - mean(r_group)) / std(r_group)
        for grpo.epochs passes:
            loss = clipped surrogate with A_i on every token of answer i + beta KL(pi || pi_ref)
"""

from __future__ import annotations

import time

import torch

from llmlab.align.losses import entropy_from_logits, group_advantages, grpo_loss, masked_mean
from llmlab.align.online import (evaluate_prompts, logprobs_and_values, prompt_batch,
                                 reference_logprobs, rollout, usable)
from llmlab.align.setup import Context
from llmlab.train.core import clip_gradients
from llmlab.train.loop import finite_step


def train(ctx: Context) -> dict:
    cfg, counters, g = ctx.cfg, ctx.counters, ctx.cfg.grpo
    rewards_of = ctx.rewards
    if ctx.rank == 0:
        print(f"grpo: {g.group_size} answers per prompt, rewards from the {rewards_of.judge}")

    with ctx.open() as run:
        for step in range(counters.step, cfg.max_steps):
            t0 = time.time()
            lr = run.begin_step(step, ctx.optimizer)
            examples = prompt_batch(ctx, step)
            roll = rollout(ctx, examples, step, n=g.group_size)
            t_rollout = time.time() - t0
            scores, valid, failures = rewards_of(roll, examples)
            record = None
            if usable(ctx, scores, valid, failures, step):
                mask = roll.mask * valid.unsqueeze(1)
                advantages = group_advantages(scores, g.group_size, g.scale_rewards) * valid
                with torch.no_grad(), ctx.autocast:
                    old_logprobs = logprobs_and_values(ctx, ctx.policy, roll)[0] if g.epochs > 1 else None
                    ref_logprobs = reference_logprobs(ctx, roll) if g.beta > 0 else None
                stats = []
                for _ in range(g.epochs):
                    with ctx.autocast:
                        logprobs, _, logits = logprobs_and_values(ctx, ctx.trainee.forward, roll)
                        old = logprobs.detach() if old_logprobs is None else old_logprobs
                        out = grpo_loss(logprobs, old, ref_logprobs, advantages, mask, g.clip, g.beta, g.normalize)
                    out.loss.backward()
                    grad_norm = clip_gradients(ctx.trainee, cfg.optim.grad_clip)
                    if not finite_step(out.loss.detach(), grad_norm, ctx.optimizer, cfg.nonfinite, step):
                        break
                    ctx.optimizer.step()
                    ctx.optimizer.zero_grad(set_to_none=True)
                    with torch.no_grad():
                        entropy = masked_mean(entropy_from_logits(logits.detach()), mask).item()
                    stats.append({"loss": out.loss.item(), "kl": out.kl.item(), "clip_fraction":
                                  out.clip_fraction.item(), "entropy": entropy, "grad_norm": grad_norm.item()})
                if stats:
                    counters.tokens += int(mask.sum())
                    groups = scores.view(-1, g.group_size)
                    record = {**{k: sum(s[k] for s in stats) / len(stats) for k in stats[0]}, "lr": lr,
                              "reward": scores[valid].mean().item(),
                              "reward_std": groups.std(1).mean().item(),
                              "solved_groups": (groups.max(1).values > groups.min(1).values).float().mean().item(),
                              "response_length": roll.mask.sum(1).mean().item(), "checker_failures": len(failures),
                              "tokens_per_s": int(roll.mask.sum()) / t_rollout, "rollout_s": t_rollout,
                              "step_s": time.time() - t0}
                else:
                    counters.skipped += 1
            else:
                counters.skipped += 1
            if run.after_step(step + 1, record, evaluate=(lambda: evaluate_prompts(ctx, rewards_of))
                              if ctx.val else None, save=ctx.save):
                break
    return {"stopped": run.stopped or "max_steps", "val_loss": run.val_loss, "evaluation": run.evaluation,
            "exit_code": run.exit_code}
