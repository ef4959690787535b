"""Fine-tuning data: instruction and chat records into (ids, loss mask) examples, then batches.

Records come from `.json` (an array) or `.jsonl` files, or directories of them, in any of:
- Alpaca: `instruction`, optional `input`, `output` (and optional `system`);
- chat: `messages`, a list of `{role, content}` as in the OpenAI API;
- ShareGPT: `conversations`, a list of `{from: system|human|gpt, value}`;
- raw text: `text`, for continued pretraining, where every token trains.
Chat-like records are rendered with the model's chat template and train on the assistant's
tokens only (`llmlab.tokenizer.chat.encode_chat`). Examples are packed several to a row with
segment ids, so attention and positions never cross from one example into the next, or padded
one to a row.
"""

from __future__ import annotations

import os
import stat
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from llmlab.data import DataError
from llmlab.data.ingest import check_input, input_error, json_type, jsonl_lines, parse_json
from llmlab.tokenizer.chat import ChatTemplate, ChatTemplateError, encode_chat

SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
IGNORE = -100


@dataclass
class Example:
    ids: np.ndarray  # (n,) int64 token ids
    mask: np.ndarray  # (n,) bool: True where the token is a training target
    prompt: list[dict] | None = None  # the conversation up to the last answer (chat records), for evaluation
    reference: str | None = None  # the last answer's text
    task: str | None = None  # the record's `task` field, when it has one (synthetic sets)
    where: str = ""  # file:line

    @property
    def targets(self) -> int:
        return int(self.mask[1:].sum())


def read_records(path: str | os.PathLike) -> Iterator[tuple[str, dict]]:
    """(where, record) for every record in a .json/.jsonl file or a directory of them (sorted).

    Raises:
        DataError: naming the file (and line): a path that is missing or cannot be read (see
            `llmlab.data.ingest.check_input`), a folder without such files, text that is not UTF-8 or
            not JSON (or nested too deeply), a .json file that is not an array, a record that is not
            an object, a JSONL line longer than `MAX_LINE_BYTES`.
    """
    path = Path(path)
    if not stat.S_ISDIR(check_input(path, folders=True).st_mode):
        files = [path]
    else:
        files = sorted(p for p in path.rglob("*") if p.suffix in (".json", ".jsonl") and not p.is_dir())
        if not files:
            raise DataError(f"{path}: no .json or .jsonl files in this directory")
    for file in files:
        check_input(file)
        try:
            yield from _file_records(file)
        except OSError as e:
            raise input_error(file, e) from None


def _file_records(file: Path) -> Iterator[tuple[str, dict]]:
    if file.suffix == ".json":
        data = parse_json(_decode(file.read_bytes(), str(file)), str(file), lines=True)
        if not isinstance(data, list):
            raise DataError(f"{file}: expected a JSON array of records, got {json_type(data)}")
        records = ((f"{file}[{i}]", r) for i, r in enumerate(data))
    else:
        records = _jsonl(file)
    for where, record in records:
        if not isinstance(record, dict):
            raise DataError(f"{where}: expected a JSON object, got {json_type(record)}")
        yield where, record


def _decode(data: bytes, where: str, offset: int = 0) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{where}: not UTF-8 text ({e.reason} at byte {offset + e.start})") from None


def _jsonl(file: Path) -> Iterator[tuple[str, object]]:
    for n, offset, raw in jsonl_lines(file):
        line = _decode(raw, f"{file}:{n}", offset)
        if n == 1:
            line = line.removeprefix("\ufeff")  # json.loads rejects a byte-order mark
        if line.strip():
            yield f"{file}:{n}", parse_json(line, f"{file}:{n}")


