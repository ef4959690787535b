"""`llmlab finetune`: adapt a trained model, fully, with frozen layers, with LoRA, or with QLoRA.

Setup loads the base checkpoint (4-bit for QLoRA), swaps in adapters or freezes what the config
names, and tokenizes the records. Then one `for step ...` loop as in pretraining: micro-batches,
a backward pass whose loss is weighted by each micro-batch's share of the step's target tokens
(so accumulation equals one big batch even when examples differ in length), clip, AdamW step,
log, evaluate (validation loss, and exact-match accuracy of greedy answers when asked), and
checkpoint. LoRA checkpoints hold the adapter alone in PEFT format. At the end the run directory
gets `final/`, the merged model with its tokenizer (what `llmlab generate` and `serve` load), and
for LoRA runs `adapter/`, which `peft` loads on the HF export of the base.
"""

from __future__ import annotations

import math
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from llmlab.common import LlmlabError, atomic_dir, choose_device, init_distributed, seed_everything
from llmlab.config import save_config
from llmlab.data.sft import Batches, Example, build_examples, hold_out
from llmlab.data.shards import TokenShards, is_prepared, prepared_dir
from llmlab.data.windows import sample_batch
from llmlab.eval.loss import token_loss
from llmlab.eval.metrics import exact_match
from llmlab.generate import SamplingParams
from llmlab.generate.text import TextGenerator
from llmlab.models import require_kind
from llmlab.models.io import copy_tokenizer_files, load_model, read_config, save_model
from llmlab.peft import (LoraConfig, apply_lora, freeze, merge_and_unload, save_adapter, trainable_parameters)
from llmlab.peft.io import load_adapter_weights
from llmlab.plan.estimate import TrainingMemory, shape_of, training_memory
from llmlab.tokenizer import load_tokenizer
from llmlab.tokenizer.chat import load_chat_template
from llmlab.track import TrackConfig, check_loggers
from llmlab.train.checkpoint import (latest_checkpoint, newest_intact_checkpoint, save_checkpoint,
                                     save_sharded_checkpoint)
from llmlab.train.config import CheckpointConfig, OptimConfig, SystemConfig, check_at_least, check_seed
from llmlab.train.core import (accumulate, clip_gradients, gather_model, open_run, resolve_autocast,
                               wrap_model)
from llmlab.train.loop import (available_memory, check_run_dir, print_line, resume_run, run_settings,
                               truncate_metrics)
from llmlab.train.optim import build_optimizer


@dataclass
class DataConfig:
    train: str = "runs/synth/train.jsonl"  # records (.json/.jsonl or a folder), or a `llmlab data prepare` folder
    val: str = ""  # records to evaluate on; "" = hold out val_fraction of train (a prepared folder: its val split)
    val_fraction: float = 0.05  # share of the training records held out when val is ""
    template: str = ""  # chat template: a built-in name or a Jinja file; "" = the base's own, else llmlab's
    packing: bool = True  # several examples per row (attention stays within each) instead of one, padded
    verify: bool = True  # a prepared folder: check its shards' SHA-256 and token ids first (~1 s per GB)
    # task=classify / tokens: the label (tag) set, by index; [] = the training file's values in sorted order
    labels: list[str] = field(default_factory=list)
    text_fields: list[str] = field(default_factory=list)  # task=classify: the TSV columns / JSON fields of the text(s)
    label_field: str = "label"  # task=classify: the column / field of the label
    doc_stride: int = 128  # task=span: tokens shared by the windows of a long context (at most half a window)

    def __post_init__(self):
        if not self.train:
            raise ValueError("train is empty: name the records (.jsonl) or a `llmlab data prepare` folder")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.doc_stride < 0:
            raise ValueError(f"doc_stride must be >= 0, got {self.doc_stride}")


@dataclass
class FinetuneEvalConfig:
    every: int = 50  # evaluate every N optimizer steps (and after the last)
    batches: int = 20  # validation batches per evaluation (at most the whole validation set)
    patience: int = 0  # stop after N evaluations without a new best val loss; 0 = never
    exact_match: int = 0  # validation records answered greedily and scored by exact match; 0 = off
    max_new_tokens: int = 64  # answer length limit for exact match

    def __post_init__(self):
        check_at_least(self, every=1, batches=1, patience=0, exact_match=0, max_new_tokens=1)


