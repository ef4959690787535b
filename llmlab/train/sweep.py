"""`llmlab scaling fit`: measure your own scaling law on this machine.

Trains a grid of small LLaMA models (widths x token budgets) with the pretraining loop, fits
L(N, D) = E + A / N^alpha + B / D^beta to their final validation losses (`llmlab.plan.fit`), and
reports the constants with bootstrap errors, how well the fit predicts the largest run when that
run is held out, a plot of loss against compute with the fitted compute-optimal frontier, and the
optimal size for a larger budget. N counts non-embedding parameters (Kaplan et al. 2020 find the
law cleanest that way at small sizes); a finished run is read back instead of trained again.
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import asdict, dataclass, field, is_dataclass
from pathlib import Path
from typing import Literal

import yaml

from llmlab.common import LlmlabError, atomic_path, atomic_write_text, check_output, style
from llmlab.config import save_config
from llmlab.data.prepare import PrepareConfig, TokenizerTrainConfig, train_tokenizer
from llmlab.data.prepare import run as prepare
from llmlab.data.shards import TokenShards, prepared_dir, read_manifest
from llmlab.models import LlamaConfig
from llmlab.plan.commands import MAX_FLOPS
from llmlab.plan.fit import NAMES, LawFit, fit_law
from llmlab.plan.scaling import CHINCHILLA, CHINCHILLA_REFIT
from llmlab.tokenizer.bpe import check_vocab_size
from llmlab.train.config import check_at_least, check_seed
from llmlab.train.pretrain import PretrainConfig
from llmlab.train.pretrain import run as pretrain


@dataclass
class ScalingFitConfig:
    out_dir: str = "runs/scaling"  # sweep folder: data/, tokenizer/, runs/, fit.json, scaling.png
    data: str = ""  # token shards from `llmlab data prepare`; empty: prepare an embedded corpus here
    corpus: Literal["docs", "python"] = "python"  # embedded corpus: CPython docs (~0.2M tokens) or stdlib code
    corpus_bytes: int = 8_000_000  # of the code corpus: ~2.2M training tokens, so no run repeats data
    vocab_size: int = 2048  # tokenizer trained for the embedded corpus
    widths: list[int] = field(default_factory=lambda: [32, 48, 64, 96])  # depth = max(2, width / 32), heads of 16
    tokens: list[float] = field(default_factory=lambda: [2.5e5, 5e5, 1e6, 2e6])  # training tokens of each run
    seq_len: int = 128
    batch_size: int = 16
    lr: float = 3e-3  # peak learning rate of every run (warmup 10%, cosine to the end)
    hold_out: bool = True  # fit without the largest run and report how well it is predicted
    predict_flops: float = 1e18  # a budget to size compute-optimally with the fitted law
    bootstrap: int = 50  # resamples for the constants' standard errors
    seed: int = 0

    def __post_init__(self):
        if len(set(self.widths)) < 2 or len(set(self.tokens)) < 2:
            raise ValueError("widths and tokens need at least two values each to tell the exponents apart")
        if len(set(self.widths)) * len(set(self.tokens)) < 5 + self.hold_out:
            raise ValueError(f"{len(set(self.widths))} widths x {len(set(self.tokens))} token counts give too few "
                             f"runs to fit 5 constants{' with one held out' if self.hold_out else ''}")
        if any(w < 16 or w % 16 for w in self.widths):
            raise ValueError(f"widths must be multiples of 16 (heads of 16), got {self.widths}")
        if not all(t >= 1 for t in self.tokens):
            raise ValueError(f"tokens must each be >= 1, got {self.tokens}")
        if len({_run_name(16, t) for t in self.tokens}) < len(set(self.tokens)):  # a run's folder names 3 digits
            raise ValueError(f"tokens must differ in their first 3 significant digits, got {self.tokens}")
        check_at_least(self, corpus_bytes=0, seq_len=1, batch_size=1, bootstrap=2)  # a spread needs 2 resamples
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if not 0 < self.predict_flops <= MAX_FLOPS:  # the planner's bound: past it no extrapolation means anything
            raise ValueError(f"predict_flops must be in (0, {MAX_FLOPS:g}], got {self.predict_flops:g}")
        check_vocab_size(self.vocab_size)
        check_seed(self.seed)


def _run_name(width: int, tokens: float) -> str:
    return f"w{width}-t{tokens:.3g}"


def _model(width: int, vocab_size: int, seq_len: int) -> LlamaConfig:
    # one shape family: the SwiGLU width stays 8/3 of the model width (a multiple of 16, not of 256,
    # which would give every width here the same 256 and squeeze the range of sizes)
    return LlamaConfig(vocab_size=vocab_size, dim=width, n_layers=max(2, width // 32), n_heads=max(1, width // 16),
                       hidden_dim=16 * -(-8 * width // 48), max_seq_len=seq_len, tie_embeddings=True)


def prepare_data(cfg, out: Path) -> Path:
    """The token shards a sweep (or comparison) trains on: `cfg.data`, else the embedded corpus
    prepared once in `out` (cfg has data, corpus, corpus_bytes, vocab_size and seed)."""
    if cfg.data:
        return prepared_dir(cfg.data)
    data = out / "data"
    if not (data / "manifest.json").is_file():
        tok = out / "tokenizer"
        if not (tok / "tokenizer.json").is_file():
            train_tokenizer(TokenizerTrainConfig(out_dir=str(tok), vocab_size=cfg.vocab_size, default=cfg.corpus,
                                                 default_bytes=cfg.corpus_bytes))
        prepare(PrepareConfig(out_dir=str(data), tokenizer=str(tok), val_frac=0.1, seed=cfg.seed, default=cfg.corpus,
                              default_bytes=cfg.corpus_bytes))
    return data


def verify_data(data: str | Path) -> None:
    """Check the shards once for the whole sweep (its runs skip the check)."""
    data = prepared_dir(str(data))
    for split in ("train", "val"):
        if read_manifest(data)["splits"].get(split, {}).get("tokens"):
            TokenShards(data, split).verify()


def _run_one(cfg: ScalingFitConfig, data: Path, vocab: int, width: int, tokens: float, folder: Path) -> dict:
    result_file = folder / "result.json"
    if result_file.is_file():  # finished earlier: read, do not train again
        return json.loads(result_file.read_text())
    model = _model(width, vocab, cfg.seq_len)
    steps = max(1, math.ceil(tokens / (cfg.batch_size * cfg.seq_len)))
    run_cfg = PretrainConfig(data=str(data), verify_data=False, out_dir=str(folder / "train"), model=model,
                             seq_len=cfg.seq_len, batch_size=cfg.batch_size, max_steps=steps, seed=cfg.seed,
                             log_every=10**9)
    run_cfg.optim.lr = cfg.lr
    run_cfg.optim.warmup_steps = max(1, steps // 10)
    run_cfg.eval.every, run_cfg.eval.batches = steps, 16
    run_cfg.ckpt.every, run_cfg.ckpt.keep_last = steps, 1
    if (folder / "train").exists():  # an interrupted run: start it over
        shutil.rmtree(folder / "train")
    out = pretrain(run_cfg)
    if out["exit_code"]:  # a signal stopped it: nothing is recorded, the next call redoes it
        return {"exit_code": out["exit_code"]}
    if out["val_loss"] is None or not math.isfinite(out["val_loss"]):
        raise LlmlabError(f"run {folder.name} ended without a finite validation loss")
    result = {"width": width, "params": model.num_params().non_embedding,
              "tokens": steps * cfg.batch_size * cfg.seq_len, "val_loss": out["val_loss"]}
    atomic_write_text(result_file, json.dumps(result, indent=2) + "\n")
    return result


# what a sweep writes in its out_dir; a folder holding only these is a sweep to continue
SWEEP_FILES = ("config.yaml", "data", "tokenizer", "runs", "fit.json", "scaling.png")
# the settings a finished run's result depends on: a sweep that changes one cannot reuse the results
RESULT_SETTINGS = ("data", "corpus", "corpus_bytes", "vocab_size", "seq_len", "batch_size", "lr", "seed")
DATA_SETTINGS = ("data", "corpus", "corpus_bytes", "vocab_size", "seed")  # of these, what data/ depends on


def changed_settings(cfg, out: Path, settings: tuple[str, ...] = RESULT_SETTINGS,
                     results: tuple[str, ...] = ("runs", "data", "fit.json")) -> dict[str, str]:
    """The `settings` in which the sweep recorded in `out`'s config.yaml differs from `cfg`, each with
    a phrase for messages; {"config.yaml": ...} when results exist but no record of their settings does."""
    file = out / "config.yaml"
    if not any((out / name).exists() for name in results):
        return {}  # nothing made yet that depends on the settings
    try:
        earlier = yaml.safe_load(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {"config.yaml": "no config.yaml records them"}
    except (OSError, ValueError, RecursionError, yaml.YAMLError) as e:
        raise LlmlabError(f"{file}: unreadable ({type(e).__name__}), so the settings of the sweep in {out} are "
                          "unknown; pass --overwrite to start it over, or choose another out_dir") from None
    earlier = earlier if isinstance(earlier, dict) else {}
    embedded = not cfg.data and not earlier.get("data")  # corpus and vocabulary matter for embedded data only
    changed = {}
    for name in settings:
        if name in ("corpus", "corpus_bytes", "vocab_size") and not embedded:
            continue
        was, now = earlier.get(name), getattr(cfg, name)
        now = asdict(now) if is_dataclass(now) else now  # a nested block, as config.yaml holds it
        if name == "data" and was and now:
            same = prepared_dir(str(was)).resolve() == prepared_dir(now).resolve()
        else:  # YAML may give back 3e-3 as the string "3e-3"
            same = was == now or str(was) == str(now) or (_number(was) is not None and _number(was) == _number(now))
        if not same:
            changed[name] = f"{name}={was!r} there, {now!r} now"
    return changed


def _number(value) -> float | None:
    try:
        return float(value) if not isinstance(value, bool) else None
    except (TypeError, ValueError):
        return None


def _remove_results(out: Path, data_too: bool) -> None:
    """Remove what earlier sweeps wrote in `out` and that depends on their settings."""
    for name in ("runs", "fit.json", "scaling.png", *(("data", "tokenizer") if data_too else ())):
        path = out / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()


def run(cfg: ScalingFitConfig, *, overwrite: bool = False) -> dict:
    """Train (or read) the sweep, fit the law; returns the fit, the held-out error and the prediction.
    An out_dir holding an earlier sweep with the same settings (`RESULT_SETTINGS`) continues it; one
    holding a sweep with other settings, or anything else, needs `overwrite`, which starts the sweep
    over: the earlier runs' results are removed (and the prepared data when its settings changed)."""
    out = check_output(cfg.out_dir, label="out_dir", inputs=[prepared_dir(cfg.data) if cfg.data else None],
                       overwrite=True)
    foreign = sorted(p.name for p in out.iterdir() if p.name not in SWEEP_FILES and not p.name.startswith(".")) \
        if out.is_dir() else []
    if foreign and not overwrite:
        raise LlmlabError(f"out_dir {out}: already exists and holds files that are not a sweep's "
                          f"({', '.join(foreign[:5])}); pass --overwrite to write the sweep there anyway (llmlab "
                          "replaces only the files it writes) or choose another out_dir")
    changed = changed_settings(cfg, out)
    if changed and not overwrite:
        raise LlmlabError(f"out_dir {out}: holds a sweep made with other settings ({next(iter(changed.values()))}), "
                          "whose results would be mixed with this one's; pass --overwrite to start the sweep over "
                          "there, or choose another out_dir")
    if cfg.data:
        verify_data(cfg.data)  # before anything is written
    if overwrite:
        _remove_results(out, data_too="config.yaml" in changed or bool(changed.keys() & set(DATA_SETTINGS)))
    save_config(cfg, out / "config.yaml")
    data = prepare_data(cfg, out)
    if not cfg.data:
        verify_data(data)
    vocab = read_manifest(data)["vocab_size"]

    runs = []
    grid = [(w, t) for w in sorted(set(cfg.widths)) for t in sorted(set(cfg.tokens))]
    for i, (width, tokens) in enumerate(grid, 1):
        folder = out / "runs" / _run_name(width, tokens)
        print(style(f"[{i}/{len(grid)}] width {width}, {tokens:.3g} tokens", "1"))
        runs.append(_run_one(cfg, data, vocab, width, tokens, folder))
        if "exit_code" in runs[-1]:
            print(f"stopped: run {folder.name} was interrupted; the same command continues (finished runs are "
                  "read back)")
            return runs[-1]

    held = max(runs, key=lambda r: (r["params"], r["tokens"])) if cfg.hold_out else None
    fitted = [r for r in runs if r is not held]
    fit = fit_law([r["params"] for r in fitted], [r["tokens"] for r in fitted], [r["val_loss"] for r in fitted],
                  bootstrap=cfg.bootstrap, seed=cfg.seed)
    law = fit.law
    summary = {"constants": {k: getattr(law, k) for k in NAMES},
               "stderr": fit.stderr, "runs": runs}
    if held is not None:
        predicted = law.loss(held["params"], held["tokens"])
        summary["held_out"] = {**held, "predicted": predicted, "error": predicted / held["val_loss"] - 1}
    n_opt, d_opt = law.optimal(cfg.predict_flops)
    summary["prediction"] = {"flops": cfg.predict_flops, "params": n_opt, "tokens": d_opt,
                             "loss": law.loss(n_opt, d_opt)}
    plot_fit(runs, fit, out / "scaling.png")
    atomic_write_text(out / "fit.json", json.dumps(summary, indent=2) + "\n")
    _report(summary, out)
    return summary


