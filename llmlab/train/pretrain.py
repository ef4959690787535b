"""`llmlab pretrain`: the causal language-modelling loop, readable top to bottom.

Setup, then one `for step ...` loop: sample micro-batches, forward, scaled backward, clip,
AdamW step on the warmup + cosine schedule, log, evaluate, checkpoint. The data position is a
pure function of (seed, step, micro-batch, rank), and every RNG and optimizer tensor is saved,
so a run killed at any point and resumed with `resume=auto` reproduces the uninterrupted run
bit for bit on CPU.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from llmlab.common import LlmlabError, choose_device, init_distributed, seed_everything
from llmlab.config import save_config, to_dict
from llmlab.data.fim import FimSpec
from llmlab.data.shards import TokenShards, prepared_dir
from llmlab.data.windows import sample_batch
from llmlab.eval.loss import token_loss
from llmlab.models import LlamaConfig, ModelConfig, build_model
from llmlab.models.kernels import LOSS_BLOCK_ELEMENTS_CPU, LOSS_BLOCK_ELEMENTS_GPU
from llmlab.plan.estimate import TrainingMemory, cpu_runtime_bytes, shape_of, training_memory
from llmlab.tokenizer import load_tokenizer
from llmlab.track import TrackConfig, check_loggers
from llmlab.train.checkpoint import latest_checkpoint, save_checkpoint, save_sharded_checkpoint
from llmlab.train.config import (CheckpointConfig, EvalConfig, OptimConfig, SystemConfig, check_at_least,
                                 check_probability, check_seed)
from llmlab.train.core import accumulate, clip_gradients, open_run, resolve_autocast, wrap_model
from llmlab.train.loop import available_memory, check_run_dir, resume_run, run_settings, truncate_metrics
from llmlab.train.objectives import Batches, MaskingConfig, resolve_objective
from llmlab.train.optim import build_optimizer


@dataclass
class PretrainConfig:
    data: str = "runs/data"  # folder written by `llmlab data prepare`
    verify_data: bool = True  # check the shards' SHA-256 and token ids first (~1 s per GB); false for huge corpora
    out_dir: str = "runs/pretrain"  # run directory: config.yaml, metrics.jsonl, checkpoints/
    model: ModelConfig = field(default_factory=lambda: LlamaConfig(  # any family; vocab_size null = the data's
        vocab_size=None, dim=128, n_layers=4, n_heads=4, max_seq_len=256))
    optim: OptimConfig = field(default_factory=OptimConfig)
    seq_len: int | None = None  # tokens per training sequence; null = model.max_seq_len, the context it is built for
    batch_size: int = 16  # sequences per micro-batch (per process)
    grad_accum: int = 1  # micro-batches per optimizer step
    max_steps: int = 1000  # optimizer steps; the schedule ends here
    max_minutes: float = 0.0  # also stop (with a checkpoint) after this much wall time; 0 = no limit
    # what the model learns to predict: auto = the next token (decoders), masked tokens (encoders: mlm),
    # corrupted spans (encoder-decoders: span_corruption); see llmlab/train/objectives.py
    objective: Literal["auto", "clm", "mlm", "span_corruption"] = "auto"
    masking: MaskingConfig = field(default_factory=MaskingConfig)  # mlm and span_corruption
    fim_rate: float = 0.0  # fraction of training documents reordered for fill-in-the-middle (code models)
    fim_spm_rate: float = 0.5  # of those, the fraction in SPM rather than PSM order
    nonfinite: Literal["stop", "skip"] = "stop"  # on a NaN/inf loss: stop the run, or skip the batch
    log_every: int = 10  # plain log line every N steps when stderr is not a terminal
    seed: int = 0
    eval: EvalConfig = field(default_factory=EvalConfig)
    ckpt: CheckpointConfig = field(default_factory=CheckpointConfig)
    system: SystemConfig = field(default_factory=SystemConfig)
    track: TrackConfig = field(default_factory=TrackConfig)  # metric loggers: TensorBoard, MLflow

    def __post_init__(self):
        check_at_least(self, seq_len=1, batch_size=1, grad_accum=1, max_steps=1, max_minutes=0, log_every=1)
        check_probability(self, "fim_rate", "fim_spm_rate")
        if not self.data:
            raise ValueError("data is empty: name the folder `llmlab data prepare` wrote")
        check_seed(self.seed)


@torch.no_grad()
def evaluate(model, shards: TokenShards, cfg: PretrainConfig, device: torch.device,
             objective: Batches | None = None) -> float:
    """Loss per predicted token (nats, `llmlab.eval.loss`) over the same `eval.batches` validation
    batches every time (masked statically: the same predictions at every evaluation; for encoders the
    masked-LM loss alone, so perplexity means the same with or without the auxiliary tasks)."""

    def batches():
        for i in range(cfg.eval.batches):
            if objective is not None:  # the masked tokens alone: a sentence-pair or span boundary loss is left out
                batch = objective.batch(shards, (cfg.seed, 1, i), device, static=True)
                yield {k: v for k, v in batch.items() if k not in ("sentence_targets", "span_boundaries")}
                continue
            x, y = sample_batch(shards, cfg.batch_size, cfg.seq_len, (cfg.seed, 1, i), device)
            yield {"input_ids": x, "targets": y}

    return token_loss(model, batches()).mean


def run(cfg: PretrainConfig, *, overwrite: bool = False) -> dict:
    """Pretrain; returns {"step", "tokens", "val_loss", "stopped", "checkpoint", "exit_code"}.
    `overwrite` starts over in an out_dir that holds an earlier run's checkpoints or other files."""
    # ---- setup
    objective_name = resolve_objective(cfg.objective, cfg.masking, cfg.model)
    if cfg.fim_rate and objective_name != "clm":
        raise LlmlabError(f"fim_rate reorders documents for next-token prediction; objective={objective_name}")
    device = choose_device(cfg.system.device, "system.device")
    rank, world = init_distributed(device)
    cfg.system.autocast = resolve_autocast(cfg.system, device, rank, world)  # config.yaml records it
    check_run_dir(Path(cfg.out_dir), resume=cfg.ckpt.resume, inputs=[prepared_dir(cfg.data)], overwrite=overwrite,
                  rank=rank)
    check_loggers(cfg.track)
    train_data = TokenShards(cfg.data, "train")
    manifest = train_data.manifest
    val_data = TokenShards(cfg.data, "val") if manifest["splits"].get("val", {}).get("tokens") else None
    _resolve(cfg, manifest, {"train": train_data, "val": val_data})
    fim = _fim_spec(cfg, manifest)
    tokenizer_dir = _tokenizer_dir(manifest)
    objective = _objective(cfg, objective_name, tokenizer_dir, fim, {"train": train_data, "val": val_data})
    add_bos = bool(manifest["config"].get("bos", False))  # the shards' convention, which checkpoints record
    if cfg.system.preflight:
        preflight(cfg, device, processes=world if device.type == "cpu" else 1)
    if cfg.verify_data:
        for shards in (train_data, val_data):
            if shards is not None:
                shards.verify()
    out, ckpt_dir = Path(cfg.out_dir), Path(cfg.out_dir) / "checkpoints"

    seed_everything(cfg.seed)
    model = build_model(cfg.model).to(device)
    model.gradient_checkpointing = cfg.system.gradient_checkpointing
    trainee = wrap_model(model, cfg.system, world)
    optimizer = build_optimizer(model, cfg.optim, device)
    masking = ", ".join(f"{k}={v}" for k, v in vars(cfg.masking).items())
    settings = run_settings(cfg, world, objective=objective_name, model=to_dict(cfg.model),
                            **({"masking": masking} if objective_name != "clm" else {}))
    counters = resume_run(cfg, ckpt_dir, rank, model, optimizer, settings)
    if rank == 0:
        save_config(cfg, out / "config.yaml")
        truncate_metrics(out / "metrics.jsonl", counters.step)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.system.autocast == "bf16")
    tokens_per_step = cfg.batch_size * cfg.seq_len * cfg.grad_accum * world
    bytes_per_token = _bytes_per_token(manifest, "val")

    def predicted_token_loss(batch):  # the mean loss over the batch's predicted tokens
        return trainee.forward(**batch), (batch["targets"] != -100).sum()

    def evaluation() -> dict:
        val_loss = evaluate(model, val_data, cfg, device, objective)
        ppl = math.exp(min(val_loss, 50))
        bpb = {"val_bpb": val_loss / math.log(2) / bytes_per_token} if objective_name == "clm" else {}
        return {"val_loss": val_loss, "val_ppl": ppl, **bpb, "text": f"val_loss {val_loss:.4f}  ppl {ppl:.2f}"}

    def save(state: dict) -> None:
        if trainee.sharded:  # every rank writes its shards
            save_sharded_checkpoint(ckpt_dir, counters.step, model, optimizer, {**state, "settings": settings},
                                    cfg.ckpt.keep_last, tokenizer_dir, add_bos=add_bos)
        elif rank == 0:
            save_checkpoint(ckpt_dir, counters.step, model, optimizer, {**state, "settings": settings},
                            cfg.ckpt.keep_last, tokenizer_dir, add_bos=add_bos)

    # ---- the loop
    with open_run(cfg, counters, out, rank, world, device) as run:
        model.train()
        for step in range(counters.step, cfg.max_steps):
            t0 = time.time()
            lr = run.begin_step(step, optimizer)
            # batch k of the step's grad_accum x world; so 2 ranks x 1 equals 1 process x 2 micro-batches
            batches = [objective.batch(train_data, (cfg.seed, 0, step, rank * cfg.grad_accum + micro), device)
                       for micro in range(cfg.grad_accum)]
            loss = accumulate(trainee, batches, predicted_token_loss, autocast)
            grad_norm = clip_gradients(trainee, cfg.optim.grad_clip)
            record = None
            if run.optimizer_step(step, loss.loss, grad_norm, optimizer):
                counters.tokens += tokens_per_step
                record = {"loss": loss.loss.item(), "lr": lr, "tokens_per_s": tokens_per_step / (time.time() - t0),
                          "grad_norm": grad_norm.item(), **run.auxiliary(loss)}
            if run.after_step(step + 1, record, evaluate=evaluation if val_data is not None else None, save=save):
                break
    stopped = run.stopped or "max_steps"
    latest = latest_checkpoint(ckpt_dir, clean=False)
    if rank == 0:
        print(f"stopped after step {counters.step} ({stopped}); {counters.tokens:,} tokens; checkpoint {latest}")
    return {"step": counters.step, "tokens": counters.tokens, "val_loss": run.val_loss, "stopped": stopped,
            "checkpoint": str(latest) if latest else None, "exit_code": run.exit_code, "skipped": counters.skipped}


