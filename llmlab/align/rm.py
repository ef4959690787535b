"""`method=rm`: a reward model (Ouyang et al. 2022, section 3.5): the base with a scalar head in
place of its language-model head, trained on preference pairs with the Bradley-Terry loss.

    for step ...:
        batch = B pairs, chosen rows then rejected rows
        r = score at each row's last token
        loss = -log sigma(r_chosen - r_rejected)

The result (`final/`) loads with `llmlab.load_model` (a model with num_labels=1) and converts to
HF's sequence-classification layout with `llmlab convert final --to hf`.
"""

from __future__ import annotations


import torch

from llmlab.align.dpo import preference_line, train_on_pairs
from llmlab.align.losses import reward_loss
from llmlab.align.policy import reward_scores
from llmlab.align.setup import Context
from llmlab.data.preference import PairBatches


def pair_scores(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen, rejected) scores (B,) of a batch of pairs."""
    scores = reward_scores(model, batch["sequences"], batch["lengths"]).view(2, -1)
    return scores[0], scores[1]


def train(ctx: Context) -> dict:
    cfg = ctx.cfg
    batches = PairBatches(ctx.train, cfg.batch_size, seed=cfg.seed, pad_id=ctx.pad_id())
    val_batches = PairBatches(ctx.val, cfg.batch_size, seed=cfg.seed, pad_id=ctx.pad_id()) if ctx.val else None
    seen: dict[str, list] = {}

    def loss_fn(batch):
        chosen, rejected = pair_scores(ctx.trainee.forward, batch)
        seen.setdefault("chosen", []).append(chosen.detach())
        seen.setdefault("rejected", []).append(rejected.detach())
        return reward_loss(chosen, rejected).mean(), len(chosen)

    @torch.no_grad()
    def evaluation() -> dict:
        ctx.policy.eval()
        chosen, rejected = [], []
        for batch in val_batches.first_epoch(cfg.eval.batches, ctx.device):
            with ctx.autocast:
                c, r = pair_scores(ctx.policy.model, batch)
            chosen.append(c)
            rejected.append(r)
        ctx.policy.train()
        chosen, rejected = torch.cat(chosen), torch.cat(rejected)
        line = preference_line(reward_loss(chosen, rejected), chosen, rejected, "val_")
        line["text"] = f"val_loss {line['val_loss']:.4f}  accuracy {line['val_accuracy']:.1%}  margin " \
                       f"{line['val_margin']:.3f}"
        return line

    return train_on_pairs(ctx, batches, loss_fn, evaluation if val_batches else None, seen)
