"""Encoders and encoder-decoders answering the evaluator's requests.

`Seq2SeqLM` (T5, mT5): a context is the encoder's input and a continuation the decoder's output,
both ending with EOS as T5 frames them (lm-evaluation-harness scores a seq2seq model the same
way: the answer and its end). A continuation longer than the decoder's `max_target_len` is scored
in pieces, each conditioned (through the encoder) on all the text before it that fits; a rolling
log-likelihood is such a continuation of an empty input. Generation runs the encoder-decoder
scheduler.

`EncoderLM` (BERT, RoBERTa, ALBERT):
- with its masked-LM head, a continuation is scored by its pseudo-log-likelihood (Salazar et al.
  2020, "Masked Language Model Scoring"): each of its tokens masked in turn and predicted from
  everything else in [CLS] context continuation [SEP]; a text longer than the window is scored
  in pieces of half a window, each with as much of the text before it as fits. `fill_mask`
  predicts the tokens of a word that a `[MASK]` stands for;
- with a task head (`llmlab finetune task=classify|tokens|span`), it answers the task files of
  its task through `llmlab.eval.heads`: labels, tags and answer spans, named by the model's
  `labels.json`.
An encoder does not generate text: generation tasks are refused by name.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch

from llmlab.eval.heads import (HEAD_OF_TASK, TaskRows, frame_ids, head_logits, predict_answers, predict_labels,
                               predict_tags)
from llmlab.eval.lm import TOKEN_BUDGET, EvalError, LocalLM, move_whitespace, sum_scores
from llmlab.generate.engine import Score

MASK = "[MASK]"  # what a fill-mask task's text holds in place of its answer


def model_labels(folder: Path) -> list[str] | None:
    """The label (tag) names of a task model by index, from its labels.json; None without one."""
    value = _json(folder / "labels.json")
    if value is None:
        return None
    if not isinstance(value, list) or not value or not all(isinstance(x, str) for x in value):
        raise EvalError(f"{folder / 'labels.json'}: must list the model's label names (strings), by index")
    if len(set(value)) != len(value):
        twice = next(x for x in value if value.count(x) > 1)
        raise EvalError(f"{folder / 'labels.json'}: label {twice!r} is listed twice")
    return value


def model_framing(folder: Path, seq_len: int) -> tuple[int, int]:
    """(seq_len, doc_stride) that a task model's rows were framed with, from its task.json (written by
    task fine-tuning); without one, the model's window and a quarter of it."""
    value = _json(folder / "task.json") or {}
    if not isinstance(value, dict):
        raise EvalError(f"{folder / 'task.json'}: must be a JSON object")
    framed, stride = value.get("seq_len", seq_len), value.get("doc_stride", seq_len // 4)
    for name, v in (("seq_len", framed), ("doc_stride", stride)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise EvalError(f"{folder / 'task.json'}: {name} must be an integer >= 0, got {v!r}")
    return min(framed, seq_len) or seq_len, stride


def _json(path: Path):
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise EvalError(f"{path}: cannot be read as JSON ({e})") from None


class Seq2SeqLM(LocalLM):
    """An encoder-decoder and its tokenizer (see the module docstring)."""

    kind = "encoder-decoder"

    def __init__(self, model, tokenizer, **kwargs):
        super().__init__(model, tokenizer, **kwargs)
        if tokenizer.eos_id is None:
            raise EvalError("an encoder-decoder's tokenizer needs an EOS token (T5's </s>) to end its input")
        self.eos = tokenizer.eos_id
        self.source_len = int(model.config.max_seq_len)
        self.max_length = int(model.config.max_target_len)  # decoder tokens scored at once

    def loglikelihood(self, requests: Sequence[tuple[str, str]]) -> list[tuple[float, bool]]:
        pairs = []
        for context, continuation in requests:
            context, continuation = move_whitespace(context, continuation)
            pairs.append((self.encode(context), self.encode(continuation) + [self.eos]))
        return [(s.logprob, s.greedy) for s in self.score_tokens(pairs)]

    def loglikelihood_rolling(self, texts: Sequence[str]) -> list[float]:
        return [s.logprob for s in self.score_tokens([([], self.encode(t)) for t in texts])]

    def score_tokens(self, pairs: Sequence[tuple[list[int], list[int]]]) -> list[Score]:
        """log p(continuation | context) of token-id pairs: the context is the encoder's input; a long
        continuation is scored in pieces of max_target_len, each piece's input the text before it."""
        pieces, owner = [], []
        for i, (ctx, cont) in enumerate(pairs):
            if not cont:
                raise EvalError("a continuation encodes to no tokens; it cannot be scored")
            for start in range(0, len(cont), self.max_length):
                pieces.append((self._source(list(ctx) + list(cont[:start])), list(cont[start:start + self.max_length])))
                owner.append(i)
        return sum_scores(len(pairs), owner, self._score(pieces))

    @torch.inference_mode()
    def _score(self, pieces: list[tuple[list[int], list[int]]]) -> list[Score]:
        """Teacher-forced scores of (encoder input, target) pairs, in batches; pairs with the same input
        share one pass of the encoder."""
        model, device = self.model, next(self.model.parameters()).device
        order = sorted(range(len(pieces)), key=lambda i: -(len(pieces[i][0]) + len(pieces[i][1])))
        out: list = [None] * len(pieces)
        for b in _batches(order, lambda i: len(pieces[i][0]) + len(pieces[i][1]), self.batch_size):
            row_of = {s: r for r, s in enumerate(dict.fromkeys(tuple(pieces[i][0]) for i in b))}
            sources = list(row_of)
            width = max(len(s) for s in sources)
            ids = torch.zeros(len(sources), width, dtype=torch.long)
            mask = torch.zeros(len(sources), width, dtype=torch.long)
            for r, s in enumerate(sources):
                ids[r, :len(s)], mask[r, :len(s)] = torch.tensor(s), 1
            encoded = model.encode(ids.to(device), mask.to(device))
            rows = torch.tensor([row_of[tuple(pieces[i][0])] for i in b], device=device)
            length = max(len(pieces[i][1]) for i in b)
            targets = torch.full((len(b), length), -100, dtype=torch.long)
            for r, i in enumerate(b):
                targets[r, :len(pieces[i][1])] = torch.tensor(pieces[i][1])
            targets = targets.to(device)
            hidden = model.decode(model.shift_right(targets), encoded[rows], mask.to(device)[rows])
            logp = model.logits(hidden).float().log_softmax(-1)  # (R, L, V)
            for r, i in enumerate(b):
                n = len(pieces[i][1])
                want = targets[r, :n]
                lps = logp[r, :n].gather(-1, want[:, None]).squeeze(-1)
                out[i] = Score(float(lps.sum()), bool((logp[r, :n].argmax(-1) == want).all()), lps.tolist())
        return out

    @property
    def generation_room(self) -> int:
        return self.max_length  # the decoder's own limit: the input does not share it

    def prompt_ids(self, context: str, max_new: int) -> list[int]:
        return self._source(self.encode(context))

    def _source(self, ids: list[int]) -> list[int]:
        """The encoder's input for the text `ids`: its newest tokens that fit, then EOS."""
        return (ids[-(self.source_len - 1):] if self.source_len > 1 else []) + [self.eos]


class EncoderLM(LocalLM):
    """A bidirectional encoder and its tokenizer (see the module docstring)."""

    kind = "encoder"

    def __init__(self, model, tokenizer, *, batch_size: int = 32, name: str = "model", hash: str | None = None,
                 seed: int = 1234, labels: list[str] | None = None, framing: tuple[int, int] | None = None):
        self.model, self.tokenizer, self.template = model.eval(), tokenizer, None
        self.batch_size, self.name, self.hash, self.seed = batch_size, name, hash, seed
        cfg = model.config
        self.head, self.labels, self.seq_len = cfg.head, labels, int(cfg.max_seq_len)
        # a task head reads rows as fine-tuning framed them: that window and doc stride
        self.task_len, self.doc_stride = framing or (self.seq_len, self.seq_len // 4)
        self.cls, self.sep = frame_ids(tokenizer)  # as task fine-tuning frames a text
        if self.cls is None:
            raise EvalError("an encoder's tokenizer needs [CLS] and [SEP] (or <s> and </s>) to frame a text")
        self.max_length = self.seq_len - 2  # tokens between [CLS] and [SEP]
        self.prefix_id = self.cls

    # ------------------------------------------------------------------ masked-LM scoring

    def _need_mlm(self, what: str) -> None:
        if self.head != "mlm":
            raise EvalError(f"{what} needs the masked-LM head; this encoder has the {self.head} head of a fine-tuned "
                            "task (score it on a task file of its task)")
        if self.tokenizer.mask_id is None:
            raise EvalError(f"{what} masks tokens, but the tokenizer has no [MASK] (or <mask>) token")

    def loglikelihood(self, requests: Sequence[tuple[str, str]]) -> list[tuple[float, bool]]:
        self._need_mlm("log-likelihood scoring")
        pairs = []
        for context, continuation in requests:
            context, continuation = move_whitespace(context, continuation)
            ctx = self.encode(context)
            whole = self.encode(context + continuation)
            pairs.append((ctx, whole[len(ctx):] if whole[:len(ctx)] == ctx else self.encode(continuation)))
        return [(s.logprob, s.greedy) for s in self.score_tokens(pairs)]

    def loglikelihood_rolling(self, texts: Sequence[str]) -> list[float]:
        self._need_mlm("perplexity")
        return [s.logprob for s in self.score_tokens([([], self.encode(t)) for t in texts])]

    def score_tokens(self, pairs: Sequence[tuple[list[int], list[int]]]) -> list[Score]:
        """Pseudo-log-likelihoods of token-id (context, continuation) pairs (see the module docstring)."""
        self._need_mlm("log-likelihood scoring")
        for _, cont in pairs:
            if not cont:
                raise EvalError("a continuation encodes to no tokens; it cannot be scored")
        half = max(1, self.max_length // 2)
        pieces, owner = [], []
        for i, (ctx, cont) in enumerate(pairs):
            ctx, cont = list(ctx), list(cont)
            if len(cont) <= self.max_length:  # the context's newest tokens that fit beside it
                pieces.append((ctx[len(ctx) - (self.max_length - len(cont)):], cont))
                owner.append(i)
                continue
            for start in range(0, len(cont), half):  # pieces of half a window after the text before them
                piece = cont[start:start + half]
                pieces.append(((ctx + cont[:start])[-(self.max_length - len(piece)):], piece))
                owner.append(i)
        return sum_scores(len(pairs), owner, self._pll(pieces))

    @torch.inference_mode()
    def _pll(self, pairs: list[tuple[list[int], list[int]]]) -> list[Score]:
        """One copy of [CLS] context continuation [SEP] per continuation token, that token masked."""
        device = next(self.model.parameters()).device
        copies = [(p, j) for p in range(len(pairs)) for j in range(len(pairs[p][1]))]
        logprob: list[list[float]] = [[] for _ in pairs]
        greedy = [True] * len(pairs)
        width_of = lambda c: len(pairs[c[0]][0]) + len(pairs[c[0]][1]) + 2  # noqa: E731
        for b in _batches(copies, width_of, self.batch_size):
            width = max(width_of(c) for c in b)
            ids = torch.full((len(b), width), self.tokenizer.pad_id or 0, dtype=torch.long)
            mask = torch.zeros(len(b), width, dtype=torch.long)
            where, want = [], []
            for r, (p, j) in enumerate(b):
                ctx, cont = pairs[p]
                row = [self.cls, *ctx, *cont, self.sep]
                ids[r, :len(row)], mask[r, :len(row)] = torch.tensor(row), 1
                ids[r, 1 + len(ctx) + j] = self.tokenizer.mask_id
                where.append(1 + len(ctx) + j)
                want.append(cont[j])
            hidden = self.model.encode(ids.to(device), mask.to(device))
            at = hidden[torch.arange(len(b), device=device), torch.tensor(where, device=device)]
            logp = self.model.mlm_logits(at).float().log_softmax(-1)  # (R, V)
            wanted = torch.tensor(want, device=device)
            lps = logp.gather(-1, wanted[:, None]).squeeze(-1).tolist()
            hits = (logp.argmax(-1) == wanted).tolist()
            for (p, _), lp, hit in zip(b, lps, hits):
                logprob[p].append(lp)
                greedy[p] = greedy[p] and hit
        return [Score(sum(lp), g, lp) for lp, g in zip(logprob, greedy)]

    @torch.inference_mode()
    def fill_mask(self, requests: Sequence[tuple[str, str]], where: Sequence[str], k: int = 5) -> list[dict]:
        """For each (text holding one [MASK], answer): the answer's tokens in the text masked and
        predicted at once; {"prediction": the most likely tokens' text, "acc": every token right,
        "acc_top5": every token among its position's k most likely}."""
        self._need_mlm("fill-mask scoring")
        device = next(self.model.parameters()).device
        rows = []
        for (text, answer), w in zip(requests, where):
            start = text.index(MASK)
            full = text[:start] + answer + text[start + len(MASK):]
            enc = self.tokenizer.backend.encode(full, add_special_tokens=False)
            span = [t for t, (a, b) in enumerate(enc.offsets) if a < start + len(answer) and b > start]
            if not span:
                raise EvalError(f"{w}: the answer {answer!r} gives no token of its own in the text")
            if self.tokenizer.unk_id is not None and any(enc.ids[t] == self.tokenizer.unk_id for t in span):
                raise EvalError(f"{w}: the answer {answer!r} has characters the vocabulary lacks (it encodes to "
                                "the unknown token), so no prediction could name it")
            if len(span) > self.max_length:
                raise EvalError(f"{w}: the answer is {len(span)} tokens, more than the {self.seq_len}-token window")
            room = self.max_length - len(span)  # the text around the answer: as much of each side as fits
            left = max(0, span[0] - max(room // 2, room - (len(enc.ids) - span[-1] - 1)))
            ids = enc.ids[left:left + self.max_length]
            rows.append(([self.cls, *ids, self.sep], [t - left + 1 for t in span], [enc.ids[t] for t in span]))
        out = []
        for b in _batches(list(range(len(rows))), lambda i: len(rows[i][0]), self.batch_size):
            width = max(len(rows[i][0]) for i in b)
            ids = torch.full((len(b), width), self.tokenizer.pad_id or 0, dtype=torch.long)
            mask = torch.zeros(len(b), width, dtype=torch.long)
            for r, i in enumerate(b):
                row, positions, _ = rows[i]
                ids[r, :len(row)], mask[r, :len(row)] = torch.tensor(row), 1
                ids[r, positions] = self.tokenizer.mask_id
            hidden = self.model.encode(ids.to(device), mask.to(device))
            for r, i in enumerate(b):
                _, positions, want = rows[i]
                logits = self.model.mlm_logits(hidden[r, positions]).float()  # (n, V)
                top = logits.topk(min(k, logits.size(-1)), dim=-1).indices.tolist()
                best = [t[0] for t in top]
                out.append((i, {"prediction": self.tokenizer.decode(best).strip(), "acc": float(best == want),
                                "acc_top5": float(all(w in t for w, t in zip(want, top)))}))
        return [d for _, d in sorted(out, key=lambda x: x[0])]

    def generate_until(self, requests):
        raise EvalError("an encoder does not generate text; score it on multiple-choice, log-likelihood, fill-mask "
                        "or task-file tasks")

    # ------------------------------------------------------------------ task heads

    def _rows(self, task: str, examples: Sequence) -> tuple[TaskRows, list]:
        if self.head != HEAD_OF_TASK[task]:
            raise EvalError(f"a {task} task needs a model fine-tuned with task={task} (the {HEAD_OF_TASK[task]} head); "
                            f"this encoder has the {self.head} head")
        encoder = TaskRows(task, self.tokenizer, self.task_len, doc_stride=self.doc_stride)
        return encoder, encoder.rows(examples)

    def classify(self, examples: Sequence) -> list[str]:
        """The predicted label name of each classification example."""
        encoder, rows = self._rows("classify", examples)
        device = next(self.model.parameters()).device
        _, _, logits = head_logits(self.model, encoder, rows, self.batch_size, device)
        return [self.labels[i] for i in predict_labels(logits)]

    def tag(self, examples: Sequence) -> list[list[str]]:
        """The predicted tag names of each sentence's words (those that fit the window)."""
        encoder, rows = self._rows("tokens", examples)
        device = next(self.model.parameters()).device
        _, _, logits = head_logits(self.model, encoder, rows, self.batch_size, device)
        return [[self.labels[t] for t in tags] for tags in predict_tags(rows, logits)]

    def answer(self, examples: Sequence, *, allow_null: bool) -> list[str]:
        """The predicted answer text of each QA example ("" for no answer)."""
        encoder, rows = self._rows("span", examples)
        device = next(self.model.parameters()).device
        _, _, logits = head_logits(self.model, encoder, rows, self.batch_size, device)
        return predict_answers(rows, logits, [e.context for e in examples], allow_null=allow_null)


def _batches(items: list, width, batch_size: int):
    """`items` in order, grouped so that a group has at most batch_size items and TOKEN_BUDGET tokens
    (by `width(item)`, padded to the group's widest)."""
    group, widest = [], 0
    for item in items:
        w = width(item)
        if group and (len(group) >= batch_size or max(widest, w) * (len(group) + 1) > TOKEN_BUDGET):
            yield group
            group, widest = [], 0
        group.append(item)
        widest = max(widest, w)
    if group:
        yield group
