"""Alignment data: every preference format reads to the same pair, masks cover the answers only,
batches are a pure function of their index, bad pairs are counted or named; synthetic sets."""

from __future__ import annotations

import json
import random
from collections import Counter

import numpy as np
import pytest

from llmlab.data import DataError
from llmlab.data.preference import (PairBatches, PreferencePair, build_pairs, build_prompts, collate_pairs,
                                    read_pairs, read_prompts)
from llmlab.data.synth import TASKS, SynthConfig, near_miss, run
from llmlab.tokenizer import train_bpe
from llmlab.tokenizer.chat import builtin_template

PROMPT = [{"role": "user", "content": "Reverse: a b c"}]
EXPECTED = PreferencePair(PROMPT, "c b a", "c a b", "", None)


@pytest.fixture(scope="module")
def tok():
    return train_bpe([f"Reverse: a b c. The answer is c b a, not c a b. Hello {i}." for i in range(200)],
                     vocab_size=300)


def _write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.mark.parametrize("record", [
    {"prompt": "Reverse: a b c", "chosen": "c b a", "rejected": "c a b"},
    {"prompt": PROMPT, "chosen": [{"role": "assistant", "content": "c b a"}],
     "rejected": [{"role": "assistant", "content": "c a b"}]},
    {"chosen": [*PROMPT, {"role": "assistant", "content": "c b a"}],
     "rejected": [*PROMPT, {"role": "assistant", "content": "c a b"}]},
    {"chosen": "\n\nHuman: Reverse: a b c\n\nAssistant: c b a",
     "rejected": "\n\nHuman: Reverse: a b c\n\nAssistant: c a b"},
], ids=["strings", "trl-conversational", "messages-pair", "hh-rlhf"])
def test_every_format_reads_to_the_same_pair(tmp_path, record):
    (pair,) = read_pairs(_write(tmp_path / "p.jsonl", [record]))
    assert (pair.prompt, pair.chosen, pair.rejected) == (EXPECTED.prompt, EXPECTED.chosen, EXPECTED.rejected)
    assert pair.where.endswith("p.jsonl:1")


def test_a_multi_turn_hh_transcript_keeps_its_turns(tmp_path):
    chosen = "\n\nHuman: Hi\n\nAssistant: Hello\n\nHuman: Reverse: a b c\n\nAssistant: c b a"
    (pair,) = read_pairs(_write(tmp_path / "p.jsonl", [{"chosen": chosen, "rejected": chosen[:-5] + "c a b"}]))
    assert [m["role"] for m in pair.prompt] == ["user", "assistant", "user"]
    assert (pair.chosen, pair.rejected) == ("c b a", "c a b")


@pytest.mark.parametrize("record, match", [
    ({"chosen": [*PROMPT, {"role": "assistant", "content": "x"}],
      "rejected": [{"role": "user", "content": "other"}, {"role": "assistant", "content": "y"}]},
     "share everything but the last assistant message"),
    ({"chosen": "no markers", "rejected": "\n\nHuman: a\n\nAssistant: b"}, "starts with"),
    ({"chosen": "\n\nHuman: a", "rejected": "\n\nHuman: a"}, "does not end with an Assistant turn"),
    ({"prompt": "p", "chosen": 3, "rejected": "r"}, "chosen: expected a string or a list of messages, got a number"),
    ({"prompt": {"a": 1}, "chosen": "c", "rejected": "r"}, "prompt: expected a string or a list of messages"),
    ({"prompt": "p", "chosen": "c"}, "needs 'chosen' and 'rejected'"),
    ({"prompt": "p", "chosen": "c", "rejected": "r", "task": 5}, "task must be a string"),
    ({"chosen": "c", "rejected": ["x"]}, "must both be conversations"),
])
def test_bad_records_name_the_line_and_field(tmp_path, record, match):
    with pytest.raises(DataError, match=match) as e:
        list(read_pairs(_write(tmp_path / "p.jsonl", [{"prompt": "ok", "chosen": "a", "rejected": "b"}, record])))
    assert "p.jsonl:2" in str(e.value)


def test_masks_cover_the_answers_and_the_prompt_is_shared(tmp_path, tok):
    template = builtin_template("llmlab", eos_token="<|eos|>")
    (pair,) = build_pairs(_write(tmp_path / "p.jsonl", [{"prompt": "Reverse: a b c", "chosen": "c b a",
                                                         "rejected": "c a b", "task": "reverse"}]), tok, template, 64)
    n = int(np.argmax(pair.chosen_mask))
    assert n == int(np.argmax(pair.rejected_mask)) and np.array_equal(pair.chosen_ids[:n], pair.rejected_ids[:n])
    answer = tok.decode(pair.chosen_ids[pair.chosen_mask].tolist(), skip_special=True)
    assert answer.strip() == "c b a" and pair.chosen_mask[n:].all() and pair.task == "reverse"
    assert tok.decode(pair.rejected_ids[pair.rejected_mask].tolist(), skip_special=True).strip() == "c a b"


