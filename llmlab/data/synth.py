"""A synthetic instruction dataset whose answers a program can check: demo, test and evaluate
instruction tuning without any download.

Each record is in Alpaca format plus the name of the task that made it:

    {"instruction": "Reverse the order of the items.", "input": "3 8 1 5", "output": "5 1 8 3",
     "task": "reverse"}

The eight tasks (`TASKS`) are pure functions of a `random.Random` and a difficulty (1 = easiest).
Difficulty 1 is sized for a tiny model fine-tuned for minutes on a CPU: 1-2 digit operands for
add and subtract, one-digit factors for multiply, lists of 3-5 single digits or letters. Each
task has one fixed canonical instruction (`INSTRUCTIONS[task][0]`), so the mapping is learnable;
`paraphrase=True` draws among a few rephrasings instead.

`run(cfg)` writes train/val/test JSONL files whose splits share no (task, input) key, so the
val and test scores measure answers to inputs the model never saw in training. The eval splits
are drawn first, each key at most once, and train is then drawn from the keys they left over.
That order matters for small task spaces: multiply at difficulty 1 has only 100 inputs, and
500 training draws would cover all of them, leaving nothing unseen to evaluate.

    out_dir/
      train.jsonl  val.jsonl  test.jsonl   one JSON record a line
      config.yaml                          the resolved SynthConfig

The same records serve alignment (`format=`): `preference` writes each as a pair whose chosen answer
is the checked one and whose rejected answer is a near miss (an off-by-one sum, two items swapped, a
letter left lowercase, a wrong day), and `prompt` writes the prompt with its answer, for rewards a
checker computes. The prompt is the user turn instruction tuning renders ("instruction\n\ninput"),
and the inputs of each split are exactly those of `format=alpaca` with the same seed.
"""

from __future__ import annotations

import calendar
import json
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from llmlab.common import LlmlabError, atomic_dir, atomic_write_text, check_output, style
from llmlab.config import save_config

SPLITS = ("train", "val", "test")
MAX_DRAWS = 1000  # draws per record before a split is declared impossible to fill with new inputs
MAX_RECORDS = 1_000_000  # per split: all are drawn in memory before any is written (0.7 GB at difficulty 8)
DIGITS = "0123456789"
LETTERS = "abcdefghijklmnopqrstuvwxyz"
MAX_DIFFICULTY = len(DIGITS) - 2  # the count task draws difficulty + 2 distinct digits
WORDS = ("red", "blue", "green", "cat", "dog", "bird", "fish", "tree", "sun", "moon", "star", "book", "door",
         "hand", "road", "ship", "rain", "snow", "wind", "fire", "milk", "cake", "bread", "apple", "king",
         "queen", "house", "river", "stone", "light", "dark", "cold", "warm", "fast", "slow", "big", "small",
         "happy", "time", "sing", "read", "walk", "run", "jump", "play", "open", "close", "good", "new", "old")

# the first phrasing of each task is its canonical one
INSTRUCTIONS: dict[str, tuple[str, ...]] = {
    "add": ("Add the two numbers.", "What is the sum?", "Compute the sum of the numbers."),
    "subtract": ("Subtract the second number from the first.", "What is the difference?",
                 "Compute the first number minus the second."),
    "multiply": ("Multiply the two numbers.", "What is the product?", "Compute the product of the numbers."),
    "reverse": ("Reverse the order of the items.", "Write the items in reverse order.",
                "List the items from last to first."),
    "sort": ("Sort the numbers from smallest to largest.", "Sort the numbers in ascending order.",
             "Put the numbers in increasing order."),
    "count": ("Count how many times the item before the colon occurs in the list after it.",
              "How often does the item before the colon appear in the list after it?",
              "Give the number of times the item before the colon is in the list after it."),
    "upper": ("Convert the words to uppercase.", "Write the words in capital letters.",
              "Rewrite the words in upper case."),
    "format": ("Rewrite the date as DD/MM/YYYY.", "Convert the date from YYYY-MM-DD to DD/MM/YYYY.",
               "Write the date in day/month/year form."),
}


# --------------------------------------------------------------------------- tasks


def _record(task: str, input: str, output: str) -> dict:
    return {"instruction": INSTRUCTIONS[task][0], "input": input, "output": output, "task": task}


def _number(rng: random.Random, digits: int) -> int:
    """Uniform on [0, 10**digits - 1]: an integer of at most `digits` digits."""
    return rng.randint(0, 10**digits - 1)


