"""The training core every loop is written on: how the model is wrapped for the processes at hand,
how one optimizer step's micro-batches are accumulated for any objective, and what happens after
the step (metrics, evaluation, early stopping, signals, checkpoints).

A loop file keeps its own visible `for step in ...` loop and calls, per step:

    lr = run.begin_step(step, optimizer)
    loss = accumulate(trainee, batches, loss_fn, autocast)
    grad_norm = clip_gradients(trainee, cfg.optim.grad_clip)
    if run.optimizer_step(step, loss.loss, grad_norm, optimizer):
        record = {"loss": loss.loss.item(), "lr": lr, ..., **run.auxiliary(loss)}
    if run.after_step(step + 1, record, evaluate=..., save=...):
        break

`loss_fn(batch) -> (loss, weight)` is the objective: the loss is a mean over `weight` units (target
tokens, preference pairs, ...). Accumulation weights every micro-batch of every rank by its share of
the step's units, so grad_accum micro-batches on each of N processes give the gradient of one batch
of all of them, whatever the objective.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn

from llmlab.track import MetricLoggers, RunRecorder
from llmlab.train.config import SystemConfig, TrainConfig
from llmlab.train.loop import (Counters, finite_step, print_line, report, run_outputs, step_seed, stop_reason,
                               write_metrics)
from llmlab.train.optim import lr_at

LossFn = Callable[[object], tuple[torch.Tensor, torch.Tensor | float]]


# --------------------------------------------------------------------------- the model and its processes


@dataclass
class Trainee:
    """The model as the loop trains it. `model` is the module itself (its parameters, for the optimizer
    and the checkpoints); `forward` is what the loop calls: compiled and wrapped for several processes.
    `sharded`: each process holds a shard of the parameters (FSDP2), so checkpoints are written by all."""

    model: nn.Module
    forward: nn.Module
    world: int
    sharded: bool = False

    @contextlib.contextmanager
    def sync_gradients(self, last: bool) -> Iterator[None]:
        """The context of one micro-batch's forward and backward: the processes exchange gradients on
        the step's last micro-batch only (before it, each keeps adding to its own)."""
        if self.world == 1 or last:
            yield
        elif self.sharded:
            self.model.set_requires_gradient_sync(False)
            try:
                yield
            finally:
                self.model.set_requires_gradient_sync(True)
        else:
            with self.forward.no_sync():
                yield


def wrap_model(model: nn.Module, system: SystemConfig, world: int) -> Trainee:
    """`model` ready for the run's processes, then compiled when `system.compile` says so: alone, under
    DistributedDataParallel (each rank holds the whole model and averages gradients), or sharded with
    FSDP2 (`system.parallel=fsdp`: each transformer block, then the rest, is split over the ranks and
    gathered for its forward and backward; on GPUs with bf16 autocast, gathered in bf16 with gradients
    reduced in fp32). Build the optimizer after this: FSDP2 replaces the parameters with shards."""
    sharded = world > 1 and system.parallel == "fsdp"
    if sharded:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        device = next(model.parameters()).device
        policy = MixedPrecisionPolicy()
        if device.type == "cuda" and system.autocast == "bf16":
            policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        stacks = [model.encoder, model.decoder] if hasattr(model, "encoder") else [model]  # T5: two stacks
        for block in [b for stack in stacks for b in stack.layers]:
            fully_shard(block, mp_policy=policy)
        fully_shard(model, mp_policy=policy)
    forward = torch.compile(model) if system.compile else model
    if world > 1 and not sharded:
        forward = nn.parallel.DistributedDataParallel(forward)
    return Trainee(model, forward, world, sharded)


def gather_model(trainee: Trainee, build: Callable[[], nn.Module], *, everywhere: bool = False) -> nn.Module | None:
    """The trained model whole, for exporting or generating: the model itself, or under FSDP2 (a
    collective every rank calls) a model from `build()` that receives every gathered weight, on rank 0
    (None on the others) or, with `everywhere`, on every rank."""
    if not trainee.sharded:
        return trainee.model
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=not everywhere)
    state = get_model_state_dict(trainee.model, options=options)
    if not everywhere and dist.get_rank() != 0:
        return None
    model = build()
    model.load_state_dict(state)
    return model


