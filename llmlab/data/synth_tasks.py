"""Synthetic data for encoder and encoder-decoder fine-tuning: every task of `llmlab.data.tasks`
trains and is scored on a CPU with no download.

- sentiment `{text, label}`: the majority polarity of 1-3 clauses, where "not" or "never" flips an
  adjective;
- ner `{tokens, tags}`: PER, LOC and ORG names from small lists, in BIO tags; "Jordan" and
  "Florence" are people or places by their context;
- qa `{id, title, context, question, answers, is_impossible}`: the span of a fact about the person
  asked after, among 2-3 people;
- translate `{source, target, task}`: word by word between two made-up lexicons;
- summarize `{source, target, task}`: keep the capitalised words, in order.

Each generator is a pure function of a `random.Random`; `generate(task, n, seed)` draws n records
from one seed, and `run(cfg)` writes train/val/test files in the task's format (TSV or JSONL,
CoNLL or JSONL, SQuAD JSON, JSONL) with the writers of `llmlab.data.tasks`, so the readers there
read them back. As in `llmlab.data.synth`, val is drawn first, then test, then train, and no input
of one split appears in another.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from llmlab.common import LlmlabError, atomic_dir, check_output, style
from llmlab.config import save_config
from llmlab.data.synth import WORDS
from llmlab.data.tasks import write_classification, write_seq2seq, write_squad, write_token_classification

SPLITS = ("train", "val", "test")
MAX_DRAWS = 1000  # draws per record before a split is declared impossible to fill with new inputs
MAX_RECORDS = 1_000_000

# --------------------------------------------------------------------------- sentiment

POSITIVE = ("good", "great", "excellent", "wonderful", "pleasant", "superb", "lovely", "fantastic", "delightful",
            "solid")
NEGATIVE = ("bad", "poor", "terrible", "awful", "boring", "dull", "horrible", "weak", "disappointing", "mediocre")
NEGATORS = ("not", "never")
INTENSIFIERS = ("very", "really", "quite")
ASPECTS = ("food", "service", "plot", "acting", "price", "staff", "music", "room", "screen", "battery", "story",
           "design", "ending", "sound", "view")
CLAUSES = ("the {aspect} was {adj}", "the {aspect} is {adj}", "i thought the {aspect} was {adj}",
           "honestly the {aspect} seemed {adj}")
JOINERS = (" and ", " but ", ", ", " while ")
SENTIMENT_LABELS = ("negative", "positive")


def sentiment(rng: random.Random) -> dict:
    """A review of 1-3 clauses whose majority polarity is the label (drawn uniformly).

    A clause's polarity is its adjective's, flipped by a negator ("not", "never") just before it
    or before its intensifier: "the plot was not very good" is negative. Negated clauses are about
    a third of all, so word counts alone do not give the label.
    """
    label = rng.randrange(2)  # 0 negative, 1 positive
    n = rng.choice((1, 2, 3))
    polarities = [label] * n
    if n == 3 and rng.random() < 0.5:
        polarities[0] = 1 - label  # one dissenting clause out of three
    rng.shuffle(polarities)
    aspects = rng.sample(ASPECTS, n)
    clauses = []
    for polarity, aspect in zip(polarities, aspects):
        negate = rng.random() < 0.35
        words = POSITIVE if polarity != negate else NEGATIVE  # a negated clause uses the opposite adjective
        adj = rng.choice(words)
        if rng.random() < 0.3:
            adj = f"{rng.choice(INTENSIFIERS)} {adj}"
        if negate:
            adj = f"{rng.choice(NEGATORS)} {adj}"
        clauses.append(rng.choice(CLAUSES).format(aspect=aspect, adj=adj))
    text = clauses[0] + "".join(rng.choice(JOINERS) + c for c in clauses[1:])
    return {"text": text + ".", "label": SENTIMENT_LABELS[label]}


# --------------------------------------------------------------------------- named entities

FIRST_NAMES = ("Anna", "Ben", "Carla", "David", "Elena", "Farid", "Grace", "Hugo", "Ines", "Jonas", "Kira", "Liam",
               "Jordan", "Florence")
LAST_NAMES = ("Berg", "Costa", "Diaz", "Evans", "Fischer", "Garcia", "Hale", "Ito", "Novak", "Okafor")
PLACES = ("Paris", "Lima", "Oslo", "Cairo", "Denver", "Kyoto", "Jordan", "Florence", "New Haven", "Cape Town",
          "San Marino", "Port Louis")
ORGS = ("Acme Corp", "Globex", "Vantage Labs", "Blue Harbor Bank", "Northwind Traders", "Helios Energy",
        "Orbit Media", "Kestrel Systems", "Red Pine Studio")
ENTITY_TYPES = ("PER", "LOC", "ORG")
SENTENCES = ("{PER} lives in {LOC} .", "{PER} works for {ORG} .", "{PER} moved from {LOC} to {LOC} .",
             "{ORG} opened an office in {LOC} .", "{PER} met {PER} in {LOC} .",
             "yesterday {PER} joined {ORG} as an engineer .", "the weather in {LOC} was cold today .",
             "{ORG} hired {PER} last year .", "{PER} and {PER} visited {ORG} .", "nobody came to the meeting .",
             "the report from {ORG} praised {PER} .")


def _person(rng: random.Random) -> str:
    first = rng.choice(FIRST_NAMES)
    return first if rng.random() < 0.5 else f"{first} {rng.choice(LAST_NAMES)}"


NAMES: dict[str, Callable[[random.Random], str]] = {
    "PER": _person, "LOC": lambda rng: rng.choice(PLACES), "ORG": lambda rng: rng.choice(ORGS)}


def ner(rng: random.Random) -> dict:
    """A sentence from a template with PER, LOC and ORG slots filled from the name lists (no name
    twice in a sentence), tagged BIO: B- on an entity's first word, I- on the rest, O elsewhere."""
    tokens: list[str] = []
    tags: list[str] = []
    used: set[str] = set()
    for word in rng.choice(SENTENCES).split():
        kind = word.strip("{}") if word.startswith("{") else None
        if kind is None:
            tokens.append(word)
            tags.append("O")
            continue
        name = NAMES[kind](rng)
        while name in used:
            name = NAMES[kind](rng)
        used.add(name)
        words = name.split()
        tokens += words
        tags += [f"B-{kind}"] + [f"I-{kind}"] * (len(words) - 1)
    return {"tokens": tokens, "tags": tags}


