"""Fine-tuning data for encoders and encoder-decoders: the usual local formats of four tasks, read
into typed examples, written back from records, and the label alignments their trainers need.

- sequence classification (`ClassificationExample`): GLUE-style `.tsv` with a header row, or
  JSONL `{text, label}` with an optional `text_pair`;
- token classification (`TokenExample`): CoNLL (`token ... tag` a line, the tag last, a blank
  line between sentences), or JSONL `{tokens, tags}`;
- extractive QA (`QAExample`): SQuAD v1.1 / v2.0 JSON (`data[].paragraphs[].context, qas[]`,
  `is_impossible`);
- seq2seq (`Seq2SeqExample`): JSONL `{source, target}`, or `{input, output}`, or `{src, tgt}`,
  with an optional `task`.

JSONL also means a `.json` array of records or a folder of `.json`/`.jsonl` files, as for
instruction data (`llmlab.data.sft.read_records`). CoNLL is any other suffix (`.conll`, `.txt`,
`.bio`). Labels and tags become indices into a label set: the one given, or the values of the
file in sorted order (`label_set`), so a training file's set is passed on to its val and test
files. Every reader raises `DataError` naming the file and line (SQuAD: the question id) of the
first bad input; the writers refuse records their format cannot hold, so what they write reads
back the same.

Alignment, after the recipes of HF transformers' token-classification and question-answering
examples: `align_tags` gives a word's tag to its first subword and IGNORE to the rest, and
`word_predictions` undoes it; `answer_token_span` turns an answer's characters into the token
start/end a QA head learns (the null index when the window misses the answer), and `best_span`
reads the best answer back from start/end logits as SQuAD evaluation does.
"""

from __future__ import annotations

import json
import os
import re
import stat
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from llmlab.common import atomic_write_text
from llmlab.data import DataError
from llmlab.data.ingest import MAX_LINE_BYTES, check_input, input_error, json_type, parse_json
from llmlab.data.sft import IGNORE, read_records

JSONL_SUFFIXES = (".json", ".jsonl")
SEQ2SEQ_FIELDS = (("source", "target"), ("input", "output"), ("src", "tgt"))  # tried in this order
DOCSTART = "-DOCSTART-"  # CoNLL-2003's document separator line, skipped
_INTEGER = re.compile(r"-?\d+")


@dataclass
class ClassificationExample:
    text: str
    label: int  # index into the label set
    text_pair: str | None = None  # the second text of a pair task (NLI, paraphrase)
    where: str = ""  # file:line


@dataclass
class TokenExample:
    tokens: list[str]  # words, as the file splits them
    tags: list[int]  # one index into the tag set per word
    where: str = ""  # file:line of the first word


@dataclass
class QAExample:
    id: str
    question: str
    context: str
    answers: list[str]  # empty when is_impossible
    answer_starts: list[int]  # character offset of each answer in context
    is_impossible: bool = False  # SQuAD 2.0: the context does not answer the question
    title: str = ""
    where: str = ""  # file: question id


@dataclass
class Seq2SeqExample:
    source: str
    target: str
    task: str | None = None  # the record's `task` field, when it has one (synthetic sets)
    where: str = ""  # file:line


@dataclass(frozen=True)
class AnswerSpan:
    start: int  # first token of the answer
    end: int  # last token of the answer (inclusive)
    start_char: int  # the answer is context[start_char:end_char]
    end_char: int
    score: float  # start_logits[start] + end_logits[end]


# --------------------------------------------------------------------------- label sets


def label_set(values: Iterable[str]) -> list[str]:
    """The distinct values in sorted order: by number when all are integers ("2" before "10"),
    else as tags: "O" first, then by entity type, B- before I- (`bio_tags` of the sorted types)."""
    distinct = set(values)
    if distinct and all(_INTEGER.fullmatch(v) for v in distinct):
        return sorted(distinct, key=int)
    return sorted(distinct, key=lambda v: (v != "O", v[2:] if v[:2] in ("B-", "I-") else v, v))


