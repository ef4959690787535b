"""llmlab data distill: instruction data written by a teacher model, as Alpaca and Self-Instruct make it.

Each round (Wang et al. 2023, "Self-Instruct"; Taori et al. 2023, "Alpaca"):
1. each of `prompts_per_round` prompts shows `demos` tasks drawn from the pool (the seed tasks and,
   once there are some, at most half of them tasks the teacher wrote) and asks for more; the
   completion is parsed into new instructions (with an input where the teacher gave one);
2. an instruction is dropped when it is shorter than 3 or longer than 150 words, names what a text
   model cannot see or make (an image, a file, a plot, ...), does not start with a letter or a digit,
   or is a near duplicate: ROUGE-L F (rouge-score) above `rouge_threshold` (0.7) against any
   instruction in the pool or already taken this round;
3. the teacher answers each survivor after `demos` answered seed tasks of the same kind, greedily by
   default; an empty answer is dropped;
4. code tasks (those prompted from code seeds, which carry unit tests) also get `assert` tests from
   the teacher, and are kept only when one of `code_samples` answers passes them in the evaluator's
   sandboxed runner (`llmlab.eval.coderun`), as Code Llama filters its self-instruct data.
Kept tasks join the pool, so later rounds see them. Rounds go on until `instructions` tasks are kept
or `rounds` are spent. The teacher is any model `llmlab eval` reads (a checkpoint, a run directory,
an HF folder) or an OpenAI-compatible server's completions route (`llmlab serve`, vLLM, ...); prompts
are plain text, as Self-Instruct prompted GPT-3.

out_dir receives `train.jsonl` (Alpaca records: instruction, input, output, and `provenance`: the
teacher, its hash, the round, the demonstrations shown, the kind, the highest ROUGE-L against the
pool and, for code, the tests and the samples tried), `dropped.jsonl` (each with its `reason`),
`report.json` (counts) and `config.yaml`; all of it lands together when the run ends.
"""

from __future__ import annotations

import json
import random
import re
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

from llmlab.common import LlmlabError, atomic_dir, atomic_write_text, check_output
from llmlab.config import save_config

BLOCKED_WORDS = ("image", "images", "graph", "graphs", "picture", "pictures", "file", "files", "map", "maps",
                 "draw", "plot", "go to", "video", "audio", "music", "flowchart", "diagram")
MIN_WORDS, MAX_WORDS = 3, 150
NO_INPUT = "<noinput>"
MAX_CHARS_PER_TOKEN = 32  # no tokenizer's token is longer: more text than that is a server over its limit
# what the prompts are made of: the teacher continues a numbered list, then answers after "Output:"
LIST_HEADER = "Come up with a series of tasks:\n"
CODE_LIST_HEADER = "Come up with a series of Python programming tasks, each solved by one function:\n"
TESTS_HEADER = "Write Python assert statements that check a solution to each task.\n"

