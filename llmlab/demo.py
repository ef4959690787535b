"""`llmlab demo`: the main job on the embedded default, end to end, with no arguments.

1. train a byte-level BPE tokenizer on what every Python install carries: the CPython
   documentation (`pydoc_data.topics`, ~0.46 MB) and ~6 MB of the standard library's own .py
   files, then clean, deduplicate, split and tokenize them into shards;
2. pretrain a small LLaMA-style model for a fixed wall-clock budget (about three minutes on two
   CPU cores), with the step count calibrated so the cosine schedule ends on time, evaluating and
   saving a checkpoint six times on the way;
3. report validation perplexity against a unigram baseline, draw the loss curve
   (`loss.png` in the run directory), print a few samples, and evaluate the best checkpoint by
   validation loss on the built-in tasks (held-out documentation perplexity, cloze, bias probe).

The documentation alone is ~95K tokens: three minutes of training would read it 10 to 20 times,
and validation perplexity would rise after the first few passes while the samples began to
recite it. With the code added, the run reads its data about once, and validation perplexity
falls until the end.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from llmlab.common import (LlmlabError, atomic_path, atomic_write_text, check_output, choose_device, seed_everything,
                           style)
from llmlab.config import save_config
from llmlab.data.prepare import PrepareConfig, TokenizerTrainConfig, train_tokenizer
from llmlab.data.prepare import run as prepare
from llmlab.data.shards import TokenShards
from llmlab.generate import SamplingParams
from llmlab.generate.text import TextGenerator
from llmlab.models import LlamaConfig
from llmlab.models.io import load_model
from llmlab.tokenizer import load_tokenizer
from llmlab.tokenizer.bpe import check_vocab_size
from llmlab.train.config import check_at_least, check_seed
from llmlab.train.loop import available_memory
from llmlab.train.pretrain import PretrainConfig, estimate_training_memory
from llmlab.train.pretrain import run as pretrain

PROMPTS = ("The for statement", "A class definition", "Exceptions are")


@dataclass
class DemoConfig:
    out_dir: str = "runs/demo"  # everything the demo writes: data/, tokenizer/, pretrain/, loss.png
    minutes: float = 3.0  # wall-clock training budget
    vocab_size: int = 4096  # BPE vocabulary
    dim: int = 192  # model width (LLaMA-style, 4 layers, 6 heads)
    n_layers: int = 4
    seq_len: int = 128
    batch_size: int = 16
    lr: float = 2e-3
    code_bytes: int = 6_000_000  # bytes of the standard library's .py files added to the documentation (0: none)
    seed: int = 0

    def __post_init__(self):
        check_vocab_size(self.vocab_size)
        check_at_least(self, n_layers=1, seq_len=1, batch_size=1, code_bytes=0)
        for name in ("minutes", "lr"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.dim < 1 or self.dim % 12:
            raise ValueError(f"dim must be a positive multiple of 12 (6 heads of even width), got {self.dim}")
        check_seed(self.seed)


def run(cfg: DemoConfig, *, overwrite: bool = False) -> dict:
    """Run the demo; returns {"val_loss", "val_ppl", "unigram_ppl", "steps", "best_checkpoint", "run_dir",
    "eval"}. `overwrite`
    runs it again in an out_dir that holds an earlier demo (or anything else)."""
    out = check_output(cfg.out_dir, label="out_dir", overwrite=overwrite)
    model = LlamaConfig(vocab_size=cfg.vocab_size, dim=cfg.dim, n_layers=cfg.n_layers, n_heads=6,
                        max_seq_len=cfg.seq_len, tie_embeddings=True)
    # before the tokenizer and the data: a model too large for this machine is refused in seconds
    device = choose_device()
    need = estimate_training_memory(PretrainConfig(model=model, seq_len=cfg.seq_len, batch_size=cfg.batch_size),
                                    device).total
    have = available_memory(device)
    if have is not None and need > have:
        raise LlmlabError(f"the demo's model needs about {need / 1e9:.2f} GB to train but {device} has "
                          f"{have / 1e9:.2f} GB free; lower dim, n_layers, batch_size or seq_len")
    seed_everything(cfg.seed)
    save_config(cfg, out / "config.yaml")

    corpus = "docs+python" if cfg.code_bytes else "docs"
    print(style("1/4 data and tokenizer (the CPython documentation in pydoc_data.topics"
                + (f" and {cfg.code_bytes / 1e6:g} MB of the standard library's .py files)" if cfg.code_bytes else ")"),
                "1"))
    tok_dir = train_tokenizer(TokenizerTrainConfig(out_dir=str(out / "tokenizer"), vocab_size=cfg.vocab_size,
                                                   default=corpus, default_bytes=cfg.code_bytes), overwrite=overwrite)
    manifest = prepare(PrepareConfig(out_dir=str(out / "data"), tokenizer=str(tok_dir), val_frac=0.1, default=corpus,
                                     default_bytes=cfg.code_bytes, seed=cfg.seed), overwrite=overwrite)

    print(style(f"\n2/4 pretraining for {cfg.minutes:g} minutes", "1"))
    model.vocab_size = manifest["vocab_size"]
    train_cfg = PretrainConfig(data=str(out / "data"), out_dir=str(out / "pretrain"), seq_len=cfg.seq_len,
                               batch_size=cfg.batch_size, model=model, seed=cfg.seed, log_every=25)
    train_cfg.optim.lr = cfg.lr
    train_cfg.eval.batches = 4
    train_cfg.max_steps = _calibrate_steps(train_cfg, 60 * cfg.minutes, n_evals=6)
    train_cfg.optim.warmup_steps = max(1, train_cfg.max_steps // 20)
    train_cfg.eval.every = max(1, train_cfg.max_steps // 6)
    train_cfg.ckpt.every, train_cfg.ckpt.keep_last = train_cfg.eval.every, 8  # one per evaluation: pick the best
    train_cfg.max_minutes = 1.5 * cfg.minutes  # a hard cap if the machine turns out slower than measured
    result = pretrain(train_cfg, overwrite=overwrite)

    print(style("\n3/4 results", "1"))
    unigram = unigram_loss(TokenShards(out / "data", "train"), TokenShards(out / "data", "val"), manifest["vocab_size"])
    val_loss = result["val_loss"]
    print(f"  validation perplexity  {math.exp(val_loss):8.2f}   (unigram baseline {math.exp(unigram):.2f})")
    curve = [(r["step"], r["val_loss"]) for r in _records(out / "pretrain" / "metrics.jsonl") if "val_loss" in r]
    print("  along the way          " + "  ".join(f"{math.exp(v):.1f}" for _, v in curve)
          + ("   (still falling)" if len(curve) > 1 and curve[-1][1] <= min(v for _, v in curve) else ""))
    plot_losses(out / "pretrain" / "metrics.jsonl", out / "loss.png")
    print(f"  loss curve             {out / 'loss.png'}")
    best = best_checkpoint(out / "pretrain")
    model = load_model(best)
    tokenizer = load_tokenizer(tok_dir)
    completions = TextGenerator(model.eval(), tokenizer).complete(
        PROMPTS, SamplingParams(temperature=0.8, max_new_tokens=40, seed=cfg.seed))
    for prompt, c in zip(PROMPTS, completions):
        print(style(f"  > {prompt}", "2") + c.text.replace("\n", " "))

    print(style(f"\n4/4 evaluation of the best checkpoint by validation loss: {best.name}", "1"))
    from llmlab.eval.run import DEFAULT_TASKS, EvalConfig, table
    from llmlab.eval.run import run as evaluate

    results = evaluate(EvalConfig(tasks=list(DEFAULT_TASKS), out_dir=str(out / "eval"), device="cpu"), [str(best)],
                       overwrite=overwrite, quiet=True)
    print("\n".join("  " + line for line in table(results).splitlines()))
    print(f"  per-document scores    {out / 'eval' / 'samples.jsonl'}")
    summary = {"val_loss": val_loss, "val_ppl": math.exp(val_loss), "unigram_ppl": math.exp(unigram),
               "steps": result["step"], "best_checkpoint": str(best), "run_dir": str(out),
               "eval": {f"{r['task']}/{r['metric']}": r["value"] for r in results["rows"]}}
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2))
    return summary


def _records(metrics_file: Path) -> list[dict]:
    return [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()]


def best_checkpoint(run_dir: Path) -> Path:
    """The run's checkpoint whose step had the lowest validation loss (the newest without any)."""
    from llmlab.train.checkpoint import list_checkpoints

    found = list_checkpoints(run_dir / "checkpoints")
    if not found:
        raise LlmlabError(f"{run_dir}: no checkpoint was written")
    losses = {r["step"]: r["val_loss"] for r in _records(run_dir / "metrics.jsonl") if "val_loss" in r}
    scored = [c for c in found if int(c.name.removeprefix("step-")) in losses]
    return min(scored, key=lambda c: losses[int(c.name.removeprefix("step-"))]) if scored else found[-1]


