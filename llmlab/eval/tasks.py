"""Tasks: documents, how each becomes a prompt and requests, and how answers are scored.

A `Task` carries the fields of an lm-evaluation-harness task config, and `load_task_file` reads
such a YAML for local data (`dataset_path: json` with `data_files`), so a task written for that
harness runs here unchanged and gets the same prompts:

    context = description + k x (text + target_delimiter + target + fewshot_delimiter) + text

where text, target and choices come from `doc_to_text`, `doc_to_target` and `doc_to_choice`, each a
document field's name, a Jinja template (rendered in the template sandbox, `StrictUndefined`), or
a literal list. Few-shot examples are drawn by `random.Random(seed)` in document order, skipping
the document itself when it is drawn from its own split (the harness's sampler, seed 1234).

A key the harness supports but llmlab does not (`process_docs`, `!function` ...) is an error that
names the file and line; so is an unknown key.
"""

from __future__ import annotations

import ast
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from llmlab.data.ingest import jsonl_lines, parse_json
from llmlab.eval.lm import DEFAULT_MAX_GEN_TOKS, EvalError, generation_settings
from llmlab.tokenizer.chat import SANDBOX
from llmlab.tokenizer.sandbox import RenderError, Sandbox

HARNESS_OUTPUT_TYPES = ("multiple_choice", "loglikelihood", "loglikelihood_rolling", "generate_until")
FILE_OUTPUT_TYPES = HARNESS_OUTPUT_TYPES + ("fill_mask",)  # what a task YAML may ask for
# tokens: perplexity of a prepared folder's token shards; classification, token_classification and
# extractive_qa: a fine-tuning task file (`TASK_FILES`) scored by a task head, or a language model
OUTPUT_TYPES = FILE_OUTPUT_TYPES + ("tokens", "classification", "token_classification", "extractive_qa")
# the metrics each output type can report; the first ones are the defaults (as in the harness)
METRICS = {
    "multiple_choice": ("acc", "acc_norm", "brier_score", "f1", "ece", "likelihood_gap"),
    "loglikelihood": ("perplexity", "acc"),
    "loglikelihood_rolling": ("word_perplexity", "byte_perplexity", "bits_per_byte", "token_perplexity"),
    "generate_until": ("exact_match", "f1", "check", "pass_at_k", "bleu", "rouge1", "rouge2", "rougeL"),
    "tokens": ("token_perplexity", "bits_per_byte"),
    "fill_mask": ("acc", "acc_top5"),
    "classification": ("acc", "f1"),
    "token_classification": ("entity_f1", "precision", "recall", "tag_accuracy"),
    "extractive_qa": ("exact_match", "f1"),
}
DEFAULT_METRICS = {"multiple_choice": ("acc", "acc_norm"), "loglikelihood": ("perplexity", "acc"),
                   "loglikelihood_rolling": ("word_perplexity", "byte_perplexity", "bits_per_byte"),
                   "generate_until": ("exact_match",), "tokens": ("token_perplexity", "bits_per_byte"),
                   **{t: METRICS[t] for t in ("fill_mask", "classification", "token_classification", "extractive_qa")}}
# `KIND:PATH` names a fine-tuning data file as a task (the readers of `llmlab.data.tasks`)
TASK_FILES = ("classify", "tokens", "span", "seq2seq")
QA_PROMPT = "{context}\n\nQuestion: {question}\nAnswer:"  # extractive QA asked of a language model
EXACT_MATCH_OPTIONS = {"ignore_case", "ignore_punctuation", "ignore_numbers", "regexes_to_ignore", "ignore_whitespace"}
FILTERS = ("regex", "take_first", "take_first_k", "remove_whitespace", "lowercase", "uppercase", "majority_vote",
           "extract_answer")

SUPPORTED_KEYS = {
    "task", "task_alias", "tag", "dataset_path", "dataset_name", "dataset_kwargs", "training_split",
    "validation_split", "test_split", "fewshot_split", "doc_to_text", "doc_to_target", "doc_to_choice",
    "target_delimiter", "fewshot_delimiter", "description", "num_fewshot", "metric_list", "output_type",
    "generation_kwargs", "repeats", "filter_list", "metadata", "fewshot_config", "should_decontaminate", "include",
}
MASK = "[MASK]"  # where a fill_mask text's answer goes
HARNESS_ONLY_KEYS = {
    "custom_dataset", "process_docs", "process_results", "use_prompt", "doc_to_image", "doc_to_audio", "unsafe_code",
    "doc_to_decontamination_query", "gen_prefix", "group", "group_alias", "aggregate_metric_list", "class",
    "dataset_revision", "weight_by_size", "multiple_input", "multiple_target", "task_list",
}


