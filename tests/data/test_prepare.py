"""Token shards and the `llmlab data` / `llmlab tokenizer train` pipelines, on corpora built in code."""

from __future__ import annotations

import json
import os
import pickle
import random

import numpy as np
import pytest

from llmlab.common import OutputError
from llmlab.config import ConfigError, from_dict, to_dict
from llmlab.data import DataError
from llmlab.data import prepare
from llmlab.data.clean import normalize
from llmlab.data.ingest import Document
from llmlab.data.prepare import PrepareConfig, TokenizerTrainConfig, assign_split, run, train_tokenizer
from llmlab.data.shards import ShardWriter, TokenShards, read_manifest, token_dtype
from llmlab.tokenizer import load_tokenizer, train_bpe

SYLLABLES = ["ka", "lo", "mi", "ne", "ru", "ta", "po", "si", "ve", "du", "an", "el", "or"]


def _docs(n: int, seed: int = 0) -> list[str]:
    """n distinct documents of 40-90 made-up words with sentences and a title line."""
    rng = random.Random(seed)
    words = ["".join(rng.choice(SYLLABLES) for _ in range(rng.randint(1, 3))) for _ in range(400)]
    docs = []
    for i in range(n):
        body = " ".join(rng.choice(words) for _ in range(rng.randint(40, 90)))
        docs.append(f"Document {i}\n\n{body.capitalize()}.")
    return docs