def bio_tags(types: Sequence[str]) -> list[str]:
    """The BIO (IOB2) tag set of entity types: O, then B- and I- of each type in the order given."""
    return ["O"] + [f"{prefix}-{t}" for t in types for prefix in ("B", "I")]


def _check_set(values: Sequence[str], what: str) -> list[str]:
    values = [str(v) for v in values]
    if not values:
        raise DataError(f"the {what} set is empty")
    repeated = sorted({v for v in values if values.count(v) > 1})
    if repeated:
        raise DataError(f"the {what} set names {', '.join(map(repr, repeated))} more than once")
    return values


def _index(value: str, index: dict[str, int], what: str, where: str) -> int:
    if value not in index:
        raise DataError(f"{where}: {what} {value!r} is not in the {what} set ({', '.join(index)})")
    return index[value]


def _map(rows: list[tuple], given: Sequence[str] | None, what: str) -> tuple[dict[str, int], list[str]]:
    """The label set (given, or collected from rows of (where, ..., values)) and its index."""
    if given is not None:
        names = _check_set(given, what)
    else:
        names = label_set(v for row in rows for v in row[-1])
    return {name: i for i, name in enumerate(names)}, names


# --------------------------------------------------------------------------- text files


def _text_lines(file: Path) -> Iterator[tuple[str, str]]:
    """(file:line, text) for every line of a UTF-8 text file, without its line end.

    Raises:
        DataError: the file is missing or unreadable, a line is not UTF-8 or longer than MAX_LINE_BYTES.
    """
    check_input(file)
    try:
        with open(file, "rb") as f:
            n = 0
            while raw := f.readline(MAX_LINE_BYTES + 1):
                n += 1
                where = f"{file}:{n}"
                if len(raw) > MAX_LINE_BYTES:
                    raise DataError(f"{where}: line longer than {MAX_LINE_BYTES / 2**20:g} MiB")
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise DataError(f"{where}: not UTF-8 text ({e.reason} at byte {e.start} of the line)") from None
                yield where, (line.removeprefix("\ufeff") if n == 1 else line).rstrip("\r\n")
    except OSError as e:
        raise input_error(file, e) from None


def _is_jsonl(path: Path) -> bool:
    """JSON records (a .json/.jsonl file or a folder of them) rather than a TSV or CoNLL file."""
    return path.suffix in JSONL_SUFFIXES or stat.S_ISDIR(check_input(path, folders=True).st_mode)


def _string(record: dict, key: str, where: str, *, optional: bool = False) -> str | None:
    value = record.get(key)
    if value is None and optional:
        return None
    if not isinstance(value, str):
        got = f"got {json_type(value)}" if key in record else f"missing; the record has {sorted(record)}"
        raise DataError(f"{where}: {key!r} must be a string ({got})")
    return value


# --------------------------------------------------------------------------- sequence classification


def read_classification(path: str | os.PathLike, labels: Sequence[str] | None = None, *,
                        text_fields: Sequence[str] | None = None,
                        label_field: str = "label") -> tuple[list[ClassificationExample], list[str]]:
    """Sequence-classification examples from a GLUE-style TSV file or JSON records.

    Args:
        path: A `.tsv` file (tab-separated, no quoting, a header row naming the columns), or a
            `.jsonl`/`.json` file or folder of records `{"text": ..., "label": ...}` with an
            optional `"text_pair"`.
        labels: The label set; None collects it from this file (`label_set`). Pass a training
            file's set when reading its val and test files.
        text_fields: The one or two columns (fields) holding the text. None: `sentence`, or
            `sentence1` and `sentence2`, for TSV (whichever the header has); `text` and, where a
            record has it, `text_pair` for JSON.
        label_field: The column (field) holding the label: a string, or an integer (taken as its
            decimal string).

    Returns:
        (examples, labels): every example's `label` indexes `labels`.

    Raises:
        DataError: naming file:line: a file of another kind, a row with the wrong number of
            fields, a missing column or field, a text that is not a string, an empty or non-string
            label, a label outside a given set (listing the set), no examples at all.
    """
    path = Path(path)
    if text_fields is not None and len(text_fields) not in (1, 2):
        raise DataError(f"text_fields must name one or two fields, got {list(text_fields)}")
    if path.suffix == ".tsv":
        rows = list(_classification_tsv(path, text_fields, label_field))
    elif _is_jsonl(path):
        rows = list(_classification_json(path, text_fields, label_field))
    else:
        raise DataError(f"{path}: expected a .tsv file, or .jsonl/.json records or a folder of them")
    if not rows:
        raise DataError(f"{path}: no examples")
    index, names = _map(rows, labels, "label")
    examples = [ClassificationExample(text, _index(label, index, "label", where), pair, where)
                for where, text, pair, (label,) in rows]
    return examples, names


