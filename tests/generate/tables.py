"""Hand-built language models whose next-token logits depend only on the last token."""

from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import nn

from llmlab.models.layers import KVCache


class TableLM(nn.Module):
    """logits(next | ..., last) = table[last]: a bigram model the engine drives like any decoder."""

    def __init__(self, table: torch.Tensor, max_seq_len: int = 64):
        super().__init__()
        self.table = nn.Parameter(table.float())
        self.config = SimpleNamespace(vocab_size=table.size(0), max_seq_len=max_seq_len)

    def make_kv_cache(self, batch_size: int, max_len: int | None = None) -> KVCache:
        return KVCache(0, batch_size, 1, max_len or self.config.max_seq_len, 1)

    def forward(self, input_ids, *, kv_cache=None, attention_mask=None, logits_to_keep=0):
        if kv_cache is not None:
            kv_cache.advance(input_ids.size(1))
        return self.table[input_ids[:, -logits_to_keep:] if logits_to_keep else input_ids]


def chain(vocab_size: int, path: list[int], loop_to: int | None = None) -> TableLM:
    """A model that greedily follows `path` (each token's successor), then repeats `loop_to`."""
    table = torch.zeros(vocab_size, vocab_size)
    for a, b in zip(path, path[1:]):
        table[a, b] = 10.0
    if loop_to is not None:
        table[path[-1], loop_to] = 10.0
        table[loop_to, loop_to] = 10.0
    return TableLM(table)
