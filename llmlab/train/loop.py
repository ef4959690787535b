"""Plumbing every training loop shares: signals, resume, per-step seeds, stop agreement across
ranks, free memory, the metrics file and the progress display. The loops themselves stay in their
own files (`pretrain.py`, `finetune.py`), readable top to bottom."""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import signal
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from llmlab.common import LlmlabError, atomic_write_text, check_output
from llmlab.models.io import CheckpointError
from llmlab.train.checkpoint import (latest_checkpoint, list_checkpoints, load_checkpoint,
                                     newest_intact_checkpoint, verify_checkpoint)
from llmlab.train.config import TrainConfig


# --------------------------------------------------------------------------- the run


class StopSignals:
    """Turn SIGINT/SIGTERM into a flag the loop checks after each step (then it saves and exits). A
    second signal stops at once, without saving (KeyboardInterrupt), for a step that does not end."""

    def __init__(self):
        self.received: int | None = None
        self._previous = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}

    def _handle(self, signum, frame):
        if self.received is not None:
            raise KeyboardInterrupt
        self.received = signum

    def restore(self):
        for s, handler in self._previous.items():
            signal.signal(s, handler)


# what a run writes in its out_dir; a folder holding only these (and metrics or checkpoints among them) is a run
RUN_FILES = ("config.yaml", "metrics.jsonl", "checkpoints", "final", "adapter", "before.json", "report.json",
             "tensorboard", "mlruns")


def check_run_dir(out: Path, *, resume: str, inputs: list, overwrite: bool, rank: int) -> None:
    """Refuse, before anything is loaded, an out_dir this run may not write into.

    A fresh start needs an absent or empty folder, or an earlier run's folder that holds no checkpoint
    (a run killed before its first one); `overwrite` lifts that (the old checkpoints are removed: llmlab
    wrote them; other files stay). Resuming needs a run's folder. The folder may not be or hold an input.
    """
    check_output(out, label="out_dir", inputs=inputs, overwrite=True)
    if resume != "none" and overwrite:
        raise LlmlabError(f"ckpt.resume={resume} continues the run in {out} and --overwrite starts it over; "
                          "choose one")
    if not out.is_dir():
        return
    entries = sorted(p.name for p in out.iterdir() if not p.name.startswith("."))
    checkpoints = list_checkpoints(out / "checkpoints")
    is_run = set(entries) <= set(RUN_FILES) and bool({"metrics.jsonl", "checkpoints"} & set(entries))
    fresh = resume == "none" or (resume == "auto" and not checkpoints)
    if fresh and checkpoints and not overwrite:
        raise LlmlabError(f"out_dir {out}: already holds checkpoints (newest {checkpoints[-1].name}); pass "
                          "ckpt.resume=auto to continue that run, or --overwrite to start it over")
    if entries and not is_run and not checkpoints and not overwrite:
        raise LlmlabError(f"out_dir {out}: already exists and holds files that are not a run's "
                          f"({', '.join(entries[:5])}); pass --overwrite to write the run there anyway (llmlab "
                          "replaces only the files it writes) or choose another out_dir")
    if overwrite and rank == 0:
        for old in checkpoints + sorted((out / "checkpoints").glob("step-*.damaged")):
            shutil.rmtree(old)
        latest_checkpoint(out / "checkpoints", clean=True)  # and the debris of interrupted writes


BATCH_SHAPE = ("batch_size", "seq_len", "micro_batches")


def run_settings(cfg: TrainConfig, world: int, **more) -> dict:
    """What a resume must keep from the run that saved the checkpoint: the batches each step sees
    (`BATCH_SHAPE`, changeable with ckpt.allow_batch_change), the optimizer (only its own kind reads
    its saved state) and whatever `more` names. A step's batches are its grad_accum x processes
    micro-batches, numbered rank by rank, so 2 processes x 1 resume as 1 process x 2 and back. A run
    with adapters (`peft`) keeps their kind and shape: rank, scale, targets."""
    settings = {"batch_size": cfg.batch_size, "seq_len": cfg.seq_len, "micro_batches": cfg.grad_accum * world,
                "optim.name": cfg.optim.name}
    peft = getattr(cfg, "peft", None)
    if peft is not None:
        settings["peft"] = peft
    if peft in ("lora", "qlora"):
        lora = cfg.lora
        settings["lora"] = (f"r={lora.r}, alpha={lora.alpha:g}, targets={list(lora.targets)}"
                            + (", rslora" if lora.rslora else ""))
    return {**settings, **more}