# --------------------------------------------------------------------------- extractive QA

PEOPLE = tuple(f for f in FIRST_NAMES if f not in PLACES)  # a person's name never reads as a place here
CITIES = tuple(p for p in PLACES if p not in FIRST_NAMES)
FACTS = {  # fact -> (sentence, question); {x} is the person, {a} the answer
    "city": ("{x} was born in {a}.", "Where was {x} born?"),
    "year": ("{x} was born in the year {a}.", "In which year was {x} born?"),
    "employer": ("{x} works at {a}.", "Where does {x} work?"),
}


def qa(rng: random.Random, unanswerable: float = 0.0) -> dict:
    """A context of facts about 2-3 people (where and in which year each was born, where they
    work) and a question about one of them whose answer is a span of the context; with
    probability `unanswerable`, a question the context cannot answer: a fact it leaves out, or
    someone it never mentions (SQuAD 2.0's is_impossible). Records lack `id`; `generate` numbers them."""
    people = rng.sample(PEOPLE, rng.randint(2, 3))
    cities, orgs = rng.sample(CITIES, len(people)), rng.sample(ORGS, len(people))
    sentences, spans = [], {}
    at = 0
    for person, city, org in zip(people, cities, orgs):
        facts = {"city": city, "year": str(rng.randint(1950, 2020)), "employer": org}
        for fact in rng.sample(list(facts), rng.randint(1, 3)):
            sentence, _ = FACTS[fact]
            prefix, _, _ = sentence.partition("{a}")
            text = sentence.format(x=person, a=facts[fact])
            spans[(person, fact)] = (at + len(prefix.format(x=person)), facts[fact])
            sentences.append(text)
            at += len(text) + 1
    context = " ".join(sentences)
    if rng.random() < unanswerable:  # a fact the context leaves out, or someone it never mentions
        untold = [(p, f) for p in people for f in FACTS if (p, f) not in spans]
        if untold and rng.random() < 0.5:
            person, fact = rng.choice(untold)
        else:
            person, fact = rng.choice([p for p in PEOPLE if p not in people]), rng.choice(list(FACTS))
        question = FACTS[fact][1].format(x=person)
        return {"title": "people", "context": context, "question": question, "answers": [], "is_impossible": True}
    person, fact = rng.choice(list(spans))
    start, answer = spans[(person, fact)]
    return {"title": "people", "context": context, "question": FACTS[fact][1].format(x=person),
            "answers": [{"text": answer, "answer_start": start}], "is_impossible": False}


# --------------------------------------------------------------------------- seq2seq