@dataclass
class Filter:
    """A named pipeline of answer filters (the harness's filter_list entry)."""

    name: str
    steps: list[tuple[str, dict]]


@dataclass
class Task:
    name: str
    output_type: str
    docs: list[dict]  # the documents scored
    fewshot_docs: list[dict] | None = None  # where few-shot examples come from; None: no few-shot
    doc_to_text: Any = ""
    doc_to_target: Any = None
    doc_to_choice: Any = None
    target_delimiter: str = " "
    fewshot_delimiter: str = "\n\n"
    description: str = ""
    num_fewshot: int = 0
    fewshot_sampler: str = "default"  # "default": random draws; "first_n": the first k in order
    fewshot_same_split: bool = False  # few-shot docs come from the scored split: never show a doc itself
    metrics: list[tuple[str, dict]] = field(default_factory=list)
    generation_kwargs: dict = field(default_factory=dict)
    filters: list[Filter] = field(default_factory=list)
    repeats: int = 1
    source: str = "built-in"  # the file that defined the task (for errors)
    doc_where: list[str] = field(default_factory=list)  # "file:line" of each document
    checker: Callable[[dict, str], bool] | None = None  # metric "check": is this answer right for this doc
    tests: Callable[[dict], str] | None = None  # metric "pass_at_k": the unit tests of a doc's program
    prompt: Callable[[dict], str | list] | None = None  # a built-in task's own prompt (text, or chat messages)
    group_by: str | None = None  # a document field whose values also get scores of their own
    shards: Any = None  # output_type "tokens": the TokenShards whose windows the documents are
    examples: list | None = None  # a task file's examples (`llmlab.data.tasks`), one per document
    labels: list[str] | None = None  # their label (tag) names
    version: Any = None

    def __post_init__(self):
        if self.output_type not in OUTPUT_TYPES:
            raise EvalError(f"{self.source}: output_type must be one of {list(OUTPUT_TYPES)}, got {self.output_type!r}")
        if not self.metrics:
            self.metrics = [(m, {}) for m in DEFAULT_METRICS[self.output_type]]
        if not self.filters:
            self.filters = [Filter("none", [("take_first", {})])]
        if self.output_type == "generate_until" and "until" not in self.generation_kwargs:
            self.generation_kwargs = {"until": [self.fewshot_delimiter], **self.generation_kwargs}
        if not self.doc_where:
            self.doc_where = [f"{self.source}: document {i}" for i in range(len(self.docs))]


# --------------------------------------------------------------------------- document fields


class Renderer:
    """Turns a task's doc_to_* specs into values, rendering Jinja in the template sandbox in batches
    (by default the one chat templates use: one child process, started on first use)."""

    def __init__(self, sandbox: Sandbox | None = None):
        self.sandbox = sandbox or SANDBOX

    def values(self, task: Task, spec: Any, docs: list[dict], where: list[str], what: str) -> list[Any]:
        if spec is None:
            raise EvalError(f"{task.source}: {what} is not set")
        if isinstance(spec, (list, int)) and not isinstance(spec, bool):
            return [spec for _ in docs]
        if isinstance(spec, dict) and what == "doc_to_choice":
            return [list(spec.values()) for _ in docs]
        if not isinstance(spec, str):
            raise EvalError(f"{task.source}: {what} must be a field name, a Jinja template or a list; got "
                            f"{type(spec).__name__}")
        fields = set().union(*(d.keys() for d in docs)) if docs else set()
        if spec in fields:
            out = []
            for d, w in zip(docs, where):
                if spec not in d or d[spec] is None:
                    raise EvalError(f"{w}: the document has no field {spec!r} ({what} of task {task.name})")
                out.append(d[spec])
            return out
        try:
            texts = self.sandbox.render(spec, [{"variables": d, "strict": True} for d in docs]) if docs else []
        except RenderError as e:
            index = getattr(e, "index", None)
            at = where[index] if index is not None and index < len(where) else task.source
            raise EvalError(f"{at}: {what} of task {task.name}: {e}") from None
        return [self._convert(task, t, w, what) for t, w in zip(texts, where)]

    @staticmethod
    def _convert(task: Task, text: str, where: str, what: str) -> Any:
        """The harness's conversions of a rendered template: digits are a choice index (when the
        task has choices), "[...]" a list, and choices always a Python literal list."""
        if what == "description":
            return text
        if what == "doc_to_choice":
            try:
                value = ast.literal_eval(text)
            except (ValueError, SyntaxError, MemoryError, RecursionError):
                raise EvalError(f"{where}: doc_to_choice of task {task.name} rendered {text[:80]!r}, not a list "
                                "literal") from None
            return value
        if text.isdigit() and task.doc_to_choice is not None:
            return int(text)
        if what == "doc_to_target" and len(text) >= 2 and text[0] == "[" and text[-1] == "]":
            try:
                return ast.literal_eval(text)
            except (ValueError, SyntaxError, MemoryError, RecursionError):
                return text
        return text


