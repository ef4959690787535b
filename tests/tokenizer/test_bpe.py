"""Byte-level BPE: special-token layout, lossless round trips, save/load, HF interop, errors.

Every tokenizer here is trained in a fraction of a second on a corpus generated in code.
"""

from __future__ import annotations

import json
import os
import random
import re

import pytest
import tokenizers
from tokenizers import models, pre_tokenizers, processors

from llmlab.common import LlmlabError
from llmlab.tokenizer import FIM_TOKENS, SPECIAL_TOKENS, Tokenizer, load_tokenizer, train_bpe

VOCAB = 500


def _corpus(n_lines: int = 400, seed: int = 0) -> list[str]:
    """English-like lines from made-up words, plus accents, CJK, emoji, digits and whitespace runs."""
    rng = random.Random(seed)
    syllables = ["th", "e", "an", "re", "in", "on", "er", "st", "ou", "ing", "al", "ch", "ed", "is", "or", "ly"]
    words = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 4))) for _ in range(300)]
    extra = ["café", "naïve", "Straße", "日本語", "中文字", "😀", "🚀🚀", "Ω≈ç", "2024", "3.14", "\t", "  ", "\n"]
    lines = []
    for _ in range(n_lines):
        line = " ".join(rng.choice(words) for _ in range(rng.randint(5, 15)))
        if rng.random() < 0.3:
            line += " " + rng.choice(extra)
        lines.append(line.capitalize() + rng.choice([".", "!", "?", ","]))
    return lines


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return train_bpe(iter(_corpus()), VOCAB)  # a one-shot iterator: training reads it once


def _random_text(rng: random.Random, n: int) -> str:
    """Random code points from every plane, surrogates excluded (a Python str may hold them, UTF-8 may not)."""
    ranges = [(0x00, 0x7F), (0x80, 0x7FF), (0x800, 0xD7FF), (0xE000, 0xFFFF), (0x1F300, 0x1FAFF),
              (0x10000, 0x10FFFF)]
    out = []
    for _ in range(n):
        lo, hi = rng.choice(ranges)
        out.append(chr(rng.randint(lo, hi)))
    return "".join(out)


def test_special_tokens_take_the_first_ids_in_order(tok):
    assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2)
    assert tok.fim_ids == tuple(SPECIAL_TOKENS.index(t) for t in FIM_TOKENS)
    assert tok.vocab_size == VOCAB  # the corpus has enough pairs to fill the vocabulary


def test_small_corpus_gives_at_most_the_asked_vocab():
    small = train_bpe(["ab ab ab", "cd cd"], 1000)
    assert 256 + len(SPECIAL_TOKENS) < small.vocab_size < 1000


def test_min_frequency_and_word_boundaries_limit_the_merges():
    corpus = ["hello world.", "hello world.", "xq"]
    strict, loose = train_bpe(corpus, 1000, min_frequency=2), train_bpe(corpus, 1000, min_frequency=1)
    assert strict.token_to_id("xq") is None and loose.token_to_id("xq") is not None
    # GPT-2's split keeps a leading space with its word and punctuation apart ("Ġ" is the space byte)
    assert strict.token_to_id("hello") is not None and strict.token_to_id("Ġworld") is not None
    assert not [t for t in strict.backend.get_vocab() if "oĠ" in t or "d." in t]


def test_every_byte_has_a_token_and_there_is_no_unknown_token(tok):
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    ids = {tok.token_to_id(symbol) for symbol in alphabet}
    assert len(alphabet) == 256 and None not in ids and len(ids) == 256
    assert tok.backend.model.unk_token is None  # nothing can ever be encoded as <unk>