# --------------------------------------------------------------------------- helpers


def preflight(cfg: PretrainConfig, device: torch.device, processes: int = 1) -> float:
    """Peak memory of this run per process, by the planner's estimate; LlmlabError when `processes`
    of them (ranks sharing the RAM of one CPU) exceed the memory the device has free (CPU: available
    RAM). Returns the estimate in bytes."""
    memory = estimate_training_memory(cfg, device)
    have = available_memory(device)
    if have is not None and memory.total * processes > have:
        parts = ", ".join(f"{k.replace('_', ' ')} {v / 1e9:.2f}" for k, v in
                          (("weights", memory.weights + memory.master_weights), ("gradients", memory.gradients),
                           ("optimizer", memory.optimizer), ("activations", memory.activations),
                           ("runtime", memory.runtime)) if v)
        ranks = f" x {processes} processes" if processes > 1 else ""
        raise LlmlabError(f"preflight: this run needs about {memory.total / 1e9:.2f} GB per process ({parts} GB)"
                          f"{ranks} but {device} has {have / 1e9:.2f} GB free; lower batch_size or seq_len, set "
                          "system.gradient_checkpointing=true, or skip the check with system.preflight=false")
    return memory.total


def estimate_training_memory(cfg: PretrainConfig, device: torch.device) -> TrainingMemory:
    """The planner's training-memory estimate for this config: fp32 AdamW states, activations at the
    autocast precision, plus the one logits block the blockwise loss holds at a time; on a CPU, also
    the runtime's kernels and the freed memory the allocator keeps."""
    precision = "bf16" if cfg.system.autocast == "bf16" else "fp32"
    memory = training_memory(shape_of(cfg.model), batch=cfg.batch_size, seq_len=cfg.seq_len, precision=precision,
                             checkpointing=cfg.system.gradient_checkpointing)
    block = LOSS_BLOCK_ELEMENTS_GPU if device.type == "cuda" else LOSS_BLOCK_ELEMENTS_CPU
    memory.activations += 4 * min(block, cfg.batch_size * cfg.seq_len * cfg.model.vocab_size)
    if device.type == "cpu":
        memory.runtime = cpu_runtime_bytes(memory.activations)
    return memory


