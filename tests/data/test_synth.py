"""The synthetic instruction dataset: answers checked by independent computation, seeding, task
balance, disjoint splits on disk, exact-match scoring and the error paths."""

from __future__ import annotations

import json
import random
import re
from collections import Counter
from datetime import datetime

import pytest

from llmlab.common import LlmlabError, OutputError
from llmlab.config import ConfigError, from_dict
from llmlab.data import synth
from llmlab.data.synth import INSTRUCTIONS, TASKS, SynthConfig, generate, run

KEYS = {"instruction", "input", "output", "task"}


def _numbers(text: str, op: str) -> tuple[int, int]:
    match = re.fullmatch(rf"(\d+) {re.escape(op)} (\d+)", text)
    assert match, text
    return int(match[1]), int(match[2])


def _count_answer(text: str) -> str:
    target, items = text.split(": ")
    return str(items.split().count(target))


# each task's answer recomputed from its input, without the generator's code
SOLVE = {
    "add": lambda s: str(sum(_numbers(s, "+"))),
    "subtract": lambda s: str(_numbers(s, "-")[0] - _numbers(s, "-")[1]),
    "multiply": lambda s: str(_numbers(s, "*")[0] * _numbers(s, "*")[1]),
    "reverse": lambda s: " ".join(s.split()[::-1]),
    "sort": lambda s: " ".join(str(v) for v in sorted(int(t) for t in s.split())),
    "count": _count_answer,
    "upper": lambda s: s.upper(),
    "format": lambda s: datetime.strptime(s, "%Y-%m-%d").strftime("%d/%m/%Y"),
}


def test_there_are_eight_tasks_each_with_a_solver_and_phrasings():
    assert list(TASKS) == ["add", "subtract", "multiply", "reverse", "sort", "count", "upper", "format"]
    assert SOLVE.keys() == TASKS.keys() == INSTRUCTIONS.keys()


@pytest.mark.parametrize("difficulty", [1, 2, 3, synth.MAX_DIFFICULTY])  # every task works up to the cap
@pytest.mark.parametrize("task", list(TASKS))
def test_every_answer_is_correct(task, difficulty):
    records = generate([task], 300, seed=difficulty, difficulty=difficulty)
    assert len(records) == 300
    for r in records:
        assert set(r) == KEYS and r["task"] == task
        assert r["instruction"] == INSTRUCTIONS[task][0]
        assert r["output"] == SOLVE[task](r["input"]), r
    assert len({r["input"] for r in records}) > 20  # the inputs vary


def test_difficulty_one_is_small():
    records = generate(list(TASKS), 8 * 200, seed=0)
    by_task = {t: [r for r in records if r["task"] == t] for t in TASKS}
    for r in by_task["add"] + by_task["subtract"]:
        assert all(0 <= v <= 99 for v in map(int, re.findall(r"\d+", r["input"])))
    assert all(int(r["output"]) >= 0 for r in by_task["subtract"])
    for r in by_task["multiply"]:
        assert all(0 <= v <= 9 for v in _numbers(r["input"], "*"))
    for task in ("reverse", "sort"):
        for r in by_task[task]:
            items = r["input"].split()
            assert 3 <= len(items) <= 5 and all(len(item) == 1 for item in items)
    for r in by_task["upper"]:
        assert r["input"] == r["input"].lower() and 2 <= len(r["input"].split()) <= 4
    # harder is bigger: operands and lists grow
    hard = generate(["add", "reverse"], 400, seed=0, difficulty=3)
    assert max(max(_numbers(r["input"], "+")) for r in hard if r["task"] == "add") > 999
    assert max(len(r["input"].split()) for r in hard if r["task"] == "reverse") > 5


def test_a_seed_gives_the_same_records_and_another_seed_others():
    tasks = list(TASKS)
    assert generate(tasks, 64, seed=7) == generate(tasks, 64, seed=7)
    assert generate(tasks, 64, seed=7) != generate(tasks, 64, seed=8)


def test_tasks_are_interleaved_evenly():
    tasks = ["add", "sort", "upper"]
    records = generate(tasks, 100, seed=0)
    assert [r["task"] for r in records[:6]] == tasks * 2
    assert sorted(Counter(r["task"] for r in records).values()) == [33, 33, 34]


def test_paraphrase_draws_among_the_phrasings_of_the_task():
    records = generate(["add", "count"], 200, seed=0, paraphrase=True)
    for task in ("add", "count"):
        used = {r["instruction"] for r in records if r["task"] == task}
        assert used == set(INSTRUCTIONS[task])
    assert all(r["output"] == SOLVE[r["task"]](r["input"]) for r in records)


@pytest.mark.parametrize("tasks, n, difficulty, message", [
    (["add", "divide"], 10, 1, r"unknown task 'divide'; known tasks: add, subtract, multiply"),
    (["add"], 0, 1, "must be >= 1 and at most 1,000,000, got 0"),
    (["add"], -3, 1, "must be >= 1 and at most 1,000,000, got -3"),
    (["add"], 10**12, 1, "must be >= 1 and at most 1,000,000, got 1000000000000"),
    (["add"], 5, 0, "difficulty must be >= 1"),
    (["count"], 5, 9, "difficulty must be >= 1 and at most 8, got 9"),
    (["add"], 5, 10**6, "difficulty must be >= 1 and at most 8, got 1000000"),
    ([], 5, 1, "no tasks"),
])
def test_generate_refuses_bad_arguments(tasks, n, difficulty, message):
    with pytest.raises(LlmlabError, match=message):
        generate(tasks, n, seed=0, difficulty=difficulty)