def _add(rng: random.Random, difficulty: int) -> dict:
    """"a + b" with operands of up to difficulty + 1 digits (0-99 at difficulty 1)."""
    a, b = _number(rng, difficulty + 1), _number(rng, difficulty + 1)
    return _record("add", f"{a} + {b}", str(a + b))


def _subtract(rng: random.Random, difficulty: int) -> dict:
    """"a - b" with a >= b, operands of up to difficulty + 1 digits; the answer is never negative."""
    a, b = sorted((_number(rng, difficulty + 1), _number(rng, difficulty + 1)), reverse=True)
    return _record("subtract", f"{a} - {b}", str(a - b))


def _multiply(rng: random.Random, difficulty: int) -> dict:
    """"a * b" with factors of up to `difficulty` digits (the 0-9 times table at difficulty 1)."""
    a, b = _number(rng, difficulty), _number(rng, difficulty)
    return _record("multiply", f"{a} * {b}", str(a * b))


def _reverse(rng: random.Random, difficulty: int) -> dict:
    """difficulty + 2 to difficulty + 4 single digits or single letters, reversed."""
    alphabet = rng.choice((DIGITS, LETTERS))
    items = [rng.choice(alphabet) for _ in range(rng.randint(difficulty + 2, difficulty + 4))]
    return _record("reverse", " ".join(items), " ".join(reversed(items)))


def _sort(rng: random.Random, difficulty: int) -> dict:
    """difficulty + 2 to difficulty + 4 numbers of up to `difficulty` digits, sorted ascending."""
    numbers = [_number(rng, difficulty) for _ in range(rng.randint(difficulty + 2, difficulty + 4))]
    return _record("sort", " ".join(map(str, numbers)), " ".join(map(str, sorted(numbers))))


def _count(rng: random.Random, difficulty: int) -> dict:
    """"b: a b b c a": occurrences of an item in a list drawn from difficulty + 2 symbols (may be 0)."""
    pool = rng.sample(rng.choice((DIGITS, LETTERS)), difficulty + 2)  # few symbols, so items repeat
    items = [rng.choice(pool) for _ in range(rng.randint(difficulty + 3, difficulty + 5))]
    target = rng.choice(pool)
    return _record("count", f"{target}: {' '.join(items)}", str(items.count(target)))


def _upper(rng: random.Random, difficulty: int) -> dict:
    """difficulty + 1 to difficulty + 3 common lowercase English words, uppercased."""
    words = [rng.choice(WORDS) for _ in range(rng.randint(difficulty + 1, difficulty + 3))]
    return _record("upper", " ".join(words), " ".join(words).upper())


def _format_date(rng: random.Random, difficulty: int) -> dict:
    """A valid date YYYY-MM-DD in the 50 * difficulty years either side of 2000, as DD/MM/YYYY."""
    year = rng.randint(max(1, 2000 - 50 * difficulty), min(9999, 1999 + 50 * difficulty))
    month = rng.randint(1, 12)
    day = rng.randint(1, calendar.monthrange(year, month)[1])
    return _record("format", f"{year:04d}-{month:02d}-{day:02d}", f"{day:02d}/{month:02d}/{year:04d}")


TASKS: dict[str, Callable[[random.Random, int], dict]] = {
    "add": _add, "subtract": _subtract, "multiply": _multiply, "reverse": _reverse,
    "sort": _sort, "count": _count, "upper": _upper, "format": _format_date,
}


# --------------------------------------------------------------------------- generation


def generate(tasks: Sequence[str], n: int, seed: int, difficulty: int = 1, *, paraphrase: bool = False) -> list[dict]:
    """n records, record i from task tasks[i % len(tasks)], so every task gets n // len(tasks) or one more.

    Args:
        tasks: Task names (keys of `TASKS`); a name listed twice gets twice the share.
        n: Number of records.
        seed: Seed of the one `random.Random` that draws them all: the same seed gives the same list.
        difficulty: 1 (easiest) or more; scales operand sizes and list lengths.
        paraphrase: Draw each instruction among the task's phrasings instead of its canonical one.

    Returns:
        The records; inputs may repeat (use `run` for splits without shared inputs).

    Raises:
        LlmlabError: An unknown task, no tasks, n outside [1, MAX_RECORDS] or difficulty outside
            [1, MAX_DIFFICULTY].
    """
    return _draw(tasks, n, random.Random(seed), difficulty, paraphrase=paraphrase)


