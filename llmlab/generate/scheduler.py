"""Continuous batching: sequences join and leave the running batch at every decode step.

The engine (`engine.py`) runs a fixed batch to its end; a server cannot wait for the slowest
request before admitting the next. Here each `step()` first prefills the sequences that arrived
(together, as one left-padded batch), merges them into the running batch, samples one token for every running sequence, and drops the ones that finished or were
cancelled, so their rows stop costing compute at once (iteration-level scheduling, Yu et al.,
2022, "Orca").

The batch's KV cache is left-aligned to a shared length L: a row's tokens end at column L, with
padding before them hidden by the attention mask; position ids count real tokens only, so a row
computes exactly what it computes alone. A joining row whose prompt is longer than L shifts the
others right. The cache holds L plus some headroom and doubles when full; once it spans the whole
context, every row shifts left by the padding they all share.
Each sequence keeps its own sampling settings and random generator.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import astuple, dataclass, field

import torch
from torch import nn

from llmlab.generate.engine import check_prompts, context_length
from llmlab.generate.sampling import SamplingParams, process_logits, sample
from llmlab.models.layers import KVCache

HEADROOM = 64  # decode steps a new cache has room for before it grows


@dataclass(eq=False)
class Sequence:
    """One completion being generated: a prompt, its settings, and what it has produced so far."""

    prompt: list[int]
    params: SamplingParams  # n is ignored: a request with n completions adds n sequences
    seed: int | None = None  # this completion's own seed (a request's seed + its index)
    stop_check: Callable[[list[int]], bool] | None = None  # True to finish now (stop strings)
    id: int = field(default_factory=itertools.count().__next__)
    index: int = 0  # the caller's label (a server's choice index)
    output: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "stop", "length" or "cancelled"
    generator: torch.Generator | None = None
    cancelled: bool = False
    group: tuple = field(default=(), repr=False)  # sequences with equal keys are sampled together


@dataclass
class Event:
    """A new token of a sequence (token_id None for a sequence cancelled before its next token)."""

    sequence: Sequence
    token_id: int | None
    logprob: float | None = None
    top_logprobs: dict[int, float] | None = None
    finish_reason: str | None = None


class Scheduler:
    """Runs up to `max_batch` sequences at once; `add` queues, `step` advances every one by a token."""

    def __init__(self, model: nn.Module, max_batch: int = 16):
        self.model = model
        self.max_batch = max_batch
        self.context = context_length(model)
        self.vocab_size = int(model.config.vocab_size)
        self.device = next(model.parameters()).device
        self.waiting: list[Sequence] = []
        self.running: list[Sequence] = []
        self.cache: KVCache | None = None
        self.mask: torch.Tensor | None = None  # (B, context) 1 where a row has a token
        self.logits: torch.Tensor | None = None  # (B, V) next-token logits of the running rows

    def add(self, seq: Sequence) -> Sequence:
        """Queue a sequence; it joins the batch at the next step with room. Raises GenerationError
        for a prompt that is empty, out of vocabulary or too long, or bad sampling settings."""
        self.check(seq)
        return self.add_checked(seq)

    def check(self, seq: Sequence) -> None:
        """What `add` refuses, without queueing (a server validates before it answers)."""
        seq.params.validate(self.vocab_size)
        seq.prompt = check_prompts([seq.prompt], self.vocab_size, self.context, seq.params.max_new_tokens, False)[0]

    def add_checked(self, seq: Sequence) -> Sequence:
        if seq.seed is not None and not seq.params.greedy:
            seq.generator = torch.Generator().manual_seed(seq.seed)
        seq.group = (astuple(seq.params), seq.generator is not None)  # once, not at every step
        self.waiting.append(seq)
        return seq

    def reset(self) -> None:
        """Drop every sequence, running or waiting (after a failed step)."""
        self.waiting, self.running = [], []
        self.cache = self.mask = self.logits = None

    def cancel(self, seq: Sequence) -> None:
        """Stop a sequence (its client went away): it leaves the batch at the next step."""
        seq.cancelled = True

    @property
    def busy(self) -> bool:
        return bool(self.waiting or self.running)

    @torch.inference_mode()
    def step(self) -> list[Event]:
        """Admit waiting sequences, then produce one token for every running one."""
        gone = [s for s in self.waiting + self.running if s.cancelled]
        for seq in gone:
            seq.finish_reason = "cancelled"
        events = [Event(s, None, finish_reason="cancelled") for s in gone]
        self.waiting = [s for s in self.waiting if not s.cancelled]
        self._keep([r for r, s in enumerate(self.running) if not s.cancelled])  # frees rows for the joiners
        joining = self.waiting[:max(0, self.max_batch - len(self.running))]
        self.waiting = self.waiting[len(joining):]
        if joining:
            self._admit(joining)
        if not self.running:
            return events
        tokens, logprobs, tops = self._sample()
        keep = []
        for row, seq in enumerate(self.running):
            t = tokens[row]
            seq.output.append(t)
            p = seq.params
            ends = any(len(seq.output) >= len(s) and tuple(seq.output[-len(s):]) == s for s in p.stop_sequences)
            if t in p.stop_token_ids or ends or (seq.stop_check and seq.stop_check(seq.output)):
                seq.finish_reason = "stop"
            elif len(seq.output) >= min(p.max_new_tokens, self.context - len(seq.prompt)):
                seq.finish_reason = "length"
            else:
                keep.append(row)
            events.append(Event(seq, t, logprobs[row] if logprobs else None, tops[row] if tops else None,
                                seq.finish_reason))
        self._keep(keep)
        if self.running:
            self._decode([self.running[r].output[-1] for r in range(len(self.running))])
        return events

    # ------------------------------------------------------------------ batch state

    def _admit(self, seqs: list[Sequence]) -> None:
        """Prefill the joining sequences as one left-padded batch and merge their cache rows into the
        running batch, everyone's tokens ending at the shared column L."""
        width = max(len(s.prompt) for s in seqs)
        ids = torch.zeros(len(seqs), width, dtype=torch.long)
        mask = torch.zeros(len(seqs), width, dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, width - len(s.prompt):] = torch.tensor(s.prompt)
            mask[i, width - len(s.prompt):] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        fresh = self.model.make_kv_cache(len(seqs), width)
        ragged = any(len(s.prompt) != width for s in seqs)
        logits = self.model(ids, kv_cache=fresh, attention_mask=mask if ragged else None)[:, -1].float()
        old = self.cache.length if self.running else 0
        length = max(old, width)
        rows = len(self.running) + len(seqs)
        cache = self.model.make_kv_cache(rows, min(self.context, length + HEADROOM))
        full_mask = torch.zeros(rows, cache.max_len, dtype=torch.long, device=self.device)
        n = len(self.running)
        if n:  # the running rows move right so that they end at column `length` too
            cache.k[:, :n, :, length - old:length] = self.cache.k[:, :, :, :old]
            cache.v[:, :n, :, length - old:length] = self.cache.v[:, :, :, :old]
            full_mask[:n, length - old:length] = self.mask[:, :old]
        cache.k[:, n:, :, length - width:length] = fresh.k[:, :, :, :width]
        cache.v[:, n:, :, length - width:length] = fresh.v[:, :, :, :width]
        full_mask[n:, length - width:length] = mask
        cache.length = length
        self.cache, self.mask = cache, full_mask
        self.logits = logits if not n else torch.cat([self.logits, logits])
        self.running += seqs

    def _keep(self, rows: list[int]) -> None:
        """Drop finished rows from the batch (their cache, mask and logits)."""
        if len(rows) == len(self.running):
            return
        self.running = [self.running[r] for r in rows]
        if not rows:
            self.cache = self.mask = self.logits = None
            return
        index = torch.tensor(rows, device=self.device)
        self.cache.select_rows(index)
        self.mask, self.logits = self.mask[index], self.logits[index]

    def _decode(self, tokens: list[int]) -> None:
        """One forward step of every running row on its newest token."""
        if self.cache.length + 1 > self.cache.max_len:
            self._make_room()
        column = self.cache.length
        self.mask[:, column] = 1
        ids = torch.tensor(tokens, device=self.device)[:, None]
        self.logits = self.model(ids, kv_cache=self.cache, attention_mask=self.mask[:, :column + 1])[:, -1].float()

    def _make_room(self) -> None:
        """Grow the cache (doubling, up to the context), or when it spans the context already, shift
        every row left by the padding all rows share."""
        n = self.cache.length
        if self.cache.max_len < self.context:
            cache = self.model.make_kv_cache(len(self.running), min(self.context, 2 * self.cache.max_len))
            cache.k[:, :, :, :n], cache.v[:, :, :, :n] = self.cache.k[:, :, :, :n], self.cache.v[:, :, :, :n]
            cache.length = n
            mask = torch.zeros(len(self.running), cache.max_len, dtype=torch.long, device=self.device)
            mask[:, :n] = self.mask[:, :n]
            self.cache, self.mask = cache, mask
            return
        pad = int((self.mask[:, :n].cumsum(-1) == 0).sum(-1).min())
        self.cache.k[:, :, :, :n - pad] = self.cache.k[:, :, :, pad:n].clone()
        self.cache.v[:, :, :, :n - pad] = self.cache.v[:, :, :, pad:n].clone()
        self.mask[:, :n - pad] = self.mask[:, pad:n].clone()
        self.mask[:, n - pad:] = 0
        self.cache.length = n - pad

    def _sample(self) -> tuple[list[int], list[float] | None, list[dict[int, float]] | None]:
        """One token per running row, each with its own settings; rows that share settings are
        processed together. Log-probabilities come from the raw model distribution."""
        logits = self.logits
        tokens = torch.empty(len(self.running), dtype=torch.long)
        groups: dict[tuple, list[int]] = {}
        for row, seq in enumerate(self.running):
            groups.setdefault(seq.group, []).append(row)
        for rows in groups.values():
            params = self.running[rows[0]].params
            index = torch.tensor(rows, device=logits.device)
            counts = seen = None
            if params.repetition_penalty != 1.0 or params.frequency_penalty or params.presence_penalty:
                counts = torch.zeros(len(rows), self.vocab_size, dtype=torch.int32, device=logits.device)
                seen = torch.zeros(len(rows), self.vocab_size, dtype=torch.bool, device=logits.device)
                for i, r in enumerate(rows):
                    out = torch.tensor(self.running[r].output, dtype=torch.long, device=logits.device)
                    counts[i].index_add_(0, out, torch.ones_like(out, dtype=torch.int32))
                    seen[i, self.running[r].prompt] = True
                seen |= counts > 0
                if params.repetition_penalty == 1.0:
                    seen = None
            generators = [self.running[r].generator for r in rows] if self.running[rows[0]].generator else None
            chosen = sample(process_logits(logits[index], params, counts, seen), params.greedy, generators)
            tokens[rows] = chosen.cpu()
        token_list = tokens.tolist()
        want = [seq.params.logprobs for seq in self.running]
        if all(w is None for w in want):
            return token_list, None, None
        logp = torch.log_softmax(logits, dim=-1)
        chosen_lp = logp.gather(-1, tokens.to(logp.device)[:, None]).squeeze(-1).tolist()
        k = max(w or 0 for w in want)
        tops = None
        if k:
            top = torch.topk(logp, min(k, self.vocab_size), dim=-1)
            tops = [dict(list(zip(i, v))[:w or 0]) if w else None
                    for i, v, w in zip(top.indices.tolist(), top.values.tolist(), want)]
        return token_list, chosen_lp, tops
