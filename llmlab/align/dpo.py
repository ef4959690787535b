"""`method=dpo|ipo`: Direct Preference Optimization (Rafailov et al. 2023) and its squared-loss
variant IPO (Azar et al. 2023), on preference pairs, against a reference.

The reference's log-probabilities come from the starting model, computed once for every pair before
the first step (`dpo.reference=precompute`), or with LoRA from the base with the adapters disabled
at each step (`dpo.reference=adapters`); neither keeps a second model in memory.

    for step ...:
        batch = B pairs, chosen rows then rejected rows
        log pi(y|x) summed over the answer's tokens (averaged for IPO)
        loss = dpo_loss(pi_w, pi_l, ref_w, ref_l, beta)
"""

from __future__ import annotations

import contextlib
import time

import torch

from llmlab.align.logprobs import IGNORE, sequence_logprobs, token_logprobs
from llmlab.align.losses import dpo_loss, entropy_from_logits, masked_mean
from llmlab.align.policy import reference
from llmlab.align.setup import Context
from llmlab.data.preference import PairBatches, collate_pairs
from llmlab.models.io import load_model
from llmlab.train.core import accumulate, clip_gradients


@torch.no_grad()
def reference_logprobs(ctx: Context, pairs: list) -> torch.Tensor:
    """(N, 2) log-probabilities of each pair's chosen and rejected answer under the starting model: the
    base with adapters disabled (LoRA), or the base read again from its checkpoint (full fine-tuning,
    so a resumed run gets the same reference; its memory is given back afterwards)."""
    out = []
    average = ctx.cfg.method == "ipo"
    with contextlib.ExitStack() as stack:
        ref = stack.enter_context(reference(ctx.policy, None)) if ctx.lora else load_model(ctx.cfg.base, ctx.device)
        was_training = ref.training
        ref.eval()
        for i in range(0, len(pairs), ctx.cfg.batch_size):
            batch = collate_pairs(pairs[i:i + ctx.cfg.batch_size], ctx.pad_id(), ctx.device)
            with ctx.autocast:
                logps = sequence_logprobs(ref, batch["input_ids"], batch["targets"], average=average)
            out.append(logps.float().view(2, -1).t())
        ref.train(was_training)
    return torch.cat(out)


def pair_losses(ctx: Context, model, batch: dict, ref: torch.Tensor | None, seen: dict | None = None):
    """The DPO or IPO loss of each pair of `batch` (and its rewards); `ref` (B, 2) precomputed, or None
    to run the base with adapters disabled now. With dpo.sft_weight (RPO) each pair's loss also holds
    the weighted negative log-likelihood per token of the batch's chosen answers (as TRL's
    loss_type=[sigmoid, sft] adds it). With `seen`, the policy's entropy over the answers is appended
    to seen["entropy"]."""
    cfg = ctx.cfg
    average = cfg.method == "ipo"
    targets = batch["targets"]
    logits = model(batch["input_ids"])
    per_token = token_logprobs(logits, targets)
    tokens = (targets != IGNORE).sum(1).float()
    summed = per_token.sum(1)
    logps = (summed / tokens.clamp(min=1) if average else summed).view(2, -1)  # rows: chosen, then rejected
    if seen is not None:
        with torch.no_grad():
            seen.setdefault("entropy", []).append(masked_mean(entropy_from_logits(logits.detach()),
                                                              (targets != IGNORE).float()))
    if ref is None:
        with reference(ctx.policy, None) as base:
            ref = sequence_logprobs(base, batch["input_ids"], targets, average=average).view(2, -1).t()
    out = dpo_loss(logps[0], logps[1], ref[:, 0], ref[:, 1], cfg.dpo.beta, cfg.dpo.label_smoothing, kind=cfg.method)
    if cfg.dpo.sft_weight:
        chosen_tokens = tokens.view(2, -1)[0]
        nll = -summed.view(2, -1)[0].sum() / chosen_tokens.sum().clamp(min=1)
        out = out._replace(loss=out.loss + cfg.dpo.sft_weight * nll)
    return out