def _draw(tasks: Sequence[str], n: int, rng: random.Random, difficulty: int, *, paraphrase: bool = False,
          exclude: frozenset[tuple[str, str]] | set[tuple[str, str]] = frozenset(), unique: bool = False,
          split: str = "") -> list[dict]:
    """`generate`, redrawing any record whose (task, input) key is in `exclude` (or already drawn, if `unique`).

    Raises:
        LlmlabError: As `generate`; or MAX_DRAWS draws in a row found no admissible input for a task:
            its input space is too small for the number of records asked for.
    """
    _check(tasks, n, difficulty)
    seen: set[tuple[str, str]] = set()
    records = []
    for i in range(n):
        task = tasks[i % len(tasks)]
        for _ in range(MAX_DRAWS):
            record = TASKS[task](rng, difficulty)
            key = (task, record["input"])
            if key not in exclude and not (unique and key in seen):
                break
        else:
            where = f"the {split} split" if split else "the records"
            done = sum(r["task"] == task for r in records)
            raise LlmlabError(f"cannot fill {where}: task {task!r} at difficulty {difficulty} found no new input in "
                              f"{MAX_DRAWS} draws after {done} of its records ({len(exclude)} inputs held by other "
                              f"splits); its input space is too small: ask for fewer records, raise the difficulty "
                              f"or drop the task")
        seen.add(key)
        if paraphrase:
            record["instruction"] = rng.choice(INSTRUCTIONS.get(task, (record["instruction"],)))
        records.append(record)
    return records


def _check(tasks: Sequence[str], n: int, difficulty: int) -> None:
    if not tasks:
        raise LlmlabError(f"no tasks given; known tasks: {', '.join(TASKS)}")
    for name in tasks:
        if name not in TASKS:
            raise LlmlabError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}")
    if not 1 <= n <= MAX_RECORDS:
        raise LlmlabError(f"the number of records must be >= 1 and at most {MAX_RECORDS:,}, got {n}")
    if not 1 <= difficulty <= MAX_DIFFICULTY:
        raise LlmlabError(f"difficulty must be >= 1 and at most {MAX_DIFFICULTY}, got {difficulty}")


# --------------------------------------------------------------------------- splits on disk


@dataclass
class SynthConfig:
    out_dir: str = "runs/synth"  # folder for train.jsonl, val.jsonl, test.jsonl; absent or empty, or --overwrite
    tasks: list[str] = field(default_factory=lambda: list(TASKS))  # task names, interleaved round-robin
    train: int = 4000  # training records (inputs may repeat)
    val: int = 200  # validation records, each input once and never in train or test
    test: int = 200  # test records, each input once and never in train or val
    difficulty: int = 1  # 1 (easiest) to 8: scales operand sizes and list lengths
    seed: int = 0  # one seed for all three splits (each draws from its own stream)
    paraphrase: bool = False  # draw instructions among a few phrasings instead of one canonical phrasing per task
    # alpaca: instruction records; preference: prompt, chosen (the checked answer), rejected (a near miss);
    # prompt: prompt and answer (for rewards a checker computes)
    format: Literal["alpaca", "preference", "prompt"] = "alpaca"

    def __post_init__(self):
        if not self.tasks:
            raise ValueError(f"tasks must name at least one task; known tasks: {', '.join(TASKS)}")
        unknown = [t for t in self.tasks if t not in TASKS]
        if unknown:
            raise ValueError(f"unknown task(s) {', '.join(map(repr, unknown))}; known tasks: {', '.join(TASKS)}")
        for name, least in (("train", 1), ("val", 0), ("test", 0)):
            if not least <= getattr(self, name) <= MAX_RECORDS:
                raise ValueError(f"{name} must be >= {least} and at most {MAX_RECORDS:,} (records are drawn in memory "
                                 f"before any is written), got {getattr(self, name)}")
        if not 1 <= self.difficulty <= MAX_DIFFICULTY:
            raise ValueError(f"difficulty must be >= 1 and at most {MAX_DIFFICULTY}, got {self.difficulty}")


