"""`llmlab eval MODEL [MODEL ...] tasks=[...] key=value`: run tasks against models, write the results.

    out_dir/
      results.json    per model and task: each metric's value and bootstrap standard error, n,
                      few-shot count, seed, the model's hash, and extras (confusion matrices ...)
      samples.jsonl   one line per scored document: the prompt, the answers, the scores
      config.yaml     the resolved EvalConfig

A model that is a run directory inside a workspace, or a checkpoint of one, also has its results recorded
in the workspace's run registry (`llmlab.eval.record`).

Every task is loaded and checked before any model runs, and the folder is written once, at the
end, under a temporary name: a bad task file or a failed run leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from llmlab import __version__
from llmlab.common import (LlmlabError, atomic_dir, atomic_write_text, check_output, finite_json, seed_everything,
                           style)
from llmlab.config import save_config, to_dict
from llmlab.eval.builtin import BUILTIN_TASKS
from llmlab.eval.evaluate import TaskResult, check_task, evaluate_task
from llmlab.eval.lm import EvalError, LocalLM, ServerLM
from llmlab.eval.record import record_results
from llmlab.eval.tasks import Renderer, Task, load_tasks, prepare


DEFAULT_TASKS = ("pydoc-ppl", "pydoc-cloze", "bias")  # what a base model is scored on


@dataclass
class EvalConfig:
    tasks: list[str] = field(default_factory=lambda: list(DEFAULT_TASKS))  # built-ins, task YAMLs, text, data folders
    out_dir: str = "eval"  # results.json, samples.jsonl, config.yaml; absent or empty, or --overwrite
    num_fewshot: int | None = None  # few-shot examples per prompt; None: each task's own num_fewshot
    limit: int | None = None  # score only the first N documents of each task; None: all
    batch_size: int = 32  # contexts scored (or sequences generated) together
    device: str = "auto"  # auto, cpu, cuda, cuda:N, mps
    dtype: str = "auto"  # auto (the checkpoint's fp32), bf16, fp16
    seed: int = 1234  # draws few-shot examples, samples, and bootstrap resamples (the harness's default)
    bootstrap_iters: int = 1000  # resamples for each metric's standard error; 0: none
    code_timeout: float = 5.0  # seconds a code sample may run against its tests

    def __post_init__(self):
        if not isinstance(self.tasks, list) or not self.tasks:
            raise ValueError("tasks must list at least one task: a built-in name, a task YAML or a folder of them")
        for name, least in (("num_fewshot", 0), ("limit", 1), ("batch_size", 1), ("bootstrap_iters", 0), ("seed", 0)):
            value = getattr(self, name)
            if value is not None and value < least:
                raise ValueError(f"{name} must be >= {least}, got {value}")
        if self.batch_size > 4096 or self.bootstrap_iters > 100_000:
            raise ValueError("batch_size must be at most 4096 and bootstrap_iters at most 100000")
        if not 0 < self.code_timeout <= 600 or not math.isfinite(self.code_timeout):
            raise ValueError(f"code_timeout must be in (0, 600] seconds, got {self.code_timeout}")


def load_all_tasks(specs: list[str]) -> list[Task]:
    tasks: list[Task] = []
    for spec in specs:
        tasks += load_tasks(str(spec), builtins=BUILTIN_TASKS)
    names = [t.name for t in tasks]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise EvalError(f"task {repeated[0]!r} is named twice; give each task a distinct `task:` name")
    return tasks


def run(cfg: EvalConfig, models: list[str], servers: list[str] = (), *, server_model: str | None = None,
        overwrite: bool = False, quiet: bool = False) -> dict:
    """Evaluate every model on every task; returns the results (what results.json holds)."""
    if not models and not servers:
        raise EvalError("name at least one model: a checkpoint, a run directory, an HF folder, or --server URL")
    out = check_output(cfg.out_dir, label="out_dir", inputs=list(models), overwrite=overwrite)
    seed_everything(cfg.seed)
    tasks = load_all_tasks(cfg.tasks)
    renderer = Renderer()
    prepared = {t.name: prepare(t, renderer, num_fewshot=cfg.num_fewshot, limit=cfg.limit, seed=cfg.seed)
                for t in tasks}  # every template and document checked before any model loads
    say = (lambda *a: None) if quiet else (lambda *a: print(*a, file=sys.stderr))
    entries, samples = [], []
    specs = [("local", m) for m in models] + [("server", s) for s in servers]
    for kind, spec in specs:
        if kind == "local":
            lm = LocalLM.from_path(spec, device=cfg.device, dtype=cfg.dtype, batch_size=cfg.batch_size, seed=cfg.seed)
        else:
            lm = ServerLM(spec, model=server_model, batch_size=min(cfg.batch_size, 64), seed=cfg.seed)
        for task in tasks:  # every task this model cannot answer is refused before any is scored
            with _naming(lm, task):
                check_task(task, lm)
        for task in tasks:
            t0 = time.time()
            with _naming(lm, task):
                result = evaluate_task(task, lm, seed=cfg.seed, bootstrap_iters=cfg.bootstrap_iters,
                                       code_timeout=cfg.code_timeout, prepared=prepared[task.name])
            say(style(f"  {lm.name}  {task.name}", "2") + f"  {_headline(result)}  ({time.time() - t0:.1f} s)")
            entries.append(_entry(lm, kind, result))
            samples += [{"model": lm.name, "task": task.name, **s} for s in result.samples]
        del lm
    results = {"llmlab_version": __version__, "config": to_dict(cfg),
               "models": [{"name": e["model"], "hash": e["model_hash"], "kind": e["kind"]} for e in entries
                          if e["task"] == tasks[0].name],
               "results": entries, "rows": [row for e in entries for row in _rows(e)]}
    with atomic_dir(out, merge=overwrite) as tmp:
        atomic_write_text(tmp / "results.json", json.dumps(finite_json(results), indent=2, default=str) + "\n")
        atomic_write_text(tmp / "samples.jsonl", "".join(json.dumps(finite_json(s), default=str) + "\n"
                                                         for s in samples))
        save_config(cfg, tmp / "config.yaml")
    record_results(results, list(models), [out / "results.json", out / "samples.jsonl"], say)
    results["out_dir"] = str(out)
    return results


@contextlib.contextmanager
def _naming(lm, task: Task):
    """An EvalError raised inside, prefixed with the model and the task it concerns."""
    try:
        yield
    except EvalError as e:
        raise EvalError(f"{lm.name} on task {task.name}: {e}") from None


def _entry(lm, kind: str, r: TaskResult) -> dict:
    return {"model": lm.name, "model_hash": lm.hash, "kind": kind, "task": r.task, "output_type": r.output_type,
            "n": r.n, "fewshot": r.fewshot, "seed": r.seed, "version": r.version,
            "metrics": {k: {"value": _finite(v), "stderr": _finite(r.stderr.get(k))} for k, v in r.metrics.items()},
            **({"extra": r.extra} if r.extra else {})}


def _finite(x):
    return x if x is None or math.isfinite(x) else None


def _rows(entry: dict) -> list[dict]:
    return [{"model": entry["model"], "model_hash": entry["model_hash"], "task": entry["task"], "metric": m,
             "value": v["value"], "stderr": v["stderr"], "n": entry["n"], "fewshot": entry["fewshot"],
             "seed": entry["seed"]} for m, v in entry["metrics"].items()]


def _headline(r: TaskResult) -> str:
    return "  ".join(f"{k} {v:.4g}" for k, v in list(r.metrics.items())[:3])


def table(results: dict) -> str:
    """One row per task and metric, one column per model: value ± standard error."""
    models = list(dict.fromkeys(r["model"] for r in results["rows"]))
    keys = list(dict.fromkeys((r["task"], r["metric"]) for r in results["rows"]))
    cells = {(r["task"], r["metric"], r["model"]): r for r in results["rows"]}

    def cell(row):
        if row is None or row["value"] is None:
            return "-"
        return f"{row['value']:.4f} ± {row['stderr']:.4f}" if row["stderr"] else f"{row['value']:.4f}"

    head = ["task", "metric", "n", *(_short(m) for m in models)]
    body = [[t, m, str(next(r["n"] for r in results["rows"] if r["task"] == t)),
             *(cell(cells.get((t, m, model))) for model in models)] for t, m in keys]
    widths = [max(len(row[i]) for row in [head, *body]) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in [head, *body]]
    return "\n".join([lines[0], "  ".join("-" * w for w in widths), *lines[1:]])


def _short(name: str) -> str:
    return name if len(name) <= 40 else "..." + name[-37:]


def main(args: list[str], servers: list[str], *, server_model: str | None, as_json: bool, overwrite: bool) -> int:
    """The `llmlab eval` verb: models are the arguments without `=`, overrides those with one."""
    from llmlab.config import load_config

    models = [a for a in args if "=" not in a]
    overrides = [a for a in args if "=" in a]
    cfg = load_config(EvalConfig, None, overrides)
    results = run(cfg, models, servers, server_model=server_model, overwrite=overwrite, quiet=as_json)
    if as_json:
        print(json.dumps(finite_json(results), indent=2, default=str))
    else:
        print(table(results))
        print(f"\nwrote {Path(results['out_dir']) / 'results.json'} and samples.jsonl")
    return 0


__all__ = ["EvalConfig", "EvalError", "LlmlabError", "main", "run", "table"]
