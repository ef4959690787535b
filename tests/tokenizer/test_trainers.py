"""WordPiece (BERT) and Unigram (T5) tokenizers: id layout, round trips up to each family's
normalization, save/load, the `tokenizer train` command, and parity with HF tokenizers built in code.

Every tokenizer here is trained in a fraction of a second on a corpus generated in code.
"""

from __future__ import annotations

import json
import random
import re
import unicodedata

import pytest

from llmlab.cli import main
from llmlab.tokenizer import (UNIGRAM_SPECIAL_TOKENS, WORDPIECE_SPECIAL_TOKENS, load_tokenizer, record_bos_convention,
                              sentinel_tokens, train_unigram, train_wordpiece)

WORDPIECE_VOCAB = 300
UNIGRAM_VOCAB = 400  # 300 pieces + T5's 100 sentinels


def _corpus(n_lines: int = 400, seed: int = 0) -> list[str]:
    """Capitalized lines of made-up words, some accented, ending in punctuation."""
    rng = random.Random(seed)
    syllables = ["th", "e", "an", "re", "in", "on", "er", "st", "ou", "ing", "al", "ch", "ed", "is", "or", "ly"]
    words = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 4))) for _ in range(300)]
    words += ["café", "naïve", "élan", "fiancé"] * 10
    lines = []
    for _ in range(n_lines):
        line = " ".join(rng.choice(words) for _ in range(rng.randint(5, 15)))
        comma = rng.randrange(len(line))
        line = line[:comma] + line[comma:].replace(" ", ", ", 1)
        lines.append(line.capitalize() + rng.choice([".", "!", "?"]))
    return lines


@pytest.fixture(scope="module")
def wordpiece():
    return train_wordpiece(iter(_corpus()), WORDPIECE_VOCAB)  # a one-shot iterator: training reads it once


@pytest.fixture(scope="module")
def unigram():
    return train_unigram(iter(_corpus()), UNIGRAM_VOCAB)


def _texts() -> list[str]:
    """Unseen lines of corpus words, with capitals, accents and uneven whitespace."""
    lines = _corpus(12, seed=1)
    return lines + ["CAFÉ Naïve ÉLAN, fiancé!", "  the end\tis near \n\n and done  ", "Thing", ""]


def _bert_normalized(text: str) -> str:
    """bert-base-uncased's view of `text`: lowercased, accents stripped, whitespace runs as one space."""
    stripped = "".join(c for c in unicodedata.normalize("NFD", text.lower()) if unicodedata.category(c) != "Mn")
    return " ".join(stripped.split())


def _t5_normalized(text: str) -> str:
    """T5's view of `text`: NFKC, whitespace runs (newlines too) as one space, none at the ends."""
    return " ".join(unicodedata.normalize("NFKC", text).split())


# --------------------------------------------------------------------------- WordPiece


def test_wordpiece_ids_are_where_bert_puts_them(wordpiece):
    assert [wordpiece.token_to_id(t) for t in WORDPIECE_SPECIAL_TOKENS] == [0, 1, 2, 3, 4]
    roles = (wordpiece.pad_id, wordpiece.unk_id, wordpiece.cls_id, wordpiece.sep_id, wordpiece.mask_id)
    assert roles == (0, 1, 2, 3, 4)
    assert (wordpiece.bos_id, wordpiece.eos_id, wordpiece.sentinel_ids) == (None, None, ())  # as HF's BERT: none
    assert wordpiece.kind == "wordpiece" and wordpiece.vocab_size == WORDPIECE_VOCAB
    vocab = wordpiece.backend.get_vocab()
    assert any(t.startswith("##") and len(t) > 3 for t in vocab)  # continuation pieces were merged
    pieces = set(vocab) - set(WORDPIECE_SPECIAL_TOKENS)
    assert not [t for t in pieces if t != t.lower() or "é" in t]  # uncased: no capital, no accent survives


def test_wordpiece_round_trips_the_normalized_text(wordpiece):
    for text in _texts():
        ids = wordpiece.encode(text)
        assert wordpiece.unk_id not in ids and all(0 <= i < wordpiece.vocab_size for i in ids), text
        assert wordpiece.decode(ids) == _bert_normalized(text), repr(text)
    # a word holding a character the corpus never showed is one [UNK], as in BERT
    assert wordpiece.encode("thing zebra thing") == [*wordpiece.encode("thing"), 1, *wordpiece.encode("thing")]