def run(cfg: SynthConfig, *, overwrite: bool = False) -> dict:
    """Write train/val/test JSONL splits that share no (task, input) key; prints a report.

    val is drawn first, then test without val's keys, then train without either's (module
    docstring). Everything is drawn before anything is written, so a split that cannot be filled
    leaves out_dir untouched; the folder is then written beside out_dir and renamed into place.

    Args:
        cfg: The configuration.
        overwrite: write into an existing non-empty out_dir, replacing the files of the same names.

    Returns:
        {"out_dir": str, "counts": {split: {task: records}}}.

    Raises:
        LlmlabError: A task's input space at this difficulty is too small to fill a split with
            inputs no other split holds.
        OutputError: out_dir exists and is not empty (without `overwrite`) or cannot be written.
    """
    out = check_output(cfg.out_dir, label="out_dir", overwrite=overwrite)
    tasks = list(cfg.tasks)
    splits = draw_splits(cfg)
    with atomic_dir(out, merge=overwrite) as tmp:
        for split in SPLITS:
            records = [as_format(r, cfg.format, random.Random(f"synth:{cfg.seed}:{split}:near-miss:{i}"))
                       for i, r in enumerate(splits[split])]
            lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
            atomic_write_text(tmp / f"{split}.jsonl", lines)
        save_config(cfg, tmp / "config.yaml")
    counts = {s: {t: sum(r["task"] == t for r in splits[s]) for t in dict.fromkeys(tasks)} for s in SPLITS}
    _report(out, cfg, counts)
    return {"out_dir": str(out), "counts": counts}


def draw_splits(cfg: SynthConfig, *, train: bool = True) -> dict[str, list[dict]]:
    """The records of each split, as `run` writes them: val, then test without val's keys, then
    (with `train`) train without either's. The same config always gives the same records."""
    held_out: set[tuple[str, str]] = set()  # keys of the eval splits, which no later split may reuse
    splits: dict[str, list[dict]] = {}
    for split in ("val", "test", "train") if train else ("val", "test"):
        n = getattr(cfg, split)
        rng = random.Random(f"synth:{cfg.seed}:{split}")  # str seeds are hashed with SHA-512: stable across runs
        splits[split] = _draw(list(cfg.tasks), n, rng, cfg.difficulty, paraphrase=cfg.paraphrase, exclude=held_out,
                              unique=split != "train", split=split) if n else []
        if split != "train":
            held_out |= {(r["task"], r["input"]) for r in splits[split]}
    return splits


# --------------------------------------------------------------------------- alignment formats


def as_format(record: dict, fmt: str, rng: random.Random) -> dict:
    """An Alpaca record in `fmt`: itself, a preference pair with a near miss as the rejected answer,
    or a prompt with its answer."""
    if fmt == "alpaca":
        return record
    prompt = record["instruction"] + "\n\n" + record["input"]  # the user turn instruction tuning renders
    if fmt == "prompt":
        return {"prompt": prompt, "answer": record["output"], "task": record["task"]}
    return {"prompt": prompt, "chosen": record["output"], "rejected": near_miss(record, rng), "task": record["task"]}


def near_miss(record: dict, rng: random.Random) -> str:
    """A plausible wrong answer to a synthetic record, never equal to the right one."""
    task, answer = record["task"], record["output"]
    if task in ("add", "subtract", "multiply", "count"):
        value = int(answer)
        wrong = [value + d for d in (-2, -1, 1, 2) if value + d >= 0]
        return str(rng.choice(wrong))
    if task in ("reverse", "sort"):
        items = answer.split(" ")
        swaps = [i for i in range(len(items) - 1) if items[i] != items[i + 1]]
        if swaps:
            i = rng.choice(swaps)
            items[i], items[i + 1] = items[i + 1], items[i]
            return " ".join(items)
        return " ".join(items[:-1])  # every item alike: one too few
    if task == "upper":
        letters = [i for i, c in enumerate(answer) if c.isalpha()]
        i = rng.choice(letters)
        return answer[:i] + answer[i].lower() + answer[i + 1:]
    if task == "format":
        day, month, year = answer.split("/")
        if rng.random() < 0.5:  # the day and month swapped where that differs, else the day one off
            if day != month:
                return f"{month}/{day}/{year}"
        day = int(day) + (1 if int(day) < 28 else -1)
        return f"{day:02d}/{month}/{year}"
    raise LlmlabError(f"no near miss for task {task!r}")


def _report(out: Path, cfg: SynthConfig, counts: dict[str, dict[str, int]]) -> None:
    print(style(f"synth -> {out}", "1"))
    print(f"  difficulty {cfg.difficulty}, seed {cfg.seed}, format {cfg.format}; no input is shared between splits")
    print(f"  {'task':10s}" + "".join(f"{s:>8s}" for s in SPLITS))
    for task in counts["train"]:
        print(f"  {task:10s}" + "".join(f"{counts[s][task]:>8,}" for s in SPLITS))
    print(f"  {'total':10s}" + "".join(f"{sum(counts[s].values()):>8,}" for s in SPLITS))
