"""WordPiece (BERT) and Unigram (T5) tokenizers, trained with HF `tokenizers`; the byte-level BPE is in `bpe.py`.

Each trainer builds the whole pipeline of the model family it copies, so that the saved
tokenizer.json frames and decodes text as that family's does:

    WordPiece (bert-base-uncased)    BertNormalizer (lowercase, strip accents) -> BertPreTokenizer
        -> WordPiece ("##" continues a word) -> "[CLS] $A [SEP]" -> WordPiece decoder
        ids: [PAD]=0 [UNK]=1 [CLS]=2 [SEP]=3 [MASK]=4, then the alphabet and the merges
    Unigram (t5-small, mT5)          NFKC -> split on whitespace, "▁" marks a word start (Metaspace)
        -> Unigram -> "$A </s>" -> Metaspace decoder
        ids: <pad>=0 </s>=1 <unk>=2, then the pieces, then <extra_id_{n-1}> ... <extra_id_0>

Both return the llmlab `Tokenizer`, whose `encode` ignores these templates (BOS/EOS come only from
its flags): `[tok.cls_id, *tok.encode(s), tok.sep_id]` is what BERT feeds its model, and
`tok.encode(s, eos=True)` what T5 does; `tok.backend.encode(s).ids` applies the template itself.

Neither is lossless, by design of the families copied: WordPiece lowercases, strips accents and
loses the spaces around punctuation; Unigram collapses every run of whitespace (newlines too) to
one space. A character the training text never showed becomes the unknown token.
"""

from __future__ import annotations

import json
from collections.abc import Iterable

import tokenizers
from tokenizers import AddedToken, decoders, models, normalizers, pre_tokenizers, processors, trainers

from llmlab.tokenizer.bpe import MAX_VOCAB_SIZE, SENTINEL, Tokenizer, check_min_frequency

WORDPIECE_SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")  # ids 0..4, BERT's roles
UNIGRAM_SPECIAL_TOKENS = ("<pad>", "</s>", "<unk>")  # ids 0, 1, 2, as T5 numbers them
WORDPIECE_ALPHABET = 1000  # characters a WordPiece keeps, the most frequent first (HF's BERT trainer's default)
_METASPACE = "▁"  # U+2581, SentencePiece's mark of a word start


def sentinel_tokens(n: int) -> list[str]:
    """T5's sentinel tokens <extra_id_0> ... <extra_id_{n-1}>."""
    return [SENTINEL.format(i) for i in range(n)]


def check_wordpiece_vocab_size(vocab_size: int) -> None:
    """Raise ValueError unless `vocab_size` leaves room past the special tokens and is at most MAX_VOCAB_SIZE."""
    _check_room(vocab_size, len(WORDPIECE_SPECIAL_TOKENS), "a WordPiece has 5 special tokens")


def check_unigram_vocab_size(vocab_size: int, sentinels: int) -> None:
    """Raise ValueError unless `sentinels` >= 0 and `vocab_size` leaves room for pieces past the
    special tokens and the sentinels, and is at most MAX_VOCAB_SIZE."""
    if sentinels < 0:
        raise ValueError(f"sentinels must be >= 0, got {sentinels}")
    _check_room(vocab_size, len(UNIGRAM_SPECIAL_TOKENS) + sentinels,
                f"a Unigram has 3 special tokens + {sentinels} sentinels")


def _check_room(vocab_size: int, floor: int, why: str) -> None:
    if vocab_size <= floor:
        raise ValueError(f"vocab_size={vocab_size} is too small: {why}, so vocab_size must be > {floor}")
    if vocab_size > MAX_VOCAB_SIZE:
        raise ValueError(f"vocab_size={vocab_size} is too large: at most {MAX_VOCAB_SIZE:,} (the trainer reserves "
                         "memory for every id it may create; the largest vocabularies in use are about 256K)")


