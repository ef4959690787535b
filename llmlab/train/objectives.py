"""What pretraining predicts, and the batches that teach it.

- `clm` (decoders): the next token of random windows of the corpus (`llmlab.data.windows`).
- `mlm` (encoders, BERT's masked language model): the corpus is cut into fixed sequences of
  seq_len - 2 tokens, each framed as [CLS] tokens [SEP] and masked by `llmlab.data.masking`: 15% of
  the tokens, 80/10/10 [MASK] / random / kept; by token, by whole word, or by SpanBERT's spans (with
  the model's span boundary head, its boundary objective too); and, for ALBERT, each sequence cut
  in two segments at a random point, swapped half the time, for sentence-order prediction. Dynamic
  masking (RoBERTa) draws a new mask every time a sequence is seen; static masking (BERT) one per
  sequence, the same in every epoch.
- `span_corruption` (encoder-decoders, T5): each fixed sequence loses 15% of its tokens in spans of
  mean length 3, each replaced by a sentinel in the input, and the target spells the spans out
  after their sentinels; rows are read at the length that makes inputs of exactly seq_len tokens.
Validation batches are masked statically, so every evaluation scores the same predictions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from llmlab.common import LlmlabError
from llmlab.data.masking import (dynamic_rng, mlm_mask, sentence_order_pair, span_corrupt, span_corruption_lengths,
                                 span_mask, static_rng, word_starts_from_tokens)
from llmlab.data.shards import TokenShards
from llmlab.data.windows import sample_batch
from llmlab.models import model_kind, with_article

OBJECTIVES = {"clm": "decoder", "mlm": "encoder", "span_corruption": "encoder-decoder"}


@dataclass
class MaskingConfig:
    rate: float = 0.15  # mlm and span_corruption: the share of tokens to predict
    static: bool = False  # mlm: one mask per sequence for good (BERT), not a new one each time it is seen (RoBERTa)
    unit: Literal["token", "word", "span"] = "token"  # mlm: tokens, whole words, or SpanBERT's geometric spans
    sentence_order: bool = False  # mlm: ALBERT's sentence-order prediction (needs model.sentence_head)
    mean_span_length: float = 3.0  # span_corruption: T5's mean corrupted span

    def __post_init__(self):
        if not 0 < self.rate < 1:
            raise ValueError(f"rate must be in (0, 1), got {self.rate}")
        if not self.mean_span_length >= 1:
            raise ValueError(f"mean_span_length must be >= 1, got {self.mean_span_length}")


def resolve_objective(objective: str, masking: MaskingConfig, model_cfg) -> str:
    """The objective to train (`auto`: the one the model's kind is made for), checked against the
    model: what it predicts, and the heads the masking options need."""
    kind = model_kind(model_cfg)
    native = next(o for o, k in OBJECTIVES.items() if k == kind)
    objective = native if objective == "auto" else objective
    if objective != native:
        raise LlmlabError(f"objective={objective} trains {OBJECTIVES[objective]} models; model.family="
                          f"{model_cfg.family} is {with_article(kind)}: use objective={native}")
    if objective == "mlm":
        if model_cfg.head != "mlm":
            raise LlmlabError(f"objective=mlm needs model.head=mlm, got {model_cfg.head}")
        if masking.sentence_order != model_cfg.sentence_head:
            raise LlmlabError("masking.sentence_order and model.sentence_head go together: the sentence-order "
                              "task trains the sentence head")
        if model_cfg.span_boundary_head and masking.unit != "span":
            raise LlmlabError("model.span_boundary_head learns from spans: set masking.unit=span")
    return objective


class Batches:
    """Training and validation batches of one objective: `batch(shards, key, device)` gives the model's
    keyword arguments, targets included; `key` seeds the batch as `sample_batch`'s seed does."""

    def __init__(self, objective: str, masking: MaskingConfig, seq_len: int, batch_size: int, model_cfg,
                 tokenizer, seed: int, fim=None):
        self.objective, self.masking, self.seq_len, self.batch_size = objective, masking, seq_len, batch_size
        self.model_cfg, self.seed, self.fim = model_cfg, seed, fim
        self.vocab_size = model_cfg.vocab_size
        if objective == "clm":
            self.row = seq_len + 1
            return
        if objective == "mlm":
            self.cls, self.sep = _first(tokenizer.cls_id, tokenizer.bos_id), _first(tokenizer.sep_id, tokenizer.eos_id)
            self.mask = tokenizer.mask_id
            if None in (self.cls, self.sep, self.mask):
                raise LlmlabError("objective=mlm needs a tokenizer with [CLS], [SEP] and [MASK] tokens (or <s>, </s> "
                                  "and <mask>): train one with `llmlab tokenizer train kind=wordpiece`")
            self.specials = sorted({i for i in (self.cls, self.sep, self.mask, tokenizer.pad_id, tokenizer.eos_id)
                                    if i is not None})
            self.row = seq_len - (3 if masking.sentence_order else 2)
            if self.row < 2:
                raise LlmlabError(f"seq_len={seq_len} leaves no room for text between [CLS] and [SEP]")
            if masking.unit != "token":
                self.pieces = [tokenizer.backend.id_to_token(i) or "" for i in range(tokenizer.vocab_size)]
                self.scheme = "wordpiece" if tokenizer.kind == "wordpiece" else "space_prefix"
            return
        self.sentinels = tokenizer.sentinel_ids
        self.eos = tokenizer.eos_id
        if not self.sentinels:
            raise LlmlabError("objective=span_corruption needs sentinel tokens <extra_id_0>, ...: train the tokenizer "
                              "with `llmlab tokenizer train kind=unigram`")
        try:
            self.row, self.target_len = span_corruption_lengths(seq_len, rate=masking.rate,
                                                                mean_span_length=masking.mean_span_length,
                                                                eos=self.eos is not None)
        except ValueError as e:
            raise LlmlabError(f"seq_len={seq_len}: {e}") from None
        if self.target_len > model_cfg.max_target_len:
            raise LlmlabError(f"span corruption of seq_len={seq_len} inputs makes targets of {self.target_len} "
                              f"tokens, more than model.max_target_len={model_cfg.max_target_len}")

    def sequences(self, shards: TokenShards) -> int:
        """How many fixed sequences the split holds (clm: window starts)."""
        return max(0, len(shards) - self.row) if self.objective == "clm" else len(shards) // self.row

    def batch(self, shards: TokenShards, key: tuple[int, ...], device: torch.device, *,
              static: bool = False) -> dict:
        if self.objective == "clm":
            x, y = sample_batch(shards, self.batch_size, self.seq_len, key, device, self.fim)
            return {"input_ids": x, "targets": y}
        rng = np.random.default_rng(key)
        index = rng.integers(0, self.sequences(shards), size=self.batch_size)
        draw = int(rng.integers(2**62))  # this batch's draw: what makes dynamic masks new
        rows = []
        for i in index.tolist():
            mask_rng = static_rng(self.seed, i) if static or self.masking.static else dynamic_rng(self.seed, i, draw)
            tokens = shards.get(i * self.row, self.row)
            rows.append(self._mlm(tokens, mask_rng) if self.objective == "mlm" else self._t5(tokens, mask_rng))
        out = {k: torch.from_numpy(np.stack([r[k] for r in rows])).to(device) for k in rows[0] if k != "boundaries"}
        if "boundaries" in rows[0]:
            out["span_boundaries"] = tuple(torch.from_numpy(np.stack([r["boundaries"][j] for r in rows])).to(device)
                                           for j in range(3))
        return out

    def _mlm(self, tokens: np.ndarray, rng: np.random.Generator) -> dict:
        if self.masking.sentence_order:
            cut = int(rng.integers(1, len(tokens)))
            pair = sentence_order_pair(tokens[:cut], tokens[cut:], rng=rng, cls_id=self.cls, sep_id=self.sep,
                                       max_len=self.seq_len)
            ids, types, extra = pair.input_ids, pair.token_type_ids, {"sentence_targets": np.int64(pair.label)}
        else:
            ids = np.concatenate([[self.cls], tokens, [self.sep]]).astype(np.int64)
            types, extra = np.zeros_like(ids), {}
        starts = None
        if self.masking.unit != "token":
            starts = word_starts_from_tokens([self.pieces[t] for t in ids.tolist()], self.scheme)
        common = dict(rng=rng, vocab_size=self.vocab_size, mask_id=self.mask, special_ids=self.specials,
                      rate=self.masking.rate, word_starts=starts)
        if self.masking.unit == "span":
            spans = span_mask(ids, **common)
            inputs, labels = spans.inputs, spans.labels
            if self.model_cfg.span_boundary_head:
                extra["boundaries"] = (spans.left, spans.right, spans.position)
        else:
            inputs, labels = mlm_mask(ids, **common)
        return {"input_ids": inputs.astype(np.int64), "token_type_ids": types, "targets": labels, **extra}

    def _t5(self, tokens: np.ndarray, rng: np.random.Generator) -> dict:
        inputs, targets = span_corrupt(tokens.astype(np.int64), rng=rng, sentinel_ids=self.sentinels,
                                       rate=self.masking.rate, mean_span_length=self.masking.mean_span_length,
                                       eos_id=self.eos)
        return {"input_ids": inputs.astype(np.int64), "targets": targets.astype(np.int64)}


def _first(*ids):
    return next((i for i in ids if i is not None), None)
