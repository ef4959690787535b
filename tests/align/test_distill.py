"""llmlab data distill: the Self-Instruct rounds against a scripted server and a local checkpoint, its
filters one by one, and what it writes."""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from llmlab.align.distill import (CODE_LIST_HEADER, LIST_HEADER, TESTS_HEADER, DistillConfig, DistillError,
                                  Novelty, clean_tests, instruction_prompt, parse_instructions, read_seeds, run,
                                  screen)
from llmlab.cli import main
from llmlab.common import LlmlabError
from llmlab.data.sft import read_records, record_messages
from llmlab.eval.lm import ServerLM
from llmlab.models import LlamaConfig, build_model
from llmlab.models.io import copy_tokenizer_files, save_model

SEEDS = [
    {"instruction": "Give three tips for staying healthy.", "input": "", "output": "Sleep, eat well, move."},
    {"instruction": "Translate the sentence into French.", "input": "The cat sleeps.", "output": "Le chat dort."},
    {"instruction": "Write a function `double(x)` that returns twice x.", "input": "",
     "output": "def double(x):\n    return 2 * x", "tests": "assert double(2) == 4"},
]

TEXT_TASKS = (" Name the capital city of Spain.\n"
              "Task 6: Give three tips for staying healthy.\n"  # a seed again: near duplicate
              "Task 7: Draw a picture of a cat sitting on a mat.\n"  # what a text model cannot make
              "Task 8: Hi there\n"  # too short
              "Task 9: Explain why the sky appears blue during the day.\nInput: <noinput>\n"
              "Task 10: Count the vowels in the word given.\nInput: banana\n"
              "Task 11: Describe the weather on")  # cut off by the token budget
CODE_TASKS = (" Write a function `add(a, b)` that returns the sum of a and b.\n"
              "Task 6: Implement halve(n), giving n divided by two and rounded down.\n")
ANSWERS = {"capital": "Madrid", "sky": "Sunlight scatters off air molecules, blue light the most.",
           "vowels": "3", "add(a, b)": "```python\ndef add(a, b):\n    return a + b\n```",
           "halve(n)": "def halve(n):\n    return n / 2"}  # wrong on every sample: fails its tests
TESTS = {"add(a, b)": "assert add(1, 2) == 3\nassert add(0, 0) == 0\nprint('done')",
         "halve(n)": "assert halve(5) == 2"}


def _complete(prompt: str) -> str:
    if prompt.startswith(LIST_HEADER):
        return TEXT_TASKS
    if prompt.startswith(CODE_LIST_HEADER):
        return CODE_TASKS
    last = prompt.rsplit("Task:", 1)[-1] if prompt.startswith(TESTS_HEADER) else prompt.rsplit("Instruction:", 1)[-1]
    table = TESTS if prompt.startswith(TESTS_HEADER) else ANSWERS
    return next((v for k, v in table.items() if k in last), "")


class _Teacher(BaseHTTPRequestHandler):
    requests: list[dict] = []
    mute = False  # answer every prompt with nothing

    def log_message(self, *args):
        pass

    def _send(self, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        if self.path == "/v1/models":
            return self._send({"data": [{"id": "teacher-1"}]})
        self.send_error(404)

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if self.path != "/v1/completions":
            return self.send_error(404)
        self.requests.append(body)
        text = "" if self.mute else _complete(body["prompt"])
        self._send({"choices": [{"index": 0, "text": text, "finish_reason": "stop"}]})


@pytest.fixture
def teacher_url():
    _Teacher.requests, _Teacher.mute = [], False
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Teacher)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()


@pytest.fixture
def seeds(tmp_path):
    path = tmp_path / "seeds.jsonl"
    path.write_text("".join(json.dumps(s) + "\n" for s in SEEDS))
    return path


def _read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_parse_instructions_reads_inputs_and_drops_the_cut_off_task():
    parsed, cut = parse_instructions(TEXT_TASKS, 5)
    assert cut == [("Describe the weather on", "")]
    assert parsed[0] == ("Name the capital city of Spain.", "")
    assert parsed[4] == ("Explain why the sky appears blue during the day.", "")  # <noinput> is no input
    assert parsed[5] == ("Count the vowels in the word given.", "banana")
    assert len(parsed) == 6
    # one task, or a completion whose last line ended, loses nothing
    assert parse_instructions(" Say hi to the user politely", 2) == ([("Say hi to the user politely", "")], [])
    assert parse_instructions(CODE_TASKS, 5)[1] == []


def test_instruction_prompt_numbers_the_demos_and_leaves_the_next_open():
    tasks = read_seeds("builtin")
    prompt = instruction_prompt(tasks[:3], "text")
    assert prompt.startswith(LIST_HEADER) and prompt.endswith("Task 4:")
    assert "Task 2: Translate the sentence into French.\nInput: The cat sleeps on the sofa.\n" in prompt
    assert len(tasks) == 20 and sum(t.kind == "code" for t in tasks) == 6