def _tokenizer_dir(manifest: dict) -> Path | None:
    """The folder whose tokenizer files each checkpoint carries: the shards were tokenized with a
    tokenizer.json file or a folder holding one; None when the manifest names neither."""
    if not manifest["tokenizer_path"]:
        return None
    path = Path(manifest["tokenizer_path"])
    return path if path.is_dir() else path.parent


def _resolve(cfg: PretrainConfig, manifest: dict, splits: dict[str, TokenShards | None]) -> None:
    """Fill in what was left unset from the data and the model (config.yaml records the values), and
    check what was set against them."""
    if cfg.model.vocab_size is None:
        cfg.model.vocab_size = manifest["vocab_size"]
    if cfg.model.vocab_size < manifest["vocab_size"]:
        raise LlmlabError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's "
                          f"{manifest['vocab_size']} ({cfg.data}); set model.vocab_size={manifest['vocab_size']} "
                          "or leave it unset")
    given = cfg.seq_len is not None
    if not given:
        cfg.seq_len = cfg.model.max_seq_len
    if cfg.seq_len > cfg.model.max_seq_len:
        raise LlmlabError(f"seq_len={cfg.seq_len} exceeds model.max_seq_len={cfg.model.max_seq_len}; lower "
                          f"seq_len, or build the model for it with model.max_seq_len={cfg.seq_len}")
    for name, shards in splits.items():
        if shards is not None and len(shards) <= cfg.seq_len + 1:
            raise LlmlabError(f"{cfg.data}: the {name} split has {len(shards)} tokens, fewer than seq_len+1="
                              f"{cfg.seq_len + 1}{'' if given else ' (seq_len unset: model.max_seq_len)'}; lower "
                              "seq_len or add data")


