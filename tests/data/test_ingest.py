"""Ingest, normalization, quality rules and dedup: each on corpora built in tmp_path in code."""

from __future__ import annotations

import inspect
import json
import json.decoder
import os
import random
import re
from collections import Counter
from pathlib import Path

import pytest

from llmlab.data import DataError
from llmlab.data import ingest
from llmlab.data.clean import CleanConfig, normalize, quality_problem
from llmlab.data.dedup import Deduplicator
from llmlab.data.ingest import Document, default_corpus, iter_documents, python_sources

PROSE = ("The quick brown fox jumps over the lazy dog while the patient cat watches from the warm window "
         "and counts the birds that fly across the garden.")


def _write(path, data: str | bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data if isinstance(data, bytes) else data.encode("utf-8"))


def _paragraphs(n: int, seed: int = 0) -> list[str]:
    """n distinct paragraphs of 20-60 words (slices of one random word sequence, so it is fast)."""
    rng = random.Random(seed)
    vocab = PROSE.lower().rstrip(".").split()
    words = [rng.choice(vocab) for _ in range(5000)]
    return [f"Paragraph {i}. " + " ".join(words[i % 4000:i % 4000 + 20 + i % 41]) for i in range(n)]


# --------------------------------------------------------------------------- ingest


def test_directory_with_mixed_files_is_walked_sorted_and_skips_are_counted(tmp_path):
    _write(tmp_path / "b.md", "# Title\nmarkdown body")
    _write(tmp_path / "a.txt", "plain text")
    _write(tmp_path / "sub" / "c.jsonl", '{"text": "first"}\n\n  \n{"text": "second", "id": 2}\n')
    _write(tmp_path / "sub" / "notes.csv", "a,b\n1,2\n")
    _write(tmp_path / "image.txt", b"GIF89a\x00\x01\x02 looks like text afterwards")
    _write(tmp_path / ".hidden.txt", "not read")
    _write(tmp_path / ".git" / "x.txt", "not read either")
    stats = Counter()
    docs = list(iter_documents([tmp_path], stats=stats))
    assert [d.text for d in docs] == ["plain text", "# Title\nmarkdown body", "first", "second"]
    assert [d.source for d in docs] == [str(tmp_path / "a.txt"), str(tmp_path / "b.md"),
                                        f"{tmp_path / 'sub' / 'c.jsonl'}:1", f"{tmp_path / 'sub' / 'c.jsonl'}:4"]
    assert stats == Counter(files=3, binary=1, other_suffix=1, hidden=2)


def test_files_and_directories_are_read_in_the_order_given(tmp_path):
    _write(tmp_path / "z.txt", "zed")
    _write(tmp_path / "d" / "a.txt", "ay")
    assert [d.text for d in iter_documents([tmp_path / "z.txt", tmp_path / "d"])] == ["zed", "ay"]
    assert [d.text for d in iter_documents(str(tmp_path / "z.txt"))] == ["zed"]  # one path, not its characters


def test_text_field_and_byte_order_mark(tmp_path):
    _write(tmp_path / "a.jsonl", b"\xef\xbb\xbf" + json.dumps({"body": "caf\u00e9"}).encode() + b"\n")
    _write(tmp_path / "b.txt", b"\xef\xbb\xbfhello")
    assert [d.text for d in iter_documents([tmp_path / "a.jsonl"], text_field="body")] == ["caf\u00e9"]
    assert [d.text for d in iter_documents([tmp_path / "b.txt"])] == ["hello"]


@pytest.mark.parametrize("line, problem", [
    ('{"text": "unterminated', "invalid JSON"),
    ('["text", "a list"]', "expected a JSON object, got an array"),
    ('{"body": "no text field"}', "no 'text' field (keys: 'body')"),
    ('{"text": 42}', "field 'text' is a number, expected a string"),
    ('{"text": null}', "field 'text' is null"),
])
def test_malformed_jsonl_line_names_file_line_and_problem(tmp_path, line, problem):
    path = tmp_path / "c.jsonl"
    _write(path, '{"text": "ok"}\n{"text": "ok too"}\n' + line + "\n")
    with pytest.raises(DataError) as e:
        list(iter_documents([path]))
    assert f"{path}:3: " in str(e.value)
    assert problem in str(e.value)


def test_missing_path_is_named_before_any_document(tmp_path):
    _write(tmp_path / "a.txt", "present")
    docs = iter_documents([tmp_path / "a.txt", tmp_path / "nope"])
    with pytest.raises(DataError, match=r"nope: no such file or directory"):
        next(docs)