# --------------------------------------------------------------------------- precision


# bf16 products at least this much faster than fp32: autocast pays for its rounding. Devices fall in two
# groups: with native bf16 (GPUs; CPUs with AMX, ~5x; with AVX512-BF16, 2.2-2.6x measured) or without
# (emulated, below 1x); 1.5 parts them with room for a noisy probe on either side.
BF16_SPEEDUP = 1.5


def matmul_speedup(device: torch.device, n: int | None = None, repeats: int = 3) -> float:
    """How many times faster an n x n x n matrix product runs in bf16 than in fp32 on `device`, timed
    on the spot (best of `repeats` after a warm-up; a few tens of milliseconds). n is 512 on a CPU and
    4096 on a GPU, where a smaller product measures the launch rather than the arithmetic. 0 where
    bf16 is not supported at all."""
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return 0.0
    n = n or (4096 if device.type == "cuda" else 512)
    times = {}
    for dtype in (torch.float32, torch.bfloat16):
        a = torch.randn(n, n, device=device).to(dtype)
        best = math.inf
        for i in range(repeats + 1):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            torch.mm(a, a)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if i:  # the first call warms up
                best = min(best, time.perf_counter() - t0)
        times[dtype] = best
    return times[torch.float32] / times[torch.bfloat16]


def resolve_autocast(system: SystemConfig, device: torch.device, rank: int, world: int) -> str:
    """Settle `system.autocast=auto` into "bf16" or "none" for this run, by `matmul_speedup` on rank 0
    (the other ranks follow it), and say which; an explicit setting is kept as it is."""
    if system.autocast != "auto":
        return system.autocast
    speedup = matmul_speedup(device) if rank == 0 else 0.0
    if world > 1:
        shared = torch.tensor(speedup, device=device)
        torch.distributed.broadcast(shared, 0)
        speedup = float(shared)
    choice = "bf16" if speedup >= BF16_SPEEDUP else "none"
    if rank == 0:
        print(f"precision: {'bf16 autocast' if choice == 'bf16' else 'fp32'} (system.autocast=auto: bf16 matrix "
              f"products run {speedup:.2g}x as fast as fp32 on {device})")
    return choice


# --------------------------------------------------------------------------- one optimizer step


def set_lr(optimizer: torch.optim.Optimizer, step: int, cfg: TrainConfig) -> float:
    """The warmup + cosine learning rate of `step` (0-based), set on every group; returns it."""
    lr = lr_at(step, cfg.max_steps, cfg.optim)
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr


class StepLoss(NamedTuple):
    """One optimizer step's loss over all ranks: its mean over the step's units, the units, and the part
    of the mean that a model's auxiliary loss makes up (None for a model that reports none)."""

    loss: torch.Tensor
    units: torch.Tensor
    aux: torch.Tensor | None
    routing: torch.Tensor | None = None  # a mixture of experts': tokens per expert (summed over layers), dropped


