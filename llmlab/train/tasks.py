"""`llmlab finetune CONFIG task=classify|tokens|span|seq2seq`: fine-tuning encoders and encoder-decoders.

An encoder (BERT, RoBERTa, ALBERT: usually one pretrained with `objective=mlm`) gets the head of
its task in place of the masked-LM head, with the encoder's weights, full or with LoRA (the new
head then trains whole beside the adapters):
- classify: the pooler and a classifier on [CLS] (sentiment, NLI): accuracy and macro F1;
- tokens: a classifier on every token (NER), each word's tag learnt on its first piece: entity F1
  (seqeval's rules);
- span: start and end logits over the context (extractive QA, SQuAD): exact match and F1 of the
  best span over the windows of a long context (overlapping by `data.doc_stride` tokens), or no
  answer when the [CLS] score beats it and the validation set has unanswerable questions;
- seq2seq: T5 on source/target pairs (translation, summarisation), teacher forcing, then greedy
  decoding: exact match and BLEU.
Rows are encoded, and scored, by `llmlab.eval.heads` (as `llmlab eval` scores the final model),
padded per batch; batches follow a seeded shuffle per epoch, a pure function of the step, so
resume is exact. The loop, checkpoints, signals and early stopping are the training core's.

    run_dir/  config.yaml  metrics.jsonl  checkpoints/  final/ (the model, its tokenizer, labels.json, task.json)
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from llmlab.common import LlmlabError, atomic_dir, atomic_write_text, choose_device, init_distributed, seed_everything
from llmlab.config import save_config
from llmlab.data.sft import epoch_batch, hold_out
from llmlab.data.tasks import read_classification, read_seq2seq, read_squad, read_token_classification
from llmlab.eval.heads import (TaskRows, classification_scores, head_logits, predict_answers, predict_labels,
                               predict_tags, qa_scores, tagging_scores)
from llmlab.eval.loss import token_loss
from llmlab.eval.metrics import bleu, exact_match
from llmlab.models import build_model, model_kind, with_article
from llmlab.models.io import copy_tokenizer_files, load_model, read_config, save_model
from llmlab.peft import apply_lora, merge_and_unload, trainable_parameters
from llmlab.tokenizer import load_tokenizer
from llmlab.track import check_loggers
from llmlab.train.checkpoint import save_checkpoint
from llmlab.train.core import accumulate, clip_gradients, open_run, resolve_autocast, wrap_model
from llmlab.train.loop import check_run_dir, resume_run, run_settings, truncate_metrics
from llmlab.train.optim import build_optimizer

TASKS = {"classify": "encoder", "tokens": "encoder", "span": "encoder", "seq2seq": "encoder-decoder"}
HEAD_KEYS = ("mlm_", "lm_head.", "sentence_classifier.", "sbo_", "classifier.", "pooler.")  # what a new head replaces


def run(cfg, *, overwrite: bool = False) -> dict:
    """Fine-tune `cfg.base` on `cfg.task` (a `FinetuneConfig` whose task is not sft); returns
    {"step", "val_loss", "metrics", "stopped", "final", ...}."""
    from llmlab.train.finetune import _base_checkpoint

    device = choose_device(cfg.system.device, "system.device")
    rank, world = init_distributed(device)
    if world > 1 and cfg.system.parallel == "fsdp":
        raise LlmlabError(f"task={cfg.task} fine-tuning runs data-parallel (system.parallel=ddp)")
    if cfg.peft == "qlora":
        raise LlmlabError(f"task={cfg.task}: use peft=lora or none (QLoRA quantizes decoders)")
    cfg.system.autocast = resolve_autocast(cfg.system, device, rank, world)
    out = Path(cfg.out_dir)
    check_run_dir(out, resume=cfg.ckpt.resume, overwrite=overwrite, rank=rank,
                  inputs=[cfg.base, cfg.data.train, cfg.data.val or None])
    check_loggers(cfg.track)
    base = str(_base_checkpoint(cfg.base))
    base_cfg, _ = read_config(base)
    if model_kind(base_cfg) != TASKS[cfg.task]:
        raise LlmlabError(f"base={cfg.base} is {with_article(model_kind(base_cfg))} (family={base_cfg.family}); "
                          f"task={cfg.task} fine-tunes {TASKS[cfg.task]} models")
    if cfg.seq_len is None:
        cfg.seq_len = base_cfg.max_seq_len
    if cfg.seq_len > base_cfg.max_seq_len:
        raise LlmlabError(f"seq_len={cfg.seq_len} exceeds the base model's {base_cfg.max_seq_len} positions")
    tokenizer = load_tokenizer(base)
    data = TaskData(cfg, tokenizer, base_cfg)
    if cfg.epochs > 0:
        cfg.max_steps = max(1, math.ceil(cfg.epochs * len(data.train) / (cfg.batch_size * cfg.grad_accum * world)))

    seed_everything(cfg.seed)
    model = task_model(base, base_cfg, cfg.task, len(data.labels), device)
    if cfg.peft == "lora":
        apply_lora(model, cfg.lora)
        for name, p in model.named_parameters():  # the new head trains whole beside the adapters
            if name.startswith(("classifier.", "pooler.")):
                p.requires_grad_(True)
    trained, total = trainable_parameters(model)
    if rank == 0:
        print(f"{cfg.task}: {len(data.train):,} training and {len(data.val):,} validation examples; training "
              f"{trained:,} of {total:,} parameters ({100 * trained / total:.2f}%)")
    trainee = wrap_model(model, cfg.system, world)
    optimizer = build_optimizer(model, cfg.optim, device)
    settings = run_settings(cfg, world, base=str(Path(base).resolve()), task=cfg.task, labels=data.labels)
    counters = resume_run(cfg, out / "checkpoints", rank, model, optimizer, settings)
    if rank == 0:
        save_config(cfg, out / "config.yaml")
        truncate_metrics(out / "metrics.jsonl", counters.step)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.system.autocast == "bf16")
    scores: dict = {}

    def loss_fn(batch):
        return trainee.forward(**batch), data.units(batch)

    def evaluation() -> dict:
        nonlocal scores
        val_loss, scores = data.evaluate(model, device, cfg.eval.batches)
        shown = "  ".join(f"{k} {v:.4f}" for k, v in scores.items())
        return {"val_loss": val_loss, **scores, "text": f"val_loss {val_loss:.4f}  {shown}"}

    def save(state: dict) -> None:
        if rank == 0:
            save_checkpoint(out / "checkpoints", counters.step, model, optimizer, {**state, "settings": settings},
                            cfg.ckpt.keep_last, base)

    with open_run(cfg, counters, out, rank, world, device) as loop:
        model.train()
        for step in range(counters.step, cfg.max_steps):
            t0 = time.time()
            lr = loop.begin_step(step, optimizer)
            batches = [data.batch(step * cfg.grad_accum * world + rank * cfg.grad_accum + micro, device)
                       for micro in range(cfg.grad_accum)]
            loss = accumulate(trainee, batches, loss_fn, autocast)
            grad_norm = clip_gradients(trainee, cfg.optim.grad_clip)
            record = None
            if loop.optimizer_step(step, loss.loss, grad_norm, optimizer):
                tokens = sum(int(b["input_ids"].numel()) for b in batches)  # padding included
                counters.tokens += tokens
                record = {"loss": loss.loss.item(), "lr": lr, "tokens_per_s": tokens / (time.time() - t0),
                          "grad_norm": grad_norm.item()}
            if loop.after_step(step + 1, record, evaluate=evaluation if data.val else None, save=save):
                break
    stopped = loop.stopped or "max_steps"
    final = None
    if rank == 0:
        final = export(cfg, model, base, data.labels)
        print(f"stopped after step {counters.step} ({stopped}); model {final}")
    return {"step": counters.step, "val_loss": loop.val_loss, "metrics": scores, "stopped": stopped,
            "final": final, "skipped": counters.skipped, "exit_code": loop.exit_code}


def task_model(base: str, base_cfg, task: str, n_labels: int, device: torch.device):
    """The base with the task's head: T5 as it is (seq2seq); an encoder with a new classify, tokens
    or span head in place of its pretraining heads (a base that already has this head keeps it)."""
    if task == "seq2seq":
        model = load_model(base, device)
        for p in model.parameters():
            p.requires_grad_(True)
        return model.train()
    head = {"classify": "classify", "tokens": "tokens", "span": "span"}[task]
    fields = {f.name: getattr(base_cfg, f.name) for f in dataclasses.fields(base_cfg)}
    fields.update(head=head, num_labels=2 if task == "span" else n_labels, sentence_head=False,
                  span_boundary_head=False, tie_embeddings=False)
    cfg = type(base_cfg)(**fields)
    model = build_model(cfg).to(device)
    state = load_model(base, device).state_dict()
    same_head = base_cfg.head == head and base_cfg.num_labels == cfg.num_labels
    kept = {k: v for k, v in state.items() if same_head or not k.startswith(HEAD_KEYS)
            or (k.startswith("pooler.") and head == "classify")}  # a pretrained pooler serves the classifier
    missing, unexpected = model.load_state_dict(kept, strict=False)
    if unexpected or any(not k.startswith(HEAD_KEYS) for k in missing):
        raise LlmlabError(f"base={base}: its encoder does not fit the task model (missing {missing[:5]}, "
                          f"unexpected {unexpected[:5]})")
    return model.train()


def export(cfg, model, base: str, labels: list[str]) -> str:
    """`final/`: the fine-tuned model (LoRA merged) with the base's tokenizer, labels.json (the label
    or tag names by index) and task.json (the task, seq_len and doc_stride its rows were framed with),
    which `llmlab eval` reads."""
    if cfg.peft == "lora":
        model = merge_and_unload(model)
    out = Path(cfg.out_dir)
    with atomic_dir(out / "final", merge=True) as tmp:
        save_model(model.eval(), tmp)
        copy_tokenizer_files(base, tmp)
        if labels:
            atomic_write_text(tmp / "labels.json", json.dumps(labels, indent=2) + "\n")
        if cfg.task != "seq2seq":  # how the examples were framed: `llmlab eval` frames them alike
            atomic_write_text(tmp / "task.json", json.dumps({"task": cfg.task, "seq_len": cfg.seq_len,
                                                             "doc_stride": cfg.data.doc_stride}) + "\n")
    return str(out / "final")


# --------------------------------------------------------------------------- data


class TaskData:
    """The task's examples, encoded as rows (`TaskRows`); seeded batches; validation loss and scores."""

    def __init__(self, cfg, tokenizer, model_cfg):
        self.cfg, self.tok, self.task = cfg, tokenizer, cfg.task
        self.labels: list[str] = []
        self.encoder = TaskRows(cfg.task, tokenizer, cfg.seq_len, max_target=getattr(model_cfg, "max_target_len", None),
                                doc_stride=cfg.data.doc_stride)
        if cfg.data.val and Path(cfg.data.train).is_dir() and \
                Path(cfg.data.train).resolve() in Path(cfg.data.val).resolve().parents:
            raise LlmlabError(f"data.val={cfg.data.val} lies inside data.train={cfg.data.train}, whose every file is "
                              "read for training; name the training file")
        train, val = self._read(cfg.data.train), None
        if cfg.data.val:
            val = self._read(cfg.data.val)
        else:
            train, val = hold_out(train, cfg.data.val_fraction, cfg.seed)
        if not train:
            raise LlmlabError(f"data.train={cfg.data.train}: no training examples left after holding out validation")
        self.val_examples = val
        self.train, self.val = self.encoder.rows(train), self.encoder.rows(val)
        if cfg.batch_size > len(self.train):
            raise LlmlabError(f"batch_size={cfg.batch_size} is more than the {len(self.train):,} training examples")

    def _read(self, path: str) -> list:
        task, data = self.task, self.cfg.data
        if task == "classify":
            examples, self.labels = read_classification(path, self.labels or data.labels or None,
                                                        text_fields=data.text_fields or None,
                                                        label_field=data.label_field)
            if len(self.labels) < 2:
                raise LlmlabError(f"{path}: one label ({self.labels[0]!r}) only; classification needs two or more")
            return examples
        if task == "tokens":
            examples, self.labels = read_token_classification(path, self.labels or data.labels or None)
            bad = next((t for t in self.labels if t != "O" and not (t[:2] in ("B-", "I-") and len(t) > 2)), None)
            if bad is not None:
                first = next(e.where for e in examples if self.labels.index(bad) in e.tags)
                raise LlmlabError(f"{first}: tag {bad!r} (in this sentence) is not O, B-TYPE or I-TYPE; token "
                                  "classification reads BIO tags (the tag is a line's last column)")
            return examples
        if task == "span":
            return read_squad(path)
        return read_seq2seq(path)

    # ---- batches

    def batch(self, index: int, device: torch.device) -> dict:
        """Micro-batch `index` of training: rows of a seeded shuffle per epoch, in order."""
        size = self.cfg.batch_size
        chosen = epoch_batch(len(self.train), index * size, size, (self.cfg.seed, 5))
        return self.encoder.collate([self.train[i] for i in chosen], device)

    def units(self, batch: dict) -> int:
        return self.encoder.units(batch)

    # ---- evaluation

    @torch.no_grad()
    def evaluate(self, model, device: torch.device, batches: int) -> tuple[float, dict]:
        """(loss per unit, the task's scores) over the first `batches` x batch_size validation examples."""
        examples = self.val_examples[:batches * self.cfg.batch_size]
        rows = [r for r in self.val if r.meta["example"] < len(examples)]
        training = model.training
        model.eval()
        try:
            if self.task == "seq2seq":  # the loss by teacher forcing, the scores by greedy decoding
                size = self.cfg.batch_size
                batches = (self.encoder.collate(rows[i:i + size], device) for i in range(0, len(rows), size))
                return token_loss(model, batches).mean, self._seq2seq_scores(model, rows, examples)
            total, units, logits = head_logits(model, self.encoder, rows, self.cfg.batch_size, device)
        finally:
            model.train(training)
        if self.task == "classify":
            scores = classification_scores([self.labels[e.label] for e in examples],
                                           [self.labels[p] for p in predict_labels(logits)])
        elif self.task == "tokens":
            scores = tagging_scores([[self.labels[t] for t in e.tags] for e in examples],
                                    [[self.labels[t] for t in tags] for tags in predict_tags(rows, logits)])
            scores = {"entity_f1": scores["entity_f1"], "tag_accuracy": scores["tag_accuracy"]}
        else:
            answers = predict_answers(rows, logits, [e.context for e in examples],
                                      allow_null=any(e.is_impossible for e in self.val_examples))
            em, f1 = zip(*(qa_scores(a, e.answers) for a, e in zip(answers, examples)))
            scores = {"exact_match": float(np.mean(em)), "f1": float(np.mean(f1))}
        return total / max(units, 1), scores

    def _seq2seq_scores(self, model, rows: list, examples: list) -> dict:
        from llmlab.generate import SamplingParams
        from llmlab.generate.engine import Engine

        eos = self.encoder.eos
        params = SamplingParams(max_new_tokens=self.encoder.max_target, temperature=0.0,
                                stop_token_ids=[eos] if eos is not None else [])
        done = Engine(model).generate([r.input_ids for r in rows], params)
        texts = [self.tok.decode(c.token_ids, skip_special=True).strip() for c in done]
        refs = [e.target for e in examples]
        return {"exact_match": float(np.mean([exact_match(t, g, ignore_whitespace=True) for t, g in zip(texts, refs)])),
                "bleu": bleu(texts, refs)}
