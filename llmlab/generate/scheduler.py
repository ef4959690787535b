"""Continuous batching: sequences join and leave the running batch at every decode step.

The engine (`engine.py`) runs a fixed batch to its end; a server cannot wait for the slowest
request before admitting the next. Here each `step()` first prefills the sequences that arrived
(each alone, so the batch never waits on a long prompt's padding), merges them into the running
batch, samples one token for every running sequence, and drops the ones that finished or were
cancelled, so their rows stop costing compute at once (iteration-level scheduling, Yu et al.,
2022, "Orca").

The batch's KV cache is left-aligned to a shared length L: a row's tokens end at column L, with
padding before them hidden by the attention mask; position ids count real tokens only, so a row
computes exactly what it computes alone. A joining row whose prompt is longer than L shifts the
others right; when L reaches the cache's end, every row shifts left by the padding they all share.
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


@dataclass(eq=False)
class Sequence:
    """One completion being generated: a prompt, its settings, and what it has produced so far."""

    prompt: list[int]
    params: SamplingParams  # n is ignored: a request with n completions adds n sequences
    seed: int | None = None  # this completion's own seed (a request's seed + its index)
    stop_check: Callable[[list[int]], bool] | None = None  # True to finish now (stop strings)
    id: int = field(default_factory=itertools.count().__next__)
    output: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "stop", "length" or "cancelled"
    generator: torch.Generator | None = None
    cancelled: bool = False


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
        seq.params.validate(self.vocab_size)
        seq.prompt = check_prompts([seq.prompt], self.vocab_size, self.context, seq.params.max_new_tokens, False)[0]
        if seq.seed is not None and not seq.params.greedy:
            seq.generator = torch.Generator().manual_seed(seq.seed)
        self.waiting.append(seq)
        return seq

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
        for seq in joining:
            self._join(seq)
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

    def _join(self, seq: Sequence) -> None:
        """Prefill `seq` alone and merge its cache row into the batch, right-aligned at column L."""
        p = len(seq.prompt)
        cache = self.model.make_kv_cache(1, self.context)
        ids = torch.tensor([seq.prompt], device=self.device)
        logits = self.model(ids, kv_cache=cache)[:, -1].float()
        if self.cache is None or not self.running:
            self.cache, self.logits = cache, logits
            self.mask = torch.zeros(1, self.context, dtype=torch.long, device=self.device)
            self.mask[0, :p] = 1
            self.running = [seq]
            return
        length = max(self.cache.length, p)
        shift = length - self.cache.length
        rows = len(self.running) + 1
        merged = self.model.make_kv_cache(rows, self.context)
        old = self.cache.length
        merged.k[:, :-1, :, shift:length] = self.cache.k[:, :, :, :old]
        merged.v[:, :-1, :, shift:length] = self.cache.v[:, :, :, :old]
        merged.k[:, -1, :, length - p:length] = cache.k[:, 0, :, :p]
        merged.v[:, -1, :, length - p:length] = cache.v[:, 0, :, :p]
        merged.length = length
        mask = torch.zeros(rows, self.context, dtype=torch.long, device=self.device)
        mask[:-1, shift:length] = self.mask[:, :old]
        mask[-1, length - p:length] = 1
        self.cache, self.mask = merged, mask
        self.logits = torch.cat([self.logits, logits])
        self.running.append(seq)

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
        if self.cache.length + 1 > self.context:  # shift every row left by the padding all rows have
            pad = int((self.mask[:, :self.cache.length].cumsum(-1) == 0).sum(-1).min())
            n = self.cache.length
            self.cache.k[:, :, :, :n - pad] = self.cache.k[:, :, :, pad:n].clone()
            self.cache.v[:, :, :, :n - pad] = self.cache.v[:, :, :, pad:n].clone()
            self.mask[:, :n - pad] = self.mask[:, pad:n].clone()
            self.mask[:, n - pad:] = 0
            self.cache.length = n - pad
        column = self.cache.length
        self.mask[:, column] = 1
        ids = torch.tensor(tokens, device=self.device)[:, None]
        self.logits = self.model(ids, kv_cache=self.cache, attention_mask=self.mask[:, :column + 1])[:, -1].float()

    def _sample(self) -> tuple[list[int], list[float] | None, list[dict[int, float]] | None]:
        """One token per running row, each with its own settings; rows that share settings are
        processed together. Log-probabilities come from the raw model distribution."""
        logits = self.logits
        tokens = torch.empty(len(self.running), dtype=torch.long)
        groups: dict[tuple, list[int]] = {}
        for row, seq in enumerate(self.running):
            groups.setdefault((astuple(seq.params), seq.generator is not None), []).append(row)
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