def resume_from(cfg: TrainConfig, ckpt_dir: Path, rank: int) -> tuple[Path | None, dict | None]:
    """The checkpoint to resume from and its state, checked whole (`verify_checkpoint`); (None, None)
    for a fresh start.

    With resume=auto, damaged checkpoints newer than the newest intact one are passed over with a
    warning each, and set aside (renamed `step-N.damaged`) so that the run can write their steps again.
    """
    if cfg.ckpt.resume == "none":
        return None, None
    if cfg.ckpt.resume != "auto":
        path = Path(cfg.ckpt.resume)
        try:
            path.stat()
        except OSError as e:  # missing, a symbolic link loop, unreadable
            raise LlmlabError(f"ckpt.resume={cfg.ckpt.resume}: {e.strerror}") from None
        if not (path / "state.json").is_file():
            raise LlmlabError(f"ckpt.resume={cfg.ckpt.resume}: not a training checkpoint (no state.json)")
        try:
            state = verify_checkpoint(path)
        except CheckpointError as e:
            raise CheckpointError(f"ckpt.resume: {e}; resume from another checkpoint") from None
        newer = [p.name for p in list_checkpoints(ckpt_dir) if int(p.name[5:]) > state["step"]]
        if newer:  # saving would skip their steps, and a later resume=auto would mix the two runs
            raise LlmlabError(f"ckpt.resume={cfg.ckpt.resume}: {ckpt_dir} holds checkpoints past its step "
                              f"{state['step']} ({', '.join(newer)}); resume from the newest, or choose another "
                              "out_dir")
        return path, state
    latest_checkpoint(ckpt_dir, clean=rank == 0)  # removes the debris of interrupted writes
    path, state, damaged = newest_intact_checkpoint(ckpt_dir)
    if damaged and path is None:
        raise CheckpointError(f"ckpt.resume=auto: no intact checkpoint in {ckpt_dir}; the newest: {damaged[0][1]}")
    for folder, error in damaged:
        if rank == 0:
            print(f"warning: {error}; resuming from {path.name} instead, and {folder.name} is set aside as "
                  f"{folder.name}.damaged", file=sys.stderr, flush=True)
            aside = folder.with_name(folder.name + ".damaged")
            shutil.rmtree(aside, ignore_errors=True)  # the same step, damaged and set aside before
            os.replace(folder, aside)
    return path, state


@dataclass
class Counters:
    """What a run carries from step to step, and its checkpoints carry across a resume."""

    step: int = 0
    tokens: int = 0  # units trained on so far: tokens, target tokens, pairs...
    skipped: int = 0  # steps whose loss or gradient was not finite (nonfinite=skip)
    best_val_loss: float = math.inf
    bad_evals: int = 0  # evaluations since the last new best

    def state(self) -> dict:
        return {"tokens": self.tokens, "skipped": self.skipped, "best_val_loss": self.best_val_loss,
                "bad_evals": self.bad_evals}


def resume_run(cfg: TrainConfig, ckpt_dir: Path, rank: int, model, optimizer, settings: dict,
               load_weights=None) -> Counters:
    """The counters restored from the checkpoint `ckpt.resume` names (`load_checkpoint` restores the
    weights, the optimizer and the RNGs), or a fresh start's. `settings` (`run_settings`) must equal those the
    checkpoint recorded, the batch shape excepted with ckpt.allow_batch_change."""
    path, state = resume_from(cfg, ckpt_dir, rank)
    if path is None:
        return Counters()
    saved = state.get("settings") if isinstance(state.get("settings"), dict) else {}  # older: none recorded
    for name, value in settings.items():
        if name not in saved or saved[name] == value or (name in BATCH_SHAPE and cfg.ckpt.allow_batch_change):
            continue
        was = saved[name]
        if isinstance(value, dict) and isinstance(was, dict):  # a section (model=): name the first field that differs
            key = next(k for k in sorted(set(value) | set(was)) if value.get(k) != was.get(k))
            name, value, was = f"{name}.{key}", value.get(key), was.get(key)
        what = f"{value} micro-batches per step (grad_accum x processes)" if name == "micro_batches" \
            else f"{name}={value}"
        hint = ", or pass ckpt.allow_batch_change=true to resume with other batches" if name in BATCH_SHAPE else ""
        raise LlmlabError(f"{what}, but the checkpoint {path} was trained with {was}; set it back{hint}")
    load_checkpoint(path, model, optimizer, load_weights, state)
    try:
        counters = Counters(state["step"], state["tokens"], state["skipped"], state["best_val_loss"],
                            state["bad_evals"])
    except KeyError as e:
        raise CheckpointError(f"{path / 'state.json'}: not a checkpoint of this loop (no {e})") from None
    if rank == 0:
        print(f"resumed from {path} at step {state['step']}")
    return counters


