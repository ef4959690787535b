"""Byte-level BPE: train one with HF `tokenizers`, load any tokenizer.json, save in HF layout.

`Tokenizer` is a thin wrapper over a Rust `tokenizers.Tokenizer` of any kind (BPE, and the
WordPiece and Unigram ones of `llmlab.tokenizer.trainers`, BERT's and T5's). It adds no
post-processing template: BOS/EOS are added only when `encode` is asked to, so
`decode(encode(s)) == s` holds for every string a byte-level tokenizer can see. Literal
special-token text in the input ("<|eos|>") is matched as the special token, as HF does by
default: the text still round-trips through `decode(..., skip_special=False)`, but its ids are
the special id, not the bytes of the text.

A tokenizer also carries its model's BOS convention: `add_bos` says whether the model saw BOS
before every document (llmlab's `data prepare` puts none by default: EOS after each document is
what precedes the next). `save` and `record_bos_convention` write it where outside clients read it
(tokenizer_config.json's `add_bos_token` and `bos_token`, and the tokenizer.json post-processor
that HF applies), so that HF `AutoTokenizer` and lm-eval start a document with the token the model
learned: BOS when there is one to declare, else EOS (`document_start_id`).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from llmlab.common import LlmlabError, atomic_path, atomic_write_text, read_json_object

FIM_TOKENS = ("<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>")  # fill-in-the-middle sentinels
SPECIAL_TOKENS = ("<|bos|>", "<|eos|>", "<|pad|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>",
                  *FIM_TOKENS)

# Names that tokenizer.json files from other projects use for the same roles, tried in order
# after llmlab's own, so that a foreign tokenizer still reports its BOS/EOS/PAD ids.
_BOS_NAMES = ("<|bos|>", "<s>", "<|begin_of_text|>", "<|endoftext|>")
_EOS_NAMES = ("<|eos|>", "</s>", "<|end_of_text|>", "<|endoftext|>")
_PAD_NAMES = ("<|pad|>", "<pad>", "[PAD]")
_UNK_NAMES = ("<unk>", "[UNK]")
_CLS_NAMES = ("[CLS]",)  # BERT's sequence start and classification token; not a BOS (HF's bos_token_id is None)
_SEP_NAMES = ("[SEP]",)  # BERT's sequence end and separator; not an EOS
_MASK_NAMES = ("[MASK]", "<mask>")
SENTINEL = "<extra_id_{}>"  # T5's span-corruption sentinels: <extra_id_0> has the highest id
_N_BYTES = 256  # the byte-level alphabet: one symbol per byte value
MAX_VOCAB_SIZE = 2**20  # what BPE training may ask for: the trainer allocates about 70 bytes per id up front
MAX_MIN_FREQUENCY = 2**32  # counts are unsigned 64-bit in the trainer; past this no pair of any corpus qualifies


class Tokenizer:
    """Wraps a `tokenizers.Tokenizer` (byte-level BPE, WordPiece, Unigram: any tokenizer.json).

    Args:
        tok: the Rust tokenizer to wrap; it is used as is, never copied.
        add_bos: whether the paired model saw BOS before every document (data prepared with
            `bos=true`, or a folder whose tokenizer_config.json says `add_bos_token: true`).
        bos_token: the BOS token a tokenizer_config.json declares; None when it declares none.
    """

    def __init__(self, tok: tokenizers.Tokenizer, *, add_bos: bool = False, bos_token: str | None = None):
        self._tok = tok
        self.add_bos = add_bos  # the model saw BOS before every document; `encode` still adds it only when asked
        self._declared_bos = bos_token

    @property
    def backend(self) -> tokenizers.Tokenizer:
        """The wrapped `tokenizers.Tokenizer`, for features this wrapper does not expose."""
        return self._tok

    @property
    def kind(self) -> str:
        """The model type of the tokenizer.json, lowercased: "bpe" (byte-level or not), "wordpiece",
        "unigram" or "wordlevel"."""
        return type(self._tok.model).__name__.lower()

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
        """Id of <|pad|>, else of <pad>, else of [PAD]; else None."""
        return self._first_id(_PAD_NAMES)

    @property
    def unk_id(self) -> int | None:
        """Id of <unk>, else of [UNK]; None for a byte-level BPE, which has no unknown token."""
        return self._first_id(_UNK_NAMES)

    @property
    def cls_id(self) -> int | None:
        """Id of [CLS], which BERT's template puts before a text; else None."""
        return self._first_id(_CLS_NAMES)

    @property
    def sep_id(self) -> int | None:
        """Id of [SEP], which BERT's template puts after each text; else None."""
        return self._first_id(_SEP_NAMES)

    @property
    def mask_id(self) -> int | None:
        """Id of [MASK], else of <mask>: what masked-language-model training puts in place of a token."""
        return self._first_id(_MASK_NAMES)

    @property
    def sentinel_ids(self) -> tuple[int, ...]:
        """Ids of <extra_id_0>, <extra_id_1>, ... (T5's span-corruption sentinels), in that order
        and as far as the run goes unbroken; empty when there are none. In T5's layout they are the
        last ids, <extra_id_0> the highest, so the tuple counts down."""
        ids = []
        while (token_id := self._tok.token_to_id(SENTINEL.format(len(ids)))) is not None:
            ids.append(token_id)
        return tuple(ids)

    @property
    def bos_token(self) -> str | None:
        """The BOS token the tokenizer declares: the one its tokenizer_config.json named, else, when
        `add_bos`, the BOS that `bos_id` finds; None when it declares none (HF's `bos_token`)."""
        if self._declared_bos is not None and self._tok.token_to_id(self._declared_bos) is not None:
            return self._declared_bos
        return self._first_token(_BOS_NAMES) if self.add_bos else None

    @property
    def document_end_id(self) -> int | None:
        """The id `encode(..., eos=True)` puts after a text: EOS, else BERT's [SEP] (a WordPiece
        vocabulary has no EOS; [SEP] ends its segments)."""
        eos = self.eos_id
        return eos if eos is not None else self.sep_id

    @property
    def document_start_id(self) -> int | None:
        """The id that precedes a document: the declared BOS (`bos_token`), else EOS, which ends the
        document before it in llmlab's shards. What HF's `bos_token_id or eos_token_id` gives for a
        saved folder, and what lm-eval starts a rolling-perplexity window with."""
        token = self.bos_token
        return self._tok.token_to_id(token) if token is not None else self.eos_id

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

    def special_token_id(self, text: str) -> int | None:
        """The id of `text` when it is one special token (an added token marked special, such as
        <|end|>), else None. Merges never produce a special token from ordinary text, so a model
        writes that text only as this id: matching the id is matching the text."""
        token_id = self._tok.token_to_id(text)
        added = self._tok.get_added_tokens_decoder().get(token_id) if token_id is not None else None
        return token_id if added is not None and added.special and added.content == text else None

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
            end = self.document_end_id
            if end is None:
                raise ValueError(f"this tokenizer has none of the tokens {', '.join(_EOS_NAMES + _SEP_NAMES)}")
            ids.append(end)
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
        the folder as a fast tokenizer with the same ids, and records the BOS convention: with
        `add_bos`, `add_bos_token: true`, the BOS as `bos_token`, and a tokenizer.json post-processor
        that puts it before the text HF encodes (as LLaMA's does); without, `add_bos_token: false`
        and `bos_token: null`, so that HF's `bos_token_id` is None and harnesses start a document
        with EOS, as llmlab's shards do. Both writes are atomic.

        Args:
            path: the folder to write into (created if missing).
            model_max_length: longest sequence the paired model accepts; None (written as null)
                means unknown, which transformers reads as "no limit".

        Raises:
            ValueError: `add_bos` is set but the vocabulary has no BOS token.
        """
        folder = Path(path)
        bos = self._bos_config()
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": bos["bos_token"],
                  "eos_token": self._first_token(_EOS_NAMES), "pad_token": self._first_token(_PAD_NAMES),
                  "add_bos_token": bos["add_bos_token"], "model_max_length": model_max_length}
        # the roles a BPE has none of (BERT's, T5's), named only when present so a BPE's config stays as it was
        roles = {"unk_token": _UNK_NAMES, "cls_token": _CLS_NAMES, "sep_token": _SEP_NAMES, "mask_token": _MASK_NAMES}
        config |= {key: token for key, names in roles.items() if (token := self._first_token(names)) is not None}
        if sentinels := self.sentinel_ids:  # the key transformers 4 reads, and 5 reads as its extra_special_tokens
            config["additional_special_tokens"] = [SENTINEL.format(i) for i in range(len(sentinels))]
        target = self._save_backend(folder)
        atomic_write_text(folder / "tokenizer_config.json", json.dumps(config, indent=2) + "\n")
        return target

    def _bos_config(self) -> dict:
        if self.add_bos and self.bos_token is None:
            raise ValueError(f"add_bos is set but this tokenizer has none of the tokens {', '.join(_BOS_NAMES)}")
        return {"bos_token": self.bos_token if self.add_bos else None, "add_bos_token": self.add_bos}

    def _save_backend(self, folder: Path) -> Path:
        """Write tokenizer.json with a post-processor that adds BOS exactly when `add_bos` (the wrapped
        tokenizer is left as it is; llmlab's own `encode` ignores post-processors)."""
        tok = self._tok
        current = _processor_state(tok)
        if _adds_bos(current, self.bos_token) != self.add_bos:
            spec = json.loads(tok.to_str())
            bos = self.bos_token
            spec["post_processor"] = (_with_bos(current, bos, self._tok.token_to_id(bos)) if self.add_bos
                                      else _without_bos(current))
            tok = tokenizers.Tokenizer.from_str(json.dumps(spec))
        target = folder / "tokenizer.json"
        with atomic_path(target) as tmp:
            tok.save(str(tmp))
        return target

    def sha256(self) -> str:
        """Hex SHA-256 of the canonical (compact) tokenizer.json text: equal iff the tokenizers are."""
        return hashlib.sha256(self._tok.to_str().encode("utf-8")).hexdigest()


def record_bos_convention(folder: str | os.PathLike, add_bos: bool) -> None:
    """Record in a tokenizer folder (one holding tokenizer.json) whether its model saw BOS before every
    document, as `Tokenizer.save` writes it: tokenizer_config.json's `add_bos_token`, its `bos_token`
    (null without BOS) and the tokenizer.json post-processor. Every other field of the config (a chat
    template, a foreign tokenizer's own EOS) stays; a folder without a config gets `save`'s.

    Raises:
        LlmlabError: the folder's tokenizer or config cannot be read.
        ValueError: `add_bos` but the vocabulary has no BOS token.
    """
    folder = Path(folder)
    tokenizer = load_tokenizer(folder)
    tokenizer.add_bos = add_bos
    config = _read_config(folder / "tokenizer_config.json")
    if config is None:
        tokenizer.save(folder)
        return
    bos = tokenizer._bos_config()
    tokenizer._save_backend(folder)
    atomic_write_text(folder / "tokenizer_config.json", json.dumps({**config, **bos}, indent=2) + "\n")


def _processor_state(tok: tokenizers.Tokenizer) -> dict | None:
    """The post-processor of `tok` as its tokenizer.json object, without serializing the vocabulary."""
    processor = tok.post_processor
    return None if processor is None else json.loads(processor.__getstate__())


def _processor_parts(state: dict | None) -> list[dict]:
    if state is None:
        return []
    return list(state.get("processors") or []) if state.get("type") == "Sequence" else [state]


def _adds_bos(state: dict | None, bos_token: str | None = None) -> bool:
    """Whether a post-processor (a tokenizer.json object) puts a BOS before the text: a
    TemplateProcessing, alone or in a Sequence, whose single-text template starts with `bos_token`
    or a token of _BOS_NAMES. BERT's [CLS] starts a text too but is no BOS: HF declares none."""
    names = {*_BOS_NAMES, bos_token} - {None}
    return any(p.get("type") == "TemplateProcessing" and p.get("single")
               and p["single"][0].get("SpecialToken", {}).get("id") in names for p in _processor_parts(state))


def _without_bos(state: dict | None) -> dict | None:
    parts = [p for p in _processor_parts(state) if p.get("type") != "TemplateProcessing"]
    return None if not parts else parts[0] if len(parts) == 1 else {"type": "Sequence", "processors": parts}


def _with_bos(state: dict | None, bos: str, bos_id: int) -> dict:
    template = json.loads(processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos}:1 $B:1", special_tokens=[(bos, bos_id)]).__getstate__())
    parts = [*_processor_parts(_without_bos(state)), template]
    return parts[0] if len(parts) == 1 else {"type": "Sequence", "processors": parts}


def _read_config(file: Path) -> dict | None:
    """A tokenizer_config.json (or special_tokens_map.json) as a dict; None when there is none."""
    if not file.is_file():
        return None
    return read_json_object(file)


def _token_text(token) -> str | None:
    # HF stores a special token as its text or as an AddedToken object {"content": ...}
    text = token.get("content") if isinstance(token, dict) else token
    return text if isinstance(text, str) and text else None


def _bos_convention(folder: Path) -> tuple[bool | None, str | None]:
    """(add_bos_token, declared BOS text) of a tokenizer folder; add_bos_token None when not stated."""
    config = _read_config(folder / "tokenizer_config.json") or {}
    if "bos_token" not in config:  # older HF folders name the special tokens in a separate file
        config = {**(_read_config(folder / "special_tokens_map.json") or {}), **config}
    add_bos = config.get("add_bos_token")
    if add_bos is not None and not isinstance(add_bos, bool):
        raise LlmlabError(f"{folder / 'tokenizer_config.json'}: add_bos_token must be true or false, got {add_bos!r}")
    return add_bos, _token_text(config.get("bos_token"))


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

    From a folder, the BOS convention comes along: `add_bos` is tokenizer_config.json's
    `add_bos_token` (when it has none: whether the tokenizer.json post-processor adds BOS, as a
    folder saved by transformers 5 records it), and its `bos_token` is the declared BOS. A lone
    file declares nothing: no BOS, EOS before a document.

    Raises:
        LlmlabError: the file is missing or unreadable, or is not a valid tokenizer.json, or the
            folder's tokenizer_config.json is not a JSON object; the message names the path.
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
        tok = tokenizers.Tokenizer.from_str(text)
    except Exception as e:  # the Rust side raises a bare Exception for any malformed file
        try:
            json.loads(text)  # parsed only on failure: Python's message gives the line and column
        except ValueError as je:
            raise LlmlabError(f"{file}: invalid JSON: {je}") from None
        except RecursionError:
            raise LlmlabError(f"{file}: not a valid tokenizer.json: nested too deeply") from None
        raise LlmlabError(f"{file}: not a valid tokenizer.json: {e}") from None
    add_bos, bos_token = _bos_convention(path) if path.is_dir() else (False, None)
    if add_bos is None:
        add_bos = _adds_bos(_processor_state(tok), bos_token)
    return Tokenizer(tok, add_bos=add_bos, bos_token=bos_token)