@dataclass
class Prepared:
    """A task's documents with everything the requests and the scoring need."""

    docs: list[dict]
    where: list[str]
    texts: list[Any]
    targets: list[Any]
    choices: list[list[str]] | None
    contexts: list[str]
    fewshot: int
    stops: list[str] = field(default_factory=list)  # stop strings the model adds (the end of a chat turn)


def prepare(task: Task, renderer: Renderer, *, num_fewshot: int | None = None, limit: int | None = None,
            seed: int = 1234) -> Prepared:
    """Render every document's text, target and choices and build its few-shot context."""
    docs, where = task.docs[:limit], task.doc_where[:limit]
    if not docs:
        raise EvalError(f"{task.source}: task {task.name} has no documents")
    if task.output_type in ("tokens", "token_classification"):  # token ids or words already: nothing to render
        return Prepared(docs, where, [""] * len(docs), [None] * len(docs), None, [""] * len(docs), 0)
    k = task.num_fewshot if num_fewshot is None else num_fewshot
    if task.prompt is not None or task.output_type not in HARNESS_OUTPUT_TYPES:
        k = 0
    texts = renderer.values(task, task.doc_to_text, docs, where, "doc_to_text") if task.prompt is None else \
        [task.prompt(d) for d in docs]
    targets = renderer.values(task, task.doc_to_target, docs, where, "doc_to_target") \
        if task.doc_to_target is not None else [None] * len(docs)
    choices = None
    if task.doc_to_choice is not None:
        choices = renderer.values(task, task.doc_to_choice, docs, where, "doc_to_choice")
        for c, w in zip(choices, where):
            _check_choices(task, c, w)
    if task.output_type == "multiple_choice":
        if choices is None:
            raise EvalError(f"{task.source}: task {task.name} is multiple_choice but sets no doc_to_choice")
        for t, c, w in zip(targets, choices, where):
            gold_index(task, t, c, w)
    for t, w in zip(texts, where):
        if not isinstance(t, str) and not (task.prompt is not None and isinstance(t, list)):  # a list: chat messages
            raise EvalError(f"{w}: doc_to_text of task {task.name} gave {type(t).__name__} {t!r}, not text "
                            "(documents with one context per choice are not supported)")
    if task.output_type == "fill_mask":
        for t, target, w in zip(texts, targets, where):
            if not isinstance(t, str) or t.count(MASK) != 1:
                raise EvalError(f"{w}: a fill_mask text must hold {MASK} once, where its answer goes (task "
                                f"{task.name})")
            if not isinstance(target, str) or not target.strip():
                raise EvalError(f"{w}: a fill_mask target must be the non-empty text {MASK} stands for, got {target!r}")
    contexts = _fewshot_contexts(task, renderer, docs, texts, k, seed) if k > 0 else list(texts)
    if task.description:  # a field or a template of each document, joined without a delimiter
        heads = renderer.values(task, task.description, docs, where, "description")
        contexts = [str(h) + c for h, c in zip(heads, contexts)]
    return Prepared(docs, where, texts, targets, choices, contexts, k)


def _check_choices(task: Task, choices: Any, where: str) -> None:
    if not isinstance(choices, list) or not choices:
        raise EvalError(f"{where}: doc_to_choice of task {task.name} must give a non-empty list of strings, got "
                        f"{choices!r}"[:300])
    bad = [c for c in choices if not isinstance(c, str)]
    if bad:
        raise EvalError(f"{where}: doc_to_choice of task {task.name}: every choice must be a string, got {bad[0]!r}")


def gold_index(task: Task, target: Any, choices: list[str], where: str) -> int | list[int]:
    """The index (or indices) of the right choice: an index, or the text of a choice."""
    golds = target if isinstance(target, list) else [target]
    out = []
    for g in golds:
        if isinstance(g, bool) or not isinstance(g, (int, str)):
            raise EvalError(f"{where}: doc_to_target of task {task.name} must be a choice's index or text, got {g!r}")
        if isinstance(g, str):
            if g not in choices:
                raise EvalError(f"{where}: the target {g!r} of task {task.name} is not one of its choices {choices}"
                                [:300])
            g = choices.index(g)
        if not 0 <= g < len(choices):
            raise EvalError(f"{where}: the target index {g} of task {task.name} is outside its {len(choices)} choices")
        out.append(g)
    return out if isinstance(target, list) else out[0]