def _write_corpus(root, docs: list[str]):
    root.mkdir(parents=True, exist_ok=True)
    for i, doc in enumerate(docs):
        (root / f"doc{i:04d}.txt").write_text(doc, encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tok")
    return train_bpe(iter(_docs(200, seed=99)), 400).save(folder)


@pytest.fixture(scope="module")
def tok(tokenizer_path):
    return load_tokenizer(tokenizer_path)


def _expected_tokens(tok, texts: list[str], split: str, cfg: PrepareConfig) -> list[int]:
    """What the split's shards must hold: each of its documents' ids + EOS, in input order."""
    ids = []
    for text in map(normalize, texts):
        if assign_split(text, cfg.seed, cfg.val_frac, cfg.test_frac) == split:
            ids += tok.encode(text, bos=cfg.bos, eos=cfg.eos)
    return ids


# --------------------------------------------------------------------------- shards


def test_token_dtype():
    assert token_dtype(4096) == np.uint16 and token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.uint32 and token_dtype(70000).str == "<u4"
    with pytest.raises(ValueError):
        token_dtype(0)


def test_shard_writer_splits_streams_and_checks_range(tmp_path):
    writer = ShardWriter(tmp_path / "out", "train", token_dtype(1000), shard_tokens=10)
    assert not (tmp_path / "out").exists()  # constructing writes nothing
    writer.add(list(range(7)))
    writer.add(np.arange(7, 25))
    writer.add([])
    with pytest.raises(ValueError, match="does not fit"):
        writer.add([70_000])
    with pytest.raises(ValueError, match="does not fit"):
        writer.add([-1])
    records = writer.close()
    assert [r["tokens"] for r in records] == [10, 10, 5]
    assert [r["file"] for r in records] == ["train_0000.bin", "train_0001.bin", "train_0002.bin"]
    data = b"".join((tmp_path / "out" / r["file"]).read_bytes() for r in records)
    assert np.frombuffer(data, dtype="<u2").tolist() == list(range(25))
    assert sorted(os.listdir(tmp_path / "out")) == [r["file"] for r in records]  # no temporary files left
    assert ShardWriter(tmp_path / "empty", "val", "uint16").close() == []
    assert not (tmp_path / "empty").exists()


def test_prepare_round_trip_across_shards(tmp_path, tokenizer_path, tok):
    texts = _docs(60)
    corpus = _write_corpus(tmp_path / "corpus", texts)
    cfg = PrepareConfig(inputs=[str(corpus)], out_dir=str(tmp_path / "data"), tokenizer=str(tokenizer_path),
                        val_frac=0.2, shard_tokens=500, dedup="none")
    manifest = run(cfg)
    assert manifest == read_manifest(tmp_path / "data")
    assert manifest["dtype"] == "uint16" and manifest["eos_id"] == tok.eos_id
    assert manifest["tokenizer_sha256"] == tok.sha256() and manifest["vocab_size"] == tok.vocab_size
    assert manifest["documents"] == {"in": 60, "kept": 60, "removed": {}}
    assert manifest["config"]["val_frac"] == 0.2 and (tmp_path / "data" / "config.yaml").exists()
    assert set(manifest["splits"]) == {"train", "val"}
    for split in ("train", "val"):
        info = manifest["splits"][split]
        shards = TokenShards(tmp_path / "data", split)
        expected = _expected_tokens(tok, texts, split, cfg)
        assert len(shards) == info["tokens"] == len(expected) > 0
        assert shards.get(0, len(shards)).tolist() == expected
        assert shards.documents == info["documents"]
        assert shards.bytes == sum(len(normalize(t).encode()) for t in texts
                                   if assign_split(normalize(t), 0, 0.2) == split)
        shards.verify()
    train = TokenShards(tmp_path / "data", "train")
    assert len(manifest["splits"]["train"]["shards"]) > 3
    full = train.get(0, len(train))
    for start in (0, 490, 499, 500, 1234, len(train) - 700):  # windows that straddle shard boundaries
        window = train.get(start, 700)
        assert window.dtype == np.int64 and window.tolist() == full[start:start + 700].tolist()
    with pytest.raises(IndexError):
        train.get(len(train) - 5, 6)
    clone = pickle.loads(pickle.dumps(train))  # DataLoader workers re-open, not copy
    assert len(pickle.dumps(train)) < 1000 and clone.get(100, 50).tolist() == full[100:150].tolist()
    with pytest.raises(DataError, match="no split 'test'"):
        TokenShards(tmp_path / "data", "test")


def test_truncated_or_corrupt_shard_is_detected(tmp_path, tokenizer_path):
    corpus = _write_corpus(tmp_path / "corpus", _docs(30))
    out = tmp_path / "data"
    run(PrepareConfig(inputs=[str(corpus)], out_dir=str(out), tokenizer=str(tokenizer_path), shard_tokens=400))
    shard = out / "train_0001.bin"
    data = shard.read_bytes()
    shard.write_bytes(data[:-2])
    with pytest.raises(DataError, match=r"train_0001\.bin: .* truncated"):
        TokenShards(out, "train")
    shard.write_bytes(data[:10] + bytes([data[10] ^ 1]) + data[11:])
    shards = TokenShards(out, "train")  # same size: only the checksum sees it
    with pytest.raises(DataError, match=r"train_0001\.bin: sha256 .* does not match"):
        shards.verify()
    shard.unlink()
    with pytest.raises(DataError, match=r"train_0001\.bin: shard listed in the manifest is missing"):
        TokenShards(out, "train")
    (out / "manifest.json").unlink()
    with pytest.raises(DataError, match="manifest.json: not found"):
        TokenShards(out, "train")


class BigVocabTokenizer:
    """A stand-in with a vocabulary past uint16: one id per word, all above 65535."""

    vocab_size, bos_id, eos_id = 70_000, 69_998, 69_999

    def encode_batch(self, texts, *, bos=False, eos=False):
        return [[65_536 + len(w) for w in t.split()] + [self.eos_id] * eos for t in texts]

    def sha256(self):
        return "0" * 64


def test_vocab_past_65536_gives_uint32_shards(tmp_path):
    texts = _docs(20)
    corpus = _write_corpus(tmp_path / "corpus", texts)
    fake = BigVocabTokenizer()
    cfg = PrepareConfig(inputs=[str(corpus)], out_dir=str(tmp_path / "data"), val_frac=0.0)
    manifest = run(cfg, tokenizer=fake)
    assert manifest["dtype"] == "uint32" and list(manifest["splits"]) == ["train"]
    shards = TokenShards(tmp_path / "data", "train")
    expected = [i for ids in fake.encode_batch([normalize(t) for t in texts], eos=True) for i in ids]
    assert shards.get(0, len(shards)).tolist() == expected and max(expected) == 69_999
    shard = manifest["splits"]["train"]["shards"][0]
    assert (tmp_path / "data" / shard["file"]).stat().st_size == 4 * shard["tokens"]


# --------------------------------------------------------------------------- prepare


def test_out_dir_that_exists_is_refused_and_left_alone(tmp_path, tokenizer_path):
    corpus = _write_corpus(tmp_path / "corpus", _docs(10))
    out = tmp_path / "data"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(OutputError, match=r"already exists \(a non-empty folder\); pass --overwrite"):
        run(PrepareConfig(inputs=[str(corpus)], out_dir=str(out), tokenizer=str(tokenizer_path)))
    assert sorted(os.listdir(tmp_path)) == before and os.listdir(out) == ["keep.txt"]
    assert (out / "keep.txt").read_text() == "precious"
    # --overwrite writes the data beside what the folder holds and removes nothing
    run(PrepareConfig(inputs=[str(corpus)], out_dir=str(out), tokenizer=str(tokenizer_path)), overwrite=True)
    assert (out / "keep.txt").read_text() == "precious" and (out / "manifest.json").exists()
    assert sorted(os.listdir(tmp_path)) == before  # no temporary folder left beside it
    with pytest.raises(OutputError, match="is inside the input"):
        run(PrepareConfig(inputs=[str(corpus)], out_dir=str(corpus / "data"), tokenizer=str(tokenizer_path)))
    with pytest.raises(OutputError, match="contains the input"):
        run(PrepareConfig(inputs=[str(corpus)], out_dir=str(tmp_path), tokenizer=str(tokenizer_path)), overwrite=True)
    empty = tmp_path / "empty"
    empty.mkdir()  # an empty directory is taken: nothing in it to lose
    run(PrepareConfig(inputs=[str(corpus)], out_dir=str(empty), tokenizer=str(tokenizer_path)))
    assert (empty / "manifest.json").exists()


def test_empty_corpus_is_an_error_and_writes_nothing(tmp_path, tokenizer_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "blob.txt").write_bytes(b"\x00\x01binary")
    (corpus / "table.csv").write_text("a,b")
    out = tmp_path / "new" / "deeper" / "data"
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(DataError, match=r"empty corpus: no documents .*binary 1, other_suffix 1"):
        run(PrepareConfig(inputs=[str(corpus)], out_dir=str(out), tokenizer=str(tokenizer_path)))
    assert sorted(os.listdir(tmp_path)) == before  # not even the parents of out_dir
    for i, text in enumerate(["tiny", "small", "short one"]):
        (corpus / f"{i}.txt").write_text(text)
    with pytest.raises(DataError, match=r"empty corpus: all 3 documents of .*corpus were removed \(too_short 3\)"):
        run(PrepareConfig(inputs=[str(corpus)], out_dir=str(out), tokenizer=str(tokenizer_path)))
    assert sorted(os.listdir(tmp_path)) == before


def test_no_tokenizer_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="no tokenizer: set tokenizer=PATH"):
        run(PrepareConfig(out_dir=str(tmp_path / "data")))
    assert not (tmp_path / "data").exists()