def accumulate(trainee: Trainee, batches: list, loss_fn: LossFn,
               autocast: contextlib.AbstractContextManager) -> StepLoss:
    """Forward and backward this rank's micro-batches of one optimizer step; returns the step's loss
    over all ranks (`StepLoss`) with gradients ready for the optimizer.

    Each micro-batch's loss is a mean over its `weight` units, so it enters the gradient as loss x
    weight, and once every micro-batch of every rank is in, the gradients are divided by the step's
    units: the gradient of the mean loss over all units of the step, as one big batch gives it.
    (DistributedDataParallel and FSDP2 average the ranks' sums, hence the factor world.)
    A model with an auxiliary loss (a router's load balancing) includes it in the loss it returns and
    leaves it in `model.aux_loss`; it is averaged the same way and reported apart. A mixture of experts
    also leaves `model.routing` (tokens per expert and dropped assignments), summed over the step.
    """
    device = next(trainee.model.parameters()).device
    sums = torch.zeros(3, device=device)  # loss x weight, weight, aux x weight
    reported, routing = False, None
    for micro, batch in enumerate(batches):
        with autocast, trainee.sync_gradients(micro == len(batches) - 1):
            trainee.model.aux_loss = trainee.model.routing = None
            loss, weight = loss_fn(batch)
            weight = torch.as_tensor(weight, dtype=torch.float32, device=device)
            (loss * weight).backward()
        aux, counts = trainee.model.aux_loss, trainee.model.routing
        reported |= aux is not None
        if counts is not None:
            routing = counts if routing is None else routing + counts
        sums += torch.stack([loss.detach().float(), torch.ones((), device=device),
                             torch.zeros((), device=device) if aux is None else aux.detach().float()]) * weight
    if trainee.world > 1:  # SUM: Gloo (CPU) has no AVG
        torch.distributed.all_reduce(sums)
        if routing is not None:
            torch.distributed.all_reduce(routing)
    scale = trainee.world / sums[1]
    for p in trainee.model.parameters():
        if p.grad is not None:
            p.grad.mul_(scale)
    return StepLoss(sums[0] / sums[1], sums[1], sums[2] / sums[1] if reported else None, routing)


def clip_gradients(trainee: Trainee, max_norm: float) -> torch.Tensor:
    """Clip the global gradient norm of the trained parameters to `max_norm` (0: no clipping); returns
    the norm before clipping."""
    params = [p for p in trainee.model.parameters() if p.requires_grad]
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm or math.inf)
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # FSDP2: the norm of all shards


# --------------------------------------------------------------------------- after the step