@contextlib.contextmanager
def run_outputs(out: Path, start: int, total: int, rank: int) -> Iterator[tuple[StopSignals, object, object]]:
    """What a run holds open while it trains: the SIGINT/SIGTERM handlers, the metrics file (rank 0)
    and the progress bar (rank 0 on a terminal); all given back on the way out, however it ends."""
    signals = StopSignals()
    metrics = open(out / "metrics.jsonl", "a", encoding="utf-8") if rank == 0 else None
    progress = progress_bar(start, total, rank)
    try:
        yield signals, metrics, progress
    finally:
        signals.restore()
        if progress is not None:
            progress.close()
        if metrics is not None:
            metrics.close()


def step_seed(seed: int, step: int, rank: int) -> int:
    return int(np.random.SeedSequence((seed, 2, step, rank)).generate_state(1)[0])


def stop_reason(signals: StopSignals, out_of_time: bool, world: int, device: torch.device) -> str | None:
    """Why to stop after this step, agreed by all ranks (a signal or the clock may reach one rank first)."""
    code = 2 if signals.received is not None else 1 if out_of_time else 0
    if world > 1:
        flag = torch.tensor(code, device=device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        code = int(flag)
    if code == 2:
        name = signal.Signals(signals.received).name if signals.received is not None else "on another rank"
        return f"signal:{name}"
    return "max_minutes" if code == 1 else None


def finite_step(loss: torch.Tensor, grad_norm: torch.Tensor, optimizer: torch.optim.Optimizer, nonfinite: str,
                step: int) -> bool:
    """True when the step's loss and gradient norm are finite. Otherwise the gradients are dropped and,
    with nonfinite="stop", the run stops with an error naming which was not finite (nothing is saved);
    with "skip" it returns False and the caller counts the batch as skipped. `step` counts from 0."""
    values = {"loss": loss.item(), "gradient norm": grad_norm.item()}
    bad = [f"{name} {value}" for name, value in values.items() if not math.isfinite(value)]
    if not bad:
        return True
    optimizer.zero_grad(set_to_none=True)
    if nonfinite == "stop":
        fine = "".join(f" ({name} {value:.4g})" for name, value in values.items() if math.isfinite(value))
        raise LlmlabError(f"non-finite {' and '.join(bad)} at step {step + 1}{fine}; stopping without saving. "
                          "Lower optim.lr, or set nonfinite=skip to skip such batches")
    return False


def available_memory(device: torch.device) -> float | None:
    """Bytes free on `device` now (CPU: MemAvailable), or None where it cannot be known."""
    if device.type == "cuda":
        return float(torch.cuda.mem_get_info(device)[0])
    if device.type == "cpu":
        try:
            for line in Path("/proc/meminfo").read_text().splitlines():
                if line.startswith("MemAvailable:"):
                    return float(line.split()[1]) * 1024
        except OSError:
            pass
        return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"))
    return None


def truncate_metrics(path: Path, step: int) -> None:
    """Drop metric lines past `step`: a killed run may have logged steps its checkpoint lacks."""
    if not path.exists():
        return
    kept = [line for line in path.read_text(encoding="utf-8", errors="replace").splitlines()
            if _logged_step(line) <= step]
    atomic_write_text(path, "".join(line + "\n" for line in kept))


def _logged_step(line: str) -> float:
    """The step a metrics line records; infinity (so it is dropped) for a line a kill cut short."""
    try:
        record = json.loads(line)
        return record["step"] if isinstance(record, dict) and isinstance(record.get("step"), int) else math.inf
    except ValueError:
        return math.inf


def write_metrics(metrics, record: dict) -> None:
    if metrics is not None:
        metrics.write(json.dumps(record) + "\n")
        metrics.flush()


def progress_bar(start: int, total: int, rank: int):
    if rank != 0 or not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=start, unit="step", dynamic_ncols=True)


def print_line(progress, text: str) -> None:
    if progress is not None:
        progress.write(text)
    else:
        print(text, flush=True)


def report(progress, record: dict, cfg: TrainConfig, steps_this_run: int) -> None:
    if progress is not None:
        progress.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}",
                             tok_s=f"{record['tokens_per_s']:.0f}", refresh=False)
        progress.update(1)
    elif record["step"] % cfg.log_every == 0 or record["step"] == cfg.max_steps:
        eta = (cfg.max_steps - record["step"]) * record["time"] / steps_this_run
        print(f"step {record['step']}/{cfg.max_steps}  loss {record['loss']:.4f}  lr {record['lr']:.2e}  "
              f"{record['tokens_per_s']:.0f} tok/s  eta {eta:.0f}s", flush=True)