def _make_special(kind: str, path: Path) -> None:
    if kind == "loop":
        path.symlink_to(path.with_name("other" + path.suffix))
        path.with_name("other" + path.suffix).symlink_to(path)
    elif kind == "broken":
        path.symlink_to(path.with_name("gone.txt"))
    elif kind == "fifo":
        os.mkfifo(path)
    else:
        path.symlink_to("/dev/zero")  # would never end


@pytest.mark.parametrize("kind, problem", [
    ("loop", "a loop of symbolic links"),
    ("broken", "a broken symbolic link (to "),
    ("fifo", "is a FIFO (named pipe), not a regular file"),
    ("device", "is a device file, not a regular file"),
])
def test_inputs_that_are_not_regular_files_are_named_not_read(tmp_path, kind, problem):
    named = tmp_path / "named.jsonl"
    _make_special(kind, named)
    with pytest.raises(DataError, match=re.escape(f"{named}: {problem}")):  # before any document
        next(iter_documents([named]))
    folder = tmp_path / "walked"
    _write(folder / "a.txt", "readable")
    _make_special(kind, folder / "b.txt")
    with pytest.raises(DataError, match=re.escape(f"{folder / 'b.txt'}: {problem}")):
        list(iter_documents([folder]))


def test_an_unreadable_file_is_named(tmp_path, monkeypatch):
    # tests run as root, for whom chmod 000 blocks nothing: the refusal is simulated at open()
    _write(tmp_path / "a.jsonl", '{"text": "x"}\n')

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(tmp_path / "a.jsonl"))

    monkeypatch.setattr(ingest, "open", refuse, raising=False)
    with pytest.raises(DataError, match=re.escape(f"{tmp_path / 'a.jsonl'}: cannot be read (Permission denied)")):
        list(iter_documents([tmp_path]))


def test_deeply_nested_json_is_an_error_naming_file_and_line(tmp_path):
    path = tmp_path / "deep.jsonl"
    _write(path, '{"text": "ok"}\n{"text": ' + "[" * 100_000 + "]" * 100_000 + "}\n")
    with pytest.raises(DataError, match=re.escape(f"{path}:2: JSON nested too deeply to read")):
        list(iter_documents([path]))


def test_a_line_too_long_is_refused_not_read_whole(tmp_path, monkeypatch):
    monkeypatch.setattr(ingest, "MAX_LINE_BYTES", 64)
    path = tmp_path / "long.jsonl"
    _write(path, '{"text": "short"}\n' + json.dumps({"text": "x" * 100}) + "\n")
    docs = iter_documents([path])
    assert next(docs).text == "short"
    with pytest.raises(DataError, match=re.escape(f"{path}:2: line longer than 6.10352e-05 MiB")):
        next(docs)


@pytest.mark.parametrize("line, message", [
    ('{"text": "abc', "invalid JSON: Unterminated string starting at column 10"),
    ('{"text": "a\tb"}', "invalid JSON: Invalid control character at column 12"),
    ('{"text": "ok"} x', "invalid JSON: Extra data at column 16"),
])
def test_json_messages_read_right(tmp_path, line, message):
    path = tmp_path / "a.jsonl"
    _write(path, line + "\n")
    with pytest.raises(DataError) as e:
        list(iter_documents([path]))
    assert str(e.value) == f"{path}:1: {message}"


def test_named_file_of_unsupported_type_is_an_error(tmp_path):
    _write(tmp_path / "data.csv", "a,b")
    with pytest.raises(DataError, match=r"data\.csv: unsupported file type '\.csv'"):
        list(iter_documents([tmp_path / "data.csv"]))


def test_invalid_utf8_error_skip_and_replace(tmp_path):
    _write(tmp_path / "bad.txt", b"good text\xff more")
    _write(tmp_path / "good.txt", "fine")
    with pytest.raises(DataError, match=r"bad\.txt: invalid UTF-8 at byte 9"):
        list(iter_documents([tmp_path]))
    stats = Counter()
    assert [d.text for d in iter_documents([tmp_path], encoding_errors="skip", stats=stats)] == ["fine"]
    assert stats["invalid_utf8"] == 1 and stats["files"] == 1
    replaced = [d.text for d in iter_documents([tmp_path], encoding_errors="replace")]
    assert replaced == ["good text\ufffd more", "fine"]
    with pytest.raises(ValueError, match="encoding_errors"):
        list(iter_documents([tmp_path], encoding_errors="ignore"))