SEED_TASKS = [
    {"instruction": "Give three tips for staying healthy.", "input": "",
     "output": "1. Eat a balanced diet with plenty of fruit and vegetables.\n2. Exercise regularly.\n"
               "3. Get enough sleep."},
    {"instruction": "Translate the sentence into French.", "input": "The cat sleeps on the sofa.",
     "output": "Le chat dort sur le canapé."},
    {"instruction": "Classify the sentiment of the review as positive or negative.",
     "input": "The battery died after two days and support never answered.", "output": "negative"},
    {"instruction": "Summarize the paragraph in one sentence.",
     "input": "Python lists are ordered, mutable sequences. They can hold items of any type, grow and shrink "
              "as needed, and support indexing, slicing and iteration.",
     "output": "Python lists are ordered, mutable sequences of any items that can grow, shrink and be indexed."},
    {"instruction": "Explain the difference between a list and a tuple in Python.", "input": "",
     "output": "A list is mutable: its items can be changed, added or removed. A tuple is immutable: once "
               "created it cannot change, which also makes it hashable when its items are."},
    {"instruction": "Rewrite the sentence in the passive voice.", "input": "The committee approved the budget.",
     "output": "The budget was approved by the committee."},
    {"instruction": "Extract every email address from the text.",
     "input": "Write to ana@example.org or, for billing, to billing@example.com.",
     "output": "ana@example.org, billing@example.com"},
    {"instruction": "Suggest a name for a small bakery that sells sourdough bread.", "input": "",
     "output": "Rise & Crust"},
    {"instruction": "Answer the question with a number.", "input": "How many days are there in a leap year?",
     "output": "366"},
    {"instruction": "Correct the grammar of the sentence.", "input": "She don't like apples.",
     "output": "She doesn't like apples."},
    {"instruction": "List the planets of the solar system in order from the Sun.", "input": "",
     "output": "Mercury, Venus, Earth, Mars, Jupiter, Saturn, Uranus, Neptune"},
    {"instruction": "Convert the temperature from Celsius to Fahrenheit.", "input": "25 degrees Celsius",
     "output": "77 degrees Fahrenheit"},
    {"instruction": "Write a haiku about autumn.", "input": "",
     "output": "Red leaves drift and fall\ncool wind hums through empty trees\nthe year exhales slow"},
    {"instruction": "Give an antonym of the word.", "input": "generous", "output": "stingy"},
    {"instruction": "Write a function `is_palindrome(s)` that returns True when the string reads the same "
                    "backwards, ignoring case.", "input": "",
     "output": "def is_palindrome(s):\n    s = s.lower()\n    return s == s[::-1]",
     "tests": "assert is_palindrome('Level')\nassert not is_palindrome('python')\nassert is_palindrome('')"},
    {"instruction": "Write a function `fizzbuzz(n)` that returns 'Fizz' for multiples of 3, 'Buzz' for multiples "
                    "of 5, 'FizzBuzz' for multiples of both, and the number as a string otherwise.", "input": "",
     "output": "def fizzbuzz(n):\n    if n % 15 == 0:\n        return 'FizzBuzz'\n    if n % 3 == 0:\n"
               "        return 'Fizz'\n    if n % 5 == 0:\n        return 'Buzz'\n    return str(n)",
     "tests": "assert fizzbuzz(15) == 'FizzBuzz'\nassert fizzbuzz(9) == 'Fizz'\nassert fizzbuzz(10) == 'Buzz'\n"
              "assert fizzbuzz(7) == '7'"},
    {"instruction": "Write a function `word_count(text)` that returns a dict mapping each word to how many times "
                    "it occurs.", "input": "",
     "output": "def word_count(text):\n    counts = {}\n    for word in text.split():\n"
               "        counts[word] = counts.get(word, 0) + 1\n    return counts",
     "tests": "assert word_count('a b a') == {'a': 2, 'b': 1}\nassert word_count('') == {}"},
    {"instruction": "Write a function `flatten(xs)` that flattens a list of lists by one level.", "input": "",
     "output": "def flatten(xs):\n    return [x for inner in xs for x in inner]",
     "tests": "assert flatten([[1, 2], [3], []]) == [1, 2, 3]\nassert flatten([]) == []"},
    {"instruction": "Write a function `second_largest(nums)` that returns the second largest distinct number, "
                    "or None when there is none.", "input": "",
     "output": "def second_largest(nums):\n    distinct = sorted(set(nums))\n"
               "    return distinct[-2] if len(distinct) > 1 else None",
     "tests": "assert second_largest([3, 1, 3, 2]) == 2\nassert second_largest([5]) is None\n"
              "assert second_largest([]) is None"},
    {"instruction": "Write a function `gcd(a, b)` that returns the greatest common divisor of two non-negative "
                    "integers.", "input": "",
     "output": "def gcd(a, b):\n    while b:\n        a, b = b, a % b\n    return a",
     "tests": "assert gcd(12, 18) == 6\nassert gcd(7, 0) == 7\nassert gcd(0, 0) == 0"},
]


class DistillError(LlmlabError):
    pass


