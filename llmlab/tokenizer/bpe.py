"""Byte-level BPE: train one with HF `tokenizers`, load any tokenizer.json, save in HF layout.

`Tokenizer` is a thin wrapper over a Rust `tokenizers.Tokenizer`. It adds no post-processing
template: BOS/EOS are added only when `encode` is asked to, so `decode(encode(s)) == s` holds for
every string a byte-level tokenizer can see. Literal special-token text in the input ("<|eos|>")
is matched as the special token, as HF does by default: the text still round-trips through
`decode(..., skip_special=False)`, but its ids are the special id, not the bytes of the text.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from llmlab.common import LlmlabError, atomic_path, atomic_write_text

FIM_TOKENS = ("<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>")  # fill-in-the-middle sentinels
SPECIAL_TOKENS = ("<|bos|>", "<|eos|>", "<|pad|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>",
                  *FIM_TOKENS)

# Names that tokenizer.json files from other projects use for the same roles, tried in order
# after llmlab's own, so that a foreign tokenizer still reports its BOS/EOS/PAD ids.
_BOS_NAMES = ("<|bos|>", "<s>", "<|begin_of_text|>", "<|endoftext|>")
_EOS_NAMES = ("<|eos|>", "</s>", "<|end_of_text|>", "<|endoftext|>")
_PAD_NAMES = ("<|pad|>", "<pad>")
_N_BYTES = 256  # the byte-level alphabet: one symbol per byte value
MAX_VOCAB_SIZE = 2**20  # what BPE training may ask for: the trainer allocates about 70 bytes per id up front
MAX_MIN_FREQUENCY = 2**32  # counts are unsigned 64-bit in the trainer; past this no pair of any corpus qualifies


class Tokenizer:
    """Wraps a `tokenizers.Tokenizer` (byte-level BPE or any tokenizer.json).

    Args:
        tok: the Rust tokenizer to wrap; it is used as is, never copied.
    """

    def __init__(self, tok: tokenizers.Tokenizer):
        self._tok = tok

    @property
    def backend(self) -> tokenizers.Tokenizer:
        """The wrapped `tokenizers.Tokenizer`, for features this wrapper does not expose."""
        return self._tok

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included: the smallest embedding table that fits every id."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def bos_id(self) -> int | None:
        """Id of <|bos|>, else of the first of <s>, <|begin_of_text|>, <|endoftext|> present; else None."""
        return self._first_id(_BOS_NAMES)

    @property
    def eos_id(self) -> int | None:
        """Id of <|eos|>, else of the first of </s>, <|end_of_text|>, <|endoftext|> present; else None."""
        return self._first_id(_EOS_NAMES)

    @property
    def pad_id(self) -> int | None:
        """Id of <|pad|>, else of <pad>; else None."""
        return self._first_id(_PAD_NAMES)

    @property
    def fim_ids(self) -> tuple[int, int, int] | None:
        """Ids of <|fim_prefix|>, <|fim_middle|>, <|fim_suffix|> when the vocabulary has all three."""
        ids = tuple(self._tok.token_to_id(t) for t in FIM_TOKENS)
        return None if None in ids else ids

    def _first_token(self, names: Sequence[str]) -> str | None:
        return next((name for name in names if self._tok.token_to_id(name) is not None), None)

    def _first_id(self, names: Sequence[str]) -> int | None:
        token = self._first_token(names)
        return None if token is None else self._tok.token_to_id(token)

    def token_to_id(self, token: str) -> int | None:
        """The id of `token`, or None if the vocabulary has no such token."""
        return self._tok.token_to_id(token)

    def encode(self, text: str, *, bos: bool = False, eos: bool = False) -> list[int]:
        """Token ids of `text`, optionally framed by BOS and EOS.

        Any post-processing template in a foreign tokenizer.json is ignored so that the flags are
        the only source of BOS/EOS (no doubled BOS).

        Raises:
            ValueError: `text` is not valid Unicode (a lone surrogate), or a flag asks for a
                token this tokenizer does not have.
        """
        try:
            ids = self._tok.encode(text, add_special_tokens=False).ids
        except TypeError as e:
            raise _explain(e, [text]) from None
        return self._frame(ids, bos, eos)

    def encode_batch(self, texts: list[str], *, bos: bool = False, eos: bool = False) -> list[list[int]]:
        """`encode` for many texts at once, in parallel on the Rust side; same ids as one by one."""
        # encode_batch_fast skips the character offsets we never read (tokenizers >= 0.21)
        encode = getattr(self._tok, "encode_batch_fast", self._tok.encode_batch)
        try:
            encodings = encode(list(texts), add_special_tokens=False)
        except TypeError as e:
            raise _explain(e, texts) from None
        return [self._frame(e.ids, bos, eos) for e in encodings]

    def _frame(self, ids: list[int], bos: bool, eos: bool) -> list[int]:
        if bos:
            ids.insert(0, self._required_id(_BOS_NAMES))
        if eos:
            ids.append(self._required_id(_EOS_NAMES))
        return ids

    def _required_id(self, names: Sequence[str]) -> int:
        if (token_id := self._first_id(names)) is None:
            raise ValueError(f"this tokenizer has none of the tokens {', '.join(names)}")
        return token_id

    def decode(self, ids: Sequence[int], *, skip_special: bool = False) -> str:
        """Text of `ids`; with `skip_special` the special tokens are left out.

        Ids outside the vocabulary decode to nothing (the `tokenizers` behaviour), so that a model
        whose embedding table is padded past `vocab_size` can still be sampled from and printed.
        """
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special)

    def save(self, path: str | os.PathLike, *, model_max_length: int | None = None) -> Path:
        """Write `path/tokenizer.json` and `path/tokenizer_config.json`; returns the tokenizer.json path.

        The config names the special tokens so that HF `AutoTokenizer.from_pretrained(path)` loads
        the folder as a fast tokenizer with the same ids. Both writes are atomic.

        Args:
            path: the folder to write into (created if missing).
            model_max_length: longest sequence the paired model accepts; None (written as null)
                means unknown, which transformers reads as "no limit".
        """
        folder = Path(path)
        target = folder / "tokenizer.json"
        with atomic_path(target) as tmp:
            self._tok.save(str(tmp))
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": self._first_token(_BOS_NAMES),
                  "eos_token": self._first_token(_EOS_NAMES), "pad_token": self._first_token(_PAD_NAMES),
                  "model_max_length": model_max_length}
        atomic_write_text(folder / "tokenizer_config.json", json.dumps(config, indent=2) + "\n")
        return target

    def sha256(self) -> str:
        """Hex SHA-256 of the canonical (compact) tokenizer.json text: equal iff the tokenizers are."""
        return hashlib.sha256(self._tok.to_str().encode("utf-8")).hexdigest()


def _explain(error: TypeError, texts: Iterable[str]) -> Exception:
    """The Rust side rejects a str holding a lone surrogate with a bare "must be str"; say why."""
    for text in texts:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            return ValueError(f"cannot tokenize text that is not valid Unicode: {e}")
        except AttributeError:  # not a str at all: the original message says so
            break
    return error


def check_vocab_size(vocab_size: int, special_tokens: Sequence[str] = SPECIAL_TOKENS) -> None:
    """Raise ValueError unless `vocab_size` leaves room for at least one merge and is at most
    MAX_VOCAB_SIZE."""
    floor = _N_BYTES + len(special_tokens)
    if vocab_size <= floor:
        raise ValueError(f"vocab_size={vocab_size} is too small: a byte-level BPE needs {_N_BYTES} byte tokens "
                         f"+ {len(special_tokens)} special tokens, so vocab_size must be > {floor}")
    if vocab_size > MAX_VOCAB_SIZE:
        raise ValueError(f"vocab_size={vocab_size} is too large: at most {MAX_VOCAB_SIZE:,} (the trainer reserves "
                         "memory for every id it may create; the largest vocabularies in use are about 256K)")


def check_min_frequency(min_frequency: int) -> None:
    """Raise ValueError unless `min_frequency` is in [1, MAX_MIN_FREQUENCY]."""
    if not 1 <= min_frequency <= MAX_MIN_FREQUENCY:
        raise ValueError(f"min_frequency must be in [1, {MAX_MIN_FREQUENCY:,}], got {min_frequency}")


def train_bpe(texts: Iterable[str], vocab_size: int, *, special_tokens: Sequence[str] = SPECIAL_TOKENS,
              min_frequency: int = 2, show_progress: bool = False) -> Tokenizer:
    """Train a byte-level BPE tokenizer, streaming `texts` once (the corpus is never held in memory).

    Special tokens take ids 0..k-1 in the order given, then the 256 byte symbols, then merges.
    Because every byte has a symbol, every string is encodable and no unknown token exists.

    Args:
        texts: the training corpus, any iterable of strings (a generator is fine).
        vocab_size: ids wanted, special tokens included; a corpus with too few distinct pairs
            gives fewer.
        special_tokens: tokens never split and never produced from text by merges.
        min_frequency: a pair seen fewer times than this is never merged.
        show_progress: draw the `tokenizers` progress bars on stderr.

    Returns:
        The trained tokenizer.

    Raises:
        ValueError: `vocab_size` leaves no room for a single merge or exceeds MAX_VOCAB_SIZE;
            `min_frequency` is below 1 or above MAX_MIN_FREQUENCY.
    """
    check_vocab_size(vocab_size, special_tokens)
    check_min_frequency(min_frequency)
    tok = tokenizers.Tokenizer(models.BPE())
    # use_regex splits words/numbers/punctuation GPT-2 style, so merges never cross those borders
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                  special_tokens=list(special_tokens), show_progress=show_progress,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    return Tokenizer(tok)


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """Load a tokenizer.json file, or the tokenizer.json inside a folder.

    Raises:
        LlmlabError: the file is missing or unreadable, or is not a valid tokenizer.json;
            the message names the path.
    """
    path = Path(path)
    file = path / "tokenizer.json" if path.is_dir() else path
    if file.exists() and not file.is_file():  # a folder, a FIFO (reading would block), a device
        raise LlmlabError(f"{file}: not a regular file; expected a tokenizer.json or the folder holding one")
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise LlmlabError(f"{file}: no such tokenizer file"
                          + (" (the folder holds no tokenizer.json)" if path.is_dir() else "")) from None
    except (OSError, UnicodeDecodeError) as e:
        raise LlmlabError(f"{file}: cannot read tokenizer: {e}") from None
    try:
        return Tokenizer(tokenizers.Tokenizer.from_str(text))
    except Exception as e:  # the Rust side raises a bare Exception for any malformed file
        try:
            json.loads(text)  # parsed only on failure: Python's message gives the line and column
        except ValueError as je:
            raise LlmlabError(f"{file}: invalid JSON: {je}") from None
        except RecursionError:
            raise LlmlabError(f"{file}: not a valid tokenizer.json: nested too deeply") from None
        raise LlmlabError(f"{file}: not a valid tokenizer.json: {e}") from None
