"""Random training windows from token shards: what pretraining (and continued pretraining in
`finetune`) feeds the model. A window's place is a pure function of its seed, so a step's batches
are the same however often a run is resumed and however many processes share it."""

from __future__ import annotations

import numpy as np
import torch

from llmlab.data.fim import FimSpec, fim_permute
from llmlab.data.shards import TokenShards


def sample_batch(shards: TokenShards, batch_size: int, seq_len: int, seed: tuple[int, ...],
                 device: torch.device, fim: FimSpec | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Random windows of seq_len + 1 tokens -> (inputs, targets), each (B, T). `seed` fixes them,
    and the fill-in-the-middle reordering too when `fim` is given."""
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, len(shards) - seq_len - 1, size=batch_size)
    rows = [shards.get(int(s), seq_len + 1) for s in starts]  # int64 already
    if fim is not None:
        rows = [fim_permute(row, fim, rng) for row in rows]
    rows = torch.from_numpy(np.stack(rows))
    rows = rows.to(device, non_blocking=True)
    return rows[:, :-1], rows[:, 1:]