def train_wordpiece(texts: Iterable[str], vocab_size: int, *, lowercase: bool = True, min_frequency: int = 2,
                    limit_alphabet: int = WORDPIECE_ALPHABET, show_progress: bool = False) -> Tokenizer:
    """Train a BERT-style WordPiece tokenizer, streaming `texts` once.

    [PAD] [UNK] [CLS] [SEP] [MASK] take ids 0..4, then the alphabet (each character alone and
    "##"-prefixed), then the merged pieces. A word with a character outside the alphabet encodes as
    one [UNK], as in BERT. Devlin et al. 2019, "BERT", section 3; Wu et al. 2016, section 4.1.

    Args:
        texts: the training corpus, any iterable of strings (a generator is fine).
        vocab_size: ids wanted, special tokens included; a small corpus gives fewer.
        lowercase: lowercase and strip accents (bert-base-uncased); False keeps both (bert-base-cased).
        min_frequency: a pair seen fewer times than this is never merged.
        limit_alphabet: keep at most this many distinct characters, the most frequent.
        show_progress: draw the `tokenizers` progress bars on stderr.

    Raises:
        ValueError: `vocab_size` leaves no room past the special tokens, exceeds MAX_VOCAB_SIZE, or
            is smaller than the alphabet the corpus needs; `min_frequency` is out of range.
    """
    check_wordpiece_vocab_size(vocab_size)
    check_min_frequency(min_frequency)
    if limit_alphabet < 1:
        raise ValueError(f"limit_alphabet must be >= 1, got {limit_alphabet}")
    _, unk, cls, sep, _ = WORDPIECE_SPECIAL_TOKENS
    tok = tokenizers.Tokenizer(models.WordPiece(unk_token=unk, continuing_subword_prefix="##"))
    # strip_accents=None strips exactly when lowercasing, as the original BERT does
    tok.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True, lowercase=lowercase)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()  # whitespace, and every punctuation char alone
    tok.decoder = decoders.WordPiece(prefix="##")
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                        special_tokens=list(WORDPIECE_SPECIAL_TOKENS), limit_alphabet=limit_alphabet,
                                        continuing_subword_prefix="##", show_progress=show_progress)
    tok.train_from_iterator(texts, trainer=trainer)
    _check_trained_size(tok, vocab_size, 0, "lower limit_alphabet or ")
    ids = {t: tok.token_to_id(t) for t in (cls, sep)}
    tok.post_processor = processors.TemplateProcessing(
        single=f"{cls} $A {sep}", pair=f"{cls} $A {sep} $B:1 {sep}:1", special_tokens=list(ids.items()))
    return Tokenizer(tok)


def train_unigram(texts: Iterable[str], vocab_size: int, *, sentinels: int = 100,
                  show_progress: bool = False) -> Tokenizer:
    """Train a T5-style Unigram tokenizer (SentencePiece's model), streaming `texts` once.

    <pad>=0, </s>=1, <unk>=2, then the pieces, then the `sentinels` span-corruption tokens as the
    last ids, <extra_id_0> the highest: t5-small's 32,100 ids are 32,000 pieces and <extra_id_99>
    = 32000 ... <extra_id_0> = 32099. Kudo 2018, "Subword Regularization", section 3; Raffel et
    al. 2020, "T5", section 3.1.4 (the sentinels).

    Args:
        texts: the training corpus, any iterable of strings (a generator is fine).
        vocab_size: ids wanted, special tokens and sentinels included; a small corpus gives fewer
            pieces (the sentinels still take the last ids).
        sentinels: how many <extra_id_i> tokens to add (T5: 100); 0 for none.
        show_progress: draw the `tokenizers` progress bars on stderr.

    Raises:
        ValueError: `sentinels` < 0; `vocab_size` leaves no room past the special tokens and
            sentinels, exceeds MAX_VOCAB_SIZE, or is smaller than the alphabet the corpus needs.
    """
    check_unigram_vocab_size(vocab_size, sentinels)
    pad, eos, unk = UNIGRAM_SPECIAL_TOKENS
    tok = tokenizers.Tokenizer(models.Unigram())
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.WhitespaceSplit(),
        pre_tokenizers.Metaspace(replacement=_METASPACE, prepend_scheme="always", split=True)])
    tok.decoder = decoders.Metaspace(replacement=_METASPACE, prepend_scheme="always", split=True)
    trainer = trainers.UnigramTrainer(vocab_size=vocab_size - sentinels, special_tokens=[pad, eos, unk],
                                      unk_token=unk, show_progress=show_progress)
    try:
        tok.train_from_iterator(texts, trainer=trainer)
    except Exception as e:  # the Rust side's bare Exception; one the text iterator raised keeps its type
        if type(e) is not Exception or "not large enough" not in str(e):
            raise
        raise ValueError(f"vocab_size={vocab_size} is too small for this corpus: with {sentinels} sentinels, "
                         "its distinct characters do not fit; raise vocab_size") from None
    _check_trained_size(tok, vocab_size, sentinels, "")
    # the sentinels join the model's vocabulary in reverse, so <extra_id_0> is the last id (T5's layout).
    # Scores keep 6 decimals (SentencePiece stores float32): the Rust JSON reader rounds long ones
    # differently from the writer, which would change the tokenizer's sha256 on every save and load.
    state = json.loads(tok.model.__getstate__())
    pieces = [(piece, round(score, 6)) for piece, score in state["vocab"]]
    pieces += [(token, 0.0) for token in reversed(sentinel_tokens(sentinels))]
    tok.model = models.Unigram(pieces, state["unk_id"], False)
    tok.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in sentinel_tokens(sentinels)])
    tok.post_processor = processors.TemplateProcessing(
        single=f"$A {eos}", pair=f"$A {eos} $B {eos}", special_tokens=[(eos, tok.token_to_id(eos))])
    return Tokenizer(tok)


def _check_trained_size(tok: tokenizers.Tokenizer, vocab_size: int, sentinels: int, advice: str) -> None:
    """The trainers keep every character of the alphabet even past `vocab_size`: refuse that."""
    got = tok.get_vocab_size(with_added_tokens=True) + sentinels
    if got > vocab_size:
        with_sentinels = f" (with the {sentinels} sentinels)" if sentinels else ""
        raise ValueError(f"vocab_size={vocab_size} is too small for this corpus: its alphabet alone needs {got} "
                         f"ids{with_sentinels}; {advice}raise vocab_size")
