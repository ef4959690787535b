"""Tokenizers: train a byte-level BPE, load any HF tokenizer.json, save in the HF folder layout."""

from __future__ import annotations

from llmlab.tokenizer.bpe import (FIM_TOKENS, SPECIAL_TOKENS, Tokenizer, check_min_frequency, check_vocab_size,
                                  load_tokenizer, record_bos_convention, train_bpe)

__all__ = ["FIM_TOKENS", "SPECIAL_TOKENS", "Tokenizer", "check_min_frequency", "check_vocab_size", "load_tokenizer",
           "record_bos_convention", "train_bpe"]