def train(ctx: Context) -> dict:
    cfg = ctx.cfg
    precomputed = cfg.dpo.reference == "precompute"
    if precomputed:
        t0 = time.time()
        train_ref, val_ref = reference_logprobs(ctx, ctx.train), reference_logprobs(ctx, ctx.val) if ctx.val else None
        if ctx.rank == 0:
            print(f"reference log-probabilities of {len(ctx.train) + len(ctx.val):,} pairs in "
                  f"{time.time() - t0:.1f} s")
    batches = PairBatches(ctx.train, cfg.batch_size, seed=cfg.seed, pad_id=ctx.pad_id())
    val_batches = PairBatches(ctx.val, cfg.batch_size, seed=cfg.seed, pad_id=ctx.pad_id()) if ctx.val else None
    stats = {}

    def loss_fn(batch):
        ref = train_ref[batch["index"]] if precomputed else None
        out = pair_losses(ctx, ctx.trainee.forward, batch, ref, stats)
        stats.setdefault("chosen", []).append(out.chosen_rewards)
        stats.setdefault("rejected", []).append(out.rejected_rewards)
        return out.loss.mean(), len(out.loss)

    @torch.no_grad()
    def evaluation() -> dict:
        ctx.policy.eval()
        losses, chosen, rejected = [], [], []
        for batch in val_batches.first_epoch(cfg.eval.batches, ctx.device):
            with ctx.autocast:
                out = pair_losses(ctx, ctx.policy.model, batch, val_ref[batch["index"]] if precomputed else None)
            losses.append(out.loss)
            chosen.append(out.chosen_rewards)
            rejected.append(out.rejected_rewards)
        ctx.policy.train()
        line = preference_line(torch.cat(losses), torch.cat(chosen), torch.cat(rejected), "val_")
        line["text"] = f"val_loss {line['val_loss']:.4f}  accuracy {line['val_accuracy']:.1%}  margin " \
                       f"{line['val_margin']:.3f}"
        return line

    return train_on_pairs(ctx, batches, loss_fn, evaluation if val_batches else None, stats)


def train_on_pairs(ctx: Context, batches: PairBatches, loss_fn, evaluation, seen: dict) -> dict:
    """The loop rm, dpo and ipo share: accumulate `loss_fn` over each step's micro-batches of pairs
    (it appends the chosen and rejected rewards of each to `seen`), clip, step, log, evaluate, save."""
    cfg, counters = ctx.cfg, ctx.counters
    with ctx.open() as run:
        ctx.policy.train()
        for step in range(counters.step, cfg.max_steps):
            t0 = time.time()
            lr = run.begin_step(step, ctx.optimizer)
            seen.clear()
            micro = [batches.batch(step * cfg.grad_accum * ctx.world + ctx.rank * cfg.grad_accum + k, ctx.device)
                     for k in range(cfg.grad_accum)]
            loss = accumulate(ctx.trainee, micro, loss_fn, ctx.autocast)
            grad_norm = clip_gradients(ctx.trainee, cfg.optim.grad_clip)
            record = None
            if run.optimizer_step(step, loss.loss, grad_norm, ctx.optimizer):
                pairs = int(loss.units)
                counters.tokens += pairs
                seconds = time.time() - t0
                # the rewards of every rank's pairs, so that a record describes the whole step
                chosen, rejected = (gathered(torch.cat(seen[k]).float(), ctx.world) for k in ("chosen", "rejected"))
                entropy = gathered(torch.stack(seen["entropy"]).float(), ctx.world) if "entropy" in seen else None
                lengths = gathered(torch.cat([(b["targets"] != -100).sum(1) for b in micro]).float(), ctx.world)
                record = {"loss": loss.loss.item(), "lr": lr, "grad_norm": grad_norm.item(),
                          **preference_line(None, chosen, rejected),
                          **({"entropy": entropy.mean().item()} if entropy is not None else {}),
                          "response_length": lengths.mean().item(), "pairs_per_s": pairs / seconds,
                          "tokens_per_s": sum(int((b["targets"] != -100).sum()) for b in micro) / seconds,
                          "step_s": seconds,
                          "epoch": round(batches.epoch_of((step + 1) * cfg.grad_accum * ctx.world - 1), 4)}
            if run.after_step(step + 1, record, evaluate=evaluation, save=ctx.save):
                break
    return {"stopped": run.stopped or "max_steps", "val_loss": run.val_loss, "evaluation": run.evaluation,
            "exit_code": run.exit_code}


def preference_line(losses: torch.Tensor | None, chosen: torch.Tensor, rejected: torch.Tensor,
                    prefix: str = "") -> dict:
    """Reward margins and preference accuracy of a set of pairs (and their mean loss)."""
    line = {} if losses is None else {f"{prefix}loss": losses.mean().item()}
    margin = chosen - rejected
    line.update({f"{prefix}accuracy": (margin > 0).float().mean().item(), f"{prefix}margin": margin.mean().item(),
                 f"{prefix}chosen_reward": chosen.mean().item(), f"{prefix}rejected_reward": rejected.mean().item()})
    return line


def gathered(x: torch.Tensor, world: int) -> torch.Tensor:
    """`x` of every rank, concatenated in rank order (itself in one process); equal shapes on every rank."""
    if world == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world)]
    torch.distributed.all_gather(parts, x.contiguous())
    return torch.cat(parts)
