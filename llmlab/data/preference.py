"""Alignment data: preference pairs and prompt-only sets, rendered with the model's chat template.

Preference records (`.json` / `.jsonl`, or folders of them), each a prompt with a chosen and a
rejected answer, in any of:
- `{"prompt": str, "chosen": str, "rejected": str}` (+ optional `system`, `task`);
- TRL's conversational form: `prompt` a list of messages, `chosen` / `rejected` lists holding the
  assistant's message;
- messages pairs: `chosen` and `rejected` whole conversations that differ only in the last
  assistant message (what comes before it is the prompt);
- HH-RLHF: `chosen` and `rejected` strings of "\\n\\nHuman: ... \\n\\nAssistant: ..." turns.
Each answer is rendered after the prompt by the chat template, and only the answer's tokens (its
end of turn and EOS included) are scored, as in instruction tuning.

Prompt-only records for rewards a program checks: `{"prompt": str | messages, "answer": str, "task"}`;
preference records (answer: the chosen one) and Alpaca records (answer: the output) serve too.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from llmlab.data import DataError
from llmlab.data.ingest import json_type
from llmlab.data.sft import IGNORE, epoch_batch, read_records, record_messages
from llmlab.tokenizer.chat import ChatTemplate, ChatTemplateError, check_messages, encode_chat

HUMAN, ASSISTANT = "\n\nHuman: ", "\n\nAssistant: "


@dataclass
class PreferencePair:
    prompt: list[dict]  # messages before the answers (ends with a user turn)
    chosen: str
    rejected: str
    where: str  # file:line
    task: str | None = None


@dataclass
class PairExample:
    chosen_ids: np.ndarray  # int64 (n,): prompt + chosen answer, rendered by the chat template
    chosen_mask: np.ndarray  # bool (n,): True on the answer's tokens
    rejected_ids: np.ndarray
    rejected_mask: np.ndarray
    prompt: list[dict]
    chosen: str
    rejected: str
    where: str
    task: str | None = None


@dataclass
class PromptExample:
    prompt_ids: np.ndarray  # the rendered prompt, generation prompt included
    prompt: list[dict]
    answer: str | None  # the reference answer a checker compares with
    task: str | None
    where: str


# --------------------------------------------------------------------------- reading


def _task(record: dict, where: str) -> str | None:
    task = record.get("task")
    if task is not None and not isinstance(task, str):
        raise DataError(f"{where}: task must be a string, got {json_type(task)}")
    return task


def _messages(value, where: str, field: str) -> list[dict]:
    try:
        return check_messages(value, f"{where}: {field}")
    except ChatTemplateError as e:
        raise DataError(str(e)) from None


def _hh_turns(text: str, where: str, field: str) -> list[dict]:
    """An HH-RLHF transcript as messages."""
    if not text.startswith(HUMAN):
        raise DataError(f"{where}: {field}: an HH-RLHF transcript starts with {HUMAN!r}")
    turns, rest = [], text
    while rest:
        role = "user" if rest.startswith(HUMAN) else "assistant"
        rest = rest[len(HUMAN if role == "user" else ASSISTANT):]
        ends = [i for i in (rest.find(HUMAN), rest.find(ASSISTANT)) if i >= 0]
        cut = min(ends) if ends else len(rest)
        turns.append({"role": role, "content": rest[:cut]})
        rest = rest[cut:]
    if turns[-1]["role"] != "assistant":
        raise DataError(f"{where}: {field}: the transcript does not end with an Assistant turn")
    return turns


def _split_pair(chosen: list[dict], rejected: list[dict], where: str) -> tuple[list[dict], str, str]:
    """(prompt, chosen answer, rejected answer) of two conversations that share all but the last answer."""
    for field, conv in (("chosen", chosen), ("rejected", rejected)):
        if conv[-1]["role"] != "assistant" or len(conv) < 2:
            raise DataError(f"{where}: {field}: the conversation must end with an assistant message after a prompt")
    if chosen[:-1] != rejected[:-1]:
        raise DataError(f"{where}: chosen and rejected must share everything but the last assistant message")
    return chosen[:-1], chosen[-1]["content"], rejected[-1]["content"]


def pair_of(record: dict, where: str) -> PreferencePair:
    """The preference pair a record holds (any of the module's formats)."""
    if "chosen" not in record or "rejected" not in record:
        raise DataError(f"{where}: a preference record needs 'chosen' and 'rejected' (and usually 'prompt'); got "
                        f"keys {sorted(record)}")
    chosen, rejected, prompt = record["chosen"], record["rejected"], record.get("prompt")
    task = _task(record, where)
    if prompt is None:  # messages pairs or HH-RLHF transcripts
        if isinstance(chosen, str) and isinstance(rejected, str):
            chosen, rejected = _hh_turns(chosen, where, "chosen"), _hh_turns(rejected, where, "rejected")
        elif not (isinstance(chosen, list) and isinstance(rejected, list)):
            raise DataError(f"{where}: without a prompt, chosen and rejected must both be conversations (lists of "
                            f"messages) or HH-RLHF transcripts (strings); got {json_type(chosen)} and "
                            f"{json_type(rejected)}")
        prompt, a, b = _split_pair(_messages(chosen, where, "chosen"), _messages(rejected, where, "rejected"), where)
        return PreferencePair(prompt, a, b, where, task)
    messages = _prompt_messages(record, where)
    answers = []
    for field, value in (("chosen", chosen), ("rejected", rejected)):
        if isinstance(value, list):
            turns = _messages(value, where, field)
            if len(turns) != 1 or turns[0]["role"] != "assistant":
                raise DataError(f"{where}: {field}: expected one assistant message, got {len(turns)} message(s)")
            value = turns[0]["content"]
        elif not isinstance(value, str):
            raise DataError(f"{where}: {field}: expected a string or a list of messages, got {json_type(value)}")
        answers.append(value)
    return PreferencePair(messages, answers[0], answers[1], where, task)


def _prompt_messages(record: dict, where: str) -> list[dict]:
    prompt = record["prompt"]
    if isinstance(prompt, list):
        messages = _messages(prompt, where, "prompt")
    elif isinstance(prompt, str):
        messages = [{"role": "user", "content": prompt}]
    else:
        raise DataError(f"{where}: prompt: expected a string or a list of messages, got {json_type(prompt)}")
    system = record.get("system")
    if system is not None:
        if not isinstance(system, str):
            raise DataError(f"{where}: system: expected a string, got {json_type(system)}")
        if system and messages[0]["role"] != "system":
            messages = [{"role": "system", "content": system}, *messages]
    if messages[-1]["role"] != "user":
        raise DataError(f"{where}: prompt: the last message must be the user's, got {messages[-1]['role']!r}")
    return messages


def read_pairs(path: str | os.PathLike) -> Iterator[PreferencePair]:
    """Every preference pair of `path` (a file or a folder of .json/.jsonl files)."""
    for where, record in read_records(path):
        yield pair_of(record, where)


def read_prompts(path: str | os.PathLike) -> Iterator[tuple[str, list[dict], str | None, str | None]]:
    """(where, prompt messages, answer, task) of every prompt record, preference record (answer: the
    chosen one) or Alpaca record (answer: the output) of `path`."""
    for where, record in read_records(path):
        task = _task(record, where)
        if "chosen" in record:
            pair = pair_of(record, where)
            yield where, pair.prompt, pair.chosen, task
        elif "prompt" in record:
            answer = record.get("answer")
            if answer is not None and not isinstance(answer, str):
                raise DataError(f"{where}: answer: expected a string, got {json_type(answer)}")
            yield where, _prompt_messages(record, where), answer, task
        elif "instruction" in record:
            messages = record_messages(record, where)
            yield where, messages[:-1], messages[-1]["content"], task
        else:
            raise DataError(f"{where}: expected a prompt record (prompt, answer), a preference record (prompt, "
                            f"chosen, rejected) or an Alpaca record; got keys {sorted(record)}")


# --------------------------------------------------------------------------- tokenizing


def build_pairs(path: str | os.PathLike, tokenizer, template: ChatTemplate, seq_len: int,
                stats: Counter | None = None) -> list[PairExample]:
    """Tokenize every pair of `path`. Skipped and counted in `stats`: identical answers ("identical"),
    an empty answer ("empty_response"), a prompt that leaves no answer token within seq_len + 1
    ("prompt_too_long"). Longer pairs are cut to seq_len + 1 tokens ("truncated")."""
    stats = Counter() if stats is None else stats
    out = []
    for pair in read_pairs(path):
        stats["records"] += 1
        if not pair.chosen.strip() or not pair.rejected.strip():
            stats["empty_response"] += 1
            continue
        if pair.chosen == pair.rejected:
            stats["identical"] += 1
            continue
        encoded = []
        for answer in (pair.chosen, pair.rejected):
            try:
                ids, mask = encode_chat(template, tokenizer, [*pair.prompt, {"role": "assistant", "content": answer}],
                                        source=f"{pair.where}: messages")
            except ChatTemplateError as e:
                raise DataError(str(e)) from None
            encoded.append((np.asarray(ids, dtype=np.int64), np.asarray(mask, dtype=bool)))
        (c_ids, c_mask), (r_ids, r_mask) = encoded
        prompt_len = int(np.argmax(c_mask))
        if prompt_len != int(np.argmax(r_mask)) or not np.array_equal(c_ids[:prompt_len], r_ids[:prompt_len]):
            raise DataError(f"{pair.where}: the chat template renders the prompt differently before the two answers")
        if prompt_len >= seq_len:  # no answer token would be a target
            stats["prompt_too_long"] += 1
            continue
        if max(len(c_ids), len(r_ids)) > seq_len + 1:
            stats["truncated"] += 1
            c_ids, c_mask, r_ids, r_mask = (a[:seq_len + 1] for a in (c_ids, c_mask, r_ids, r_mask))
        out.append(PairExample(c_ids, c_mask, r_ids, r_mask, pair.prompt, pair.chosen, pair.rejected, pair.where,
                               pair.task))
    if not out:
        raise DataError(f"{path}: no usable preference pairs ({_counts(stats)})")
    return out


def build_prompts(path: str | os.PathLike, tokenizer, template: ChatTemplate, max_prompt_len: int,
                  stats: Counter | None = None) -> list[PromptExample]:
    """Tokenize every prompt of `path` with the generation prompt; prompts longer than max_prompt_len
    tokens are skipped and counted (stats["prompt_too_long"])."""
    stats = Counter() if stats is None else stats
    records = list(read_prompts(path))
    try:
        texts = template.render_many([(m, True) for _, m, _, _ in records])
    except ChatTemplateError as e:
        raise DataError(f"{path}: {e}") from None
    out = []
    for (where, messages, answer, task), text in zip(records, texts):
        stats["records"] += 1
        ids = np.asarray(tokenizer.encode(text), dtype=np.int64)
        if len(ids) > max_prompt_len:
            stats["prompt_too_long"] += 1
            continue
        if len(ids) == 0:
            stats["empty_prompt"] += 1
            continue
        out.append(PromptExample(ids, messages, answer, task, where))
    if not out:
        raise DataError(f"{path}: no usable prompts ({_counts(stats)}; prompts may take {max_prompt_len} tokens)")
    return out


def _counts(stats: Counter) -> str:
    return ", ".join(f"{n:,} {k.replace('_', ' ')}" for k, n in stats.items()) or "no records"


# --------------------------------------------------------------------------- batches


def collate_pairs(pairs: list[PairExample], pad_id: int, device: torch.device | str = "cpu",
                  index: list[int] | None = None) -> dict[str, torch.Tensor]:
    """Model inputs for B pairs: input_ids and targets (2B, T), the chosen rows first and the rejected
    rows after, right-padded (targets -100 off the answers); sequences (2B, T + 1), the whole rows (what
    a reward model scores); lengths (2B,), the real tokens of each; index (B,), the pairs' positions in
    their set when given."""
    rows = [(p.chosen_ids, p.chosen_mask) for p in pairs] + [(p.rejected_ids, p.rejected_mask) for p in pairs]
    width = max(len(ids) for ids, _ in rows) - 1
    sequences = np.full((len(rows), width + 1), pad_id, dtype=np.int64)
    targets = np.full((len(rows), width), IGNORE, dtype=np.int64)
    lengths = np.zeros(len(rows), dtype=np.int64)
    for r, (ids, mask) in enumerate(rows):
        n = len(ids) - 1
        sequences[r, :n + 1] = ids
        targets[r, :n] = np.where(mask[1:], ids[1:], IGNORE)
        lengths[r] = len(ids)
    batch = {"input_ids": sequences[:, :-1], "sequences": sequences, "targets": targets, "lengths": lengths}
    if index is not None:
        batch["index"] = np.asarray(index, dtype=np.int64)
    return {k: torch.from_numpy(v).to(device) for k, v in batch.items()}


class PairBatches:
    """Batches of pairs as a pure function of their index: batch k holds items [k B, (k + 1) B) of the
    endless sequence epoch 0, epoch 1, ..., each epoch a seeded shuffle; a resumed run sees the same."""

    def __init__(self, pairs: list[PairExample], batch_size: int, *, seed: int, pad_id: int = 0):
        self.pairs, self.batch_size, self.seed, self.pad_id = pairs, batch_size, seed, pad_id

    @property
    def rows_per_epoch(self) -> int:
        return len(self.pairs)

    def indices(self, index: int) -> list[int]:
        return epoch_batch(len(self.pairs), index * self.batch_size, self.batch_size, (self.seed, 9))

    def batch(self, index: int, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        chosen = self.indices(index)
        return collate_pairs([self.pairs[i] for i in chosen], self.pad_id, device, chosen)

    def first_epoch(self, max_batches: int, device: torch.device | str = "cpu") -> Iterator[dict[str, torch.Tensor]]:
        """Up to `max_batches` batches in the set's own order, each pair once (the last batch may be short)."""
        for start in range(0, min(len(self.pairs), max_batches * self.batch_size), self.batch_size):
            chosen = list(range(start, min(start + self.batch_size, len(self.pairs))))
            yield collate_pairs([self.pairs[i] for i in chosen], self.pad_id, device, chosen)

    def epoch_of(self, index: int) -> float:
        return (index + 1) * self.batch_size / len(self.pairs)