def _fewshot_contexts(task: Task, renderer: Renderer, docs: list[dict], texts: list[str], k: int,
                      seed: int) -> list[str]:
    pool = task.fewshot_docs
    if not pool:
        raise EvalError(f"{task.source}: task {task.name} asks for {k}-shot prompts but has no documents to draw "
                        "examples from (set fewshot_split or training_split)")
    pool_where = [f"{task.source}: few-shot document {i}" for i in range(len(pool))]
    shot_texts = renderer.values(task, task.doc_to_text, pool, pool_where, "doc_to_text")
    shot_targets = renderer.values(task, task.doc_to_target, pool, pool_where, "doc_to_target")
    shot_choices = renderer.values(task, task.doc_to_choice, pool, pool_where, "doc_to_choice") \
        if task.doc_to_choice is not None else [None] * len(pool)
    answers = []
    for target, choices, w in zip(shot_targets, shot_choices, pool_where):
        if choices is not None and isinstance(target, int):
            answers.append(choices[target])
        elif isinstance(target, list):
            answers.append(str(target[0]))
        else:
            answers.append(str(target))
    shots = [t + task.target_delimiter + a + task.fewshot_delimiter for t, a in zip(shot_texts, answers)]
    need = k + 1 if task.fewshot_same_split else k
    if need > len(pool):
        raise EvalError(f"{task.source}: task {task.name} asks for {k}-shot prompts but has only {len(pool)} "
                        "documents to draw them from")
    rng = random.Random(seed)
    contexts = []
    for doc, text in zip(docs, texts):
        if task.fewshot_sampler == "first_n":
            chosen = [i for i in range(len(pool)) if not (task.fewshot_same_split and pool[i] == doc)][:k]
        elif task.fewshot_same_split:
            drawn = rng.sample(range(len(pool)), k + 1)
            chosen = [i for i in drawn if pool[i] != doc][:k]
            if len(chosen) < k:  # the doc appeared twice in the draw: draw again without any copy of it
                chosen = rng.sample([i for i in range(len(pool)) if pool[i] != doc], k)
        else:
            chosen = rng.sample(range(len(pool)), k)
        contexts.append("".join(shots[i] for i in chosen) + text)
    return contexts


# --------------------------------------------------------------------------- task files


def load_tasks(spec: str, *, builtins: dict[str, Callable[[], list[Task]]]) -> list[Task]:
    """The tasks that `spec` names: a built-in name; a task YAML or a folder of them; a `data prepare`
    folder (perplexity of its test split, else its val split); text (.txt, .md, .jsonl files or
    a folder of them without task YAMLs: rolling perplexity per document); or `KIND:PATH`, a
    fine-tuning data file of task KIND (`task_file_task`)."""
    from llmlab.data.shards import is_prepared

    path = Path(spec)
    if spec in builtins:
        return builtins[spec]()
    kind, colon, rest = spec.partition(":")
    if colon and kind in TASK_FILES and not path.exists():
        return [task_file_task(kind, Path(rest))]
    if path.is_symlink() and not path.exists():
        raise EvalError(f"{path}: a broken symbolic link, or a loop of them")
    if path.exists() and not path.is_dir() and not path.is_file():
        raise EvalError(f"{path}: not a regular file (a device, pipe or socket); give a task file or folder")
    if path.is_dir() and is_prepared(path):
        return [shards_task(path)]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*.yaml") if p.is_file()) + sorted(p for p in path.rglob("*.yml"))
        tasks = []
        for f in files:
            raw = _read_yaml(f)[0]
            if isinstance(raw, dict) and "task" in raw:  # files without a task are included by others
                tasks.append(load_task_file(f))
        return tasks or [text_task(path)]
    if path.suffix in (".txt", ".md", ".jsonl") and path.exists():
        return [text_task(path)]
    if path.suffix in (".yaml", ".yml") or path.exists():
        return [load_task_file(path)]
    names = ", ".join(sorted(builtins))
    raise EvalError(f"unknown task {spec!r}: not a built-in task ({names}), a task YAML or folder, a prepared "
                    f"data folder, a text file, nor KIND:PATH of a task file (KIND one of {', '.join(TASK_FILES)})")