@dataclass
class FinetuneConfig:
    base: str = "runs/demo/pretrain"  # model to adapt: a checkpoint, HF folder or run directory (its newest checkpoint)
    # sft: instruction data for decoders; classify, tokens, span (encoders) or seq2seq (T5): llmlab/train/tasks.py
    task: Literal["sft", "classify", "tokens", "span", "seq2seq"] = "sft"
    out_dir: str = "runs/finetune"  # run directory: config.yaml, metrics.jsonl, checkpoints/, final/, adapter/
    data: DataConfig = field(default_factory=DataConfig)
    peft: Literal["none", "lora", "qlora"] = "lora"  # none = full fine-tuning (minus `freeze`)
    lora: LoraConfig = field(default_factory=LoraConfig)
    freeze: list[str] = field(default_factory=list)  # with peft=none: names, globs or ranges (layers.0-3) to keep
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-3, warmup_steps=20, weight_decay=0.0))
    seq_len: int | None = None  # tokens per row, longer examples are cut; null = the base's context, all it can use
    batch_size: int = 8  # rows per micro-batch (per process)
    grad_accum: int = 1  # micro-batches per optimizer step
    max_steps: int = 300  # optimizer steps; the schedule ends here
    epochs: float = 0.0  # when > 0, max_steps is set to this many passes over the training rows
    max_minutes: float = 0.0  # also stop (with a checkpoint) after this much wall time; 0 = no limit
    nonfinite: Literal["stop", "skip"] = "stop"  # on a NaN/inf loss: stop the run, or skip the batch
    log_every: int = 10  # plain log line every N steps when stderr is not a terminal
    seed: int = 0
    eval: FinetuneEvalConfig = field(default_factory=FinetuneEvalConfig)
    ckpt: CheckpointConfig = field(default_factory=lambda: CheckpointConfig(every=100))
    system: SystemConfig = field(default_factory=SystemConfig)
    track: TrackConfig = field(default_factory=TrackConfig)  # metric loggers: TensorBoard, MLflow

    def __post_init__(self):
        check_at_least(self, seq_len=1, batch_size=1, grad_accum=1, max_steps=1, epochs=0, max_minutes=0,
                       log_every=1)
        check_seed(self.seed)
        if self.task == "sft" and (self.data.labels or self.data.text_fields):
            raise ValueError("data.labels and data.text_fields are for task=classify or tokens, not task=sft")


class TokenWindows:
    """Continued pretraining on a `llmlab data prepare` folder: random windows, as `pretrain` samples."""

    def __init__(self, shards: TokenShards, seq_len: int, batch_size: int, seed: int):
        self.shards, self.seq_len, self.batch_size, self.seed = shards, seq_len, batch_size, seed

    def batch(self, index: int, device: torch.device) -> dict[str, torch.Tensor]:
        x, y = sample_batch(self.shards, self.batch_size, self.seq_len, (self.seed, 4, index), device)
        return {"input_ids": x, "targets": y}

    def epoch_of(self, index: int) -> float:
        return (index + 1) * self.batch_size * self.seq_len / len(self.shards)