def test_screen_and_novelty_follow_self_instruct():
    assert screen("Hi there") == "too_short"
    assert screen(" ".join(["word"] * 151)) == "too_long"
    assert screen("Plot the sales figures for each month.") == "unseen_modality"
    assert screen("Open the file and count its lines.") == "unseen_modality"
    assert screen("Profile the function for speed.") is None  # "file" inside a word is not the word
    assert screen("- list three fruits please") == "bad_start"
    assert screen("Name three fruits that are red.") is None
    novelty = Novelty(["Give three tips for staying healthy."])
    assert novelty.highest("give three tips for staying healthy") == pytest.approx(1.0)
    # ROUGE-L F of a 5-token common subsequence of 6 and 8 tokens: 2 * (5/6 * 5/8) / (5/6 + 5/8) = 5/7
    assert novelty.highest("Give three tips for staying happy at work.") == pytest.approx(5 / 7)
    assert novelty.highest("Translate the sentence into French.") == 0.0
    assert clean_tests("assert f(1) == 2\n  assert f(2) == 3\nprint(1)\nassert f(3) == 0") == \
        "assert f(1) == 2\nassert f(2) == 3"


def test_distill_from_a_server_keeps_checked_novel_tasks_with_provenance(tmp_path, teacher_url, seeds):
    out = tmp_path / "distilled"
    cfg = DistillConfig(teacher=teacher_url, seeds=str(seeds), out_dir=str(out), instructions=50, rounds=1,
                        prompts_per_round=8, demos=2, code_samples=3, seed=1)
    report = run(cfg)
    kept = _read(out / "train.jsonl")
    dropped = _read(out / "dropped.jsonl")
    by_instruction = {r["instruction"]: r for r in kept}
    assert set(by_instruction) == {"Name the capital city of Spain.",
                                   "Explain why the sky appears blue during the day.",
                                   "Count the vowels in the word given.",
                                   "Write a function `add(a, b)` that returns the sum of a and b."}
    assert by_instruction["Count the vowels in the word given."]["input"] == "banana"
    assert by_instruction["Name the capital city of Spain."]["output"] == "Madrid"
    add = by_instruction["Write a function `add(a, b)` that returns the sum of a and b."]
    assert add["provenance"]["kind"] == "code" and add["provenance"]["samples"] == 1
    assert add["provenance"]["tests"] == "assert add(1, 2) == 3\nassert add(0, 0) == 0"
    assert add["provenance"]["teacher"] == f"{teacher_url.removesuffix('/v1')} (teacher-1)"
    for record in kept:
        meta = record["provenance"]
        assert meta["round"] == 1 and meta["demos"] and all(d.startswith("seed-") for d in meta["demos"])
        assert 0 <= meta["rouge_l_max"] <= cfg.rouge_threshold
    reasons = {(r["instruction"], r["reason"]) for r in dropped}
    assert ("Give three tips for staying healthy.", "near_duplicate") in reasons
    assert ("Draw a picture of a cat sitting on a mat.", "unseen_modality") in reasons
    assert ("Hi there", "too_short") in reasons
    assert ("Describe the weather on", "cut_off") in reasons
    # every code sample of `halve` fails its test: tried code_samples times, then dropped
    failed = [r for r in dropped if r["reason"] == "failed_tests"]
    assert {r["instruction"] for r in failed} == {"Implement halve(n), giving n divided by two and rounded down."}
    assert failed[0]["provenance"]["samples"] == 3
    # the same instruction from a later prompt of the round is a near duplicate of the first
    assert sum(r["instruction"] == "Name the capital city of Spain." for r in dropped) >= 1
    saved = json.loads((out / "report.json").read_text())
    assert saved["kept"] == len(kept) == report["kept"] == 4
    assert saved["generated"] == saved["kept"] + sum(saved["dropped"].values())
    assert saved["dropped"]["cut_off"] >= 1
    assert saved["dropped"] == dict(sorted(Counter(r["reason"] for r in dropped).items()))
    # instructions are sampled at the configured temperature, answers greedily
    list_requests = [r for r in _Teacher.requests if r["prompt"].startswith((LIST_HEADER, CODE_LIST_HEADER))]
    assert list_requests and all(r["temperature"] == 1.0 for r in list_requests)
    assert any(r["temperature"] == 0 and "Instruction:" in r["prompt"] for r in _Teacher.requests)
    # what it writes is instruction data the fine-tuning reader takes
    for where, record in read_records(out / "train.jsonl"):
        assert record_messages(record, where)[-1]["role"] == "assistant"


def test_later_rounds_show_the_teachers_own_tasks_and_stop_at_the_target(tmp_path, teacher_url):
    text_seeds = tmp_path / "text-seeds.jsonl"
    text_seeds.write_text("".join(json.dumps(s) + "\n" for s in SEEDS[:2]))
    run(DistillConfig(teacher=teacher_url, seeds=str(text_seeds), out_dir=str(tmp_path / "a"), instructions=10,
                      rounds=2, prompts_per_round=1, demos=2))
    first = [r["instruction"] for r in _read(tmp_path / "a" / "train.jsonl")]
    assert len(first) == 3  # all from round 1: round 2 hears the same tasks again
    second_prompt = [r["prompt"] for r in _Teacher.requests if r["prompt"].startswith(LIST_HEADER)][1]
    assert sum(k in second_prompt for k in first) == 1  # demos // 2 of the teacher's own tasks
    run(DistillConfig(teacher=teacher_url, seeds=str(text_seeds), out_dir=str(tmp_path / "b"), instructions=2,
                      rounds=5, prompts_per_round=1, demos=2))
    report = json.loads((tmp_path / "b" / "report.json").read_text())
    assert report["kept"] == 2 and report["rounds"] == 1 and report["dropped"]["over_target"] == 1
    assert report["generated"] == report["kept"] + sum(report["dropped"].values())