def _lexicon(syllables: tuple[str, ...], n: int, seed: str) -> list[str]:
    """n distinct two-syllable words, the same on every run (a string seed is hashed with SHA-512)."""
    words = [a + b for a in syllables for b in syllables if a != b]
    return random.Random(seed).sample(words, n)


SOURCE_WORDS = _lexicon(("ka", "lo", "mi", "nu", "pe", "ra", "si", "to", "ve", "zu"), 32, "synth_tasks:source")
TARGET_WORDS = _lexicon(("bar", "dem", "fil", "gor", "hus", "jat", "kel", "mon", "nir", "pol"), 32,
                        "synth_tasks:target")
LEXICON = dict(zip(SOURCE_WORDS, TARGET_WORDS))  # source word -> target word


def translate(rng: random.Random) -> dict:
    """3-7 words of the made-up source lexicon and their word-by-word translation."""
    words = [rng.choice(SOURCE_WORDS) for _ in range(rng.randint(3, 7))]
    return {"source": " ".join(words), "target": " ".join(LEXICON[w] for w in words), "task": "translate"}


CAPITALISED = tuple(dict.fromkeys(FIRST_NAMES + LAST_NAMES + tuple(p for p in PLACES if " " not in p)))


def summarize(rng: random.Random) -> dict:
    """6-12 words, 1-4 of them capitalised names among lowercase words; the target keeps the
    capitalised ones in order."""
    n = rng.randint(6, 12)
    names = rng.randint(1, min(4, n))
    slots = set(rng.sample(range(n), names))
    words = [rng.choice(CAPITALISED) if i in slots else rng.choice(WORDS) for i in range(n)]
    return {"source": " ".join(words), "target": " ".join(w for w in words if w[0].isupper()), "task": "summarize"}


# --------------------------------------------------------------------------- generation

TASKS: dict[str, Callable[..., dict]] = {
    "sentiment": sentiment, "ner": ner, "qa": qa, "translate": translate, "summarize": summarize}
FORMATS = {"sentiment": ("tsv", "jsonl"), "ner": ("conll", "jsonl"), "qa": ("squad",),
           "translate": ("jsonl",), "summarize": ("jsonl",)}  # the first is the default
SUFFIX = {"tsv": ".tsv", "jsonl": ".jsonl", "conll": ".conll", "squad": ".json"}


def input_key(task: str, record: dict) -> str:
    """What makes two records the same input."""
    if task == "sentiment":
        return record["text"]
    if task == "ner":
        return " ".join(record["tokens"])
    if task == "qa":
        return record["context"] + "\n" + record["question"]
    return record["source"]


def generate(task: str, n: int, seed: int, *, unanswerable: float = 0.0) -> list[dict]:
    """n records of `task` from one seed: the same seed gives the same list. QA records are
    numbered `q-0`, `q-1`, ...; `unanswerable` is QA's share of impossible questions.

    Raises:
        LlmlabError: an unknown task, or n outside [1, MAX_RECORDS].
    """
    return _draw(task, n, random.Random(seed), unanswerable=unanswerable)


def _draw(task: str, n: int, rng: random.Random, *, unanswerable: float = 0.0, exclude: set[str] | None = None,
          unique: bool = False, split: str = "q") -> list[dict]:
    """`generate`, redrawing any record whose input is in `exclude` (or already drawn, if `unique`)."""
    if task not in TASKS:
        raise LlmlabError(f"unknown task {task!r}; known tasks: {', '.join(TASKS)}")
    if not 1 <= n <= MAX_RECORDS:
        raise LlmlabError(f"the number of records must be >= 1 and at most {MAX_RECORDS:,}, got {n}")
    exclude = exclude or set()
    seen: set[str] = set()
    records = []
    for i in range(n):
        for _ in range(MAX_DRAWS):
            record = TASKS[task](rng, unanswerable) if task == "qa" else TASKS[task](rng)
            key = input_key(task, record)
            if key not in exclude and not (unique and key in seen):
                break
        else:
            raise LlmlabError(f"cannot fill the {split} split: task {task!r} found no new input in {MAX_DRAWS} "
                              f"draws after {i} records; ask for fewer records")
        seen.add(key)
        if task == "qa":
            record = {"id": f"{split}-{i}", **record}
        records.append(record)
    return records


