"""Fine-tuning data: record formats, masks, packing without leakage, and batches as a pure function."""

from __future__ import annotations

import json
import os
import re
from collections import Counter

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from llmlab.data import DataError
from llmlab.data.sft import Batches, Example, build_examples, collate, pack, read_records, record_messages
from llmlab.models import LlamaConfig, build_model
from llmlab.tokenizer import train_bpe
from llmlab.tokenizer.chat import builtin_template


@pytest.fixture(scope="module")
def tok():
    return train_bpe([f"Add {i} and {i + 1}. The answer is {2 * i + 1}. Hello there, reverse me." for i in range(300)],
                     vocab_size=400)


def _records(tmp_path):
    alpaca = [{"instruction": "Add", "input": f"{i} + 1", "output": str(i + 1), "task": "add"} for i in range(5)]
    (tmp_path / "a.json").write_text(json.dumps(alpaca))
    chats = [{"messages": [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hello there"}]},
             {"conversations": [{"from": "system", "value": "Be kind."}, {"from": "human", "value": "Hi"},
                                {"from": "gpt", "value": "Hello"}]},
             {"text": "Hello there, reverse me."}]
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps(c) for c in chats) + "\n\n")
    return tmp_path


def test_every_record_format_is_read(tmp_path, tok):
    records = list(read_records(_records(tmp_path)))
    assert [w.rsplit("/", 1)[-1] for w, _ in records] == [f"a.json[{i}]" for i in range(5)] + [
        "b.jsonl:1", "b.jsonl:2", "b.jsonl:3"]
    assert record_messages(records[1][1], "x") == [{"role": "user", "content": "Add\n\n1 + 1"},
                                                   {"role": "assistant", "content": "2"}]
    assert [m["role"] for m in record_messages(records[6][1], "x")] == ["system", "user", "assistant"]
    assert record_messages(records[7][1], "x") is None
    examples = build_examples(tmp_path, tok, builtin_template("llmlab"), seq_len=64)
    assert len(examples) == 8 and examples[0].task == "add" and examples[1].reference == "2"
    text = examples[-1]
    assert text.mask.all() and text.ids[-1] == tok.eos_id and text.prompt is None


def test_long_examples_are_cut_and_untrainable_ones_dropped(tmp_path, tok):
    long = {"instruction": "Add " * 40, "output": "7"}
    (tmp_path / "d.jsonl").write_text(json.dumps(long) + "\n" + json.dumps({"text": "Hello " * 40}) + "\n")
    stats = Counter()
    examples = build_examples(tmp_path / "d.jsonl", tok, builtin_template("llmlab"), seq_len=16, stats=stats)
    assert stats == {"records": 2, "truncated": 2, "no_target": 1}  # the answer fell past the cut
    assert len(examples) == 1 and len(examples[0].ids) == 17