def test_invalid_utf8_in_jsonl_names_line_and_file_offset(tmp_path):
    path = tmp_path / "a.jsonl"
    _write(path, b'{"text": "ok"}\n{"text": "b\xc3("}\n')
    with pytest.raises(DataError, match=rf"a\.jsonl:2: invalid UTF-8 at byte {15 + 11}"):
        list(iter_documents([path]))


def test_skip_mode_never_yields_part_of_a_bad_file(tmp_path):
    # the bad byte is deep in a big file: without the validation pass its first documents would escape
    path = tmp_path / "big.txt"
    _write(path, ("\n\n".join(_paragraphs(40_000)) + "\n\n").encode() + b"\xff tail")
    stats = Counter()
    assert list(iter_documents([path], encoding_errors="skip", stats=stats)) == []
    assert stats["invalid_utf8"] == 1


def test_big_text_file_streams_in_parts_cut_at_blank_lines(tmp_path):
    paragraphs = _paragraphs(60_000)
    text = "\n\n".join(paragraphs)
    path = tmp_path / "big.txt"
    _write(path, text)
    assert path.stat().st_size > 10 * 2**20
    docs = iter_documents([path])
    first = next(docs)
    # the file is read block by block: text appended after the first document was yielded still arrives
    with open(path, "a", encoding="utf-8") as f:
        f.write("\n\nAPPENDED LATER")
    rest = list(docs)
    parts = [first] + rest
    assert len(text) // (ingest.CHUNK_CHARS + 1000) <= len(parts) <= len(text) // ingest.CHUNK_CHARS + 1
    assert rest[-1].text.endswith("APPENDED LATER")
    assert "\n\n".join(d.text for d in parts) == text + "\n\nAPPENDED LATER"
    assert all(ingest.CHUNK_CHARS <= len(d.text) < ingest.CHUNK_CHARS + 1000 for d in parts[:-1])
    lines = (text + "\n\nAPPENDED LATER").split("\n")
    for doc in parts:  # source is "file:line" of the line each part starts on
        file, line = doc.source.rsplit(":", 1)
        assert file == str(path) and lines[int(line) - 1] == doc.text.split("\n")[0]


def test_big_text_file_without_blank_lines_is_cut_at_line_breaks(tmp_path, monkeypatch):
    monkeypatch.setattr(ingest, "SPLIT_ABOVE_BYTES", 1000)  # small sizes keep this test fast
    monkeypatch.setattr(ingest, "CHUNK_CHARS", 500)
    monkeypatch.setattr(ingest, "HARD_CHUNK_CHARS", 2000)
    monkeypatch.setattr(ingest, "READ_BLOCK", 64)
    text = "".join(f"line {i} without any blank line after it\n" for i in range(300))
    _write(tmp_path / "log.txt", text)
    parts = [d.text for d in iter_documents([tmp_path / "log.txt"])]
    assert len(parts) > 3 and "".join(parts) == text
    assert all(p.endswith("\n") and len(p) <= 2000 for p in parts[:-1])


def test_big_file_invalid_utf8_offset_is_exact_across_blocks(tmp_path, monkeypatch):
    monkeypatch.setattr(ingest, "SPLIT_ABOVE_BYTES", 100)
    monkeypatch.setattr(ingest, "READ_BLOCK", 7)
    data = "é".encode() * 60 + b"\xe2\x82" + b"x" * 50  # a 3-byte sequence cut short, straddling blocks
    _write(tmp_path / "big.txt", data)
    with pytest.raises(DataError, match="big.txt: invalid UTF-8 at byte 120"):
        list(iter_documents([tmp_path / "big.txt"]))
    assert ingest._first_invalid_utf8(tmp_path / "big.txt") == 120


def test_default_corpus_is_the_pydoc_topics_cut_into_sections():
    from pydoc_data.topics import topics

    docs = list(default_corpus())
    assert len(docs) > 200  # 79 topics in CPython 3.11
    by_topic: dict[str, list[str]] = {}
    for d in docs:
        name, k = d.source.removeprefix("pydoc_data.topics:").rsplit("#", 1)
        assert int(k) == len(by_topic.setdefault(name, []))  # numbered from 0 in order
        by_topic[name].append(d.text)
    assert list(by_topic) == sorted(topics)
    for name, sections in by_topic.items():
        assert "\n\n".join(sections) == topics[name]  # cut at paragraph breaks, nothing lost
        assert all(len(s) >= 1000 for s in sections) or len(sections) == 1


