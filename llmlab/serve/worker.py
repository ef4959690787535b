"""The generation worker: one thread that owns the model and steps the continuous-batching scheduler.

Request handlers run on the asyncio event loop; the model runs here, so a decode step never blocks
the loop. `submit` hands sequences over through a thread-safe inbox and returns an asyncio queue
that receives each sequence's events as the worker produces them. Admission is bounded: when more
sequences wait than `max_queue` allows, `submit` refuses (the server answers 429 with Retry-After).
A failure inside a step is delivered to every affected sequence as an error, and the worker goes on.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from dataclasses import dataclass

from torch import nn

from llmlab.generate.scheduler import Event, Sequence, make_scheduler


class Overloaded(Exception):
    """The queue of waiting sequences is full."""


@dataclass
class Failure:
    """Delivered instead of an Event when a step failed."""

    message: str


class Worker:
    def __init__(self, model: nn.Module, *, max_batch: int = 16, max_queue: int = 64):
        self.scheduler = make_scheduler(model, max_batch)
        self.max_queue = max_queue
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._outputs: dict[int, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._pending = 0  # sequences submitted and not yet admitted to the batch
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="llmlab-generation", daemon=True)
        self.steps = 0

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._inbox.put(None)
        self._thread.join(timeout=10)

    def validate(self, seq: Sequence) -> None:
        """Raise GenerationError for a sequence the scheduler would refuse (empty or over-long
        prompt, out-of-vocabulary ids, bad sampling settings), before anything is queued."""
        self.scheduler.check(seq)

    def submit(self, sequences: list[Sequence]) -> asyncio.Queue:
        """Queue `sequences` (already validated) and return the queue their events arrive on.
        Raises Overloaded when the waiting room is full."""
        with self._lock:
            if self._pending + len(sequences) > self.max_queue:
                raise Overloaded(f"{self._pending} sequences are waiting (limit {self.max_queue})")
            self._pending += len(sequences)
        out: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        for seq in sequences:
            self._outputs[seq.id] = (loop, out)
        self._inbox.put(sequences)
        return out

    def cancel(self, sequences: list[Sequence]) -> None:
        """Stop sequences whose client went away; their rows are freed at the next step."""
        for seq in sequences:
            seq.cancelled = True
        self._inbox.put([])  # wake the worker if it is idle, so waiting cancelled sequences are dropped

    @property
    def load(self) -> dict:
        return {"running": len(self.scheduler.running), "waiting": self._pending, "max_batch": self.scheduler.max_batch,
                "max_queue": self.max_queue}

    # ------------------------------------------------------------------ the thread

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                item = self._inbox.get(timeout=None if not self.scheduler.busy else 0)
            except queue.Empty:
                item = []
            while item is not None:
                for seq in item:
                    self.scheduler.add_checked(seq)
                try:
                    item = self._inbox.get_nowait()
                except queue.Empty:
                    break
            if item is None or self._stop.is_set():
                return
            if not self.scheduler.busy:
                continue
            before = len(self.scheduler.waiting)
            try:
                events = self.scheduler.step()
            except Exception as e:  # a bug or an out-of-memory: fail the sequences in flight, keep serving
                failure = Failure(f"generation failed: {type(e).__name__}: {e}")
                self._deliver([(seq, failure, True) for seq in self.scheduler.running + self.scheduler.waiting])
                self.scheduler.reset()
                with self._lock:
                    self._pending = 0
                continue
            self.steps += 1
            admitted = before - len(self.scheduler.waiting)
            with self._lock:
                self._pending -= admitted
            self._deliver([(e.sequence, e, e.finish_reason is not None) for e in events])

    def _deliver(self, items: list[tuple[Sequence, Event | Failure, bool]]) -> None:
        """Hand each (sequence, event, is_last) to its request's queue: one wake-up of each event loop
        per step, not one per token."""
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for seq, item, last in items:
            target = self._outputs.pop(seq.id, None) if last else self._outputs.get(seq.id)
            if target is not None:
                by_loop.setdefault(target[0], []).append((target[1], item))
        for loop, puts in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, puts)
            except RuntimeError:  # the event loop closed (server shutting down)
                pass


def _put_all(puts: list[tuple[asyncio.Queue, object]]) -> None:
    for out, item in puts:
        out.put_nowait(item)