def _calibrate_steps(cfg: PretrainConfig, seconds: float, n_evals: int) -> int:
    """Optimizer steps that fit in `seconds` with `n_evals` evaluations, from timing a few steps of
    the same model and batch (an evaluation batch costs about a third of a training step)."""
    from llmlab.models import build_model
    from llmlab.train.optim import build_optimizer

    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model)
    opt = build_optimizer(model, cfg.optim, torch.device("cpu"))
    x = torch.randint(0, cfg.model.vocab_size, (cfg.batch_size, cfg.seq_len))
    times = []
    for _ in range(4):
        t0 = time.time()
        model(x, targets=x).backward()
        opt.step()
        opt.zero_grad()
        times.append(time.time() - t0)
    per_step = float(np.median(times[1:])) * 1.05  # logging and data sampling
    return max(10, int(seconds / per_step - n_evals * cfg.eval.batches / 3))


def unigram_loss(train: TokenShards, val: TokenShards, vocab_size: int) -> float:
    """Cross-entropy (nats) of the validation tokens under add-one-smoothed training unigram counts."""
    counts = np.ones(vocab_size, dtype=np.float64)
    for start in range(0, len(train), 1 << 20):
        counts += np.bincount(train.get(start, min(1 << 20, len(train) - start)), minlength=vocab_size)
    log_p = np.log(counts / counts.sum())
    val_tokens = val.get(0, len(val))
    return float(-log_p[val_tokens].mean())


def plot_losses(metrics_file: Path, png: Path) -> None:
    """Training and validation loss against step, saved as a PNG."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    records = _records(metrics_file)
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(*zip(*train), lw=0.8, label="train")
    if val:
        ax.plot(*zip(*val), "o-", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_path(png) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