def test_python_sources_skip_tests_and_respect_the_limit():
    stats = Counter()
    docs = list(python_sources(limit_bytes=300_000, stats=stats))
    assert len(docs) >= 10 and stats["files"] == len(docs)
    assert sum(len(d.text.encode()) for d in docs) <= 300_000
    assert all(d.source.endswith(".py") for d in docs)
    parts = {part for d in docs for part in Path(d.source).parts}
    assert not parts & {"test", "tests", "idle_test", "site-packages"}
    top = [d.source for d in docs if Path(d.source).parent == Path(docs[0].source).parent]
    assert len(top) > 5 and top == sorted(top)  # sorted within each directory


# --------------------------------------------------------------------------- normalize


@pytest.mark.parametrize("raw, clean", [
    ("a\r\nb\rc", "a\nb\nc"),
    ("cafe\u0301", "caf\u00e9"),  # NFC composes e + combining acute
    ("a\x00b\x07c\td\x1b[0m\x7f\x85e", "abc\td[0me"),  # C0, DEL and C1 controls go; tab stays
    ("line  \t\nnext\u00a0\n", "line\nnext"),  # trailing whitespace per line, incl. no-break space
    ("a\n\n\n\n\nb", "a\n\nb"),
    ("a \n \n\t\n b", "a\n\n b"),  # whitespace-only lines count as blank; inner indentation stays
    ("  \n\n  x  \n\n ", "x"),
    ("\x00\x01\r\n", ""),
])
def test_normalize(raw, clean):
    assert normalize(raw) == clean
    assert normalize(clean) == clean  # idempotent


# --------------------------------------------------------------------------- quality rules


def test_each_quality_rule():
    cfg = CleanConfig()
    assert quality_problem(PROSE, cfg) is None
    assert quality_problem("too short", cfg) == "too_short"
    assert quality_problem(PROSE + "\n" + "x" * 10_001, cfg) == "long_lines"
    assert quality_problem(PROSE + "\n" + "=-+*#|" * 30, cfg) == "symbols"
    assert quality_problem(PROSE + ("\nBUY NOW AT THE BEST PRICE, LIMITED OFFER" * 5), cfg) == "repeated_lines"
    # code: short repeated lines ("else:", "return x") weigh little, so a real module passes
    assert quality_problem(normalize(inspect.getsource(json.decoder)), cfg) is None


def test_quality_rules_can_be_turned_off():
    off = CleanConfig(min_chars=0, max_symbol_frac=1.0, max_dup_line_frac=1.0, max_line_chars=0)
    for text in ("", "x" * 20_000, "#$%^&*" * 10, "same\n" * 10):
        assert quality_problem(text, off) is None
    with pytest.raises(ValueError, match="max_symbol_frac"):
        CleanConfig(max_symbol_frac=1.5)


def test_default_thresholds_keep_the_pydoc_corpus():
    texts = [normalize(d.text) for d in default_corpus()]
    problems = Counter(quality_problem(t, CleanConfig()) for t in texts)
    # code samples stay; only the few sections that are mostly "+---+" tables go
    assert problems[None] >= 0.97 * len(texts) and set(problems) == {None, "symbols"}


# --------------------------------------------------------------------------- dedup


def _words(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [rng.choice(["alpha", "beta", "gamma", "delta", "omega", "sigma", "kappa", "lambda", "theta", "zeta",
                        "red", "green", "blue", "river", "stone", "cloud", "seven", "eleven"]) for _ in range(n)]


def test_exact_and_near_duplicates():
    dedup = Deduplicator()
    base = _words(200, seed=1)
    edited = list(base)
    edited[100] = "changed"
    assert dedup.check(" ".join(base)) is None
    assert dedup.check(" ".join(base)) == "exact_duplicate"
    assert dedup.check(" ".join(edited)) == "near_duplicate"
    assert dedup.check(" ".join(_words(200, seed=2))) is None
    assert dedup.check(" ".join(base[:150] + _words(50, seed=3))) is None  # Jaccard ~0.6 < 0.8
    assert len(dedup) == 3  # base, the seed-2 text and the partial copy; duplicates are not indexed


def test_exact_only_and_short_texts():
    dedup = Deduplicator(near=False)
    base = _words(200, seed=1)
    assert dedup.check(" ".join(base)) is None
    assert dedup.check(" ".join(base[:-1] + ["changed"])) is None
    near = Deduplicator()
    assert [near.check(t) for t in ("one two", "one two", "two one", "")] == [None, "exact_duplicate", None, None]


def test_document_is_a_plain_value():
    assert Document("t", "s") == Document("t", "s")