def _classification_tsv(file: Path, text_fields: Sequence[str] | None,
                        label_field: str) -> Iterator[tuple[str, str, str | None, tuple[str]]]:
    lines = _text_lines(file)
    header = next(lines, None)
    if header is None:
        raise DataError(f"{file}: empty; expected a header row naming the columns")
    columns = header[1].split("\t")
    if text_fields is None:
        text_fields = ["sentence"] if "sentence" in columns else ["sentence1", "sentence2"]
        if not set(text_fields) <= set(columns):
            raise DataError(f"{header[0]}: no column 'sentence' or 'sentence1' and 'sentence2' in the header "
                            f"({', '.join(columns)}); name the text column(s) with text_fields")
    for name in (*text_fields, label_field):
        if name not in columns:
            raise DataError(f"{header[0]}: no column {name!r} in the header ({', '.join(columns)})")
    at = [columns.index(name) for name in (*text_fields, label_field)]
    for where, line in lines:
        if not line.strip():
            continue
        cells = line.split("\t")
        if len(cells) != len(columns):
            raise DataError(f"{where}: {len(cells)} tab-separated fields where the header has {len(columns)}")
        texts = [cells[i] for i in at[:-1]]
        label = cells[at[-1]].strip()
        if not label:
            raise DataError(f"{where}: empty {label_field!r}")
        yield where, texts[0], texts[1] if len(texts) == 2 else None, (label,)


def _classification_json(path: Path, text_fields: Sequence[str] | None,
                         label_field: str) -> Iterator[tuple[str, str, str | None, tuple[str]]]:
    first, second = (text_fields[0], text_fields[1] if len(text_fields) == 2 else None) if text_fields else (
        "text", "text_pair")
    optional = text_fields is None  # the default pair field may be absent
    for where, record in read_records(path):
        text = _string(record, first, where)
        pair = _string(record, second, where, optional=optional) if second is not None else None
        label = record.get(label_field)
        if isinstance(label, int) and not isinstance(label, bool):
            label = str(label)
        if not isinstance(label, str) or not label:
            got = f"got {json_type(label)}" if label_field in record else "missing"
            raise DataError(f"{where}: {label_field!r} must be a non-empty string or an integer ({got})")
        yield where, text, pair, (label,)


def write_classification(path: str | os.PathLike, records: Sequence[dict]) -> None:
    """Records `{text, label}` (optional `text_pair`) as `read_classification` reads them: a `.tsv`
    file with the GLUE header `sentence  label` (`sentence1  sentence2  label` for pairs), else JSONL.

    Raises:
        DataError: for TSV, a text with a tab or line break (TSV has no quoting) or pairs mixed
            with single texts.
    """
    path = Path(path)
    if path.suffix != ".tsv":
        return write_jsonl(path, records)
    pairs = {r.get("text_pair") is not None for r in records}
    if len(pairs) > 1:
        raise DataError(f"{path}: some records have a text_pair and some not; one TSV holds one kind")
    columns = ["sentence1", "sentence2", "label"] if pairs == {True} else ["sentence", "label"]
    fields = ["text", "text_pair", "label"] if pairs == {True} else ["text", "label"]
    rows = ["\t".join(columns)]
    for i, record in enumerate(records):
        cells = [str(record[f]) for f in fields]
        if any(ch in c for c in cells for ch in "\t\n\r"):
            raise DataError(f"{path}: record {i} has a tab or line break, which TSV cannot hold")
        rows.append("\t".join(cells))
    atomic_write_text(path, "".join(row + "\n" for row in rows))


