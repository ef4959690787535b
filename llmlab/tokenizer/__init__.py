"""Tokenizers: train a byte-level BPE, a WordPiece (BERT) or a Unigram (T5), load any HF tokenizer.json, save
in the HF folder layout."""

from __future__ import annotations

from llmlab.tokenizer.bpe import (FIM_TOKENS, SPECIAL_TOKENS, Tokenizer, check_min_frequency, check_vocab_size,
                                  load_tokenizer, record_bos_convention, train_bpe)
from llmlab.tokenizer.trainers import (UNIGRAM_SPECIAL_TOKENS, WORDPIECE_SPECIAL_TOKENS, check_unigram_vocab_size,
                                       check_wordpiece_vocab_size, sentinel_tokens, train_unigram, train_wordpiece)

__all__ = ["FIM_TOKENS", "SPECIAL_TOKENS", "Tokenizer", "check_min_frequency", "check_vocab_size", "load_tokenizer",
           "record_bos_convention", "train_bpe", "UNIGRAM_SPECIAL_TOKENS", "WORDPIECE_SPECIAL_TOKENS",
           "check_unigram_vocab_size", "check_wordpiece_vocab_size", "sentinel_tokens", "train_unigram",
           "train_wordpiece"]