class Run:
    """A run's life after each step: it logs the step, asks every rank whether to stop (a signal, the
    clock, early stopping, the last step), evaluates on the cadence, and checkpoints.

    Made by `open_run`, which also holds the SIGINT/SIGTERM handlers, the metrics file and the
    progress bar open for the loop.
    """

    def __init__(self, cfg: TrainConfig, counters: Counters, rank: int, world: int, device: torch.device,
                 signals, metrics, progress):
        self.cfg, self.counters, self.rank, self.world, self.device = cfg, counters, rank, world, device
        self.signals, self.metrics, self.progress = signals, metrics, progress
        self.start, self.t_start = counters.step, time.time()
        self.stopped: str | None = None
        self.val_loss: float | None = None
        self.evaluation: dict = {}  # the latest evaluation's record
        self.recorder: RunRecorder | None = None  # the workspace registry's, when the run lies in one
        self.loggers: MetricLoggers | None = None  # TensorBoard, MLflow: those track.loggers names (rank 0)

    def log(self, record: dict) -> None:
        """Write one metrics line: to metrics.jsonl, the workspace registry and the metric loggers."""
        write_metrics(self.metrics, record)
        if self.recorder is not None:
            self.recorder.log(record)
        if self.loggers is not None:
            self.loggers.log(record)

    def begin_step(self, step: int, optimizer: torch.optim.Optimizer) -> float:
        """Set step `step`'s (0-based) learning rate, and seed dropout as a function of (seed, step,
        rank) so that a resumed run draws what the uninterrupted one drew; returns the rate."""
        torch.manual_seed(step_seed(self.cfg.seed, step, self.rank))
        return set_lr(optimizer, step, self.cfg)

    def optimizer_step(self, step: int, loss: torch.Tensor, grad_norm: torch.Tensor,
                       optimizer: torch.optim.Optimizer) -> bool:
        """Step the optimizer when the step's loss and gradient norm are finite, and say whether it did.
        Otherwise the gradients are dropped and (nonfinite=skip) the step is counted as skipped; with
        nonfinite=stop the run stops with an error."""
        if not finite_step(loss, grad_norm, optimizer, self.cfg.nonfinite, step):
            self.counters.skipped += 1
            return False
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return True

    @staticmethod
    def auxiliary(loss: StepLoss) -> dict:
        """The metrics of a step's auxiliary loss, {"aux_loss": ...}, and of a mixture of experts' routing:
        "expert_load" (each expert's share of the routed assignments, summed over layers) and
        "dropped_tokens" (assignments over an expert's capacity); nothing for a model without them."""
        out = {} if loss.aux is None else {"aux_loss": loss.aux.item()}
        if loss.routing is not None:
            counts = loss.routing.tolist()
            total = max(sum(counts[:-1]), 1)
            out.update(expert_load=[round(c / total, 4) for c in counts[:-1]], dropped_tokens=int(counts[-1]))
        return out

    def after_step(self, done: int, record: dict | None, *, evaluate: Callable[[], dict] | None,
                   save: Callable[[dict], None]) -> bool:
        """Everything after optimizer step `done` (1-based); True when the loop should stop.

        `record` holds the step's metrics ("loss", "lr", "tokens_per_s", ...; None for a skipped
        step). `evaluate()` returns the evaluation's metrics with "val_loss" (and "text", the line to
        print), or is None when there is no validation data. `save(state)` writes a checkpoint of the
        counters in `state`; it is called on every rank (rank 0 writes a single-process checkpoint).
        """
        cfg, c = self.cfg, self.counters
        c.step = done
        if record is None:
            self.log({"step": done, "skipped_nonfinite": c.skipped, "lr": self._lr(done)})
        else:
            record = {"step": done, **record, "tokens": c.tokens, "time": time.time() - self.t_start}
            self.log(record)
            if self.rank == 0:
                report(self.progress, record, cfg, done - self.start)
        out_of_time = bool(cfg.max_minutes) and time.time() - self.t_start > 60 * cfg.max_minutes
        self.stopped = stop_reason(self.signals, out_of_time, self.world, self.device)
        last = done == cfg.max_steps or self.stopped is not None
        if evaluate is not None and (done % cfg.eval.every == 0 or last):
            line = evaluate()
            text = line.pop("text", None)
            self.val_loss, self.evaluation = line["val_loss"], line
            self.log({"step": done, **line})
            if self.rank == 0 and text:
                print_line(self.progress, f"step {done}: {text}")
            if line["val_loss"] < c.best_val_loss:
                c.best_val_loss, c.bad_evals = line["val_loss"], 0
            else:
                c.bad_evals += 1
            if cfg.eval.patience and c.bad_evals >= cfg.eval.patience and self.stopped is None:
                self.stopped, last = "early_stopping", True
        if done % cfg.ckpt.every == 0 or last:
            save(c.state())
        return self.stopped is not None

    def _lr(self, done: int) -> float:
        return lr_at(done - 1, self.cfg.max_steps, self.cfg.optim)

    @property
    def exit_code(self) -> int:
        """128 + the signal's number when a signal stopped the run (as a shell reports it), else 0."""
        return 128 + self.signals.received if self.signals.received is not None else 0


@contextlib.contextmanager
def open_run(cfg: TrainConfig, counters: Counters, out, rank: int, world: int,
             device: torch.device) -> Iterator[Run]:
    """A `Run` with the outputs it writes held open for the loop; all given back however it ends.
    Rank 0 opens the metric loggers `cfg.track.loggers` names (`llmlab.track.loggers`) and, when `out`
    lies inside a workspace (`llmlab.track`), records the run in its registry: running, then finished,
    stopped (a signal) or failed (an error), the status the loggers end with too."""
    with run_outputs(out, counters.step, cfg.max_steps, rank) as (signals, metrics, progress):
        run = Run(cfg, counters, rank, world, device, signals, metrics, progress)
        if rank == 0:
            kind = type(cfg).__name__.removesuffix("Config").lower() or None
            run.loggers = MetricLoggers.open(cfg.track, out, config=cfg, kind=kind, start=counters.step)
            run.recorder = RunRecorder.for_run(out, kind=kind, config=cfg, max_steps=cfg.max_steps)
        try:
            yield run
        except BaseException:
            _end(run, "failed")
            raise
        _end(run, "stopped" if (run.stopped or "").startswith("signal") else "finished")


def _end(run: Run, status: str) -> None:
    for tracker in (run.recorder, run.loggers):
        if tracker is not None:
            tracker.end(status)