def test_distill_from_a_local_checkpoint(tmp_path, chat_base):
    out = tmp_path / "local"
    report = run(DistillConfig(teacher=str(chat_base), out_dir=str(out), instructions=2, rounds=2,
                               prompts_per_round=2, max_new_tokens=12, code_samples=1, seed=0))
    assert report["rounds"] == 2 or report["kept"] >= 2
    saved = json.loads((out / "report.json").read_text())
    assert saved["teacher_hash"] and saved["generated"] == saved["kept"] + sum(saved["dropped"].values())
    assert len(_read(out / "train.jsonl")) == saved["kept"]
    assert (out / "config.yaml").exists()


def test_bad_input_is_a_clear_error_and_writes_nothing(tmp_path, teacher_url, seeds, capsys):
    out = tmp_path / "out"
    with pytest.raises(DistillError, match="teacher: name a checkpoint"):
        run(DistillConfig(out_dir=str(out)))
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(SEEDS[0]) + "\n" + json.dumps({"instruction": "x", "output": 3}) + "\n")
    with pytest.raises(DistillError, match=r"bad.jsonl:2: output must be text"):
        run(DistillConfig(teacher=teacher_url, seeds=str(bad), out_dir=str(out)))
    with pytest.raises(ValueError, match="rouge_threshold"):
        DistillConfig(rouge_threshold=1.5)
    assert not out.exists()
    # an unreachable server, from the command line: exit 1, a message naming the URL, no traceback
    assert main(["data", "distill", "teacher=http://127.0.0.1:9/v1", f"out_dir={out}"]) == 1
    err = capsys.readouterr().err
    assert "127.0.0.1:9" in err and "Traceback" not in err
    assert not out.exists()
    # a finished output is not overwritten without --overwrite
    args = ["data", "distill", f"teacher={teacher_url}", f"seeds={seeds}", f"out_dir={out}", "instructions=1",
            "rounds=1", "prompts_per_round=1"]
    assert main(args) == 0
    first = (out / "train.jsonl").read_text()
    assert main(args) == 1 and "--overwrite" in capsys.readouterr().err
    assert (out / "train.jsonl").read_text() == first
    assert main(args + ["--overwrite"]) == 0


def test_teachers_it_cannot_use_are_refused(tmp_path, chat_base, teacher_url, capsys):
    out = tmp_path / "out"
    with pytest.raises(DistillError, match="http:// or https://"):
        run(DistillConfig(teacher="ftp://127.0.0.1/v1", out_dir=str(out)))
    reward_model = tmp_path / "rm"
    save_model(build_model(LlamaConfig(vocab_size=300, dim=16, n_layers=1, n_heads=2, hidden_dim=32, max_seq_len=32,
                                       num_labels=1)), reward_model)
    copy_tokenizer_files(chat_base, reward_model)
    with pytest.raises(LlmlabError, match="reward model or classifier"):
        run(DistillConfig(teacher=str(reward_model), out_dir=str(out)))
    with pytest.raises(ValueError, match="seed"):
        DistillConfig(seed=-3)
    assert not out.exists()
    # a teacher whose every completion is empty: a warning on stderr, with the drops written to look at
    _Teacher.mute = True
    assert main(["data", "distill", f"teacher={teacher_url}", f"out_dir={out}", "rounds=2"]) == 0
    captured = capsys.readouterr()
    assert "kept 0 of" in captured.out and "warning:" in captured.err and "dropped.jsonl" in captured.err
    assert json.loads((out / "report.json").read_text())["kept"] == 0


class _Broken(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_GET(self):
        if self.path == "/v1/models":  # an HTML error page over several lines
            body = b"<html>\n<body>\n<h1>Not Found</h1>\n</body>\n</html>\n"
            self.send_response(404)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            return self.wfile.write(body)
        self.send_response(200)  # a body that drips in a byte at a time
        self.send_header("Content-Length", "1000")
        self.end_headers()
        for _ in range(1000):
            self.wfile.write(b" ")
            self.wfile.flush()
            time.sleep(0.05)


def test_a_broken_server_is_one_line_and_a_slow_one_has_a_deadline():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Broken)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        with pytest.raises(LlmlabError, match=r"HTTP 404: <html> <body> <h1>Not Found") as e:
            ServerLM(url + "/v1")
        assert "\n" not in str(e.value)
        lm = ServerLM(url + "/v1", model="m", timeout=0.2)
        started = time.perf_counter()
        with pytest.raises(LlmlabError, match="took over 2 s"):
            lm._call("GET", "/slow")
        assert time.perf_counter() - started < 10
    finally:
        server.shutdown()