def _report(summary: dict, out: Path) -> None:
    c, s = summary["constants"], summary["stderr"]
    print(style("\nfitted L(N, D) = E + A / N^alpha + B / D^beta (N non-embedding parameters)", "1"))
    for k in ("E", "A", "B", "alpha", "beta"):
        print(f"  {k:5s} = {c[k]:10.4g}  +- {s[k]:.2g}")
    if "held_out" in summary:
        h = summary["held_out"]
        print(f"  held-out largest run (N {h['params']:,}, D {h['tokens']:,}): loss {h['val_loss']:.4f}, "
              f"predicted {h['predicted']:.4f} ({h['error']:+.1%})")
    published = ", ".join(f"{law.source.split(',')[0]} {law.size_exponent:.2f}"
                          for law in (CHINCHILLA, CHINCHILLA_REFIT))
    print(f"  compute-optimal size grows as C^a, a = beta / (alpha + beta) = {c['size_exponent']:.3f} "
          f"+- {s['size_exponent']:.2g} ({published})")
    p = summary["prediction"]
    print(f"  compute-optimal at {p['flops']:.3g} FLOPs: N {p['params']:.3g}, D {p['tokens']:.3g}, "
          f"loss {p['loss']:.3f}")
    print(f"  plot {out / 'scaling.png'}; numbers {out / 'fit.json'}")


def plot_fit(runs: list[dict], fit: LawFit, png: Path) -> None:
    """Final loss against training compute (6 N D), a line per model size, with the fitted frontier."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for params in sorted({r["params"] for r in runs}):
        rows = sorted((6 * r["params"] * r["tokens"], r["val_loss"]) for r in runs if r["params"] == params)
        ax.plot(*zip(*rows), "o-", ms=4, label=f"N = {params / 1e3:,.0f}K")
    flops = [6 * r["params"] * r["tokens"] for r in runs]
    grid = np.geomspace(min(flops) / 2, max(flops) * 10, 100)
    frontier = [fit.law.loss(*fit.law.optimal(c)) for c in grid]
    ax.plot(grid, frontier, "k--", lw=1.2, label="fitted compute-optimal frontier")
    save_compute_plot(fig, ax, "training compute 6 N D (FLOPs)", png)


def save_compute_plot(fig, ax, xlabel: str, png: Path) -> None:
    """Finish a plot of validation loss against training compute (log x, grid, legend) and write it to
    `png` atomically."""
    import matplotlib.pyplot as plt

    ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("validation loss (nats/token)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(png) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