def _read(path) -> list[dict]:
    lines = path.read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines]


def test_run_writes_disjoint_balanced_jsonl_splits(tmp_path, capsys):
    cfg = SynthConfig(out_dir=str(tmp_path / "synth"), train=800, val=80, test=80)
    result = run(cfg)
    out = tmp_path / "synth"
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml", "test.jsonl", "train.jsonl", "val.jsonl"]
    splits = {s: _read(out / f"{s}.jsonl") for s in ("train", "val", "test")}
    assert {s: len(records) for s, records in splits.items()} == {"train": 800, "val": 80, "test": 80}
    for split, records in splits.items():
        assert all(set(r) == KEYS and all(isinstance(v, str) for v in r.values()) for r in records)
        assert all(r["output"] == SOLVE[r["task"]](r["input"]) for r in records)
        counts = Counter(r["task"] for r in records)
        assert counts == Counter({t: len(records) // 8 for t in TASKS})
        assert result["counts"][split] == dict(counts)
    keys = {s: {(r["task"], r["input"]) for r in records} for s, records in splits.items()}
    assert not keys["train"] & keys["val"] and not keys["train"] & keys["test"] and not keys["val"] & keys["test"]
    assert len(keys["val"]) == 80 and len(keys["test"]) == 80  # each eval input once
    # multiply has 100 inputs at difficulty 1: train reuses the rest instead of swallowing them all
    assert sum(t == "multiply" for t, _ in keys["train"]) <= 100 - 20
    assert result["out_dir"] == str(out)
    report = capsys.readouterr().out
    assert "multiply" in report and "800" in report
    with pytest.raises(OutputError, match="already exists"):  # refused, and left as it was
        run(cfg)
    assert _read(out / "train.jsonl") == splits["train"]
    (out / "notes.txt").write_text("mine")
    assert run(cfg, overwrite=True)["counts"] == result["counts"]  # deterministic
    assert _read(out / "train.jsonl") == splits["train"] and (out / "notes.txt").read_text() == "mine"


def test_the_default_config_can_be_filled(tmp_path):
    result = run(SynthConfig(out_dir=str(tmp_path)))
    assert {s: sum(c.values()) for s, c in result["counts"].items()} == {"train": 4000, "val": 200, "test": 200}


def test_empty_eval_splits_give_empty_files(tmp_path):
    run(SynthConfig(out_dir=str(tmp_path), tasks=["sort"], train=5, val=0, test=0))
    assert len(_read(tmp_path / "train.jsonl")) == 5
    assert (tmp_path / "val.jsonl").read_text() == "" and (tmp_path / "test.jsonl").read_text() == ""


def test_a_split_larger_than_the_task_space_is_refused_and_nothing_is_written(tmp_path):
    # the 0-9 times table has 100 inputs; 150 distinct val inputs cannot exist
    cfg = SynthConfig(out_dir=str(tmp_path / "out"), tasks=["multiply"], train=10, val=150, test=0)
    with pytest.raises(LlmlabError, match="cannot fill the val split: task 'multiply'.*too small"):
        run(cfg)
    assert not (tmp_path / "out").exists()


def test_train_is_refused_when_the_eval_splits_hold_every_input(tmp_path, monkeypatch):
    def coin(rng: random.Random, difficulty: int) -> dict:
        side = rng.choice(["heads", "tails"])
        return {"instruction": "Repeat.", "input": side, "output": side, "task": "coin"}

    monkeypatch.setitem(TASKS, "coin", coin)
    run(SynthConfig(out_dir=str(tmp_path / "ok"), tasks=["coin"], train=20, val=1, test=0))
    assert {r["input"] for r in _read(tmp_path / "ok" / "train.jsonl")} == {"heads", "tails"} - {
        r["input"] for r in _read(tmp_path / "ok" / "val.jsonl")}
    with pytest.raises(LlmlabError, match="cannot fill the train split: task 'coin'"):
        run(SynthConfig(out_dir=str(tmp_path / "bad"), tasks=["coin"], train=20, val=1, test=1))
    assert not (tmp_path / "bad").exists()


def test_config_is_checked_and_builds_from_a_dict():
    cfg = from_dict(SynthConfig, {"tasks": ["add", "sort"], "train": 10, "difficulty": 2})
    assert cfg.tasks == ["add", "sort"] and cfg.val == 200 and SynthConfig().tasks == list(TASKS)
    for bad, message in [({"tasks": ["add", "nope"]}, "unknown task"), ({"tasks": []}, "at least one task"),
                         ({"train": 0}, "train must be >= 1"), ({"val": -1}, "val must be >= 0"),
                         ({"train": 10**12}, "train must be >= 1 and at most 1,000,000"),
                         ({"test": 10**7}, "test must be >= 0 and at most 1,000,000"),
                         ({"difficulty": 0}, "difficulty must be >= 1"),
                         ({"difficulty": 10**9}, "difficulty must be >= 1 and at most 8")]:
        with pytest.raises(ConfigError, match=message):
            from_dict(SynthConfig, bad)


def test_draws_are_bounded(monkeypatch):
    monkeypatch.setattr(synth, "MAX_DRAWS", 3)
    with pytest.raises(LlmlabError, match="in 3 draws"):
        synth._draw(["multiply"], 101, random.Random(0), 1, unique=True, split="test")
