"""An encoder-decoder (T5) as the engine's decoder.

The engine prefills the prompts and then feeds one token per step into a cache. For an
encoder-decoder the prompt is the encoder's input: the first call runs the encoder once, projects
its output into every decoder layer's cross-attention keys and values, and decodes the start
token; later calls decode the sampled tokens with the decoder's self-attention cache. Every row
starts its output at decoder position 0, so the decoder needs no padding; the prompts' padding
is the encoder's mask.
"""

from __future__ import annotations

import torch
from torch import nn


class PendingCache:
    """The engine's cache before the encoder has run: filled by the first call."""

    def __init__(self, max_len: int):
        self.max_len = max_len
        self.inner = None  # t5.Seq2SeqCache once the prompts are encoded

    @property
    def length(self) -> int:
        return self.inner.length if self.inner is not None else 0

    def select_rows(self, index: torch.Tensor) -> None:
        self.inner.select_rows(index)


class Seq2SeqDecoder:
    """`model(ids, kv_cache=, attention_mask=, logits_to_keep=)` over an encoder-decoder: the first
    call's ids are the prompts (B, S), left-padded with `attention_mask`; later calls' ids are the
    next decoder tokens (B, 1). Returns logits (B, 1, V) of the next token."""

    def __init__(self, model: nn.Module):
        self.model, self.config = model, model.config

    def parameters(self):
        return self.model.parameters()

    def make_kv_cache(self, batch_size: int, max_len: int | None = None) -> PendingCache:
        return PendingCache(min(max_len or self.config.max_target_len, self.config.max_target_len))

    def __call__(self, input_ids: torch.Tensor, *, kv_cache: PendingCache, attention_mask: torch.Tensor | None = None,
                 logits_to_keep: int = 0) -> torch.Tensor:
        if kv_cache.inner is None:
            encoder_out = self.model.encode(input_ids, attention_mask)
            kv_cache.inner = self.model.make_cache(encoder_out, attention_mask, kv_cache.max_len)
            input_ids = torch.full((input_ids.size(0), 1), self.config.decoder_start_id, dtype=torch.long,
                                   device=input_ids.device)
        return self.model.logits(self.model.decode(input_ids, cache=kv_cache.inner))
