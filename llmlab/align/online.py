"""What PPO and GRPO share: prompt batches, seeded rollouts, rewards from a checker or a reward model,
per-token log-probabilities of the policy and its reference, and greedy evaluation on held-out prompts."""

from __future__ import annotations

import math

import torch

from llmlab.align.logprobs import token_logprobs
from llmlab.align.policy import load_reward_model, reference, reward_scores
from llmlab.align.rollout import Rollout, check_rewards, layout, load_checker, sample
from llmlab.align.setup import Context
from llmlab.common import LlmlabError
from llmlab.data.preference import PromptExample
from llmlab.data.sft import epoch_batch
from llmlab.generate import SamplingParams
from llmlab.train.loop import step_seed


class Rewards:
    """The reward of an answer: the reward model's score when `reward.model` is set, else the checker's."""

    def __init__(self, ctx: Context):
        self.ctx = ctx
        self.model = load_reward_model(ctx.cfg.reward.model, ctx.device, ctx.tokenizer) \
            if ctx.cfg.reward.model else None
        self.checker = None if self.model is not None else load_checker(ctx.cfg.reward.checker)
        if self.checker is not None and ctx.cfg.reward.checker == "exact_match" and ctx.cfg.method in ("ppo", "grpo"):
            for path, examples in ((ctx.cfg.data.train, ctx.train), (ctx.cfg.data.val or ctx.cfg.data.train, ctx.val)):
                missing = [e.where for e in examples if e.answer is None]
                if missing:
                    raise LlmlabError(f"{path}: {len(missing):,} of {len(examples):,} prompts have no `answer` (the "
                                      f"first at {missing[0]}); reward.checker=exact_match compares each answer with "
                                      "it (add them, or name a reward.model or a checker of your own)")

    @property
    def judge(self) -> str:
        return "reward model" if self.model is not None else f"checker {self.ctx.cfg.reward.checker}"

    @torch.no_grad()
    def __call__(self, rollout: Rollout, examples: list[PromptExample]) -> tuple[torch.Tensor, torch.Tensor, list]:
        """(rewards (B,), valid (B,) bool, what failed) of the rollout's answers to `examples`."""
        if self.model is None:
            prompts = [self.ctx.tokenizer.decode(p) for p, _ in rollout.rows]
            answers = [examples[i].answer for i in rollout.prompt_index]
            rewards, valid, failures = check_rewards(self.checker, prompts, rollout.texts, answers,
                                                     self.ctx.cfg.reward.timeout)
            return rewards.to(self.ctx.device), valid.to(self.ctx.device), failures
        # the reward model learnt on conversations that end with the end of turn and EOS: score them so
        eos = self.ctx.tokenizer.eos_id
        rows = [(p, a + ([eos] if done and eos is not None and (not a or a[-1] != eos) else []))
                for (p, a), done in zip(rollout.rows, rollout.finished)]
        scored = layout(rows, rollout.texts, rollout.finished, rollout.prompt_index, self.ctx.pad_id(),
                        self.ctx.device)
        with self.ctx.autocast:
            rewards = reward_scores(self.model, scored.sequences, scored.lengths)
        return rewards.float(), torch.ones_like(rewards, dtype=torch.bool), []


def prompt_batch(ctx: Context, step: int) -> list[PromptExample]:
    """This rank's prompts for `step`: a seeded shuffle of the training prompts per epoch, cut in
    batches in order (a pure function of the step, so a resumed run sees the same prompts)."""
    size = ctx.cfg.batch_size
    chosen = epoch_batch(len(ctx.train), (step * ctx.world + ctx.rank) * size, size, (ctx.cfg.seed, 7))
    return [ctx.train[i] for i in chosen]