def test_removed_documents_are_counted_by_reason(tmp_path, tokenizer_path):
    texts = _docs(11)
    words = " ".join(_docs(4, seed=1)[1:]).split(" ")  # ~200 words: a 1-word edit keeps Jaccard ~0.95
    texts.append(" ".join(words))
    words[100] = "edited"
    texts += [texts[5], " ".join(words), "short", "#" * 40 + "\n" + "x" * 10]
    corpus = _write_corpus(tmp_path / "corpus", texts)
    reasons = {}
    for mode in ("near", "exact", "none"):
        out = tmp_path / f"data-{mode}"
        manifest = run(PrepareConfig(inputs=[str(corpus)], out_dir=str(out), tokenizer=str(tokenizer_path),
                                     dedup=mode))
        reasons[mode] = manifest["documents"]["removed"]
        assert manifest["documents"]["in"] == 16
    assert reasons["near"] == {"exact_duplicate": 1, "near_duplicate": 1, "too_short": 1, "symbols": 1}
    assert reasons["exact"] == {"exact_duplicate": 1, "too_short": 1, "symbols": 1}
    assert reasons["none"] == {"too_short": 1, "symbols": 1}


def test_split_is_deterministic_independent_of_order_and_near_the_fractions(tmp_path, tokenizer_path):
    texts = [f"document number {i} with some words" for i in range(4000)]
    assignment = [assign_split(t, 0, 0.1, 0.05) for t in texts]
    assert assignment == [assign_split(t, 0, 0.1, 0.05) for t in texts]
    counts = {s: assignment.count(s) / len(texts) for s in ("train", "val", "test")}
    assert abs(counts["val"] - 0.1) < 0.02 and abs(counts["test"] - 0.05) < 0.015
    other = [assign_split(t, 1, 0.1, 0.05) for t in texts]
    assert sum(a != b for a, b in zip(assignment, other)) > 400  # another seed draws another split
    # in a run, a document's split does not depend on where it sits in the input
    docs = _docs(40)
    _write_corpus(tmp_path / "fwd", docs)
    (tmp_path / "rev").mkdir()
    with open(tmp_path / "rev" / "all.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps({"text": t}) + "\n" for t in reversed(docs))
    splits = []
    for name in ("fwd", "rev"):
        m = run(PrepareConfig(inputs=[str(tmp_path / name)], out_dir=str(tmp_path / f"out-{name}"),
                              tokenizer=str(tokenizer_path), val_frac=0.25, test_frac=0.1))
        splits.append({s: (v["documents"], v["tokens"], v["bytes"]) for s, v in m["splits"].items()})
    assert splits[0] == splits[1] and set(splits[0]) == {"train", "val", "test"}


def test_default_corpus_prepares_end_to_end(tmp_path, tokenizer_path, capsys):
    manifest = run(PrepareConfig(out_dir=str(tmp_path / "data"), tokenizer=str(tokenizer_path)))
    documents = manifest["documents"]
    assert documents["in"] > 200 and documents["kept"] >= 0.95 * documents["in"]
    # table-only sections go, and the copies: the "if" page is the same text as the "else" page
    assert set(documents["removed"]) <= {"exact_duplicate", "near_duplicate", "symbols"}
    assert manifest["splits"]["val"]["documents"] > 0
    report = capsys.readouterr().out
    assert "the embedded default" in report and "bytes/token" in report and "\033[" not in report


def test_prepare_streams_documents(tmp_path, monkeypatch):
    # by design, no list of all documents is built: documents are pulled one by one, and at most
    # a batch per split is held when the tokenizer runs
    pulled = []

    def corpus(*args):
        for i, text in enumerate(_docs(100)):
            pulled.append(i)
            yield Document(text, f"gen:{i}")

    class Recording(BigVocabTokenizer):
        def encode_batch(self, texts, *, bos=False, eos=False):
            encoded.append(len(texts))
            held.append(len(pulled) - sum(encoded[:-1]))
            return super().encode_batch(texts, bos=bos, eos=eos)

    encoded, held = [], []
    monkeypatch.setattr(prepare, "_documents", corpus)
    monkeypatch.setattr(prepare, "BATCH_DOCS", 8)
    run(PrepareConfig(out_dir=str(tmp_path / "data"), val_frac=0.2, dedup="none"), tokenizer=Recording())
    assert sum(encoded) == 100 and len(encoded) > 10
    assert max(held) <= 2 * 8  # two splits, one batch each


def test_config_validation_and_round_trip():
    cfg = from_dict(PrepareConfig, {"inputs": ["a", "b"], "tokenizer": "t", "clean": {"min_chars": 10},
                                    "dedup": "exact", "test_frac": 0.1})
    assert cfg.clean.min_chars == 10 and cfg.dedup == "exact"
    assert from_dict(PrepareConfig, to_dict(cfg)) == cfg
    with pytest.raises(ConfigError, match="val_frac \\+ test_frac must be < 1"):
        from_dict(PrepareConfig, {"val_frac": 0.6, "test_frac": 0.4})
    with pytest.raises(ConfigError, match="dedup"):
        from_dict(PrepareConfig, {"dedup": "fuzzy"})
    with pytest.raises(ConfigError, match="vocab_size must be >"):
        from_dict(TokenizerTrainConfig, {"vocab_size": 100})


@pytest.mark.parametrize("cls, data, message", [
    (PrepareConfig, {"inputs": ["a.txt", ""]}, "inputs[1] is an empty path"),
    (PrepareConfig, {"text_field": ""}, "text_field must name the JSONL field"),
    (PrepareConfig, {"inputs": ["a.txt"], "default": "python"}, "default=python picks the corpus read when inputs"),
    (TokenizerTrainConfig, {"inputs": ["a.txt"], "default": "python"}, "default=python picks the corpus"),
    (PrepareConfig, {"shard_tokens": 0}, "shard_tokens must be >= 1"),
    (PrepareConfig, {"near_threshold": 0}, "near_threshold must be in (0, 1]"),
    (PrepareConfig, {"default_bytes": -1}, "default_bytes must be >= 0"),
    (PrepareConfig, {"val_frac": -0.1}, "val_frac must be in [0, 1)"),
    (PrepareConfig, {"clean": {"min_chars": -1}}, "clean: min_chars must be >= 0 (0 turns the rule off), got -1"),
    (PrepareConfig, {"clean": {"max_line_chars": -5}}, "clean: max_line_chars must be >= 0"),
    (PrepareConfig, {"clean": {"max_symbol_frac": 1.5}}, "clean: max_symbol_frac must be in [0, 1]"),
    (TokenizerTrainConfig, {"inputs": [" "]}, "inputs[0] is an empty path"),
    (TokenizerTrainConfig, {"vocab_size": 10**12}, "vocab_size=1000000000000 is too large: at most 1,048,576"),
    (TokenizerTrainConfig, {"min_frequency": -1}, "min_frequency must be in [1, 4,294,967,296], got -1"),
    (TokenizerTrainConfig, {"min_frequency": 2**70}, "min_frequency must be in [1,"),
    (TokenizerTrainConfig, {"max_docs": 0}, "max_docs must be >= 1"),
])
def test_config_ranges_are_checked(cls, data, message):
    with pytest.raises(ConfigError) as e:
        from_dict(cls, data)
    assert message in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("verb", ["data prepare", "tokenizer train"])
def test_unreadable_inputs_are_one_error_line_from_the_command_line(tmp_path, tokenizer_path, capsys, verb):
    from llmlab.cli import main

    os.mkfifo(tmp_path / "pipe.jsonl")  # reading it would block for ever
    (tmp_path / "deep.jsonl").write_text('{"text": ' + "[" * 100_000 + "]" * 100_000 + "}\n")
    for name, problem in (("pipe.jsonl", "is a FIFO (named pipe)"), ("deep.jsonl", ":1: JSON nested too deeply")):
        args = [*verb.split(), f"inputs=[{tmp_path / name}]", f"out_dir={tmp_path / 'out'}"]
        assert main(args + ([f"tokenizer={tokenizer_path}"] if verb == "data prepare" else [])) == 1
        err = capsys.readouterr().err
        assert err.startswith(f"error: {tmp_path / name}") and problem in err and err.count("\n") == 1
        assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- tokenizer training


def test_train_tokenizer(tmp_path, capsys):
    corpus = _write_corpus(tmp_path / "corpus", _docs(80))
    cfg = TokenizerTrainConfig(inputs=[str(corpus)], out_dir=str(tmp_path / "tok"), vocab_size=350, max_docs=50)
    path = train_tokenizer(cfg)
    assert path == tmp_path / "tok" / "tokenizer.json" and (tmp_path / "tok" / "config.yaml").exists()
    tok = load_tokenizer(path)
    assert tok.vocab_size == 350 and tok.eos_id is not None
    assert tok.decode(tok.encode("Document 3 kalo mine")) == "Document 3 kalo mine"
    report = capsys.readouterr().out
    assert "trained on   50 documents" in report and "bytes per token" in report
    with pytest.raises(OutputError, match="already exists"):
        train_tokenizer(cfg)
    (tmp_path / "nothing").mkdir()
    (tmp_path / "nothing" / "blank.txt").write_text("  \n\n ")
    with pytest.raises(DataError, match="empty corpus"):
        train_tokenizer(TokenizerTrainConfig(inputs=[str(tmp_path / "nothing")], out_dir=str(tmp_path / "tok2")))
    assert not (tmp_path / "tok2").exists()


def test_python_sources_are_a_selectable_default_corpus(tmp_path):
    from llmlab.data.prepare import PrepareConfig, TokenizerTrainConfig, run, train_tokenizer

    tok = train_tokenizer(TokenizerTrainConfig(out_dir=str(tmp_path / "tok"), vocab_size=512, default="python",
                                               default_bytes=300_000))
    manifest = run(PrepareConfig(out_dir=str(tmp_path / "data"), tokenizer=str(tok), default="python",
                                 default_bytes=300_000))
    assert 0 < manifest["documents"]["in"] and manifest["splits"]["train"]["bytes"] <= 300_000
    with pytest.raises(ValueError, match="default_bytes must be >= 0"):
        PrepareConfig(default_bytes=-1)