def task_file_task(kind: str, path: Path) -> Task:
    """A fine-tuning data file (`llmlab.data.tasks`) as a task named `KIND:FILE`:
    - classify (GLUE TSV, JSONL): classification: accuracy and macro F1, by a classify head, or for
      a language model by the log-likelihood of each label's name after the text (zero-shot);
    - tokens (CoNLL, JSONL): token_classification: entity F1, precision, recall and tag accuracy, by
      a tokens head;
    - span (SQuAD JSON): extractive_qa: SQuAD exact match and F1, by a span head, or for a language
      model by greedy generation after `QA_PROMPT`;
    - seq2seq (source/target JSONL): generate_until from the source: exact match, BLEU, ROUGE.
    """
    from llmlab.data.tasks import read_classification, read_seq2seq, read_squad, read_token_classification

    name, source = f"{kind}:{path.name}", str(path)
    if kind == "classify":
        examples, labels = read_classification(path)
        docs = [{"text": e.text, "text_pair": e.text_pair, "label": labels[e.label]} for e in examples]
        return Task(name, "classification", docs, doc_to_target="label", doc_to_choice=labels, source=source,
                    doc_where=[e.where for e in examples], examples=examples, labels=labels,
                    prompt=lambda d: d["text"] if d["text_pair"] is None else f"{d['text']}\n{d['text_pair']}")
    if kind == "tokens":
        examples, labels = read_token_classification(path)
        docs = [{"tokens": e.tokens, "tags": [labels[t] for t in e.tags]} for e in examples]
        return Task(name, "token_classification", docs, source=source, doc_where=[e.where for e in examples],
                    examples=examples, labels=labels)
    if kind == "span":
        examples = read_squad(path)
        docs = [{"id": e.id, "question": e.question, "context": e.context, "answers": e.answers} for e in examples]
        return Task(name, "extractive_qa", docs, source=source, doc_where=[e.where for e in examples],
                    examples=examples, prompt=lambda d: QA_PROMPT.format(**d),
                    generation_kwargs={"until": ["\n"], "max_gen_toks": 32})
    examples = read_seq2seq(path)
    docs = [{"source": e.source, "target": e.target, **({"task": e.task} if e.task else {})} for e in examples]
    return Task(name, "generate_until", docs, doc_to_target="target", prompt=lambda d: d["source"],
                source=source, doc_where=[e.where for e in examples],
                metrics=[("exact_match", {"ignore_whitespace": True}), ("bleu", {}), ("rouge1", {}), ("rouge2", {}),
                         ("rougeL", {})],
                generation_kwargs={"until": [], "max_gen_toks": DEFAULT_MAX_GEN_TOKS},
                group_by="task" if any(e.task for e in examples) else None)


PERPLEXITY_METRICS = ("token_perplexity", "word_perplexity", "byte_perplexity", "bits_per_byte")
CHUNK_TOKENS = 2048  # a prepared split is scored in documents of this many tokens


def text_task(path: Path) -> Task:
    """Rolling perplexity of the documents of text files (`llmlab.data.ingest.iter_documents`)."""
    from llmlab.data.ingest import iter_documents

    docs = [d for d in iter_documents([path]) if d.text.strip()]
    if not docs:
        raise EvalError(f"{path}: no text to score (no non-empty .txt, .md or .jsonl text, and no task YAML)")
    return Task(path.name or str(path), "loglikelihood_rolling", [{"text": d.text} for d in docs],
                doc_to_target="text", metrics=[(m, {}) for m in PERPLEXITY_METRICS], source=str(path),
                doc_where=[d.source for d in docs])


def shards_task(path: Path) -> Task:
    """Perplexity and bits per byte of a prepared folder's test split (its val split when it has no
    test split), read in documents of CHUNK_TOKENS tokens, each scored in rolling windows of the
    model's context that continue from the token before it."""
    from llmlab.data.shards import TokenShards

    splits = TokenShards(path, "train").manifest["splits"]
    split = next((s for s in ("test", "val") if splits.get(s, {}).get("tokens")), None)
    if split is None:
        raise EvalError(f"{path}: a prepared folder without a test or val split; prepare it with val_frac > 0")
    shards = TokenShards(path, split)
    starts = range(0, len(shards), CHUNK_TOKENS)
    docs = [{"start": s, "tokens": min(CHUNK_TOKENS, len(shards) - s)} for s in starts]
    return Task(f"{path.name}:{split}", "tokens", docs, source=str(path), shards=shards,
                doc_where=[f"{path} ({split} tokens {s}-)" for s in starts])