def rollout(ctx: Context, examples: list[PromptExample], step: int, n: int) -> Rollout:
    """n sampled answers to each example, seeded by (seed, step, rank)."""
    r = ctx.cfg.rollout
    params = SamplingParams(max_new_tokens=r.max_new_tokens, temperature=r.temperature, top_p=r.top_p, top_k=r.top_k,
                            n=n, seed=step_seed(ctx.cfg.seed, step, ctx.rank) % 2**62)
    return sample(ctx.policy.model, ctx.tokenizer, ctx.template, [e.prompt_ids for e in examples], params,
                  ctx.device)


def logprobs_and_values(ctx: Context, model, rollout: Rollout) -> tuple[torch.Tensor, torch.Tensor | None,
                                                                         torch.Tensor]:
    """Per-token log-probabilities of the answers (B, T) under the distribution they were sampled from
    (the logits over the rollout temperature, as TRL scores them), the values (B, T) when the model has
    a value head, and the logits."""
    out = model(rollout.input_ids)
    logits, values = out if isinstance(out, tuple) else (out, None)
    return token_logprobs(logits, rollout.targets, temperature=ctx.cfg.rollout.temperature), values, logits


@torch.no_grad()
def reference_logprobs(ctx: Context, rollout: Rollout) -> torch.Tensor:
    with reference(ctx.policy, ctx.frozen) as ref, ctx.autocast:
        return token_logprobs(ref(rollout.input_ids), rollout.targets, temperature=ctx.cfg.rollout.temperature)


def check_finite(ctx: Context, rewards: torch.Tensor, step: int) -> bool:
    """True when every reward is finite; otherwise stop (nonfinite=stop, nothing saved) or say to skip."""
    if bool(torch.isfinite(rewards).all()):
        return True
    bad = int((~torch.isfinite(rewards)).sum())
    if ctx.cfg.nonfinite == "stop":
        raise LlmlabError(f"{bad} non-finite reward(s) at step {step + 1}; stopping without saving. Check the "
                          "reward model or checker, or set nonfinite=skip to skip such batches")
    return False


def usable(ctx: Context, rewards: torch.Tensor, valid: torch.Tensor, failures: list[str], step: int) -> bool:
    """True when the step's rewards can train: the judge scored some answer and every reward is finite.
    A checker that scored no answer skips the step (counted); on a fresh run's first step that is an
    error, since such a checker would never train anything. Non-finite rewards: `check_finite`."""
    if not bool(valid.any()):
        if step == 0:
            raise LlmlabError(f"the {ctx.rewards.judge} scored none of the {len(valid)} answers of step 1"
                              + (f" ({failures[0]})" if failures else "") + "; nothing was trained")
        return False
    return check_finite(ctx, rewards, step)


@torch.no_grad()
def evaluate_prompts(ctx: Context, rewards: Rewards) -> dict:
    """Greedy answers to the first eval.batches x batch_size held-out prompts: their mean reward (and
    val_loss = minus it, what early stopping watches)."""
    examples = ctx.val[:ctx.cfg.eval.batches * ctx.cfg.batch_size]
    params = SamplingParams(max_new_tokens=ctx.cfg.rollout.max_new_tokens, temperature=0.0)
    total, count, failures = 0.0, 0, []
    for i in range(0, len(examples), 32):
        chunk = examples[i:i + 32]
        out = sample(ctx.policy.model, ctx.tokenizer, ctx.template, [e.prompt_ids for e in chunk], params, ctx.device)
        values, valid, failed = rewards(out, chunk)
        failures += failed
        if ctx.cfg.nonfinite == "skip":
            valid &= torch.isfinite(values)
        total += float(values[valid].sum())
        count += int(valid.sum())
    mean = total / max(count, 1)
    if not math.isfinite(mean) or not count:
        raise LlmlabError(f"the held-out prompts' mean reward is {mean if count else 'undefined'}: the "
                          f"{rewards.judge} gave {'non-finite rewards' if count else 'no reward'} to their greedy "
                          "answers" + (f" ({failures[0]})" if failures else ""))
    return {"val_loss": -mean, "val_reward": mean, "text": f"val_reward {mean:.4f} ({rewards.judge}, greedy)"}
