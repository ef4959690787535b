"""Task models on task examples: encoding, predicting, scoring.

What task fine-tuning validates with (`llmlab finetune task=...`) and what `llmlab eval` scores a
fine-tuned model with, so both give the same numbers:

- `TaskRows` encodes examples (`llmlab.data.tasks`) as model rows: [CLS] text [SEP] (a pair or a
  question and its context: [CLS] a [SEP] b [SEP], token types 0 and 1) for an encoder, the
  source with EOS for T5; a context longer than the window becomes several windows that overlap
  by `doc_stride` tokens, at most half a window (BERT's SQuAD recipe), each a row;
- `head_logits` runs an encoder's head over rows in batches (with the loss from the same logits);
- `predict_*` turn logits into predictions: a label, a tag per word (its first piece's), the best
  answer span over an example's windows, or the null answer when it scores higher (SQuAD 2.0);
- `classification_scores`, `tagging_scores`, `qa_scores`: accuracy and macro F1; seqeval's
  entity F1, precision and recall; SQuAD's exact match and F1 against any of the answers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from llmlab.common import LlmlabError
from llmlab.data.tasks import align_tags, answer_token_span, best_span, word_predictions
from llmlab.eval.metrics import classification_report, squad_exact_match, token_f1
from llmlab.eval.seqeval import entity_scores

IGNORE = -100
HEAD_OF_TASK = {"classify": "classify", "tokens": "tokens", "span": "span"}


@dataclass
class Row:
    """One input window as the model reads it, and what scoring it needs."""

    input_ids: list[int]
    types: list[int]
    target: object  # classify: label; tokens: per-token tags; span: (start, end); seq2seq: target ids
    meta: dict  # "example": the index of its example, and what its task's scoring reads


def frame_ids(tokenizer) -> tuple[int, int] | tuple[None, None]:
    """The ids an encoder's text sits between: BERT's [CLS] and [SEP], else RoBERTa's <s> and </s>;
    (None, None) when the tokenizer has neither pair."""
    for first, last in ((tokenizer.cls_id, tokenizer.sep_id), (tokenizer.bos_id, tokenizer.eos_id)):
        if first is not None and last is not None:
            return first, last
    return None, None


class TaskRows:
    """Encodes the examples of one task for a model: `task` is classify, tokens, span or seq2seq."""

    def __init__(self, task: str, tokenizer, seq_len: int, *, max_target: int | None = None, doc_stride: int = 128):
        self.task, self.tok, self.seq_len, self.doc_stride = task, tokenizer, seq_len, doc_stride
        self.pad = tokenizer.pad_id if tokenizer.pad_id is not None else 0
        if task == "seq2seq":
            self.eos, self.max_target = tokenizer.eos_id, max_target
            return
        self.cls, self.sep = frame_ids(tokenizer)
        if self.cls is None:
            raise LlmlabError(f"task={task} frames texts as [CLS] ... [SEP]; the tokenizer has neither [CLS]/[SEP] "
                              "nor <s>/</s>")

    def rows(self, examples: Sequence) -> list[Row]:
        """Every example's rows, in order (an example of task span may give several)."""
        encode = {"classify": self._classify, "tokens": self._tokens, "span": self._span,
                  "seq2seq": self._seq2seq}[self.task]
        out = []
        for i, e in enumerate(examples):
            for row in encode(e):
                row.meta["example"] = i
                out.append(row)
        return out

    def frame(self, first: list[int], second: list[int] | None = None) -> tuple[list[int], list[int]]:
        """[CLS] first [SEP] (second [SEP]) within seq_len: the longer part is cut at its end."""
        room = self.seq_len - (3 if second is not None else 2)
        second = list(second) if second is not None else None
        first = list(first)
        while len(first) + len(second or []) > room:
            (first if second is None or len(first) > len(second) else second).pop()
        ids = [self.cls, *first, self.sep]
        types = [0] * len(ids)
        if second is not None:
            ids += [*second, self.sep]
            types += [1] * (len(second) + 1)
        return ids, types

    def _classify(self, e) -> list[Row]:
        pair = self.tok.encode(e.text_pair) if e.text_pair is not None else None
        ids, types = self.frame(self.tok.encode(e.text), pair)
        return [Row(ids, types, e.label, {"label": e.label})]

    def _tokens(self, e) -> list[Row]:
        pieces, word_ids = [], []
        for w, word in enumerate(e.tokens):
            encoded = self.tok.encode(word) or [self.tok.unk_id if self.tok.unk_id is not None else self.pad]
            pieces += encoded
            word_ids += [w] * len(encoded)
        ids, types = self.frame(pieces)
        word_ids = [None, *word_ids[:len(ids) - 2], None]
        return [Row(ids, types, align_tags(e.tags, word_ids), {"tags": e.tags, "word_ids": word_ids})]

    def _span(self, e) -> list[Row]:
        """[CLS] question [SEP] window [SEP] for each window of the context: windows of the room the
        question leaves, each starting `doc_stride` tokens (at most half a window) before the previous
        one ended."""
        question = self.tok.encode(e.question)
        encoding = self.tok.backend.encode(e.context, add_special_tokens=False)
        room = self.seq_len - 3 - len(question)
        if room < 1:
            raise LlmlabError(f"{e.where}: the question fills the {self.seq_len}-token window")
        step = room - min(self.doc_stride, room // 2)  # >= 1: a long stride never means a window per token
        answer = None if e.is_impossible or not e.answers else (e.answer_starts[0],
                                                                 e.answer_starts[0] + len(e.answers[0]))
        rows, n = [], len(encoding.ids)
        for begin in range(0, max(n, 1), step):
            context = encoding.ids[begin:begin + room]
            offsets = [tuple(o) for o in encoding.offsets[begin:begin + room]]
            ids, types = self.frame(question, context)
            full = [None] * (len(question) + 2) + offsets + [None]  # the window's tokens sit after [CLS] q [SEP]
            start, end = answer_token_span(full, answer)
            rows.append(Row(ids, types, (start, end), {"offsets": full}))
            if begin + room >= n:
                break
        return rows

    def _seq2seq(self, e) -> list[Row]:
        source = self.tok.encode(e.source)[:self.seq_len - (self.eos is not None)]
        target = self.tok.encode(e.target)
        end = [self.eos] if self.eos is not None else []
        if len(target) + len(end) > self.max_target:
            raise LlmlabError(f"{e.where}: the target is {len(target) + len(end)} tokens, more than the model's "
                              f"max_target_len={self.max_target}")
        return [Row(source + end, [], target + end, {})]

    def collate(self, rows: list[Row], device: torch.device) -> dict:
        """A padded batch: input_ids, attention_mask, token_type_ids (encoders) and targets."""
        width = max(len(r.input_ids) for r in rows)
        ids = torch.full((len(rows), width), self.pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, :len(r.input_ids)] = torch.tensor(r.input_ids)
            mask[i, :len(r.input_ids)] = 1
        out = {"input_ids": ids, "attention_mask": mask}
        if self.task == "seq2seq":
            length = max(len(r.target) for r in rows)
            targets = torch.full((len(rows), length), IGNORE, dtype=torch.long)
            for i, r in enumerate(rows):
                targets[i, :len(r.target)] = torch.tensor(r.target)
        else:
            types = torch.zeros((len(rows), width), dtype=torch.long)
            for i, r in enumerate(rows):
                types[i, :len(r.types)] = torch.tensor(r.types)
            out["token_type_ids"] = types
            if self.task == "tokens":
                targets = torch.full((len(rows), width), IGNORE, dtype=torch.long)
                for i, r in enumerate(rows):
                    targets[i, :len(r.target)] = torch.tensor(r.target)
            else:
                targets = torch.tensor([r.target for r in rows], dtype=torch.long)
        out["targets"] = targets
        return {k: v.to(device) for k, v in out.items()}

    def units(self, batch: dict) -> int:
        """What a batch's mean loss is over: its predicted tokens (tokens, seq2seq) or its rows."""
        targets = batch["targets"]
        return int((targets != IGNORE).sum()) if self.task in ("tokens", "seq2seq") else len(targets)


# --------------------------------------------------------------------------- predictions


@torch.no_grad()
def head_logits(model, encoder: TaskRows, rows: list[Row], batch_size: int,
                device: torch.device) -> tuple[float, int, list[torch.Tensor]]:
    """(summed loss, units, each row's logits on the CPU) of an encoder's head over `rows`: one
    forward per batch gives the logits and, through `head_loss`, the loss."""
    total, units, logits = 0.0, 0, []
    for i in range(0, len(rows), batch_size):
        batch = encoder.collate(rows[i:i + batch_size], device)
        out = model(**{k: v for k, v in batch.items() if k != "targets"})
        n = encoder.units(batch)
        total += float(model.head_loss(out, batch["targets"])) * n
        units += n
        logits += list(out.float().cpu())
    return total, units, logits


def predict_labels(logits: list[torch.Tensor]) -> list[int]:
    return [int(p.argmax()) for p in logits]


def predict_tags(rows: list[Row], logits: list[torch.Tensor]) -> list[list[int]]:
    """Each sentence's tag index per word (its first piece's); words cut off by the window are absent."""
    return [word_predictions(p[:len(r.input_ids)].argmax(-1).tolist(), r.meta["word_ids"])
            for r, p in zip(rows, logits)]


def predict_answers(rows: list[Row], logits: list[torch.Tensor], contexts: Sequence[str], *,
                    allow_null: bool) -> list[str]:
    """Each example's answer text: the best span over its windows (start + end logits), or "" when
    `allow_null` and the smallest null score ([CLS]'s start + end) of its windows beats it."""
    best: dict[int, tuple[float, str]] = {}
    null: dict[int, float] = {}
    for r, p in zip(rows, logits):
        i, n = r.meta["example"], len(r.input_ids)
        span = best_span(p[:n, 0], p[:n, 1], r.meta["offsets"])
        null[i] = min(null.get(i, float("inf")), float(p[0, 0] + p[0, 1]))
        if span is not None and span.score > best.get(i, (-float("inf"), ""))[0]:
            best[i] = (span.score, contexts[i][span.start_char:span.end_char])
    out = []
    for i in range(len(contexts)):
        score, text = best.get(i, (-float("inf"), ""))
        out.append("" if allow_null and null.get(i, -float("inf")) > score else text)
    return out


# --------------------------------------------------------------------------- scores


def classification_scores(golds: Sequence[str], preds: Sequence[str]) -> dict[str, float]:
    report = classification_report(list(golds), list(preds))
    return {"accuracy": report["accuracy"], "macro_f1": report["macro_f1"]}


def tagging_scores(golds: Sequence[Sequence[str]], preds: Sequence[Sequence[str]]) -> dict[str, float]:
    """Entity F1, precision and recall (seqeval's rules) and the accuracy of word tags; a sentence
    cut by the window is scored on the words it kept."""
    golds = [list(g)[:len(p)] for g, p in zip(golds, preds)]
    report = entity_scores(golds, [list(p) for p in preds])
    return {"entity_f1": report["f1"], "precision": report["precision"], "recall": report["recall"],
            "tag_accuracy": report["accuracy"]}


def qa_scores(prediction: str, answers: Sequence[str]) -> tuple[float, float]:
    """(exact match, F1) of one answer against the best of the gold answers; no gold answer means
    the question is unanswerable and only "" is right."""
    answers = list(answers) or [""]
    return (max(float(squad_exact_match(prediction, a)) for a in answers),
            max(token_f1(prediction, a) for a in answers))
