"""`llmlab scaling moe`: does a mixture of experts beat a dense model at equal compute, here?

Trains two LLaMA models on the same data with the same schedule: a dense one, and one whose MLPs
are replaced by E experts of which each token uses k, each expert 1/k as wide as the dense MLP, so
that a token passes through as many parameters in both (the router adds dim x E per layer). Their
validation losses are plotted against training compute, 6 x active parameters per token plus the
attention term (`flops_per_token`), and the report says what share of the dense model's compute the
MoE needed to reach the dense model's final loss. Switch Transformer (Fedus et al. 2021) and GLaM
(Du et al. 2021) report this gain at scale; this command measures it on a laptop-sized budget.
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from llmlab.common import LlmlabError, atomic_write_text, check_output, style
from llmlab.config import save_config
from llmlab.data.shards import read_manifest
from llmlab.models import LlamaConfig
from llmlab.models.moe import MoEConfig
from llmlab.tokenizer.bpe import check_vocab_size
from llmlab.train.config import check_at_least, check_seed
from llmlab.train.pretrain import PretrainConfig
from llmlab.train.pretrain import run as pretrain
from llmlab.train.sweep import changed_settings, prepare_data, save_compute_plot, verify_data


@dataclass
class MoEVsDenseConfig:
    out_dir: str = "runs/moe-vs-dense"  # data/, tokenizer/, runs/{dense,moe}/, result.json, moe_vs_dense.png
    data: str = ""  # token shards from `llmlab data prepare`; empty: prepare an embedded corpus here
    corpus: Literal["docs", "python"] = "python"  # embedded corpus: CPython docs (~0.2M tokens) or stdlib code
    corpus_bytes: int = 8_000_000  # of the code corpus: ~2.2M training tokens, so no run repeats data
    vocab_size: int = 2048  # tokenizer trained for the embedded corpus
    dim: int = 128  # both models' width (heads of 32)
    n_layers: int = 4
    hidden_dim: int = 352  # the dense MLP's width; each expert's is hidden_dim / top_k
    experts: MoEConfig = field(default_factory=lambda: MoEConfig(n_experts=8, top_k=2))  # its hidden_dim is set here
    tokens: float = 2e6  # training tokens of each model
    seq_len: int = 128
    batch_size: int = 16
    lr: float = 3e-3  # peak learning rate of both (warmup 5%, cosine to the end)
    evals: int = 10  # validation points on each curve
    eval_batches: int = 16  # validation micro-batches per point
    seed: int = 0

    def __post_init__(self):
        check_at_least(self, corpus_bytes=0, dim=32, n_layers=1, hidden_dim=1, seq_len=1, batch_size=1, evals=1,
                       eval_batches=1)
        if self.dim % 32:
            raise ValueError(f"dim must be a multiple of 32 (heads of 32), got {self.dim}")
        if self.hidden_dim % self.experts.top_k:
            raise ValueError(f"hidden_dim={self.hidden_dim} must split into top_k={self.experts.top_k} expert widths")
        if self.experts.n_experts < 2:
            raise ValueError(f"experts.n_experts must be >= 2 for a sparse model, got {self.experts.n_experts}")
        if not math.isfinite(self.tokens):
            raise ValueError(f"tokens must be a finite number, got {self.tokens}")
        if not self.tokens >= self.batch_size * self.seq_len * self.evals:
            raise ValueError(f"tokens={self.tokens:g} is too few for {self.evals} evaluations of batches of "
                             f"{self.batch_size} x {self.seq_len}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        check_vocab_size(self.vocab_size)
        check_seed(self.seed)

    def models(self, vocab_size: int) -> dict[str, LlamaConfig]:
        """The dense model and the sparse one: the same but for the MLPs."""
        shape = dict(vocab_size=vocab_size, dim=self.dim, n_layers=self.n_layers, n_heads=self.dim // 32,
                     hidden_dim=self.hidden_dim, max_seq_len=self.seq_len, tie_embeddings=True)
        moe = MoEConfig(**{**vars(self.experts), "hidden_dim": self.hidden_dim // self.experts.top_k})
        return {"dense": LlamaConfig(**shape), "moe": LlamaConfig(**shape, moe=moe)}


# what the command writes in its out_dir; a folder holding only these is a comparison to continue
FILES = ("config.yaml", "data", "tokenizer", "runs", "result.json", "moe_vs_dense.png")
# the settings a finished run's curve depends on
RESULT_SETTINGS = ("data", "corpus", "corpus_bytes", "vocab_size", "dim", "n_layers", "hidden_dim", "experts",
                   "tokens", "seq_len", "batch_size", "lr", "evals", "eval_batches", "seed")


def _train(cfg: MoEVsDenseConfig, data: Path, model: LlamaConfig, folder: Path) -> dict:
    """One model's run (or its result, when it finished earlier): validation loss against compute;
    {"exit_code": ...} alone when a signal stopped it (nothing is recorded: the next call redoes it)."""
    result_file = folder / "result.json"
    if result_file.is_file():
        return json.loads(result_file.read_text())
    steps = max(1, math.ceil(cfg.tokens / (cfg.batch_size * cfg.seq_len)))
    every = max(1, steps // cfg.evals)
    run_cfg = PretrainConfig(data=str(data), verify_data=False, out_dir=str(folder / "train"), model=model,
                             seq_len=cfg.seq_len, batch_size=cfg.batch_size, max_steps=steps, seed=cfg.seed,
                             log_every=every)
    run_cfg.optim.lr = cfg.lr
    run_cfg.optim.warmup_steps = max(1, steps // 20)
    run_cfg.eval.every, run_cfg.eval.batches = every, cfg.eval_batches
    run_cfg.ckpt.every, run_cfg.ckpt.keep_last = steps, 1
    if (folder / "train").exists():  # an interrupted run: start it over
        shutil.rmtree(folder / "train")
    out = pretrain(run_cfg)
    if out["exit_code"]:
        return {"exit_code": out["exit_code"]}
    if out["val_loss"] is None or not math.isfinite(out["val_loss"]):
        raise LlmlabError(f"run {folder.name} ended without a finite validation loss")
    per_step = cfg.batch_size * cfg.seq_len * model.flops_per_token(cfg.seq_len)
    lines = [json.loads(line) for line in (folder / "train" / "metrics.jsonl").read_text().splitlines()]
    curve = [[r["step"] * per_step, r["val_loss"]] for r in lines if "val_loss" in r]
    params = model.num_params()
    result = {"params": params.total, "active_params": params.active,
              "flops_per_token": model.flops_per_token(cfg.seq_len), "tokens": steps * cfg.batch_size * cfg.seq_len,
              "val_loss": out["val_loss"], "curve": curve,
              "dropped_tokens": sum(r.get("dropped_tokens", 0) for r in lines)}
    atomic_write_text(result_file, json.dumps(result, indent=2) + "\n")
    return result


def flops_to_reach(curve: list[list[float]], loss: float) -> float | None:
    """The compute at which a curve of (flops, loss) points first reaches `loss`, interpolated
    linearly in log-compute between the two points around it; None if it never does."""
    for (c0, l0), (c1, l1) in zip(curve, curve[1:]):
        if l1 <= loss:
            if l0 <= loss:
                return c0
            return math.exp(math.log(c0) + (l0 - loss) / (l0 - l1) * (math.log(c1) - math.log(c0)))
    return curve[0][0] if curve and curve[0][1] <= loss else None


def run(cfg: MoEVsDenseConfig, *, overwrite: bool = False) -> dict:
    """Train (or read) both runs and compare them; returns the comparison written to result.json."""
    out = check_output(cfg.out_dir, label="out_dir", inputs=[cfg.data or None], overwrite=True)
    foreign = sorted(p.name for p in out.iterdir() if p.name not in FILES and not p.name.startswith(".")) \
        if out.is_dir() else []
    if foreign and not overwrite:
        raise LlmlabError(f"out_dir {out}: already exists and holds files that are not a comparison's "
                          f"({', '.join(foreign[:5])}); pass --overwrite to write there anyway (llmlab replaces "
                          "only the files it writes) or choose another out_dir")
    changed = changed_settings(cfg, out, RESULT_SETTINGS, results=("runs", "data", "result.json"))
    if changed and not overwrite:
        raise LlmlabError(f"out_dir {out}: holds a comparison made with other settings "
                          f"({next(iter(changed.values()))}); pass --overwrite to start it over there, or choose "
                          "another out_dir")
    if cfg.data:
        verify_data(cfg.data)  # before anything is written
    if overwrite:
        for name in ("runs", "result.json", "moe_vs_dense.png"):
            path = out / name
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            elif path.exists() or path.is_symlink():
                path.unlink()
    save_config(cfg, out / "config.yaml")
    data = prepare_data(cfg, out)
    if not cfg.data:
        verify_data(data)
    models = cfg.models(read_manifest(data)["vocab_size"])
    runs = {}
    for i, (name, model) in enumerate(models.items(), 1):
        n = model.num_params()
        print(style(f"[{i}/2] {name}: {n.total:,} parameters, {n.active:,} active", "1"))
        runs[name] = _train(cfg, data, model, out / "runs" / name)
        if "exit_code" in runs[name]:
            print(f"stopped: the {name} run was interrupted; the same command continues (finished runs are read back)")
            return runs[name]
    dense, moe = runs["dense"], runs["moe"]
    reach = flops_to_reach(moe["curve"], dense["val_loss"])
    summary = {"dense": dense, "moe": moe, "loss_gap": dense["val_loss"] - moe["val_loss"],
               "moe_compute_to_dense_loss": None if reach is None else reach / dense["curve"][-1][0]}
    plot(runs, out / "moe_vs_dense.png", cfg)
    atomic_write_text(out / "result.json", json.dumps(summary, indent=2) + "\n")
    _report(summary, out)
    return summary


def _report(summary: dict, out: Path) -> None:
    print(style("\nvalidation loss at equal training compute", "1"))
    for name in ("dense", "moe"):
        r = summary[name]
        print(f"  {name:5s}  {r['params']:>10,} parameters, {r['active_params']:>10,} active, "
              f"{r['flops_per_token'] / 1e6:6.2f} MFLOPs/token: val loss {r['val_loss']:.4f}")
    share, gap = summary["moe_compute_to_dense_loss"], summary["loss_gap"]
    reached = ("never reached the dense model's final loss" if share is None else
               f"reached the dense model's final loss with {share:.0%} of its compute")
    print(f"  the MoE ends {abs(gap):.4f} nats {'below' if gap >= 0 else 'above'} the dense model and {reached}")
    print(f"  plot {out / 'moe_vs_dense.png'}; numbers {out / 'result.json'}")


def plot(runs: dict[str, dict], png: Path, cfg: MoEVsDenseConfig) -> None:
    """Validation loss against training compute, one line per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    e = cfg.experts
    labels = {"dense": "dense", "moe": f"MoE: {e.n_experts} experts, top-{e.top_k}"}
    for name, r in runs.items():
        ax.plot(*zip(*r["curve"]), "o-", ms=4,
                label=f"{labels[name]} ({r['params'] / 1e6:.2f}M parameters, {r['active_params'] / 1e6:.2f}M active)")
    save_compute_plot(fig, ax, "training compute (FLOPs, from active parameters)", png)