def test_round_trip_of_random_unicode(tok):
    rng = random.Random(1)
    texts = [_random_text(rng, rng.randint(0, 40)) for _ in range(300)]
    texts += ["", " ", "   leading", "trailing   ", "a\n\nb\r\n\tc", "\x00\x01\x7f", " " * 17, "\n" * 5,
              "👩‍👩‍👧‍👦 family", "e\u0301 combining", "".join(map(chr, range(256))), *_corpus(20, seed=2)]
    for text in texts:
        ids = tok.encode(text)
        assert all(0 <= i < tok.vocab_size for i in ids)
        assert tok.decode(ids) == text, repr(text)


def test_every_byte_that_utf8_can_hold_round_trips(tok):
    # U+0000..U+07FF give bytes 00-BF and the 2-byte leads C2-DF; one code point per 3- and
    # 4-byte lead (E0-EF, F0-F4) gives the rest. C0, C1 and F5-FF never occur in UTF-8.
    code_points = [*range(0x800), 0x800, *(k << 12 for k in range(1, 16)),  # leads E0, E1..EF
                   0x10000, *(k << 18 for k in range(1, 5))]  # leads F0, F1..F4
    text = "".join(map(chr, code_points))
    assert set(text.encode("utf-8")) == set(range(0xC0)) | set(range(0xC2, 0xF5))
    assert tok.decode(tok.encode(text)) == text
    # the byte tokens UTF-8 never needs still exist; alone they decode to the replacement char.
    # ByteLevel writes bytes C0-FF as the Latin-1 chars of the same value (GPT-2's table).
    for byte in [0xC0, 0xC1, *range(0xF5, 0x100)]:
        assert tok.decode([tok.token_to_id(chr(byte))]) == "\ufffd"


def test_literal_special_token_text_is_encoded_as_the_special_token(tok):
    text = "say <|eos|> then <|user|>"
    ids = tok.encode(text)
    assert tok.eos_id in ids and tok.token_to_id("<|user|>") in ids
    assert tok.decode(ids) == text
    assert tok.decode(ids, skip_special=True) == "say  then "


def test_bos_and_eos_flags_add_the_ids(tok):
    for text in ["", "hello there", "日本語 😀"]:
        body = tok.encode(text)
        assert tok.encode(text, bos=True) == [tok.bos_id, *body]
        assert tok.encode(text, eos=True) == [*body, tok.eos_id]
        assert tok.encode(text, bos=True, eos=True) == [tok.bos_id, *body, tok.eos_id]
        assert tok.decode(tok.encode(text, bos=True, eos=True), skip_special=True) == text


def test_encode_batch_equals_encode_one_by_one(tok):
    rng = random.Random(3)
    texts = _corpus(50, seed=4) + [_random_text(rng, 30) for _ in range(50)] + [""]
    assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]
    assert tok.encode_batch(texts, bos=True, eos=True) == [tok.encode(t, bos=True, eos=True) for t in texts]
    assert tok.encode_batch([]) == []


def test_decode_accepts_any_int_sequence_and_drops_unknown_ids(tok):
    ids = tok.encode("hello")
    assert tok.decode(tuple(ids)) == tok.decode(iter(ids)) == "hello"
    assert tok.decode([*ids, tok.vocab_size + 5]) == "hello"  # a padded embedding table may sample these


def test_lone_surrogate_is_a_clear_value_error(tok):
    with pytest.raises(ValueError, match="not valid Unicode"):
        tok.encode("a\ud800b")
    with pytest.raises(ValueError, match="not valid Unicode"):
        tok.encode_batch(["fine", "a\udfffb"])