def run(cfg: FinetuneConfig, *, overwrite: bool = False) -> dict:
    """Fine-tune; returns {"step", "tokens", "val_loss", "exact_match", "stopped", "final", "adapter", ...}.
    `overwrite` starts over in an out_dir that holds an earlier run's checkpoints or other files. Tasks
    of encoders and encoder-decoders run `llmlab.train.tasks`."""
    if cfg.task != "sft":
        from llmlab.train import tasks

        return tasks.run(cfg, overwrite=overwrite)
    # ---- setup
    device = choose_device(cfg.system.device, "system.device")
    rank, world = init_distributed(device)
    cfg.system.autocast = resolve_autocast(cfg.system, device, rank, world)  # config.yaml records it
    if cfg.peft == "qlora" and cfg.system.parallel == "fsdp" and world > 1:
        raise LlmlabError("system.parallel=fsdp shards full-precision weights; QLoRA's 4-bit base cannot be "
                          "sharded: use system.parallel=ddp with peft=qlora")
    if cfg.peft != "none" and cfg.freeze:
        raise LlmlabError(f"freeze applies to full fine-tuning (peft=none); with peft={cfg.peft} only the "
                          "adapters train already")
    check_run_dir(Path(cfg.out_dir), resume=cfg.ckpt.resume,
                  inputs=[cfg.base, prepared_dir(cfg.data.train), cfg.data.val],
                  overwrite=overwrite, rank=rank)
    check_loggers(cfg.track)
    cfg.base = str(_base_checkpoint(cfg.base))
    model_cfg, _ = read_config(cfg.base)
    try:
        require_kind(model_cfg, ("decoder",), "task=sft (instruction data)", f"base={cfg.base}")
    except LlmlabError as e:
        hint = "task=seq2seq" if getattr(model_cfg, "encoder_decoder", False) else "task=classify, tokens or span"
        raise LlmlabError(f"{e}; fine-tune it with {hint}") from None
    if cfg.seq_len is None:
        cfg.seq_len = model_cfg.max_seq_len
    if cfg.seq_len > model_cfg.max_seq_len:
        raise LlmlabError(f"seq_len={cfg.seq_len} exceeds the base model's context of {model_cfg.max_seq_len}; "
                          f"set seq_len={model_cfg.max_seq_len} or less, or leave it unset to take the context")
    tokenizer = load_tokenizer(cfg.base)
    template = load_chat_template(cfg.base, cfg.data.template or None)
    train_data, val_data, val_examples = _data(cfg, tokenizer, template, model_cfg.vocab_size)
    if cfg.epochs > 0:
        cfg.max_steps = max(1, math.ceil(cfg.epochs / train_data.epoch_of(0) / (cfg.grad_accum * world)))
    if cfg.system.preflight:
        _preflight(cfg, model_cfg, device, world if device.type == "cpu" else 1)
    out, ckpt_dir = Path(cfg.out_dir), Path(cfg.out_dir) / "checkpoints"

    seed_everything(cfg.seed)
    model = _load_base(cfg, device)
    lora = cfg.peft in ("lora", "qlora")
    if lora:
        adapted = apply_lora(model, cfg.lora)
        kinds = ", ".join(sorted({n.split(".")[-1] for n in adapted}))
        print(f"LoRA r={cfg.lora.r} on {len(adapted)} layers ({kinds})")
    elif cfg.freeze:
        print(f"froze {len(freeze(model, cfg.freeze))} parameter tensors")
    trained, total = trainable_parameters(model)
    if trained == 0:
        raise LlmlabError(f"freeze={cfg.freeze} freezes every parameter, which leaves nothing to train")
    print(f"training {trained:,} of {total:,} parameters ({100 * trained / total:.2f}%)")
    model.gradient_checkpointing = cfg.system.gradient_checkpointing
    trainee = wrap_model(model, cfg.system, world)
    optimizer = build_optimizer(model, cfg.optim, device)
    save_weights = (lambda m, path: save_adapter(m, path, cfg.lora, base=cfg.base)) if lora else save_model
    load_weights = load_adapter_weights if lora else None
    # the adapters or weights of a checkpoint belong to the base they were trained from
    settings = run_settings(cfg, world, base=str(Path(cfg.base).resolve()))
    counters = resume_run(cfg, ckpt_dir, rank, model, optimizer, settings, load_weights)
    if rank == 0:
        save_config(cfg, out / "config.yaml")
        truncate_metrics(out / "metrics.jsonl", counters.step)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.system.autocast == "bf16")
    accuracy = None

    def answering_model():  # generation runs in inference mode, which FSDP2's gathered parameters cannot
        return gather_model(trainee, lambda: _adapted_base(cfg, device), everywhere=True)

    def target_loss(batch):  # the mean loss over the batch's target tokens (the assistant's, for chats)
        return trainee.forward(**batch), (batch["targets"] != -100).sum()

    def evaluation() -> dict:
        nonlocal accuracy
        val_loss = _evaluate_loss(model, val_data, cfg, device)
        line = {"val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50))}
        if cfg.eval.exact_match and val_examples:
            accuracy = _evaluate_answers(answering_model(), tokenizer, template, val_examples, cfg)
            line.update(_flat_accuracy(accuracy))
        line["text"] = (f"val_loss {val_loss:.4f}  ppl {line['val_ppl']:.2f}"
                        + (f"  exact match {accuracy['accuracy']:.1%}" if "exact_match" in line else ""))
        return line

    def save(state: dict) -> None:
        if trainee.sharded:  # every rank writes its shards of the whole model (adapters and base)
            save_sharded_checkpoint(ckpt_dir, counters.step, model, optimizer, {**state, "settings": settings},
                                    cfg.ckpt.keep_last, cfg.base)
        elif rank == 0:
            save_checkpoint(ckpt_dir, counters.step, model, optimizer, {**state, "settings": settings},
                            cfg.ckpt.keep_last, cfg.base, save_weights)

    # ---- the loop
    with open_run(cfg, counters, out, rank, world, device) as run:
        if counters.step == 0 and cfg.eval.exact_match and val_examples:
            accuracy = _evaluate_answers(answering_model(), tokenizer, template, val_examples, cfg)
            run.log({"step": 0, **_flat_accuracy(accuracy)})
            print_line(run.progress, f"step 0: exact match {accuracy['accuracy']:.1%} (before fine-tuning)")
        model.train()
        for step in range(counters.step, cfg.max_steps):
            t0 = time.time()
            lr = run.begin_step(step, optimizer)
            # this rank's micro-batches: k-th of the step's grad_accum x world batches
            batches = [train_data.batch(step * cfg.grad_accum * world + rank * cfg.grad_accum + micro, device)
                       for micro in range(cfg.grad_accum)]
            loss = accumulate(trainee, batches, target_loss, autocast)
            grad_norm = clip_gradients(trainee, cfg.optim.grad_clip)
            record = None
            if run.optimizer_step(step, loss.loss, grad_norm, optimizer):
                targets = int(loss.units)
                counters.tokens += targets
                epoch = train_data.epoch_of((step + 1) * cfg.grad_accum * world - 1)
                record = {"loss": loss.loss.item(), "lr": lr, "tokens_per_s": targets / (time.time() - t0),
                          "grad_norm": grad_norm.item(), "epoch": round(epoch, 4), **run.auxiliary(loss)}
            if run.after_step(step + 1, record, evaluate=evaluation if val_data is not None else None, save=save):
                break
    stopped = run.stopped or "max_steps"
    final = adapter = None
    whole = gather_model(trainee, lambda: _adapted_base(cfg, torch.device("cpu")))  # every rank takes part
    if rank == 0:
        final, adapter = _export(cfg, whole, template)
        print(f"stopped after step {counters.step} ({stopped}); {counters.tokens:,} target tokens; model {final}"
              + (f"; adapter {adapter}" if adapter else ""))
    latest = latest_checkpoint(ckpt_dir, clean=False)
    return {"step": counters.step, "tokens": counters.tokens, "val_loss": run.val_loss, "stopped": stopped,
            "skipped": counters.skipped, "exact_match": accuracy["accuracy"] if accuracy else None, "final": final,
            "adapter": adapter, "checkpoint": str(latest) if latest else None, "exit_code": run.exit_code}


# --------------------------------------------------------------------------- setup


def _base_checkpoint(base: str) -> Path:
    """`base` itself, or for a run directory its newest intact checkpoint (a warning names each newer,
    damaged one passed over)."""
    path = Path(base)
    if not (path / "config.json").is_file() and (path / "checkpoints").is_dir():
        latest, _, damaged = newest_intact_checkpoint(path / "checkpoints")
        if latest is None:
            raise LlmlabError(f"base={base}: the run directory holds no intact checkpoint"
                              + (f" (the newest: {damaged[0][1]})" if damaged else ""))
        for _, error in damaged:
            print(f"warning: {error}; fine-tuning {latest} instead", file=sys.stderr, flush=True)
        return latest
    if not path.exists():
        raise LlmlabError(f"base={base}: no such checkpoint or run directory")
    return path


def _adapted_base(cfg: FinetuneConfig, device: torch.device) -> torch.nn.Module:
    """The base as this run trains it, with its adapters (or freezing) applied, untrained."""
    model = _load_base(cfg, device)
    if cfg.peft != "none":
        apply_lora(model, cfg.lora)
    return model


def _load_base(cfg: FinetuneConfig, device: torch.device) -> torch.nn.Module:
    if cfg.peft == "qlora":
        from llmlab.quant import load_quantized

        return load_quantized(cfg.base, device)
    model = load_model(cfg.base, device)
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def _data(cfg: FinetuneConfig, tokenizer, template, vocab_size: int) -> tuple[Batches | TokenWindows,
                                                                              Batches | None, list[Example]]:
    """Training batches, validation batches and the validation examples that have a reference answer."""
    if is_prepared(cfg.data.train):  # continued pretraining on token shards
        if cfg.data.val:
            raise LlmlabError(f"data.val={cfg.data.val}: a prepared data.train brings its own val split; leave "
                              "data.val unset")
        train = TokenShards(cfg.data.train, "train")
        val = TokenShards(cfg.data.train, "val") if train.manifest["splits"].get("val", {}).get("tokens") else None
        if train.vocab_size > vocab_size:
            raise LlmlabError(f"data.train={cfg.data.train}: its tokenizer has {train.vocab_size} ids, more than the "
                              f"base model's vocab_size of {vocab_size}; prepare it with the base's tokenizer")
        for name, shards in (("train", train), ("val", val)):
            if shards is not None and len(shards) <= cfg.seq_len + 1:
                raise LlmlabError(f"data.train={cfg.data.train}: the {name} split has {len(shards)} tokens, fewer "
                                  f"than seq_len+1={cfg.seq_len + 1}; lower seq_len or add data")
            if shards is not None and cfg.data.verify:
                shards.verify()
        windows = TokenWindows(train, cfg.seq_len, cfg.batch_size, cfg.seed)
        val_windows = TokenWindows(val, cfg.seq_len, cfg.batch_size, cfg.seed + 1) if val is not None else None
        return windows, val_windows, []
    stats: Counter = Counter()
    examples = build_examples(cfg.data.train, tokenizer, template, cfg.seq_len, stats)
    if cfg.data.val:
        val = build_examples(cfg.data.val, tokenizer, template, cfg.seq_len, stats)
    else:
        examples, val = hold_out(examples, cfg.data.val_fraction, cfg.seed)
    if not examples:
        raise LlmlabError(f"{cfg.data.train}: no training examples left after holding out validation records")
    print(f"data: {len(examples):,} training and {len(val):,} validation examples"
          + "".join(f"; {n:,} {k.replace('_', ' ')}" for k, n in stats.items() if k != "records" and n))
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else 0
    train = Batches(examples, cfg.seq_len, cfg.batch_size, packed=cfg.data.packing, seed=cfg.seed, pad_id=pad)
    val_batches = Batches(val, cfg.seq_len, cfg.batch_size, packed=cfg.data.packing, seed=cfg.seed, pad_id=pad) \
        if val else None
    return train, val_batches, [e for e in val if e.reference is not None]


def _preflight(cfg: FinetuneConfig, model_cfg, device: torch.device, processes: int) -> None:
    memory = estimate_memory(cfg, model_cfg, device)
    have = available_memory(device)
    if have is not None and memory.total * processes > have:
        raise LlmlabError(f"preflight: fine-tuning needs about {memory.total / 1e9:.2f} GB per process (weights "
                          f"{memory.weights / 1e9:.2f}, optimizer {memory.optimizer / 1e9:.2f}, activations "
                          f"{memory.activations / 1e9:.2f}, runtime {memory.runtime / 1e9:.2f}) but {device} has "
                          f"{have / 1e9:.2f} GB free; lower batch_size or seq_len, use peft=lora or qlora, set "
                          "system.gradient_checkpointing=true, or skip the check with system.preflight=false")


def estimate_memory(cfg: FinetuneConfig, model_cfg, device: torch.device) -> TrainingMemory:
    """The planner's estimate for this run: the base in fp32 (4-bit for QLoRA), adapter or full AdamW
    states and, on a CPU, the runtime's share. Freezing is not credited, so the estimate errs high for
    partly frozen runs."""
    precision = "bf16" if cfg.system.autocast == "bf16" else "fp32"
    rank = cfg.lora.r if cfg.peft != "none" else 0
    return training_memory(shape_of(model_cfg), batch=cfg.batch_size, seq_len=cfg.seq_len, precision=precision,
                           checkpointing=cfg.system.gradient_checkpointing, lora_rank=rank,
                           qlora=cfg.peft == "qlora", optimizer="adamw8bit" if "8bit" in cfg.optim.name else "adamw",
                           cpu=device.type == "cpu")


# --------------------------------------------------------------------------- evaluation


@torch.no_grad()
def _evaluate_loss(model, data: Batches | TokenWindows, cfg: FinetuneConfig, device: torch.device) -> float:
    """Loss per target token (`llmlab.eval.loss`) over the first `eval.batches` validation batches (the
    same each time; for records, each validation example at most once)."""
    batches = (data.batch(i, device) for i in range(cfg.eval.batches)) if isinstance(data, TokenWindows) \
        else data.first_epoch(cfg.eval.batches, device)
    return token_loss(model, batches).mean


@torch.no_grad()
def _evaluate_answers(model, tokenizer, template, examples: list[Example], cfg: FinetuneConfig) -> dict:
    """Greedy answers to the first `eval.exact_match` validation prompts, scored by exact match
    against the reference answers, overall and per task."""
    model.eval()
    chosen = examples[:cfg.eval.exact_match]
    generator = TextGenerator(model, tokenizer)
    params = SamplingParams(temperature=0.0, max_new_tokens=cfg.eval.max_new_tokens)
    answers = []
    for i in range(0, len(chosen), 32):
        prompts = template.render_many([(e.prompt, True) for e in chosen[i:i + 32]])
        answers += [c.text for c in generator.complete(prompts, params, stop=[template.stop], truncate=True)]
    model.train()
    right = [exact_match(a, e.reference, ignore_whitespace=True) for a, e in zip(answers, chosen)]
    tasks: dict[str, list[bool]] = {}
    for ok, e in zip(right, chosen):
        tasks.setdefault(e.task or "all", []).append(ok)
    return {"accuracy": sum(right) / len(right), "tasks": {t: sum(v) / len(v) for t, v in sorted(tasks.items())}}


def _flat_accuracy(accuracy: dict) -> dict:
    return {"exact_match": accuracy["accuracy"],
            **{f"exact_match/{t}": v for t, v in accuracy["tasks"].items() if len(accuracy["tasks"]) > 1}}


# --------------------------------------------------------------------------- export


def _export(cfg: FinetuneConfig, model, template) -> tuple[str, str | None]:
    """`final/`: the merged full-precision model with the base's tokenizer files (a checkpoint
    `llmlab generate` loads); `adapter/`: the LoRA adapter alone, in PEFT format."""
    from llmlab.quant import dequantize_model

    out = Path(cfg.out_dir)
    adapter = None
    if cfg.peft != "none":
        with atomic_dir(out / "adapter", merge=True) as tmp:
            save_adapter(model, tmp, cfg.lora, base=str(Path(cfg.base).resolve()))
        adapter = str(out / "adapter")
        model = dequantize_model(merge_and_unload(model))
    model.eval()
    with atomic_dir(out / "final", merge=True) as tmp:
        save_model(model, tmp)
        copy_tokenizer_files(cfg.base, tmp)
        if cfg.data.template:  # the model now speaks this template: chat and serve should use it
            (tmp / "chat_template.jinja").write_text(template.source, encoding="utf-8")
    return str(out / "final"), adapter