def _examples(lengths, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for n in lengths:
        ids = rng.integers(1, 50, n)
        mask = rng.random(n) < 0.6
        mask[-1] = True
        out.append(Example(ids, mask))
    return out


def test_packing_keeps_rows_within_seq_len_and_every_example_once():
    lengths = [int(n) for n in np.random.default_rng(1).integers(2, 20, 200)]
    rows = pack(lengths, np.random.default_rng(2).permutation(200), seq_len=32)
    assert sorted(i for row in rows for i in row) == list(range(200))
    assert all(sum(lengths[i] for i in row) <= 32 for row in rows)
    assert len(rows) < 200 / 2  # several examples to a row


def test_batches_are_a_pure_function_of_their_index_across_epochs():
    examples = _examples([int(n) for n in np.random.default_rng(3).integers(3, 12, 30)])
    a = Batches(examples, seq_len=24, batch_size=4, packed=True, seed=7)
    sequence = [a.rows(i) for i in range(20)]  # several epochs, read in order
    b = Batches(examples, seq_len=24, batch_size=4, packed=True, seed=7)
    assert [b.rows(i) for i in (13, 2, 19, 0)] == [sequence[i] for i in (13, 2, 19, 0)]  # any order, fresh object
    per_epoch = a.rows_per_epoch
    flat = [r for rows in sequence for r in rows]
    assert sorted(i for row in flat[:per_epoch] for i in row) == list(range(30))  # epoch 0: each example once
    assert flat[per_epoch:2 * per_epoch] != flat[:per_epoch]  # epoch 1 is a new shuffle


def test_a_packed_batch_has_the_loss_of_its_examples_alone():
    torch.manual_seed(0)
    model = build_model(LlamaConfig(vocab_size=50, dim=32, n_layers=2, n_heads=4, hidden_dim=64)).eval()
    examples = _examples([7, 5, 9, 4])
    batch = collate([examples[:2], examples[2:]], seq_len=20, packed=True, pad_id=0, device=torch.device("cpu"))
    assert batch["input_ids"].shape == (2, 20)
    assert batch["segment_ids"][0].tolist() == [1] * 6 + [2] * 4 + [0] * 10
    nll, count = 0.0, 0
    with torch.no_grad():
        for e in examples:  # each example alone, no packing, summed over its trained targets
            ids = torch.from_numpy(e.ids)
            logits = model(ids[None, :-1])[0]
            keep = torch.from_numpy(e.mask[1:])
            nll += F.cross_entropy(logits[keep], ids[1:][keep], reduction="sum").item()
            count += int(keep.sum())
        assert model(**batch).item() == pytest.approx(nll / count, rel=1e-5)
        assert int((batch["targets"] != -100).sum()) == count
    unpacked = collate([[e] for e in examples], seq_len=20, packed=False, pad_id=0, device=torch.device("cpu"))
    assert unpacked["input_ids"].shape == (4, 8)  # as wide as the longest example, not seq_len
    with torch.no_grad():
        assert model(**unpacked).item() == pytest.approx(nll / count, rel=1e-5)


@pytest.mark.parametrize("content, match", [
    ('{"instruction": "a", "output": "b"}\n{"instruction": ',
     r"x\.jsonl:2: invalid JSON: Expecting value at column 17"),
    ('[1, 2]', r"x\.jsonl:1: expected a JSON object"),
    ('{"conversations": [{"from": "bot", "value": "hi"}]}', r"x\.jsonl:1: conversations\[0\]"),
    ('{"instruction": "a", "output": 3}', r"x\.jsonl:1: an Alpaca record needs a string 'output'"),
])
def test_bad_records_name_file_and_line(tmp_path, tok, content, match):
    (tmp_path / "x.jsonl").write_text(content + "\n")
    with pytest.raises(DataError, match=match):
        build_examples(tmp_path / "x.jsonl", tok, builtin_template("llmlab"), seq_len=32)


@pytest.mark.parametrize("name, content, match", [
    ("x.jsonl", '{"text": "ok"}\n{"text": ' + "[" * 100_000 + "]" * 100_000 + "}\n",
     r"x\.jsonl:2: JSON nested too deeply to read"),
    ("x.json", "[" * 100_000 + "]" * 100_000, r"x\.json: JSON nested too deeply to read"),
    ("x.json", '[\n{"text": "ok"},\n{"text": "unterminated}\n]', r"x\.json:3: invalid JSON: Invalid control "
                                                               r"character at column 24"),
    ("x.jsonl", b'{"text": "ok"}\n{"text": "\xff"}\n', r"x\.jsonl:2: not UTF-8 text \(invalid start byte at byte 25\)"),
    ("x.jsonl", '{"instruction": "a", "input": {"n": 1}, "output": "b"}', r"x\.jsonl:1: an Alpaca record's 'input' "
                                                                       "must be a string, got an object"),
    ("x.jsonl", '{"text": "a", "task": ["add"]}', r"x\.jsonl:1: task must be a string .*got an array"),
])
def test_unreadable_records_name_file_and_line(tmp_path, tok, name, content, match):
    (tmp_path / name).write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(DataError, match=match):
        build_examples(tmp_path, tok, builtin_template("llmlab"), seq_len=32)


def test_a_line_separator_inside_a_string_does_not_split_a_record(tmp_path, tok):
    (tmp_path / "x.jsonl").write_text(json.dumps({"text": "one\u2028two"}, ensure_ascii=False) + "\n",
                                      encoding="utf-8")
    assert [r for _, r in read_records(tmp_path / "x.jsonl")] == [{"text": "one\u2028two"}]


@pytest.mark.parametrize("make, problem", [
    (lambda p: p.symlink_to(p), "a loop of symbolic links"),
    (lambda p: os.mkfifo(p), "is a FIFO (named pipe), not a regular file"),
    (lambda p: p.symlink_to("/dev/zero"), "is a device file"),
])
def test_records_that_are_not_regular_files_are_named(tmp_path, make, problem):
    make(tmp_path / "x.jsonl")
    for path in (tmp_path / "x.jsonl", tmp_path):  # named, or met in a folder
        with pytest.raises(DataError, match=re.escape(f"{tmp_path / 'x.jsonl'}: {problem}")):
            list(read_records(path))


def test_missing_and_empty_inputs(tmp_path, tok):
    with pytest.raises(DataError, match="no such file"):
        list(read_records(tmp_path / "nope.jsonl"))
    with pytest.raises(DataError, match="no .json or .jsonl files"):
        list(read_records(tmp_path))
    (tmp_path / "e.json").write_text("{}")
    with pytest.raises(DataError, match="expected a JSON array"):
        list(read_records(tmp_path / "e.json"))