def test_save_and_load_keep_ids_and_hash(tok, tmp_path):
    path = tok.save(tmp_path / "tok")
    assert path == tmp_path / "tok" / "tokenizer.json" and path.is_file()
    config = json.loads((tmp_path / "tok" / "tokenizer_config.json").read_text())
    # llmlab's data puts no BOS before a document by default: the folder declares none
    assert config == {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": None, "eos_token": "<|eos|>",
                      "pad_token": "<|pad|>", "add_bos_token": False, "model_max_length": None}
    # the atomic writes leave no temporary files behind
    assert sorted(p.name for p in (tmp_path / "tok").iterdir()) == ["tokenizer.json", "tokenizer_config.json"]
    text = " ".join(_corpus(5, seed=5)) + " 😀 <|eos|>"
    assert re.fullmatch(r"[0-9a-f]{64}", tok.sha256())
    for source in (tmp_path / "tok", path, str(path)):
        loaded = load_tokenizer(source)
        assert loaded.encode(text, bos=True) == tok.encode(text, bos=True)
        assert loaded.sha256() == tok.sha256()
        assert (loaded.vocab_size, loaded.bos_id, loaded.eos_id, loaded.pad_id) == (VOCAB, 0, 1, 2)
    tok.save(tmp_path / "tok", model_max_length=128)  # overwrites in place
    assert json.loads((tmp_path / "tok" / "tokenizer_config.json").read_text())["model_max_length"] == 128


def test_sha256_tells_tokenizers_apart():
    corpus = _corpus()
    a, b = train_bpe(corpus, VOCAB), train_bpe(corpus, VOCAB - 100)
    assert a.sha256() != b.sha256()
    assert train_bpe(corpus, VOCAB).sha256() == a.sha256()  # training is deterministic


def test_load_errors_name_the_path(tmp_path):
    missing = tmp_path / "nope.json"
    with pytest.raises(LlmlabError, match=re.escape(str(missing))):
        load_tokenizer(missing)
    with pytest.raises(LlmlabError, match="holds no tokenizer.json"):
        load_tokenizer(tmp_path)
    bad = tmp_path / "bad.json"
    bad.write_text('{"model": ')
    with pytest.raises(LlmlabError, match=re.escape(str(bad)) + ".*invalid JSON.*line 1"):
        load_tokenizer(bad)
    wrong = tmp_path / "wrong.json"
    wrong.write_text('{"hello": 1}')
    with pytest.raises(LlmlabError, match=re.escape(str(wrong)) + ".*not a valid tokenizer.json"):
        load_tokenizer(wrong)


def test_a_tokenizer_path_that_is_no_file_or_nested_too_deeply_is_named(tmp_path):
    os.mkfifo(tmp_path / "pipe.json")  # reading it would block for ever
    with pytest.raises(LlmlabError, match=re.escape(f"{tmp_path / 'pipe.json'}: not a regular file")):
        load_tokenizer(tmp_path / "pipe.json")
    (tmp_path / "tokenizer.json").mkdir()
    with pytest.raises(LlmlabError, match=re.escape(f"{tmp_path / 'tokenizer.json'}: not a regular file")):
        load_tokenizer(tmp_path)
    (tmp_path / "deep.json").write_text('{"model": ' + "[" * 100_000 + "]" * 100_000 + "}")
    with pytest.raises(LlmlabError, match="deep.json: .*nested too deeply"):
        load_tokenizer(tmp_path / "deep.json")


def test_foreign_tokenizer_uses_common_special_names_and_ignores_its_template():
    vocab = {"<s>": 0, "</s>": 1, "<unk>": 2, "hi": 3, "there": 4}
    raw = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    raw.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    foreign = Tokenizer(raw)
    assert (foreign.bos_id, foreign.eos_id, foreign.pad_id, foreign.vocab_size) == (0, 1, None, 5)
    assert foreign.fim_ids is None
    raw.add_special_tokens(["<pad>"])  # an added token outside the model's vocab still counts
    assert (foreign.pad_id, foreign.vocab_size) == (5, 6)
    assert foreign.encode("hi there") == [3, 4]  # the template would have added <s>
    assert foreign.encode("hi there", bos=True, eos=True) == [0, 3, 4, 1]

    gpt2_like = Tokenizer(tokenizers.Tokenizer(models.WordLevel({"<|endoftext|>": 0, "x": 1}, unk_token="x")))
    assert (gpt2_like.bos_id, gpt2_like.eos_id, gpt2_like.pad_id) == (0, 0, None)

    bare = Tokenizer(tokenizers.Tokenizer(models.WordLevel({"x": 0}, unk_token="x")))
    assert bare.bos_id is None and bare.encode("x") == [0]
    with pytest.raises(ValueError, match="none of the tokens"):
        bare.encode("x", bos=True)