def record_messages(record: dict, where: str) -> list[dict] | None:
    """The record as chat messages, or None for a raw-text record."""
    if "messages" in record:
        return record["messages"]
    if "conversations" in record:
        turns = record["conversations"]
        if not isinstance(turns, list):
            raise DataError(f"{where}: conversations: expected a list")
        out = []
        for i, t in enumerate(turns):
            if not isinstance(t, dict) or t.get("from") not in SHAREGPT_ROLES or "value" not in t:
                raise DataError(f"{where}: conversations[{i}]: expected {{from: system|human|gpt, value: ...}}")
            out.append({"role": SHAREGPT_ROLES[t["from"]], "content": t["value"]})
        return out
    if "instruction" in record:
        for key in ("instruction", "output"):
            if not isinstance(record.get(key), str):
                raise DataError(f"{where}: an Alpaca record needs a string {key!r}"
                                + ("" if key in record else f" (missing {key!r})"))
        for key in ("input", "system"):
            if record.get(key) is not None and not isinstance(record[key], str):
                raise DataError(f"{where}: an Alpaca record's {key!r} must be a string, got {json_type(record[key])}")
        prompt = record["instruction"]
        if record.get("input"):
            prompt += "\n\n" + record["input"]
        system = [{"role": "system", "content": record["system"]}] if record.get("system") else []
        return [*system, {"role": "user", "content": prompt}, {"role": "assistant", "content": record["output"]}]
    if "text" in record:
        if not isinstance(record["text"], str):
            raise DataError(f"{where}: text: expected a string")
        return None
    raise DataError(f"{where}: unknown record; expected Alpaca (instruction, input, output), chat (messages), "
                    f"ShareGPT (conversations) or raw text (text); got keys {sorted(record)}")


def build_examples(path: str | os.PathLike, tokenizer, template: ChatTemplate, seq_len: int,
                   stats: Counter | None = None) -> list[Example]:
    """Tokenize every record of `path`. Examples longer than seq_len + 1 tokens are cut to that
    (counted in stats["truncated"]); those left with no target are dropped (stats["no_target"])."""
    stats = Counter() if stats is None else stats
    examples = []
    for where, record in read_records(path):
        messages = record_messages(record, where)
        if messages is None:
            ids = tokenizer.encode(record["text"]) + ([tokenizer.eos_id] if tokenizer.eos_id is not None else [])
            mask = [True] * len(ids)
            prompt = reference = None
        else:
            try:
                ids, mask = encode_chat(template, tokenizer, messages, source=f"{where}: messages")
            except ChatTemplateError as e:
                raise DataError(str(e)) from None
            last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
            prompt, reference = messages[:last], messages[last]["content"]
        stats["records"] += 1
        if len(ids) > seq_len + 1:
            ids, mask = ids[:seq_len + 1], mask[:seq_len + 1]
            stats["truncated"] += 1
        task = record.get("task")
        if task is not None and not isinstance(task, str):
            raise DataError(f"{where}: task must be a string (the name evaluation groups scores by), got "
                            f"{json_type(task)}")
        example = Example(np.asarray(ids, dtype=np.int64), np.asarray(mask, dtype=bool), prompt, reference,
                          task, where)
        if example.targets == 0:
            stats["no_target"] += 1
            continue
        examples.append(example)
    if not examples:
        raise DataError(f"{path}: no usable examples ({stats['records']} records read, {stats['no_target']} "
                        "with nothing to learn within seq_len)")
    return examples


def hold_out(examples: list, fraction: float, seed: int) -> tuple[list, list]:
    """(train, val): a seeded `fraction` of `examples` held out; the rest keep their order."""
    order = np.random.default_rng((seed, 5)).permutation(len(examples))
    n_val = int(len(examples) * fraction)
    return [examples[i] for i in sorted(order[n_val:])], [examples[i] for i in order[:n_val]]


def epoch_batch(count: int, first: int, size: int, seed: tuple[int, ...]) -> list[int]:
    """Items [first, first + size) of the endless sequence epoch 0, epoch 1, ... of `count` items, each
    epoch a permutation seeded by (*seed, epoch): a pure function of `first`, so a resumed run sees the
    same batches."""
    out: list[int] = []
    while len(out) < size:
        epoch, at = divmod(first + len(out), count)
        out += np.random.default_rng((*seed, epoch)).permutation(count)[at:at + size - len(out)].tolist()
    return out


def pack(lengths: list[int], order: np.ndarray, seq_len: int) -> list[list[int]]:
    """Rows of example indices, filled in `order` while the next example's `lengths` fits in seq_len."""
    rows, row, used = [], [], 0
    for i in order.tolist():
        if row and used + lengths[i] > seq_len:
            rows.append(row)
            row, used = [], 0
        row.append(i)
        used += lengths[i]
    return rows + ([row] if row else [])