def write_jsonl(path: str | os.PathLike, records: Iterable[dict]) -> None:
    """One JSON object a line, UTF-8, written atomically."""
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


# --------------------------------------------------------------------------- token classification


def read_token_classification(path: str | os.PathLike,
                              tags: Sequence[str] | None = None) -> tuple[list[TokenExample], list[str]]:
    """Token-classification sentences from a CoNLL file or JSON records.

    Args:
        path: A `.jsonl`/`.json` file or folder of records `{"tokens": [...], "tags": [...]}`
            (strings, one tag per token); any other file is CoNLL: one `token ... tag` a line,
            whitespace-separated with the tag in the last column (the columns between, such as
            CoNLL-2003's POS and chunk tags, are ignored), a blank line between sentences and
            `-DOCSTART-` lines skipped.
        tags: The tag set (for NER, `bio_tags(types)`); None collects it from this file
            (`label_set`: "O" first).

    Returns:
        (examples, tags): every example's `tags` index `tags`.

    Raises:
        DataError: naming file:line: a CoNLL line with one column, a tag outside a given set
            (listing the set), a JSON record whose tokens and tags are not lists of strings of the
            same non-zero length, no sentences at all.
    """
    path = Path(path)
    rows = list(_token_json(path) if _is_jsonl(path) else _token_conll(path))
    if not rows:
        raise DataError(f"{path}: no sentences")
    index, names = _map(rows, tags, "tag")
    examples = []
    for where, tokens, values in rows:
        ids = [_index(v, index, "tag", w) for v, w in zip(values, where)]
        examples.append(TokenExample(tokens, ids, where[0]))
    return examples, names


def _token_conll(file: Path) -> Iterator[tuple[list[str], list[str], list[str]]]:
    """(where of each token, tokens, tags) for every sentence."""
    wheres: list[str] = []
    tokens: list[str] = []
    tags: list[str] = []
    for where, line in _text_lines(file):
        cells = line.split()
        if not cells or cells[0] == DOCSTART:  # a sentence ends at a blank line or a new document
            if tokens:
                yield wheres, tokens, tags
            wheres, tokens, tags = [], [], []
            continue
        if len(cells) < 2:
            raise DataError(f"{where}: one column ({cells[0]!r}); expected 'token ... tag', whitespace-separated "
                            "with the tag last, and a blank line between sentences")
        wheres.append(where)
        tokens.append(cells[0])
        tags.append(cells[-1])
    if tokens:
        yield wheres, tokens, tags


def _token_json(path: Path) -> Iterator[tuple[list[str], list[str], list[str]]]:
    for where, record in read_records(path):
        lists = []
        for key in ("tokens", "tags"):
            value = record.get(key)
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                got = f"got {json_type(value)}" if key in record else f"missing; the record has {sorted(record)}"
                raise DataError(f"{where}: {key!r} must be a list of strings ({got})")
            lists.append(value)
        tokens, tags = lists
        if len(tokens) != len(tags) or not tokens:
            raise DataError(f"{where}: {len(tokens)} tokens and {len(tags)} tags; expected one tag per token, "
                            "at least one token")
        yield [where] * len(tokens), tokens, tags


def write_token_classification(path: str | os.PathLike, records: Sequence[dict]) -> None:
    """Records `{tokens, tags}` as `read_token_classification` reads them: JSONL for a `.jsonl`/
    `.json` path, else CoNLL (`token tag` a line, a blank line after each sentence).

    Raises:
        DataError: for CoNLL, a token or tag that is empty, holds whitespace or is `-DOCSTART-`.
    """
    path = Path(path)
    if path.suffix in JSONL_SUFFIXES:
        return write_jsonl(path, records)
    lines = []
    for i, record in enumerate(records):
        for token, tag in zip(record["tokens"], record["tags"], strict=True):
            if any(not s or s != "".join(s.split()) or s == DOCSTART for s in (token, tag)):
                raise DataError(f"{path}: record {i}: token {token!r} / tag {tag!r} cannot be written to CoNLL "
                                "(empty, whitespace inside, or -DOCSTART-)")
            lines.append(f"{token} {tag}\n")
        lines.append("\n")
    atomic_write_text(path, "".join(lines))