def test_too_small_vocab_is_a_value_error():
    floor = 256 + len(SPECIAL_TOKENS)
    with pytest.raises(ValueError, match=f"must be > {floor}"):
        train_bpe(["hello world"], floor)
    with pytest.raises(ValueError, match="must be > 257"):
        train_bpe(["hello world"], 100, special_tokens=["<|eos|>"])
    assert train_bpe(["hello hello hello"], floor + 1).vocab_size == floor + 1  # room for one merge


@pytest.mark.parametrize("vocab_size, min_frequency, message", [
    (10**9, 2, "is too large: at most 1,048,576"),  # the trainer would reserve 70 GB up front and abort
    (10**20, 2, "is too large"),
    (1000, -1, "min_frequency must be in [1, 4,294,967,296], got -1"),
    (1000, 0, "min_frequency must be in [1,"),
    (1000, 2**70, "min_frequency must be in [1,"),
])
def test_training_settings_the_trainer_cannot_take_are_value_errors(vocab_size, min_frequency, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        train_bpe(["hello world"], vocab_size, min_frequency=min_frequency)


@pytest.mark.hf
def test_saved_folder_loads_in_transformers_with_the_same_ids(tok, tmp_path):
    tf = pytest.importorskip("transformers")
    path = tok.save(tmp_path / "tok")
    rng = random.Random(6)
    texts = _corpus(10, seed=7) + [_random_text(rng, 30), "a <|eos|> b", "  spaces\n\nand lines  "]
    auto = tf.AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    fast = tf.PreTrainedTokenizerFast(tokenizer_file=str(path))
    assert (auto.bos_token_id, auto.eos_token_id, auto.pad_token_id) == (None, tok.eos_id, tok.pad_id)
    for text in texts:
        assert auto(text)["input_ids"] == fast(text)["input_ids"] == tok.encode(text)
        assert auto.decode(tok.encode(text)) == text


@pytest.mark.hf
@pytest.mark.parametrize("add_bos", [False, True])
def test_the_bos_convention_is_what_transformers_and_llmlab_read_back(tok, tmp_path, add_bos):
    """Without BOS in training (llmlab's default) HF sees no BOS and harnesses start a document with
    EOS; with it, HF's bos_token_id is BOS and HF puts it before the text, as LLaMA's tokenizer does."""
    tf = pytest.importorskip("transformers")
    tok.add_bos = add_bos
    try:
        tok.save(tmp_path / "tok")
    finally:
        tok.add_bos = False
    config = json.loads((tmp_path / "tok" / "tokenizer_config.json").read_text())
    assert (config["add_bos_token"], config["bos_token"]) == (add_bos, "<|bos|>" if add_bos else None)
    auto = tf.AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    assert auto.eos_token_id == tok.eos_id
    assert auto.bos_token_id == (tok.bos_id if add_bos else None)
    text = "the end. A new start"
    assert auto(text)["input_ids"] == ([tok.bos_id] if add_bos else []) + tok.encode(text)
    assert auto(text, add_special_tokens=False)["input_ids"] == tok.encode(text)
    loaded = load_tokenizer(tmp_path / "tok")
    assert loaded.add_bos is add_bos and loaded.bos_token == ("<|bos|>" if add_bos else None)
    assert loaded.document_start_id == (tok.bos_id if add_bos else tok.eos_id)
    # what lm-eval starts a rolling window with: HF's BOS, else its EOS
    assert (auto.bos_token_id if auto.bos_token_id is not None else auto.eos_token_id) == loaded.document_start_id
    assert loaded.encode(text) == tok.encode(text)  # llmlab adds BOS only when asked, whatever the folder says


def test_a_folder_declares_its_bos_convention(tok, tmp_path):
    """tokenizer_config.json's add_bos_token and bos_token (HF folders: LLaMA's say true and <s>); a
    folder without the flag tells by its post-processor; a lone tokenizer.json declares nothing."""
    path = tok.save(tmp_path / "tok")
    assert load_tokenizer(path).add_bos is False and load_tokenizer(path).document_start_id == tok.eos_id
    config_file = tmp_path / "tok" / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**config, "bos_token": {"content": "<|user|>"}, "add_bos_token": True}))
    loaded = load_tokenizer(tmp_path / "tok")
    assert loaded.add_bos and loaded.bos_token == "<|user|>"
    assert loaded.document_start_id == tok.token_to_id("<|user|>")
    # a BOS declared without add_bos_token still starts a document (HF's bos_token_id is set)
    config_file.write_text(json.dumps({**config, "bos_token": "<|bos|>", "add_bos_token": False}))
    loaded = load_tokenizer(tmp_path / "tok")
    assert not loaded.add_bos and loaded.document_start_id == tok.bos_id
    # no add_bos_token (transformers 5 drops it on save): the post-processor tells
    backend = tokenizers.Tokenizer.from_str(tok.backend.to_str())
    backend.post_processor = processors.TemplateProcessing(single="<|bos|> $A", special_tokens=[("<|bos|>", 0)])
    backend.save(str(path))
    config_file.write_text(json.dumps({"bos_token": "<|bos|>"}))
    assert load_tokenizer(tmp_path / "tok").add_bos is True
    config_file.write_text("[1]")
    with pytest.raises(LlmlabError, match="tokenizer_config.json: expected a JSON object"):
        load_tokenizer(tmp_path / "tok")
    config_file.write_text(json.dumps({"add_bos_token": "yes"}))
    with pytest.raises(LlmlabError, match="add_bos_token must be true or false"):
        load_tokenizer(tmp_path / "tok")