def test_wordpiece_template_frames_like_bert_but_encode_adds_nothing(wordpiece):
    body_a, body_b = wordpiece.encode("Thing one."), wordpiece.encode("Another")
    single = wordpiece.backend.encode("Thing one.")
    assert single.ids == [2, *body_a, 3]
    pair = wordpiece.backend.encode("Thing one.", "Another")
    assert pair.ids == [2, *body_a, 3, *body_b, 3]
    assert pair.type_ids == [0] * (len(body_a) + 2) + [1] * (len(body_b) + 1)
    assert wordpiece.decode(pair.ids, skip_special=True) == "thing one. another"
    with pytest.raises(ValueError, match="none of the tokens"):  # [CLS] is no BOS: the flag does not reach for it
        wordpiece.encode("x", bos=True)


def test_cased_wordpiece_keeps_capitals_and_accents():
    cased = train_wordpiece(_corpus(), WORDPIECE_VOCAB, lowercase=False)
    text = "Café naïve, Élan fiancé."
    assert cased.decode(cased.encode(text)) == text
    assert cased.vocab_size == WORDPIECE_VOCAB


# --------------------------------------------------------------------------- Unigram


def test_unigram_ids_and_sentinels_are_where_t5_puts_them(unigram):
    assert [unigram.token_to_id(t) for t in UNIGRAM_SPECIAL_TOKENS] == [0, 1, 2]
    assert (unigram.pad_id, unigram.eos_id, unigram.unk_id) == (0, 1, 2)
    assert (unigram.bos_id, unigram.cls_id, unigram.sep_id, unigram.mask_id) == (None, None, None, None)
    assert unigram.kind == "unigram" and unigram.vocab_size == UNIGRAM_VOCAB
    # <extra_id_0> is the last id, <extra_id_99> the first of the hundred: t5-small's layout
    assert unigram.sentinel_ids == tuple(range(UNIGRAM_VOCAB - 1, UNIGRAM_VOCAB - 101, -1))
    assert unigram.token_to_id("<extra_id_0>") == UNIGRAM_VOCAB - 1
    assert unigram.token_to_id("<extra_id_99>") == UNIGRAM_VOCAB - 100
    assert unigram.token_to_id("<extra_id_100>") is None
    assert unigram.token_to_id("▁") is not None and unigram.backend.id_to_token(UNIGRAM_VOCAB - 101) != "<unk>"


def test_unigram_round_trips_up_to_nfkc_and_whitespace(unigram):
    for text in [*_texts(), "ﬁancé ｔｈｅ café"]:  # NFKC: the ligature is "fi", fullwidth letters are ASCII
        ids = unigram.encode(text)
        assert unigram.unk_id not in ids and all(0 <= i < unigram.vocab_size for i in ids), text
        assert unigram.decode(ids) == _t5_normalized(text), repr(text)
    assert unigram.encode("ﬁancé ｔｈｅ") == unigram.encode("fiancé the")


def test_unigram_template_appends_eos_and_sentinels_are_special(unigram):
    text = "Thing <extra_id_0> the end <extra_id_7>"
    ids = unigram.encode(text)
    assert unigram.sentinel_ids[0] in ids and unigram.sentinel_ids[7] in ids  # matched whole, as T5 does
    assert unigram.backend.encode(text).ids == unigram.encode(text, eos=True) == [*ids, 1]
    assert unigram.decode(ids, skip_special=True) == "Thing the end"
    assert [unigram.special_token_id(t) for t in sentinel_tokens(3)] == list(unigram.sentinel_ids[:3])