# --------------------------------------------------------------------------- extractive QA


def read_squad(path: str | os.PathLike) -> list[QAExample]:
    """Questions of a SQuAD v1.1 or v2.0 JSON file, one example per question, in file order.

    `data[].paragraphs[].qas[]` each hold an `id` (string or integer), a `question`, `answers`
    (`{text, answer_start}`, several in dev sets) and, in v2.0, `is_impossible` (then `answers`
    is empty; `plausible_answers` is ignored).

    Raises:
        DataError: naming the file and the question id (or the JSON path where there is none):
            invalid JSON or structure, an answer whose `answer_start` does not point at its text,
            an empty answer, an answerable question without answers or an impossible one with
            them, an id used twice.
    """
    file = Path(path)
    check_input(file)
    try:
        raw = file.read_bytes()
    except OSError as e:
        raise input_error(file, e) from None
    try:
        text = raw.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as e:
        raise DataError(f"{file}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    top = parse_json(text, str(file), lines=True)
    articles = top.get("data") if isinstance(top, dict) else None
    if not isinstance(articles, list):
        raise DataError(f"{file}: expected SQuAD JSON, an object whose 'data' is a list of articles")
    examples: list[QAExample] = []
    seen: set[str] = set()
    for a, article in enumerate(articles):
        at = f"{file}: data[{a}]"
        paragraphs = article.get("paragraphs") if isinstance(article, dict) else None
        if not isinstance(paragraphs, list):
            raise DataError(f"{at}: expected an object with a 'paragraphs' list")
        title = article.get("title") if isinstance(article.get("title"), str) else ""
        for p, paragraph in enumerate(paragraphs):
            at = f"{file}: data[{a}].paragraphs[{p}]"
            if not isinstance(paragraph, dict) or not isinstance(paragraph.get("qas"), list):
                raise DataError(f"{at}: expected an object with a 'context' string and a 'qas' list")
            context = _string(paragraph, "context", at)
            for q, qa in enumerate(paragraph["qas"]):
                example = _question(qa, context, title, f"{at}.qas[{q}]", file)
                if example.id in seen:
                    raise DataError(f"{example.where}: the id is used by an earlier question too")
                seen.add(example.id)
                examples.append(example)
    if not examples:
        raise DataError(f"{file}: no questions")
    return examples


def _question(qa: object, context: str, title: str, at: str, file: Path) -> QAExample:
    if not isinstance(qa, dict):
        raise DataError(f"{at}: expected an object, got {json_type(qa)}")
    qid = qa.get("id")
    if isinstance(qid, bool) or not isinstance(qid, str | int):
        raise DataError(f"{at}: 'id' must be a string or an integer")
    where = f"{file}: question {str(qid)!r}"
    question = _string(qa, "question", where)
    impossible = qa.get("is_impossible", False)
    answers = qa.get("answers", [])
    if not isinstance(impossible, bool) or not isinstance(answers, list):
        raise DataError(f"{where}: 'is_impossible' must be true or false and 'answers' a list")
    if impossible and answers:
        raise DataError(f"{where}: is_impossible, yet it has {len(answers)} answer(s)")
    if not impossible and not answers:
        raise DataError(f"{where}: no answers, and not marked is_impossible")
    texts, starts = [], []
    for k, answer in enumerate(answers):
        if not isinstance(answer, dict):
            raise DataError(f"{where}: answers[{k}] must be an object {{text, answer_start}}")
        text, start = _string(answer, "text", f"{where}: answers[{k}]"), answer.get("answer_start")
        if isinstance(start, bool) or not isinstance(start, int):
            raise DataError(f"{where}: answers[{k}].answer_start must be an integer")
        if not text:
            raise DataError(f"{where}: answers[{k}] is empty")
        found = context[start:start + len(text)] if start >= 0 else ""
        if found != text:
            raise DataError(f"{where}: answers[{k}].answer_start {start} does not point at its text {text!r} (the "
                            f"context there reads {found!r})")
        texts.append(text)
        starts.append(start)
    return QAExample(str(qid), question, context, texts, starts, impossible, title, where)


def write_squad(path: str | os.PathLike, records: Sequence[dict], *, version: str = "v2.0") -> None:
    """Records `{id, question, context, answers: [{text, answer_start}], is_impossible, title}` as a
    SQuAD JSON file: consecutive records of the same title and context share a paragraph, and of
    the same title an article. `is_impossible` is written for version v2.0 only.

    Raises:
        DataError: version is not v1.1 or v2.0, or an impossible question for v1.1.
    """
    if version not in ("v1.1", "v2.0"):
        raise DataError(f"SQuAD version must be v1.1 or v2.0, got {version!r}")
    articles: list[dict] = []
    for record in records:
        title = record.get("title", "")
        if not articles or articles[-1]["title"] != title:
            articles.append({"title": title, "paragraphs": []})
        paragraphs = articles[-1]["paragraphs"]
        if not paragraphs or paragraphs[-1]["context"] != record["context"]:
            paragraphs.append({"context": record["context"], "qas": []})
        qa = {"id": record["id"], "question": record["question"], "answers": record["answers"]}
        if version == "v2.0":
            qa["is_impossible"] = bool(record.get("is_impossible", False))
        elif record.get("is_impossible"):
            raise DataError(f"{path}: question {record['id']!r} is impossible, which SQuAD v1.1 cannot hold")
        paragraphs[-1]["qas"].append(qa)
    atomic_write_text(path, json.dumps({"version": version, "data": articles}, ensure_ascii=False) + "\n")


# --------------------------------------------------------------------------- seq2seq


def read_seq2seq(path: str | os.PathLike) -> list[Seq2SeqExample]:
    """Source/target pairs from JSON records: `{source, target}`, `{input, output}` or `{src, tgt}`
    (the first pair a record has a key of; every record may choose its own), each a string, and
    an optional `task` string.

    Raises:
        DataError: naming file:line: a record with none of the pairs, a missing or non-string
            field, an Alpaca record (`instruction`: its input/output are not a source/target pair),
            no examples at all.
    """
    examples = []
    for where, record in read_records(path):
        if "instruction" in record:
            raise DataError(f"{where}: an Alpaca record (it has 'instruction'); seq2seq reads source/target pairs "
                            "(instruction data trains decoders through the finetune verb)")
        keys = next((pair for pair in SEQ2SEQ_FIELDS if pair[0] in record or pair[1] in record), None)
        if keys is None:
            accepted = ", ".join(f"{s}/{t}" for s, t in SEQ2SEQ_FIELDS)
            raise DataError(f"{where}: expected a source/target pair ({accepted}); got keys {sorted(record)}")
        task = _string(record, "task", where, optional=True)
        examples.append(Seq2SeqExample(_string(record, keys[0], where), _string(record, keys[1], where), task, where))
    if not examples:
        raise DataError(f"{path}: no examples")
    return examples


def write_seq2seq(path: str | os.PathLike, records: Sequence[dict]) -> None:
    """Records `{source, target}` (optional `task`) as JSONL."""
    write_jsonl(path, records)


# --------------------------------------------------------------------------- alignment


def align_tags(tags: Sequence[int], word_ids: Sequence[int | None]) -> list[int]:
    """Word tags to subword targets: the first subword of word w gets tags[w]; its other subwords,
    and tokens of no word (`None`: special tokens, padding), get IGNORE (-100), so the loss and the
    scores count each word once (HF transformers' token-classification recipe).

    Args:
        tags: One tag index per word.
        word_ids: One entry per token: the index of the word it came from, or None
            (`tokenizers.Encoding.word_ids`).
    """
    out, previous = [], None
    for w in word_ids:
        if w is not None and not 0 <= w < len(tags):
            raise ValueError(f"word id {w} is outside the {len(tags)} words tagged")
        out.append(IGNORE if w is None or w == previous else tags[w])
        previous = w
    return out


def word_predictions(values: Sequence, word_ids: Sequence[int | None]) -> list:
    """Per-token values (predicted tags) back to words: each word gets its first subword's value,
    the one `align_tags` trains. Words cut off the end by truncation are absent, so the list may
    be shorter than the sentence."""
    out = []
    for value, w in zip(values, word_ids, strict=True):
        if w is None or w < len(out):
            continue
        if w != len(out):
            raise ValueError(f"word {len(out)} has no token, yet word {w} has")
        out.append(value)
    return out


def answer_token_span(offsets: Sequence[tuple[int, int] | None], answer: tuple[int, int] | None, *,
                      null_index: int = 0) -> tuple[int, int]:
    """The (start, end) tokens, end inclusive, a QA head learns for an answer.

    Args:
        offsets: One entry per token of the window: its (start, end) characters in the context, or
            None for a token outside the context (the question, special tokens, padding). Context
            offsets increase along the window.
        answer: The answer's characters (start, end exclusive) in the context, or None when the
            question has no answer (SQuAD 2.0).
        null_index: The token that stands for "no answer here" (BERT's [CLS], at 0).

    Returns:
        The last context token that starts at or before the answer and the first that ends at or
        after it; (null_index, null_index) when there is no answer or the window does not hold
        all of it.
    """
    context = [i for i, o in enumerate(offsets) if o is not None]
    if answer is None or not context:
        return null_index, null_index
    start_char, end_char = answer
    if offsets[context[0]][0] > start_char or offsets[context[-1]][1] < end_char:
        return null_index, null_index
    start = max(i for i in context if offsets[i][0] <= start_char)
    end = min(i for i in context if offsets[i][1] >= end_char)
    return start, end


def best_span(start_logits, end_logits, offsets: Sequence[tuple[int, int] | None], *, max_answer_len: int = 30,
              null_index: int | None = None) -> AnswerSpan | None:
    """The answer a QA head predicts in one window: the span start <= end of context tokens, at most
    max_answer_len tokens long, that maximises start_logits[start] + end_logits[end] (the SQuAD
    post-processing of Devlin et al. 2019, over every span rather than the n best starts and ends;
    ties go to the earliest start, then the earliest end).

    Args:
        start_logits, end_logits: (T,) scores: lists, NumPy arrays or tensors (any device or dtype).
        offsets: (T,) as for `answer_token_span`: (start, end) characters, None outside the context.
        max_answer_len: The longest answer in tokens.
        null_index: For SQuAD 2.0: when start_logits[null_index] + end_logits[null_index] is greater
            than the best span's score, the prediction is "no answer" (None). Across several windows
            of one context, leave it None and compare the smallest null score with the best span.

    Returns:
        The best span, or None when no span is allowed or the null score wins.
    """
    # tolist() reads tensors of any device, dtype or grad, and NumPy arrays, alike
    starts = np.asarray(start_logits.tolist() if hasattr(start_logits, "tolist") else start_logits, dtype=np.float64)
    ends = np.asarray(end_logits.tolist() if hasattr(end_logits, "tolist") else end_logits, dtype=np.float64)
    n = len(offsets)
    if starts.shape != (n,) or ends.shape != (n,):
        raise ValueError(f"start and end logits must each have one score per token ({n}), got shapes "
                         f"{starts.shape} and {ends.shape}")
    context = np.array([o is not None for o in offsets], dtype=bool)
    length = np.arange(n)[None, :] - np.arange(n)[:, None]  # (start, end): end - start
    allowed = context[:, None] & context[None, :] & (length >= 0) & (length < max_answer_len)
    if not allowed.any():
        return None
    scores = np.where(allowed, starts[:, None] + ends[None, :], -np.inf)  # (T, T)
    start, end = divmod(int(np.argmax(scores)), n)
    best = AnswerSpan(start, end, offsets[start][0], offsets[end][1], float(scores[start, end]))
    if null_index is not None and starts[null_index] + ends[null_index] > best.score:
        return None
    return best