def test_recording_the_convention_keeps_the_rest_of_the_folder(tok, tmp_path):
    from llmlab.tokenizer import record_bos_convention

    path = tok.save(tmp_path / "tok")
    config_file = tmp_path / "tok" / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**config, "chat_template": "{{ messages }}", "eos_token": "<|end|>",
                                       "bos_token": "<|bos|>"}))
    before = path.read_bytes()
    record_bos_convention(tmp_path / "tok", False)
    assert path.read_bytes() == before  # no BOS to drop from the post-processor: tokenizer.json untouched
    written = json.loads(config_file.read_text())
    assert (written["bos_token"], written["add_bos_token"]) == (None, False)
    assert (written["chat_template"], written["eos_token"]) == ("{{ messages }}", "<|end|>")
    record_bos_convention(tmp_path / "tok", True)
    loaded = load_tokenizer(tmp_path / "tok")
    assert loaded.add_bos and loaded.document_start_id == tok.bos_id
    assert loaded.backend.encode("hi").ids == [tok.bos_id, *tok.encode("hi")]  # HF's default framing
    assert loaded.encode("hi") == tok.encode("hi")
    record_bos_convention(tmp_path / "tok", False)
    assert load_tokenizer(tmp_path / "tok").sha256() == tok.sha256()  # the BOS template is gone again
    plain = train_bpe(["abc abd"] * 20, 300, special_tokens=["<|eos|>"])
    plain.save(tmp_path / "plain")
    with pytest.raises(ValueError, match="add_bos is set but this tokenizer has none"):
        record_bos_convention(tmp_path / "plain", True)


def test_special_token_id_is_only_for_special_tokens(tok):
    assert tok.special_token_id("<|end|>") == tok.token_to_id("<|end|>")
    one_token = next(t for t in (".", ",", "e", "th") if tok.token_to_id(t) is not None)
    assert tok.special_token_id(one_token) is None  # ordinary: merges may put it inside a longer token
    assert tok.special_token_id("<|end|> ") is None and tok.special_token_id("nope") is None