def test_unigram_sentinel_count_is_a_setting():
    corpus = _corpus()
    none = train_unigram(corpus, 250, sentinels=0)
    assert none.sentinel_ids == () and none.vocab_size == 250 and "extra_id" not in none.backend.id_to_token(249)
    few = train_unigram(corpus, 250, sentinels=3)
    assert few.sentinel_ids == (249, 248, 247) and few.vocab_size == 250
    # the pieces are the same model's, whatever the sentinels: 247 pieces either way
    assert few.encode("Thing café") == train_unigram(corpus, 247, sentinels=0).encode("Thing café")


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize("train, message", [
    (lambda c: train_wordpiece(c, 5), "vocab_size=5 is too small: a WordPiece has 5 special tokens"),
    (lambda c: train_wordpiece(c, 2**21), "vocab_size=2097152 is too large"),
    (lambda c: train_wordpiece(c, 100, min_frequency=0), "min_frequency must be in [1,"),
    (lambda c: train_wordpiece(c, 100, limit_alphabet=0), "limit_alphabet must be >= 1"),
    (lambda c: train_unigram(c, 103, sentinels=100), "vocab_size=103 is too small: a Unigram has 3 special tokens + "
                                                     "100 sentinels, so vocab_size must be > 103"),
    (lambda c: train_unigram(c, 100, sentinels=-1), "sentinels must be >= 0, got -1"),
    # the corpus has about 30 distinct characters: more ids than these leave room for
    (lambda c: train_wordpiece(c, 20), "vocab_size=20 is too small for this corpus: its alphabet alone needs"),
    (lambda c: train_unigram(c, 20, sentinels=0), "vocab_size=20 is too small for this corpus"),
    (lambda c: train_unigram(c, 130), "vocab_size=130 is too small for this corpus"),
])
def test_settings_that_cannot_work_are_value_errors(train, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        train(_corpus(50))


def test_an_error_of_the_text_stream_keeps_its_type():
    def texts():
        yield from _corpus(20)
        raise KeyError("the stream broke")

    for train in (train_wordpiece, train_unigram):
        with pytest.raises(KeyError, match="the stream broke"):
            train(texts(), 200)


# --------------------------------------------------------------------------- save and load


@pytest.mark.parametrize("kind", ["wordpiece", "unigram"])
def test_save_and_load_keep_ids_hash_and_template(wordpiece, unigram, tmp_path, kind):
    tok = wordpiece if kind == "wordpiece" else unigram
    path = tok.save(tmp_path / "tok")
    loaded = load_tokenizer(tmp_path / "tok")
    assert loaded.sha256() == tok.sha256()  # scores and template survive the JSON round trip exactly
    assert (loaded.kind, loaded.add_bos, loaded.bos_token) == (kind, False, None)
    assert loaded.sentinel_ids == tok.sentinel_ids and loaded.vocab_size == tok.vocab_size
    for text in _texts():
        assert loaded.encode(text) == tok.encode(text)
        assert loaded.backend.encode(text).ids == tok.backend.encode(text).ids
    config = json.loads((tmp_path / "tok" / "tokenizer_config.json").read_text())
    if kind == "wordpiece":
        assert {k: config[k] for k in ("pad_token", "unk_token", "cls_token", "sep_token", "mask_token", "eos_token")} \
            == {"pad_token": "[PAD]", "unk_token": "[UNK]", "cls_token": "[CLS]", "sep_token": "[SEP]",
                "mask_token": "[MASK]", "eos_token": None}
    else:
        assert (config["pad_token"], config["eos_token"], config["unk_token"]) == ("<pad>", "</s>", "<unk>")
        assert config["additional_special_tokens"] == sentinel_tokens(100) and "cls_token" not in config
    # recording llmlab's "no BOS" convention keeps the family's template: [CLS] and </s> are no BOS
    before = path.read_bytes()
    record_bos_convention(tmp_path / "tok", False)
    assert path.read_bytes() == before
    with pytest.raises(ValueError, match="add_bos is set but this tokenizer has none"):
        record_bos_convention(tmp_path / "tok", True)


@pytest.mark.hf
@pytest.mark.parametrize("kind", ["wordpiece", "unigram"])
def test_saved_folder_loads_in_transformers_with_the_same_ids(wordpiece, unigram, tmp_path, kind):
    tf = pytest.importorskip("transformers")
    tok = wordpiece if kind == "wordpiece" else unigram
    tok.save(tmp_path / "tok")
    auto = tf.AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    assert (auto.pad_token_id, auto.unk_token_id, auto.eos_token_id) == (tok.pad_id, tok.unk_id, tok.eos_id)
    assert (auto.cls_token_id, auto.sep_token_id, auto.mask_token_id) == (tok.cls_id, tok.sep_id, tok.mask_id)
    assert auto.bos_token_id is None
    assert [auto.convert_tokens_to_ids(t) for t in sentinel_tokens(len(tok.sentinel_ids))] == list(tok.sentinel_ids)
    assert set(tok.sentinel_ids) <= set(auto.all_special_ids)  # named in the config, as T5's folders do
    framed = (lambda ids: [tok.cls_id, *ids, tok.sep_id]) if kind == "wordpiece" else (lambda ids: [*ids, tok.eos_id])
    for text in _texts():
        assert auto(text)["input_ids"] == framed(tok.encode(text))
        assert auto(text, add_special_tokens=False)["input_ids"] == tok.encode(text)


# --------------------------------------------------------------------------- HF tokenizer.json files


@pytest.mark.hf
def test_a_bert_tokenizer_json_from_transformers_loads_with_the_same_ids(tmp_path):
    """A bert-base-uncased-like folder: [PAD]=0, [unused*], then [UNK] [CLS] [SEP] [MASK] (100..103 there)."""
    tf = pytest.importorskip("transformers")
    vocab = ["[PAD]", "[unused0]", "[unused1]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "cat", "sat", "on",
             "mat", "un", "##aff", "##able", "##s", ",", ".", "!", "cafe", "naive", "h", "##e", "##l", "##o"]
    (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    hf = tf.BertTokenizerFast(vocab=str(tmp_path / "vocab.txt"))
    hf.save_pretrained(tmp_path / "bert")
    tok = load_tokenizer(tmp_path / "bert")
    assert hf.convert_tokens_to_ids("[CLS]") == 4  # HF read our vocabulary, not its default one
    assert (tok.pad_id, tok.unk_id, tok.cls_id, tok.sep_id, tok.mask_id) == (0, 3, 4, 5, 6) == (
        hf.pad_token_id, hf.unk_token_id, hf.cls_token_id, hf.sep_token_id, hf.mask_token_id)
    assert (tok.kind, tok.vocab_size, tok.bos_id, tok.eos_id, tok.add_bos) == ("wordpiece", len(vocab), None, None,
                                                                            False)
    texts = ["The cat sat on the mat.", "Unaffable cats, CAFÉ Naïve!", "hello", "zebra", "", "  the\n\tcat  "]
    for text in texts:
        ids = hf(text)["input_ids"]
        assert ids == [tok.cls_id, *tok.encode(text), tok.sep_id] == tok.backend.encode(text).ids, text
        assert tok.decode(ids, skip_special=True) == hf.decode(ids, skip_special_tokens=True)
        assert tok.decode(ids) == hf.decode(ids)
    assert tok.encode("unaffable cats") == [12, 13, 14, 8, 15]
    ids = hf("Unaffable cats, CAFÉ Naïve!")["input_ids"]
    assert tok.decode(ids, skip_special=True) == "unaffable cats, cafe naive!"
    pair = hf("the cat", "sat")
    assert pair["input_ids"] == tok.backend.encode("the cat", "sat").ids == [4, 7, 8, 5, 9, 5]
    assert pair["token_type_ids"] == tok.backend.encode("the cat", "sat").type_ids


@pytest.mark.hf
def test_a_t5_tokenizer_json_from_transformers_loads_with_the_same_ids(tmp_path):
    """A t5-small-like folder: a Unigram with <pad>=0 </s>=1 <unk>=2 and the sentinels last, reversed."""
    tf = pytest.importorskip("transformers")
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0), ("▁the", -3.0), ("▁cat", -3.5),
              ("s", -4.0), ("▁sat", -4.0), ("▁on", -4.0), ("▁mat", -4.5), ("▁ma", -6.0), ("t", -5.0), ("h", -5.0),
              ("e", -5.0), ("a", -5.0), ("c", -5.0), ("m", -5.0), (".", -5.0), ("▁a", -4.5)]
    sentinels = 5
    hf = tf.T5TokenizerFast(vocab=[*pieces, *((t, 0.0) for t in reversed(sentinel_tokens(sentinels)))],
                            extra_ids=sentinels)
    hf.save_pretrained(tmp_path / "t5")
    tok = load_tokenizer(tmp_path / "t5")
    n = len(pieces) + sentinels
    assert (tok.kind, tok.vocab_size, len(hf)) == ("unigram", n, n)
    assert (tok.pad_id, tok.eos_id, tok.unk_id, tok.bos_id) == (0, 1, 2, None) == (
        hf.pad_token_id, hf.eos_token_id, hf.unk_token_id, hf.bos_token_id)
    assert tok.sentinel_ids == tuple(hf.convert_tokens_to_ids(sentinel_tokens(sentinels))) == (n - 1, n - 2, n - 3,
                                                                                               n - 4, n - 5)
    assert (tok.add_bos, tok.document_start_id) == (False, 1)  # no BOS: a document starts after </s>
    texts = ["the cats sat on the mat.", "the <extra_id_0> on <extra_id_4> mat", "  the\ncat  ", "xyz the", "",
             "the mats"]
    for text in texts:
        ids = hf(text)["input_ids"]
        assert ids == tok.encode(text, eos=True) == tok.backend.encode(text).ids, text
        assert tok.decode(ids, skip_special=True) == hf.decode(ids, skip_special_tokens=True)
        assert tok.decode(ids) == hf.decode(ids)
    assert tok.encode("the mats.") == [4, 9, 6, 17]
    assert tok.encode("<extra_id_0>") == [n - 1]