class Batches:
    """Training rows as a pure function of their index: batch k of the run covers rows
    [k B, (k + 1) B) of the endless sequence epoch 0, epoch 1, ..., each epoch a fresh seeded
    shuffle of the examples (packed when asked). So a resumed run sees exactly the same batches."""

    def __init__(self, examples: list[Example], seq_len: int, batch_size: int, *, packed: bool, seed: int,
                 pad_id: int = 0):
        self.examples, self.seq_len, self.batch_size = examples, seq_len, batch_size
        self.packed, self.seed, self.pad_id = packed, seed, pad_id
        self._lengths = [len(e.ids) - 1 for e in examples]  # input positions an example takes
        self._epochs: dict[int, list[list[int]]] = {}
        self._counts: dict[int, int] = {}

    def epoch_rows(self, epoch: int) -> list[list[int]]:
        """Rows of example indices for one epoch (only the latest epoch is kept: batches advance in order)."""
        if epoch not in self._epochs:
            order = np.random.default_rng((self.seed, 3, epoch)).permutation(len(self.examples))
            rows = pack(self._lengths, order, self.seq_len) if self.packed else [[i] for i in order.tolist()]
            self._epochs = {epoch: rows}
            self._counts[epoch] = len(rows)
        return self._epochs[epoch]

    def _count(self, epoch: int) -> int:
        return self._counts[epoch] if epoch in self._counts else len(self.epoch_rows(epoch))

    @property
    def rows_per_epoch(self) -> int:
        """Rows in the first epoch (later ones differ by a few when packing)."""
        return self._count(0)

    def rows(self, index: int) -> list[list[int]]:
        """The rows of batch `index`; an epoch boundary may fall inside a batch."""
        first, epoch = index * self.batch_size, 0
        while first >= self._count(epoch):
            first -= self._count(epoch)
            epoch += 1
        out: list[list[int]] = []
        while len(out) < self.batch_size:
            out += self.epoch_rows(epoch)[first:first + self.batch_size - len(out)]
            epoch, first = epoch + 1, 0
        return out

    def epoch_of(self, index: int) -> float:
        """Epochs completed after batch `index` (by the first epoch's row count)."""
        return (index + 1) * self.batch_size / self.rows_per_epoch

    def first_epoch(self, max_batches: int, device: torch.device) -> Iterator[dict[str, torch.Tensor]]:
        """Up to `max_batches` batches of the first epoch, each row once and the last batch possibly
        short: what evaluation reads, the same every time."""
        rows = self.epoch_rows(0)[:max_batches * self.batch_size]
        for i in range(0, len(rows), self.batch_size):
            yield collate([[self.examples[j] for j in row] for row in rows[i:i + self.batch_size]], self.seq_len,
                          self.packed, self.pad_id, device)

    def batch(self, index: int, device: torch.device) -> dict[str, torch.Tensor]:
        return collate([[self.examples[i] for i in row] for row in self.rows(index)], self.seq_len,
                       self.packed, self.pad_id, device)


def collate(rows: list[list[Example]], seq_len: int, packed: bool, pad_id: int,
            device: torch.device) -> dict[str, torch.Tensor]:
    """Model inputs for rows of examples: input_ids, targets (-100 where nothing trains) and
    segment_ids (k for the k-th example of a row, 0 for padding), each (B, T). Packed rows are
    seq_len long; unpacked ones as long as the longest example in the batch."""
    width = seq_len if packed else max(sum(len(e.ids) - 1 for e in row) for row in rows)
    ids = np.full((len(rows), width), pad_id, dtype=np.int64)
    targets = np.full((len(rows), width), IGNORE, dtype=np.int64)
    segments = np.zeros((len(rows), width), dtype=np.int64)
    for r, row in enumerate(rows):
        at = 0
        for k, e in enumerate(row, 1):
            n = len(e.ids) - 1
            ids[r, at:at + n] = e.ids[:-1]
            targets[r, at:at + n] = np.where(e.mask[1:], e.ids[1:], IGNORE)
            segments[r, at:at + n] = k
            at += n
    batch = {"input_ids": ids, "targets": targets, "segment_ids": segments}
    return {k: torch.from_numpy(v).to(device, non_blocking=True) for k, v in batch.items()}