def _read_yaml(path: Path) -> tuple[Any, dict[str, int]]:
    """The YAML's value and the line of each top-level key."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise EvalError(f"{path}: no such task file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise EvalError(f"{path}: cannot be read ({e})") from None
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        value = yaml.safe_load(text)
    except yaml.constructor.ConstructorError as e:
        line = e.problem_mark.line + 1 if e.problem_mark else "?"
        raise EvalError(f"{path}:{line}: {e.problem}; llmlab runs no Python from task files (`!function` "
                        "hooks of lm-evaluation-harness are not supported)") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        raise EvalError(f"{path}:{mark.line + 1 if mark else '?'}: invalid YAML: {getattr(e, 'problem', e)}") from None
    except (ValueError, RecursionError) as e:
        raise EvalError(f"{path}: invalid YAML: {e}") from None
    lines = {}
    if isinstance(node, yaml.MappingNode):
        for key, _ in node.value:
            lines[str(key.value)] = key.start_mark.line + 1
    return value, lines


def _merged_config(path: Path, depth: int = 0) -> tuple[dict, dict[str, str]]:
    """The task config with its `include`s merged in (this file's keys win); key -> "file:line"."""
    if depth > 8:
        raise EvalError(f"{path}: `include` nests more than 8 files deep (a cycle?)")
    raw, lines = _read_yaml(path)
    if not isinstance(raw, dict):
        raise EvalError(f"{path}: a task file must be a YAML mapping of keys, got {type(raw).__name__}")
    where = {k: f"{path}:{lines.get(str(k), '?')}" for k in raw}
    merged, merged_where = {}, {}
    if "include" in raw:
        inc = raw["include"]
        if not isinstance(inc, str):
            raise EvalError(f"{where['include']}: include must be the path of a YAML file")
        base, base_where = _merged_config((path.parent / inc) if not Path(inc).is_absolute() else Path(inc), depth + 1)
        merged.update(base)
        merged_where.update(base_where)
    merged.update({k: v for k, v in raw.items() if k != "include"})
    merged_where.update({k: v for k, v in where.items() if k != "include"})
    return merged, merged_where


def load_task_file(path: str | Path) -> Task:
    """A Task from an lm-evaluation-harness task YAML with local data (see the module docstring)."""
    path = Path(path)
    cfg, where = _merged_config(path)
    for key in cfg:
        if not isinstance(key, str):
            raise EvalError(f"{path}: keys must be strings, got {key!r}")
    harness_only = sorted(k for k in cfg if k in HARNESS_ONLY_KEYS)
    if harness_only:
        k = harness_only[0]
        raise EvalError(f"{where[k]}: {k!r} is a key lm-evaluation-harness supports but llmlab does not "
                        f"(unsupported here: {', '.join(harness_only)})")
    unknown = sorted(k for k in cfg if k not in SUPPORTED_KEYS)
    if unknown:
        raise EvalError(f"{where[unknown[0]]}: unknown key {unknown[0]!r} (task files take: "
                        f"{', '.join(sorted(SUPPORTED_KEYS))})")

    def at(key: str) -> str:
        return where.get(key, str(path))

    def expect(key: str, types: tuple, what: str, default=None):
        value = cfg.get(key, default)
        if value is not None and (not isinstance(value, types) or isinstance(value, bool) and bool not in types):
            raise EvalError(f"{at(key)}: {key} must be {what}, got {value!r}"[:300])
        return value

    name = expect("task", (str,), "a string", path.stem)
    output_type = expect("output_type", (str,), "a string", "generate_until")
    if output_type not in FILE_OUTPUT_TYPES:
        raise EvalError(f"{at('output_type')}: output_type must be one of {list(FILE_OUTPUT_TYPES)}, got "
                        f"{output_type!r}")
    if cfg.get("dataset_path") != "json":
        raise EvalError(f"{at('dataset_path')}: dataset_path must be `json` (llmlab reads local JSON or JSONL files "
                        f"given by dataset_kwargs.data_files; datasets are never downloaded), got "
                        f"{cfg.get('dataset_path')!r}")
    if cfg.get("dataset_name") is not None:
        raise EvalError(f"{at('dataset_name')}: dataset_name must be null for local JSON data")
    if cfg.get("should_decontaminate"):
        raise EvalError(f"{at('should_decontaminate')}: decontamination is not supported; remove the key or set false")
    splits = _data_files(path, cfg, at("dataset_kwargs"))
    docs_of: dict[str, tuple[list[dict], list[str]]] = {}

    def split(key: str) -> str | None:
        value = expect(key, (str,), "a split name")
        if value is not None and value not in splits:
            raise EvalError(f"{at(key)}: {key} {value!r} is not a split of dataset_kwargs.data_files "
                            f"({', '.join(splits)})")
        if value is not None and value not in docs_of:
            docs_of[value] = _read_docs(splits[value])
        return value

    test, val, train, fewshot = split("test_split"), split("validation_split"), split("training_split"), \
        split("fewshot_split")
    scored = test or val
    if scored is None:
        raise EvalError(f"{path}: set test_split or validation_split: the split whose documents are scored")
    fs_cfg = expect("fewshot_config", (dict,), "a mapping", {})
    unknown_fs = sorted(set(fs_cfg) - {"sampler", "split"})
    if unknown_fs:
        raise EvalError(f"{at('fewshot_config')}: fewshot_config.{unknown_fs[0]} is not supported (llmlab knows "
                        "sampler and split)")
    sampler = fs_cfg.get("sampler", "default")
    if sampler not in ("default", "first_n"):
        raise EvalError(f"{at('fewshot_config')}: fewshot_config.sampler must be default or first_n, got {sampler!r}")
    if "split" in fs_cfg:
        fewshot = fs_cfg["split"]
        if fewshot not in splits:
            raise EvalError(f"{at('fewshot_config')}: fewshot_config.split {fewshot!r} is not a split of data_files")
        docs_of.setdefault(fewshot, _read_docs(splits[fewshot]))
    pool_split = fewshot or train or val or test
    num_fewshot = expect("num_fewshot", (int,), "an integer >= 0", 0)
    if num_fewshot < 0:
        raise EvalError(f"{at('num_fewshot')}: num_fewshot must be >= 0, got {num_fewshot}")
    metrics = _metric_list(cfg.get("metric_list"), output_type, at("metric_list"))
    gen = expect("generation_kwargs", (dict,), "a mapping", None)
    if gen is not None:
        gen = dict(gen)
        if "temperature" in gen and isinstance(gen["temperature"], (int, float)):
            gen["temperature"] = float(gen["temperature"])
        generation_settings(gen, at("generation_kwargs"))  # refused now, not after the model has loaded
    repeats = expect("repeats", (int,), "an integer >= 1", 1)
    if not 1 <= repeats <= 1000:
        raise EvalError(f"{at('repeats')}: repeats must be between 1 and 1000, got {repeats}")
    for key in ("doc_to_text", "doc_to_target", "doc_to_choice"):
        expect(key, (str, int, list, dict), "a field name, a Jinja template or a list")
    metadata = expect("metadata", (dict,), "a mapping", {}) or {}
    docs, doc_where = docs_of[scored]
    return Task(
        name=name, output_type=output_type, docs=docs, doc_where=doc_where,
        fewshot_docs=docs_of[pool_split][0] if pool_split else None,
        doc_to_text=cfg.get("doc_to_text", ""), doc_to_target=cfg.get("doc_to_target"),
        doc_to_choice=cfg.get("doc_to_choice"),
        target_delimiter=expect("target_delimiter", (str,), "a string", " "),
        fewshot_delimiter=expect("fewshot_delimiter", (str,), "a string", "\n\n"),
        description=expect("description", (str,), "a string", "") or "",
        num_fewshot=num_fewshot, fewshot_sampler=sampler, fewshot_same_split=pool_split == test,
        metrics=metrics, generation_kwargs=gen or {}, filters=_filter_list(cfg.get("filter_list"), at("filter_list")),
        repeats=repeats, source=str(path), version=metadata.get("version"))


def _data_files(path: Path, cfg: dict, where: str) -> dict[str, list[Path]]:
    kwargs = cfg.get("dataset_kwargs") or {}
    if not isinstance(kwargs, dict) or "data_files" not in kwargs:
        raise EvalError(f"{where}: dataset_kwargs.data_files must name the local JSON/JSONL files "
                        "(a path, a list, or a mapping of split name to paths)")
    extra = sorted(set(kwargs) - {"data_files"})
    if extra:
        raise EvalError(f"{where}: dataset_kwargs.{extra[0]} is not supported (llmlab reads data_files only)")
    files = kwargs["data_files"]
    if isinstance(files, (str, list)):
        files = {"train": files}
    if not isinstance(files, dict) or not files:
        raise EvalError(f"{where}: dataset_kwargs.data_files must be a path, a list or a mapping of split to paths")
    out = {}
    for split, names in files.items():
        names = [names] if isinstance(names, str) else names
        if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
            raise EvalError(f"{where}: dataset_kwargs.data_files.{split} must be a path or a list of paths")
        resolved = []
        for n in names:
            p = Path(n)
            if not p.is_absolute() and not p.exists() and (path.parent / p).exists():
                p = path.parent / p  # relative to the task file when not to the working directory
            resolved.append(p)
        out[str(split)] = resolved
    return out


MAX_DOCS = 1_000_000


def _read_docs(files: list[Path]) -> tuple[list[dict], list[str]]:
    """Documents of JSON Lines files (or a JSON file holding a list of objects), with "file:line" of each."""
    docs, where = [], []
    for f in files:
        if not f.is_file():
            raise EvalError(f"{f}: no such data file")
        if f.suffix == ".json":
            try:
                value = parse_json(f.read_text(encoding="utf-8"), str(f), lines=True)
            except (OSError, UnicodeDecodeError) as e:
                raise EvalError(f"{f}: cannot be read ({e})") from None
            if isinstance(value, list):
                items = [(f"{f}: item {i}", v) for i, v in enumerate(value)]
            else:
                items = [(f"{f}:1", value)]
        else:
            items = []
            for lineno, _, raw in jsonl_lines(f):
                if raw.strip():
                    try:
                        text = raw.decode("utf-8")
                    except UnicodeDecodeError:
                        raise EvalError(f"{f}:{lineno}: not UTF-8 text") from None
                    items.append((f"{f}:{lineno}", parse_json(text, f"{f}:{lineno}")))
        for w, doc in items:
            if not isinstance(doc, dict):
                raise EvalError(f"{w}: a document must be a JSON object, got {type(doc).__name__}")
            docs.append(doc)
            where.append(w)
            if len(docs) > MAX_DOCS:
                raise EvalError(f"{f}: more than {MAX_DOCS} documents; split the task")
    return docs, where


def _metric_list(entries: Any, output_type: str, where: str) -> list[tuple[str, dict]]:
    if entries is None:
        return [(m, {}) for m in DEFAULT_METRICS[output_type]]
    if not isinstance(entries, list) or not entries:
        raise EvalError(f"{where}: metric_list must be a non-empty list of {{metric: NAME, ...}} entries")
    out = []
    for e in entries:
        if not isinstance(e, dict) or not isinstance(e.get("metric"), str):
            raise EvalError(f"{where}: every metric_list entry needs `metric: NAME`, got {e!r}"[:300])
        name = e["metric"]
        if name not in METRICS[output_type]:
            raise EvalError(f"{where}: metric {name!r} is not supported for {output_type} tasks (llmlab has "
                            f"{', '.join(METRICS[output_type])})")
        options = {k: v for k, v in e.items() if k not in ("metric", "aggregation", "higher_is_better", "hf_evaluate")}
        allowed = EXACT_MATCH_OPTIONS if name == "exact_match" else {"k"} if name == "pass_at_k" else set()
        bad = sorted(set(options) - allowed)
        if bad:
            raise EvalError(f"{where}: metric {name!r} does not take option {bad[0]!r}")
        agg = e.get("aggregation")
        if agg is not None and agg not in ("mean", "perplexity", "weighted_perplexity", "bits_per_byte", "f1",
                                           "bleu", "brier_score"):
            raise EvalError(f"{where}: aggregation {agg!r} of metric {name!r} is not supported")
        out.append((name, options))
    return out


def _filter_list(entries: Any, where: str) -> list[Filter]:
    if entries is None:
        return []
    if not isinstance(entries, list):
        raise EvalError(f"{where}: filter_list must be a list of {{name, filter: [...]}} entries")
    out = []
    for e in entries:
        if not isinstance(e, dict) or not isinstance(e.get("name"), str) or not isinstance(e.get("filter"), list):
            raise EvalError(f"{where}: every filter_list entry needs `name` and a `filter` list, got {e!r}"[:300])
        steps = []
        for step in e["filter"]:
            if not isinstance(step, dict) or step.get("function") not in FILTERS:
                fn = step.get("function") if isinstance(step, dict) else step
                raise EvalError(f"{where}: filter function {fn!r} is not supported (llmlab has {', '.join(FILTERS)})")
            options = {k: v for k, v in step.items() if k != "function"}
            if step["function"] == "regex":
                try:
                    import re

                    re.compile(options.get("regex_pattern", r"#### (\-?[0-9\.\,]+)"))
                except (re.error, TypeError) as err:
                    raise EvalError(f"{where}: filter {e['name']!r}: bad regex_pattern: {err}") from None
            steps.append((step["function"], options))
        out.append(Filter(e["name"], steps))
    return out