# --------------------------------------------------------------------------- the command line


def _write_corpus(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i, chunk in enumerate(range(0, 400, 100)):
        (corpus / f"doc{i}.txt").write_text("\n".join(_corpus()[chunk:chunk + 100]) + "\n")
    return corpus


@pytest.mark.parametrize("kind, args", [("wordpiece", ["vocab_size=300"]), ("unigram", ["vocab_size=300",
                                                                                       "sentinels=10"])])
def test_the_train_command_makes_each_kind(tmp_path, capsys, kind, args):
    corpus = _write_corpus(tmp_path)
    out = tmp_path / "tok"
    assert main(["tokenizer", "train", f"inputs=[{corpus}]", f"out_dir={out}", f"kind={kind}", *args]) == 0
    assert "vocab size   300 (asked for 300)" in capsys.readouterr().out
    tok = load_tokenizer(out)
    assert (tok.kind, tok.vocab_size, tok.pad_id) == (kind, 300, 0)
    if kind == "wordpiece":
        assert (tok.cls_id, tok.sep_id, tok.mask_id) == (2, 3, 4)
        assert tok.decode(tok.encode("Café Thing.")) == "cafe thing."
    else:
        assert (tok.eos_id, tok.unk_id, tok.sentinel_ids) == (1, 2, tuple(range(299, 289, -1)))
        assert tok.decode(tok.encode("Café  Thing.")) == "Café Thing."
    assert f"kind: {kind}" in (out / "config.yaml").read_text()


@pytest.mark.parametrize("args, message", [
    (["sentinels=5"], "sentinels applies to kind=unigram only, not kind=bpe"),
    (["kind=wordpiece", "sentinels=5"], "sentinels applies to kind=unigram only, not kind=wordpiece"),
    (["kind=unigram", "lowercase=false"], "lowercase applies to kind=wordpiece only, not kind=unigram"),
    (["lowercase=false"], "lowercase applies to kind=wordpiece only, not kind=bpe"),
    (["kind=unigram", "min_frequency=5"], "min_frequency applies to kind=bpe or kind=wordpiece only"),
    (["kind=unigram", "sentinels=-1"], "sentinels must be >= 0, got -1"),
    (["kind=unigram", "vocab_size=100"], "vocab_size=100 is too small: a Unigram has 3 special tokens + 100 "
                                         "sentinels"),
    (["kind=wordpiece", "vocab_size=3"], "vocab_size=3 is too small: a WordPiece has 5 special tokens"),
    (["kind=sentencepiece"], "kind"),
    (["kind=wordpiece", "vocab_size=20"], "vocab_size=20 is too small for this corpus"),  # known after reading it
    (["kind=unigram", "vocab_size=120"], "vocab_size=120 is too small for this corpus"),
])
def test_bad_train_settings_exit_1_naming_the_field(tmp_path, capsys, args, message):
    corpus = _write_corpus(tmp_path)
    out = tmp_path / "tok"
    assert main(["tokenizer", "train", f"inputs=[{corpus}]", f"out_dir={out}", *args]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1, err
    assert "internal error" not in err and not out.exists()