def test_bad_pairs_are_counted_and_skipped(tmp_path, tok):
    template = builtin_template("llmlab")
    records = [{"prompt": "Reverse: a b c", "chosen": "c b a", "rejected": "c a b"},
               {"prompt": "Reverse: a b c", "chosen": "same", "rejected": "same"},
               {"prompt": "Reverse: a b c", "chosen": "  ", "rejected": "c a b"},
               {"prompt": "Hello " * 40, "chosen": "c b a", "rejected": "c a b"},
               {"prompt": "Reverse: a b c", "chosen": "c b a " * 20, "rejected": "c a b"}]
    stats = Counter()
    pairs = build_pairs(_write(tmp_path / "p.jsonl", records), tok, template, 32, stats)
    assert len(pairs) == 2
    assert (stats["identical"], stats["empty_response"], stats["prompt_too_long"], stats["truncated"]) == (1, 1, 1, 1)
    assert all(len(p.chosen_ids) <= 33 and len(p.rejected_ids) <= 33 for p in pairs)
    with pytest.raises(DataError, match="no usable preference pairs .*1 identical"):
        build_pairs(_write(tmp_path / "q.jsonl", records[1:2]), tok, template, 32)


def test_collated_pairs_put_chosen_rows_first_right_padded(tmp_path, tok):
    template = builtin_template("llmlab")
    records = [{"prompt": f"Reverse: {i}", "chosen": "c b a " * (i + 1), "rejected": "c a b"} for i in range(3)]
    pairs = build_pairs(_write(tmp_path / "p.jsonl", records), tok, template, 64)
    batch = collate_pairs(pairs, pad_id=0, index=[0, 1, 2])
    assert batch["input_ids"].shape == batch["targets"].shape == (6, batch["sequences"].shape[1] - 1)
    for r, (ids, mask) in enumerate([(p.chosen_ids, p.chosen_mask) for p in pairs]
                                    + [(p.rejected_ids, p.rejected_mask) for p in pairs]):
        n = len(ids)
        assert batch["lengths"][r] == n and batch["sequences"][r, :n].tolist() == ids.tolist()
        assert (batch["sequences"][r, n:] == 0).all()
        target = batch["targets"][r, :n - 1].numpy()
        assert np.array_equal(target[mask[1:]], ids[1:][mask[1:]]) and (target[~mask[1:]] == -100).all()
    assert batch["index"].tolist() == [0, 1, 2]


def test_pair_batches_are_a_pure_function_of_their_index(tmp_path, tok):
    template = builtin_template("llmlab")
    records = [{"prompt": f"Reverse: {i}", "chosen": "c b a", "rejected": "c a b"} for i in range(7)]
    pairs = build_pairs(_write(tmp_path / "p.jsonl", records), tok, template, 64)
    a, b = PairBatches(pairs, 3, seed=1), PairBatches(pairs, 3, seed=1)
    forward = [a.batch(k)["index"].tolist() for k in range(6)]
    assert [b.batch(k)["index"].tolist() for k in reversed(range(6))] == forward[::-1]
    seen = sum(forward, [])[:7]
    assert sorted(seen) == list(range(7))  # the first epoch covers every pair once
    assert [len(x["index"]) for x in a.first_epoch(10)] == [3, 3, 1]


def test_prompts_come_from_every_record_kind(tmp_path, tok):
    template = builtin_template("llmlab")
    records = [{"prompt": "Reverse: a b c", "answer": "c b a", "task": "reverse"},
               {"prompt": "Reverse: a b c", "chosen": "c b a", "rejected": "c a b"},
               {"instruction": "Reverse the order of the items.", "input": "a b c", "output": "c b a"},
               {"prompt": "Hello " * 50}]
    path = _write(tmp_path / "p.jsonl", records)
    read = list(read_prompts(path))
    assert [a for _, _, a, _ in read] == ["c b a", "c b a", "c b a", None]
    assert read[2][1] == [{"role": "user", "content": "Reverse the order of the items.\n\na b c"}]
    stats = Counter()
    prompts = build_prompts(path, tok, template, 40, stats)
    assert len(prompts) == 3 and stats["prompt_too_long"] == 1
    assert tok.decode(prompts[0].prompt_ids.tolist()) == template.render(read[0][1], add_generation_prompt=True)
    with pytest.raises(DataError, match="answer: expected a string"):
        list(read_prompts(_write(tmp_path / "q.jsonl", [{"prompt": "p", "answer": 3}])))


def test_near_misses_differ_from_the_answer_and_keep_its_shape():
    rng = random.Random(0)
    for task, make in TASKS.items():
        for _ in range(300):
            record = make(rng, 1)
            wrong = near_miss(record, rng)
            assert wrong != record["output"], (task, record)
            if task in ("reverse", "sort"):
                assert len(wrong.split()) in (len(record["output"].split()), len(record["output"].split()) - 1)
            elif task == "upper":
                assert wrong.upper() == record["output"]
            elif task == "format":
                assert len(wrong) == 10 and wrong.count("/") == 2
            else:
                assert int(wrong) >= 0 and abs(int(wrong) - int(record["output"])) <= 2


def test_synth_alignment_sets_hold_the_same_inputs(tmp_path):
    common = {"tasks": ["reverse", "add", "upper"], "train": 30, "val": 6, "test": 6, "seed": 3}
    for fmt in ("alpaca", "preference", "prompt"):
        run(SynthConfig(out_dir=str(tmp_path / fmt), format=fmt, **common))
    for split in ("train", "val", "test"):
        alpaca, pref, prompt = ([json.loads(x) for x in (tmp_path / f / f"{split}.jsonl").read_text().splitlines()]
                                for f in ("alpaca", "preference", "prompt"))
        for a, p, q in zip(alpaca, pref, prompt, strict=True):
            assert p["prompt"] == q["prompt"] == f"{a['instruction']}\n\n{a['input']}"
            assert p["chosen"] == q["answer"] == a["output"] != p["rejected"]
            assert p["task"] == q["task"] == a["task"]
