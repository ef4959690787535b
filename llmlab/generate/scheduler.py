"""Continuous batching: sequences join and leave the running batch at every decode step.

The engine (`engine.py`) runs a fixed batch to its end; a server cannot wait for the slowest
request before admitting the next. Here each `step()` first prefills the sequences that arrived
(together, as one left-padded batch), merges them into the running batch, samples one token for
every running sequence, and drops the ones that finished or were cancelled, so their rows stop
costing compute at once (iteration-level scheduling, Yu et al., 2022, "Orca").

The batch's KV cache is left-aligned to a shared length L: a row's tokens end at column L, with
padding before them hidden by the attention mask; position ids count real tokens only, so a row
computes exactly what it computes alone. A joining row whose prompt is longer than L shifts the
others right. The cache holds L plus some headroom and doubles when full; once it spans the whole
context, every row shifts left by the padding they all share.
The running rows are the first rows of a store that outlives them: a finished row's place is taken
by one of the last rows (only that row is copied), and joiners are written after the running rows,
so the store is reallocated only when it must grow, in rows (doubling, up to `max_batch`) or length.
Each sequence keeps its own sampling settings and random generator.

An encoder-decoder (T5) batches the same way (`Seq2SeqScheduler`): a joining prompt goes through the
encoder, its decoder starts from the start token, and each row also keeps the cross-attention keys
and values of its own input. `make_scheduler` picks the scheduler a model needs.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import astuple, dataclass, field

import torch
from torch import nn

from llmlab.generate.engine import check_prompts, context_length, is_encoder_decoder, output_budget
from llmlab.generate.sampling import SamplingParams, process_logits, sample
from llmlab.models.layers import KVCache
from llmlab.models.t5 import Seq2SeqCache

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
        self.context = context_length(model)  # the prompt's limit
        self.encoder_decoder = is_encoder_decoder(model)
        self.max_cache_len = self.context  # the decoder positions a row's cache may span
        self.vocab_size = int(model.config.vocab_size)
        self.device = next(model.parameters()).device
        self.waiting: list[Sequence] = []
        self.running: list[Sequence] = []
        self.store: KVCache | None = None  # keys and values of up to its batch size of rows
        self.cache: KVCache | None = None  # the running rows: the store's first rows
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
        seq.prompt = check_prompts([seq.prompt], self.vocab_size, self.context, seq.params.max_new_tokens, False,
                                   encoder_decoder=self.encoder_decoder)[0]

    def add_checked(self, seq: Sequence) -> Sequence:
        if seq.seed is not None and not seq.params.greedy:
            seq.generator = torch.Generator().manual_seed(seq.seed)
        seq.group = (astuple(seq.params), seq.generator is not None)  # once, not at every step
        self.waiting.append(seq)
        return seq

    def reset(self) -> None:
        """Drop every sequence, running or waiting (after a failed step)."""
        self.waiting, self.running = [], []
        self.store = self.cache = self.mask = self.logits = None

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
            elif len(seq.output) >= output_budget(self.model, len(seq.prompt), p.max_new_tokens):
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
        """Prefill the joining sequences and write their cache rows after the running ones, everyone's
        tokens ending at the shared column L."""
        fresh, mask, logits = self._prefill(seqs)
        width = mask.size(1)
        n = len(self.running)
        old = self.cache.length if n else 0
        length = max(old, width)
        rows = n + len(seqs)
        store = self.store
        if store is None or store.k.size(1) < rows or store.max_len < length:
            max_len = max(min(self.max_cache_len, length + HEADROOM), store.max_len if store is not None else 0)
            self.store = self._new_cache(self._capacity(rows, None if store is None else store.k.size(1)), max_len)
            if n:  # the running rows move right so that they end at column `length` too
                self.store.k[:, :n, :, length - old:length] = store.k[:, :n, :, :old]
                self.store.v[:, :n, :, length - old:length] = store.v[:, :n, :, :old]
        elif n and length > old:  # in place: the source overlaps its destination
            store.k[:, :n, :, length - old:length] = store.k[:, :n, :, :old].clone()
            store.v[:, :n, :, length - old:length] = store.v[:, :n, :, :old].clone()
        self.store.k[:, n:rows, :, length - width:length] = fresh.k[:, :, :, :width]
        self.store.v[:, n:rows, :, length - width:length] = fresh.v[:, :, :, :width]
        full_mask = torch.zeros(rows, self.store.max_len, dtype=torch.long, device=self.device)
        if n:
            full_mask[:n, length - old:length] = self.mask[:, :old]
        full_mask[n:, length - width:length] = mask
        self.mask = full_mask
        self.logits = logits if not n else torch.cat([self.logits, logits])
        self.running += seqs
        self._use_rows(rows, length)

    def _prefill(self, seqs: list[Sequence]) -> tuple[KVCache, torch.Tensor, torch.Tensor]:
        """Run the joining prompts as one left-padded batch: their cache, its mask (J, width) and their
        next-token logits (J, V)."""
        width = max(len(s.prompt) for s in seqs)
        ids = torch.zeros(len(seqs), width, dtype=torch.long)
        mask = torch.zeros(len(seqs), width, dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, width - len(s.prompt):] = torch.tensor(s.prompt)
            mask[i, width - len(s.prompt):] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        fresh = self._new_cache(len(seqs), width)
        ragged = any(len(s.prompt) != width for s in seqs)
        logits = self.model(ids, kv_cache=fresh, attention_mask=mask if ragged else None,
                            logits_to_keep=1)[:, -1].float()
        return fresh, mask, logits

    def _new_cache(self, rows: int, max_len: int) -> KVCache:
        return self.model.make_kv_cache(rows, max_len)

    def _capacity(self, rows: int, capacity: int | None) -> int:
        """The rows a store needs for `rows` running: its `capacity`, or doubled (up to max_batch) when
        too few."""
        if capacity is None:
            return rows
        return capacity if rows <= capacity else max(rows, min(self.max_batch, 2 * capacity))

    def _use_rows(self, n: int, length: int) -> None:
        self.cache = self.store.first_rows(n)
        self.cache.length = length

    def _keep(self, rows: list[int]) -> None:
        """Drop finished rows from the batch (their cache, mask and logits). `rows` ascend; each row
        dropped from the first len(rows) takes in one kept from past them."""
        if len(rows) == len(self.running):
            return
        n = len(rows)
        if not n:
            self.running = []
            self.cache = self.mask = self.logits = None
            return
        kept = set(rows)
        holes = [r for r in range(n) if r not in kept]
        movers = [r for r in rows if r >= n]
        order = list(range(n))
        for hole, mover in zip(holes, movers):
            order[hole] = mover
        length = self.cache.length
        if holes:
            self._move_rows(torch.tensor(holes, device=self.device), torch.tensor(movers, device=self.device), length)
        index = torch.tensor(order, device=self.device)
        self.running = [self.running[r] for r in order]
        self.mask, self.logits = self.mask[index], self.logits[index]
        self._use_rows(n, length)

    def _move_rows(self, dst: torch.Tensor, src: torch.Tensor, length: int) -> None:
        """Copy the store's rows `src` into rows `dst` (their first `length` positions)."""
        self.store.k[:, dst, :, :length] = self.store.k[:, src, :, :length]
        self.store.v[:, dst, :, :length] = self.store.v[:, src, :, :length]

    def _decode(self, tokens: list[int]) -> None:
        """One forward step of every running row on its newest token."""
        if self.cache.length + 1 > self.cache.max_len:
            self._make_room()
        column = self.cache.length
        self.mask[:, column] = 1
        ids = torch.tensor(tokens, device=self.device)[:, None]
        self.logits = self._forward(ids, self.mask[:, :column + 1])

    def _forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Next-token logits (B, V) of the running rows after their tokens ids (B, 1); mask (B, L + 1)."""
        return self.model(ids, kv_cache=self.cache, attention_mask=mask)[:, -1].float()

    def _make_room(self) -> None:
        """Grow the cache (doubling, up to max_cache_len), or when it spans that already, shift every row
        left by the padding all rows share."""
        n, rows = self.cache.length, len(self.running)
        if self.cache.max_len < self.max_cache_len:
            store = self._new_cache(self.store.k.size(1), min(self.max_cache_len, 2 * self.cache.max_len))
            store.k[:, :rows, :, :n], store.v[:, :rows, :, :n] = self.cache.k[:, :, :, :n], self.cache.v[:, :, :, :n]
            mask = torch.zeros(rows, store.max_len, dtype=torch.long, device=self.device)
            mask[:, :n] = self.mask[:, :n]
            self.store, self.mask = store, mask
            self._use_rows(rows, n)
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
                    if not self.encoder_decoder:  # T5's input is not its output: HF penalises the output alone
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


class Seq2SeqScheduler(Scheduler):
    """Continuous batching for an encoder-decoder (T5): the sequences that join at a step are encoded
    as one batch and decode their start token; then every running row decodes a token per step.

    A row's decoder cache is left-aligned as a decoder's is (T5's position bias depends only on key
    minus query, so the padding before a row's tokens shifts nothing; `T5.decode`'s decoder_mask hides
    it) and may span max_target_len positions. Its cross-attention keys and values lie in a store of
    rows beside the cache's, managed alike: a row's input fills the first columns (T5 has no absolute
    positions, so right padding is as good as left), the rest hidden by the encoder mask, and a step
    attends to the columns of the longest input running.
    """

    def __init__(self, model: nn.Module, max_batch: int = 16):
        super().__init__(model, max_batch)
        self.max_cache_len = int(model.config.max_target_len)
        self.sources: list[tuple[torch.Tensor, torch.Tensor]] | None = None  # per decoder layer: (rows, nh, S, hs) each
        self.source_mask: torch.Tensor | None = None  # (rows, S) 1 where a row's input has a token

    def reset(self) -> None:
        super().reset()
        self.sources = self.source_mask = None

    def _prefill(self, seqs: list[Sequence]) -> tuple[KVCache, torch.Tensor, torch.Tensor]:
        """Encode the joining prompts as one right-padded batch, store their cross-attention keys and
        values after the running rows', and decode the start token: their decoder cache (one position),
        its mask (J, 1) and their next-token logits (J, V)."""
        width = max(len(s.prompt) for s in seqs)
        ids = torch.zeros(len(seqs), width, dtype=torch.long)
        mask = torch.zeros(len(seqs), width, dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, :len(s.prompt)] = torch.tensor(s.prompt)
            mask[i, :len(s.prompt)] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        ragged = any(len(s.prompt) != width for s in seqs)
        fresh = self.model.make_cache(self.model.encode(ids, mask if ragged else None), mask if ragged else None, 1)
        start = torch.full((len(seqs), 1), self.model.config.decoder_start_id, dtype=torch.long, device=self.device)
        logits = self.model.logits(self.model.decode(start, cache=fresh))[:, -1].float()
        self._add_sources(fresh.cross, mask)
        return fresh.self_attn, torch.ones(len(seqs), 1, dtype=torch.long, device=self.device), logits

    def _add_sources(self, cross: list[tuple[torch.Tensor, torch.Tensor]], mask: torch.Tensor) -> None:
        """Write the joiners' cross-attention keys and values (J, nh, S', hs) per layer, and their
        encoder mask (J, S'), after the running rows; the store grows when it lacks rows or columns."""
        n, width = len(self.running), mask.size(1)
        rows = n + mask.size(0)
        if self.sources is None or self.source_mask.size(0) < rows or self.source_mask.size(1) < width:
            old, old_mask = self.sources, self.source_mask
            capacity = self._capacity(rows, None if old is None else old_mask.size(0))
            span = max(width, 0 if old is None else old_mask.size(1))
            self.sources = [(k.new_zeros(capacity, k.size(1), span, k.size(3)),
                             v.new_zeros(capacity, v.size(1), span, v.size(3))) for k, v in cross]
            self.source_mask = mask.new_zeros(capacity, span)
            if n:
                for (k, v), (old_k, old_v) in zip(self.sources, old):
                    k[:n, :, :old_k.size(2)], v[:n, :, :old_v.size(2)] = old_k[:n], old_v[:n]
                self.source_mask[:n, :old_mask.size(1)] = old_mask[:n]
        for (k, v), (new_k, new_v) in zip(self.sources, cross):
            k[n:rows, :, :width], v[n:rows, :, :width] = new_k, new_v
        self.source_mask[n:rows] = 0
        self.source_mask[n:rows, :width] = mask

    def _new_cache(self, rows: int, max_len: int) -> KVCache:
        cfg, p = self.model.config, self.model.embed_tokens.weight
        return KVCache(cfg.n_decoder_layers, rows, cfg.n_heads, cfg.head_dim, max_len, p.device, p.dtype)

    def _move_rows(self, dst: torch.Tensor, src: torch.Tensor, length: int) -> None:
        super()._move_rows(dst, src, length)
        for k, v in self.sources:
            k[dst], v[dst] = k[src], v[src]
        self.source_mask[dst] = self.source_mask[src]

    def _forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        n, span = len(self.running), max(len(s.prompt) for s in self.running)
        cross = [(k[:n, :, :span], v[:n, :, :span]) for k, v in self.sources]
        cache = Seq2SeqCache(self.cache, cross, self.source_mask[:n, :span])
        return self.model.logits(self.model.decode(ids, cache=cache, decoder_mask=mask))[:, -1].float()


def make_scheduler(model: nn.Module, max_batch: int = 16) -> Scheduler:
    """The continuous-batching scheduler for `model`: a `Seq2SeqScheduler` for an encoder-decoder."""
    return (Seq2SeqScheduler if is_encoder_decoder(model) else Scheduler)(model, max_batch)