@dataclass
class TaskSynthConfig:
    out_dir: str = "runs/synth-tasks"  # folder for the train, val and test files; absent or empty, or --overwrite
    task: Literal["sentiment", "ner", "qa", "translate", "summarize"] = "sentiment"  # what to generate
    train: int = 2000  # training records
    val: int = 200  # validation records, each input once and never in train or test
    test: int = 200  # test records, each input once and never in train or val
    seed: int = 0  # one seed for all three splits (each draws from its own stream)
    # file format: sentiment tsv|jsonl, ner conll|jsonl, qa squad, translate and summarize jsonl; "" the first
    format: str = ""
    unanswerable: float = 0.0  # qa: share of questions the context cannot answer (SQuAD 2.0 when > 0)

    def __post_init__(self):
        if self.task not in TASKS:
            raise ValueError(f"unknown task {self.task!r}; known tasks: {', '.join(TASKS)}")
        if self.format and self.format not in FORMATS[self.task]:
            raise ValueError(f"format {self.format!r} does not hold task {self.task!r}; use one of "
                             f"{', '.join(FORMATS[self.task])}")
        for name, least in (("train", 1), ("val", 0), ("test", 0)):
            if not least <= getattr(self, name) <= MAX_RECORDS:
                raise ValueError(f"{name} must be >= {least} and at most {MAX_RECORDS:,}, got {getattr(self, name)}")
        if not 0.0 <= self.unanswerable <= 1.0:
            raise ValueError(f"unanswerable must be between 0 and 1, got {self.unanswerable}")
        if self.unanswerable and self.task != "qa":
            raise ValueError(f"unanswerable is the share of questions without an answer (task=qa); task={self.task} "
                             "has none")


def draw_splits(cfg: TaskSynthConfig) -> dict[str, list[dict]]:
    """The records of each split, as `run` writes them: val, then test without val's inputs, then
    train without either's."""
    held_out: set[str] = set()
    splits: dict[str, list[dict]] = {}
    for split in ("val", "test", "train"):
        n = getattr(cfg, split)
        rng = random.Random(f"synth_tasks:{cfg.task}:{cfg.seed}:{split}")
        splits[split] = _draw(cfg.task, n, rng, unanswerable=cfg.unanswerable, exclude=held_out,
                              unique=split != "train", split=split) if n else []
        if split != "train":
            held_out |= {input_key(cfg.task, r) for r in splits[split]}
    return splits


def write_records(path: str | Path, task: str, records: list[dict], *, squad_version: str = "") -> None:
    """`records` of `task` into `path`, in the format its suffix names (`SUFFIX`); QA as SQuAD
    `squad_version`, by default v2.0 when a question is impossible and v1.1 otherwise."""
    if task == "sentiment":
        write_classification(path, records)
    elif task == "ner":
        write_token_classification(path, records)
    elif task == "qa":
        impossible = any(r["is_impossible"] for r in records)
        write_squad(path, records, version=squad_version or ("v2.0" if impossible else "v1.1"))
    else:
        write_seq2seq(path, records)


def run(cfg: TaskSynthConfig, *, overwrite: bool = False) -> dict:
    """Write `{train,val,test}.SUFFIX` files of cfg.task that share no input, and config.yaml.

    Everything is drawn before anything is written, and the folder is written beside out_dir and
    renamed into place (as `llmlab.data.synth.run`).

    Returns:
        {"out_dir": str, "files": {split: path}, "counts": {split: records}}.

    Raises:
        LlmlabError: a split cannot be filled with inputs no other split holds.
        OutputError: out_dir exists and is not empty (without `overwrite`) or cannot be written.
    """
    out = check_output(cfg.out_dir, label="out_dir", overwrite=overwrite)
    fmt = cfg.format or FORMATS[cfg.task][0]
    splits = draw_splits(cfg)
    version = "v2.0" if cfg.unanswerable > 0 else "v1.1"  # one version for every split
    names = {split: f"{split}{SUFFIX[fmt]}" for split in SPLITS}
    with atomic_dir(out, merge=overwrite) as tmp:
        for split in SPLITS:
            if splits[split]:
                write_records(tmp / names[split], cfg.task, splits[split], squad_version=version)
        save_config(cfg, tmp / "config.yaml")
    counts = {split: len(splits[split]) for split in SPLITS}
    files = {split: str(out / names[split]) for split in SPLITS if counts[split]}
    print(style(f"synth {cfg.task} -> {out}", "1"))
    print(f"  seed {cfg.seed}, format {fmt}; " + ", ".join(f"{s} {counts[s]:,}" for s in SPLITS)
          + "; no input is shared between splits")
    return {"out_dir": str(out), "files": files, "counts": counts}