@dataclass
class DistillConfig:
    # a checkpoint, run directory or HF folder, or an OpenAI-compatible server's base URL
    # (http://127.0.0.1:8000/v1; its API key from OPENAI_API_KEY)
    teacher: str = ""
    server_model: str = ""  # the model a server should use (default: the first it lists)
    out_dir: str = "runs/distill"  # train.jsonl, dropped.jsonl, report.json, config.yaml; absent, empty or --overwrite
    seeds: str = "builtin"  # builtin (14 text and 6 code tasks), or .json/.jsonl Alpaca tasks (`tests` marks code)
    instructions: int = 100  # new tasks to keep
    rounds: int = 50  # the most prompting rounds
    prompts_per_round: int = 8  # instruction prompts per round, each asking for several tasks
    demos: int = 4  # tasks shown in each prompt
    temperature: float = 1.0  # sampling temperature for new instructions
    answer_temperature: float = 0.0  # for answers (0: greedy); code answers after the first are sampled at 0.8
    max_new_tokens: int = 256  # per completion
    rouge_threshold: float = 0.7  # ROUGE-L F above which an instruction is a near duplicate
    code_samples: int = 4  # answers tried per code task; the first that passes its tests is kept
    code_timeout: float = 5.0  # seconds for one answer's tests
    device: str = "auto"  # local teachers: auto | cpu | cuda | mps
    dtype: str = "auto"
    batch_size: int = 16  # prompts decoded together (local) or sent together (server)
    seed: int = 0

    def __post_init__(self):
        for name, least in (("instructions", 1), ("rounds", 1), ("prompts_per_round", 1), ("demos", 1),
                            ("max_new_tokens", 1), ("code_samples", 1), ("batch_size", 1), ("seed", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ValueError(f"{name} must be an integer >= {least}, got {value!r}")
        for name, low, high in (("temperature", 0.0, 10.0), ("answer_temperature", 0.0, 10.0),
                                ("rouge_threshold", 0.0, 1.0), ("code_timeout", 0.1, 600.0)):
            if not low <= getattr(self, name) <= high:
                raise ValueError(f"{name} must be in [{low}, {high}], got {getattr(self, name)}")


# --------------------------------------------------------------------------- tasks


@dataclass
class Task:
    id: str
    instruction: str
    input: str = ""
    output: str = ""
    tests: str | None = None  # Python asserts, for code tasks

    @property
    def kind(self) -> str:
        return "code" if self.tests is not None else "text"


def read_seeds(spec: str) -> list[Task]:
    """The seed tasks: the built-in ones, or Alpaca records (with `tests` for code) from a file or folder."""
    if spec == "builtin":
        return [Task(f"seed-{i}", r["instruction"], r["input"], r["output"], r.get("tests"))
                for i, r in enumerate(SEED_TASKS)]
    from llmlab.data.sft import read_records

    seeds = []
    for where, record in read_records(spec):
        if not isinstance(record, dict):
            raise DistillError(f"{where}: expected an object with instruction, input, output (and tests for code)")
        for key in ("instruction", "input", "output", "tests"):
            if key in record and not isinstance(record[key], str):
                raise DistillError(f"{where}: {key} must be text, got {type(record[key]).__name__}")
        if not record.get("instruction", "").strip() or not record.get("output", "").strip():
            raise DistillError(f"{where}: a seed task needs a non-empty instruction and output")
        seeds.append(Task(f"seed-{len(seeds)}", record["instruction"].strip(), record.get("input", "").strip(),
                          record["output"].strip(), record.get("tests")))
    if not seeds:
        raise DistillError(f"seeds {spec}: no seed task found")
    return seeds


def _shown(task: Task, number: int) -> str:
    text = f"Task {number}: {task.instruction}\n"
    return text + (f"Input: {task.input}\n" if task.input else "")


def instruction_prompt(demos: list[Task], kind: str) -> str:
    """A numbered list of the demos' instructions, left open at the next number."""
    header = CODE_LIST_HEADER if kind == "code" else LIST_HEADER
    return header + "\n" + "".join(_shown(t, i + 1) for i, t in enumerate(demos)) + f"Task {len(demos) + 1}:"


def parse_instructions(completion: str, first: int) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(instruction, input) pairs from a completion of `instruction_prompt` that opened at Task `first`,
    and those cut off: the last of several tasks is set aside unless its line ended, since the token
    budget most likely ran out inside it."""
    pieces = [p.strip() for p in re.split(r"\n\s*Task \d+\s*:", "\n" + f"Task {first}:" + completion)]
    pieces = [p for p in pieces if p]
    cut = []
    if len(pieces) > 1 and not completion.endswith("\n"):
        pieces, cut = pieces[:-1], pieces[-1:]

    def pair(piece: str) -> tuple[str, str]:
        instruction, _, given = piece.partition("\nInput:")
        given = given.strip()
        return " ".join(instruction.split()), "" if given in ("", NO_INPUT) else given

    return [pair(p) for p in pieces], [pair(p) for p in cut]


def answer_prompt(demos: list[Task], task: Task) -> str:
    def block(t: Task) -> str:
        return f"Instruction: {t.instruction}\n" + (f"Input: {t.input}\n" if t.input else "") + "Output:"

    return "".join(block(d) + f" {d.output}\n\n" for d in demos) + block(task)


def tests_prompt(demos: list[Task], task: Task) -> str:
    shown = "".join(f"Task: {d.instruction}\nTests:\n{d.tests.strip()}\n\n" for d in demos)
    return TESTS_HEADER + "\n" + shown + f"Task: {task.instruction}\nTests:\n"


def clean_tests(text: str) -> str:
    """The leading run of `assert` lines of a completion (anything after them is dropped)."""
    lines = []
    for line in text.splitlines():
        if not line.strip().startswith("assert "):
            break
        lines.append(line.strip())
    return "\n".join(lines)


def screen(instruction: str) -> str | None:
    """Why an instruction is dropped before any answer is asked for, or None."""
    words = instruction.split()
    if len(words) < MIN_WORDS:
        return "too_short"
    if len(words) > MAX_WORDS:
        return "too_long"
    lowered = f" {' '.join(re.findall(r'[a-z0-9]+', instruction.lower()))} "
    if any(f" {w} " in lowered for w in BLOCKED_WORDS):
        return "unseen_modality"
    if not instruction[0].isalnum():
        return "bad_start"
    return None


class Novelty:
    """ROUGE-L F of a new instruction against every instruction kept so far (rouge-score's tokens)."""

    def __init__(self, instructions: list[str]):
        from rouge_score import rouge_scorer

        self.scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
        self.pool = [self.scorer._tokenizer.tokenize(s) for s in instructions]

    def highest(self, instruction: str) -> float:
        from rouge_score.rouge_scorer import _score_lcs

        tokens = self.scorer._tokenizer.tokenize(instruction)
        return max((_score_lcs(p, tokens).fmeasure for p in self.pool), default=0.0)

    def add(self, instruction: str) -> None:
        self.pool.append(self.scorer._tokenizer.tokenize(instruction))


# --------------------------------------------------------------------------- the teacher


def load_teacher(cfg: DistillConfig):
    """LocalLM for a folder, ServerLM for an http(s) URL: both answer `generate_until`."""
    from llmlab.eval.lm import LocalLM, ServerLM

    if not cfg.teacher:
        raise DistillError("teacher: name a checkpoint, run directory or HF folder, or a server URL such as "
                           "http://127.0.0.1:8000/v1")
    if "://" in cfg.teacher and not cfg.teacher.startswith(("http://", "https://")):
        raise DistillError(f"teacher={cfg.teacher}: a server is reached over http:// or https://, such as "
                           "http://127.0.0.1:8000/v1")
    if cfg.teacher.startswith(("http://", "https://")):
        return ServerLM(cfg.teacher, model=cfg.server_model or None, batch_size=cfg.batch_size, seed=cfg.seed)
    return LocalLM.from_path(cfg.teacher, device=cfg.device, dtype=cfg.dtype, batch_size=cfg.batch_size,
                             seed=cfg.seed)


def ask(teacher, prompts: list[str], stops: list[str], max_new: int, temperature: float, seed: int) -> list[str]:
    """Completions of `prompts`, each seeded from `seed` and its index; a server that ignores the token
    limit has its completions cut at MAX_CHARS_PER_TOKEN characters per token."""
    if not prompts:
        return []
    teacher.seed = seed
    kwargs = {"until": stops, "max_gen_toks": max_new, "do_sample": temperature > 0, "temperature": temperature}
    return [text[:max_new * MAX_CHARS_PER_TOKEN] for text in teacher.generate_until([(p, kwargs) for p in prompts])]


# --------------------------------------------------------------------------- the loop


def distill(cfg: DistillConfig, teacher, seeds: list[Task], log=print) -> tuple[list[dict], list[dict], Counter]:
    """The Self-Instruct rounds (module docstring): (kept records, dropped records, counts)."""
    from llmlab.eval.coderun import Limits, filter_by_tests

    rng = random.Random(f"distill:{cfg.seed}")
    kinds = {k: [s for s in seeds if s.kind == k] for k in ("text", "code")}
    machine: dict[str, list[Task]] = {"text": [], "code": []}
    novelty = Novelty([s.instruction for s in seeds])
    kept, dropped, counts = [], [], Counter()
    teacher_name, teacher_hash = getattr(teacher, "name", cfg.teacher), getattr(teacher, "hash", None)
    limits = Limits(timeout=cfg.code_timeout)
    code_share = len(kinds["code"]) / len(seeds)

    def drop(reason: str, record: dict) -> None:
        counts[reason] += 1
        dropped.append({**record, "reason": reason})

    for round_ in range(cfg.rounds):
        if len(kept) >= cfg.instructions:
            break
        seed = cfg.seed * 1_000_003 + round_ * 10_007
        # 1. new instructions, each prompt from one kind's pool
        plan = []
        for _ in range(cfg.prompts_per_round):
            kind = "code" if kinds["code"] and rng.random() < code_share else "text"
            n_machine = min(len(machine[kind]), cfg.demos // 2)
            demos = rng.sample(machine[kind], n_machine)
            demos += rng.sample(kinds[kind], min(cfg.demos - n_machine, len(kinds[kind])))
            rng.shuffle(demos)
            plan.append((kind, demos))
        completions = ask(teacher, [instruction_prompt(d, k) for k, d in plan], [], cfg.max_new_tokens,
                          cfg.temperature, seed)
        # 2. screening and near duplicates
        fresh: list[tuple[Task, dict]] = []
        for (kind, demos), completion in zip(plan, completions):
            parsed, cut = parse_instructions(completion, len(demos) + 1)
            for (instruction, given), was_cut in [(p, False) for p in parsed] + [(p, True) for p in cut]:
                counts["generated"] += 1
                task = Task(f"distill-{counts['generated'] - 1}", instruction, given,
                            tests="" if kind == "code" else None)
                meta = {"id": task.id, "kind": kind, "round": round_ + 1, "demos": [d.id for d in demos]}
                record = {"instruction": instruction, "input": given, "provenance": meta}
                if was_cut:
                    drop("cut_off", record)
                    continue
                reason = screen(instruction) if instruction else "empty_instruction"
                if reason is None:
                    meta["rouge_l_max"] = round(novelty.highest(instruction), 4)
                    if meta["rouge_l_max"] > cfg.rouge_threshold:
                        reason = "near_duplicate"
                if reason:
                    drop(reason, record)
                    continue
                novelty.add(instruction)  # later candidates of this round are compared with it too
                fresh.append((task, record))
        # 3. answers (and tests for code), from demos of the task's own kind
        answer_demos = {k: rng.sample(kinds[k], min(cfg.demos, len(kinds[k]))) for k in kinds if kinds[k]}
        answers = ask(teacher, [answer_prompt(answer_demos[t.kind], t) for t, _ in fresh],
                      ["\n\nInstruction:", "\nInstruction:"], cfg.max_new_tokens, cfg.answer_temperature, seed + 1)
        code = [(t, r) for t, r in fresh if t.kind == "code"]
        tests = ask(teacher, [tests_prompt(answer_demos["code"], t) for t, _ in code], ["\n\n", "\nTask:"],
                    cfg.max_new_tokens, 0.0, seed + 2)
        for (task, record), answer in zip(fresh, answers):
            task.output = answer.strip()
            record["output"] = task.output
        for (task, record), written in zip(code, tests):
            task.tests = clean_tests(written)
            record["provenance"]["tests"] = task.tests
        survivors = []
        for task, record in fresh:
            if not task.output:
                drop("empty_output", record)
            elif task.kind == "code" and not task.tests:
                drop("no_tests", record)
            else:
                survivors.append((task, record))
        # 4. code answers must pass their tests; up to code_samples answers each
        pending = [(t, r) for t, r in survivors if t.kind == "code"]
        passed: set[str] = set()
        for attempt in range(cfg.code_samples):
            if not pending:
                break
            if attempt:
                resampled = ask(teacher, [answer_prompt(answer_demos["code"], t) for t, _ in pending],
                                ["\n\nInstruction:", "\nInstruction:"], cfg.max_new_tokens, 0.8,
                                seed + 3 + attempt)
                for (task, record), answer in zip(pending, resampled):
                    task.output = record["output"] = answer.strip()
            good, _ = filter_by_tests([{"output": t.output, "tests": t.tests, "id": t.id} for t, _ in pending],
                                      limits=limits)
            ids = {g["id"] for g in good}
            for task, record in pending:
                record["provenance"]["samples"] = attempt + 1
                if task.id in ids:
                    passed.add(task.id)
            pending = [(t, r) for t, r in pending if t.id not in ids]
        for task, record in survivors:
            if task.kind == "code" and task.id not in passed:
                drop("failed_tests", record)
                continue
            if len(kept) >= cfg.instructions:
                drop("over_target", record)
                continue
            record["provenance"].update(teacher=teacher_name, teacher_hash=teacher_hash)
            kept.append({"instruction": record["instruction"], "input": record["input"], "output": record["output"],
                         "provenance": record["provenance"]})
            machine[task.kind].append(task)
        counts["rounds"] = round_ + 1
        log(f"round {round_ + 1}: {counts['generated']} instructions generated, {len(kept)} kept")
    counts["kept"] = len(kept)
    return kept, dropped, counts


def run(cfg: DistillConfig, *, overwrite: bool = False) -> dict:
    """Distil instruction data from the teacher into out_dir (module docstring); prints a report.

    Raises:
        OutputError: out_dir exists and is not empty (without `overwrite`) or cannot be written.
        DistillError / EvalError: no teacher, a teacher that cannot be loaded or reached, bad seeds.
    """
    inputs = [None if cfg.teacher.startswith(("http://", "https://")) else cfg.teacher,
              None if cfg.seeds == "builtin" else cfg.seeds]
    out = check_output(cfg.out_dir, label="out_dir", inputs=inputs, overwrite=overwrite)
    seeds = read_seeds(cfg.seeds)
    teacher = load_teacher(cfg)
    started = time.perf_counter()
    kept, dropped, counts = distill(cfg, teacher, seeds)
    report = {"teacher": getattr(teacher, "name", cfg.teacher), "teacher_hash": getattr(teacher, "hash", None),
              "seeds": len(seeds), "kept": len(kept), "generated": counts["generated"], "rounds": counts["rounds"],
              "dropped": {k: v for k, v in sorted(counts.items()) if v and k not in ("generated", "kept", "rounds")},
              "kept_by_kind": dict(Counter(r["provenance"]["kind"] for r in kept)),
              "seconds": round(time.perf_counter() - started, 1)}
    with atomic_dir(out, merge=overwrite) as tmp:
        atomic_write_text(tmp / "train.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in kept))
        atomic_write_text(tmp / "dropped.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in dropped))
        atomic_write_text(tmp / "report.json", json.dumps(report, indent=2) + "\n")
        save_config(cfg, tmp / "config.yaml")
    drops = ", ".join(f"{k} {v}" for k, v in report["dropped"].items()) or "none"
    summary = f"kept {len(kept)} of {counts['generated']} instructions in {counts['rounds']} rounds (dropped: {drops})"
    print(f"{summary} -> {Path(out) / 'train.jsonl'}")
    if not kept:
        print(f"warning: {Path(out) / 'train.jsonl'} is empty; dropped.jsonl and report.json there say why (a weak "
              "teacher, or too few rounds or tokens)", file=sys.stderr)
    return {"out_dir": str(out), **report, "config": asdict(cfg)}