def _objective(cfg: PretrainConfig, name: str, tokenizer_dir: Path | None, fim: FimSpec | None,
               splits: dict[str, TokenShards | None]) -> Batches:
    """The objective's batch maker, checked against the data: the tokenizer's special tokens, and
    a sequence or more in each split."""
    tokenizer = None
    if name != "clm":
        if tokenizer_dir is None:
            raise LlmlabError(f"objective={name} needs the tokenizer's special tokens, and {cfg.data} names no "
                              "tokenizer folder; prepare the data with tokenizer=PATH")
        tokenizer = load_tokenizer(tokenizer_dir)
    objective = Batches(name, cfg.masking, cfg.seq_len, cfg.batch_size, cfg.model, tokenizer, cfg.seed, fim)
    for split, shards in splits.items():
        if shards is not None and objective.sequences(shards) < 1:
            raise LlmlabError(f"{cfg.data}: the {split} split has {len(shards)} tokens, fewer than one sequence of "
                              f"{objective.row}; lower seq_len or add data")
    return objective


def _fim_spec(cfg: PretrainConfig, manifest: dict) -> FimSpec | None:
    if cfg.fim_rate == 0:
        return None
    if not manifest.get("fim_ids") or manifest.get("eos_id") is None:
        raise LlmlabError(f"fim_rate={cfg.fim_rate} needs <|fim_prefix|>, <|fim_middle|>, <|fim_suffix|> and EOS "
                          f"tokens, and the tokenizer of {cfg.data} lacks some; train one with `llmlab tokenizer "
                          "train` and prepare the data again")
    prefix, middle, suffix = manifest["fim_ids"]
    return FimSpec(prefix, middle, suffix, manifest["eos_id"], cfg.fim_rate, cfg.fim_spm_rate)


def _bytes_per_token(manifest: dict, split: str) -> float:
    s = manifest["splits"].get(split) or {}
    return s["bytes"] / s["tokens"] if s.get("tokens") else float("nan")


