"""The generation engine: prefill, then decode one token per step into a preallocated KV cache.

Works on token ids only; text, chat templates and stop strings live one layer up
(`llmlab.generate.text`). Any decoder of the zoo can be driven: the engine needs
`model(input_ids, kv_cache=, attention_mask=, logits_to_keep=)`, `model.make_kv_cache(batch,
max_len)` and `model.config.max_seq_len` / `vocab_size`.

Prompts of different lengths are left-padded into one batch, with an attention mask that hides the
padding and position ids that count real tokens only, so each row decodes exactly as it would
alone. A prompt with n > 1 samples is prefilled once and its cache rows copied n times.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from llmlab.generate.compiled import CompiledDecoder
from llmlab.generate.sampling import GenerationError, SamplingParams, process_logits, sample
from llmlab.models.kernels import StaticKVCache

# stop_check(row, token_ids_so_far) -> True to finish that row now (used for stop strings)
StopCheck = Callable[[int, list[int]], bool]


@dataclass
class TokenEvent:
    """One new token of one completion, as the stream yields it."""

    row: int  # completion index: prompt_index * n + sample_index
    token_id: int
    logprob: float | None = None  # log-probability under the model (before penalties and temperature)
    top_logprobs: dict[int, float] | None = None  # the model's most likely tokens at this step
    finish_reason: str | None = None  # "stop" or "length" on the completion's last token


@dataclass
class Completion:
    prompt_index: int
    sample_index: int
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "stop": a stop token, sequence or check; "length": out of budget
    logprobs: list[float] | None = None
    top_logprobs: list[dict[int, float]] | None = None
    score: float | None = None  # beam search: length-normalised sum of log-probabilities


def context_length(model: nn.Module) -> int:
    return int(model.config.max_seq_len)


def is_encoder_decoder(model: nn.Module) -> bool:
    return bool(getattr(model.config, "encoder_decoder", False))


def output_budget(model: nn.Module, prompt_len: int, max_new_tokens: int) -> int:
    """How many tokens a completion of a `prompt_len`-token prompt may have: a decoder's prompt and
    output share its context; an encoder-decoder's output has the decoder's own limit."""
    if is_encoder_decoder(model):
        return min(max_new_tokens, int(model.config.max_target_len))
    return min(max_new_tokens, context_length(model) - prompt_len)


def check_prompts(prompts: Sequence[Sequence[int]], vocab_size: int, context: int, max_new_tokens: int,
                  truncate: bool, *, encoder_decoder: bool = False) -> list[list[int]]:
    """Validate token-id prompts; with `truncate`, drop their oldest tokens to leave room for
    `max_new_tokens` (always keeping at least one). An encoder-decoder's prompt (its input) may fill
    the whole context: the output does not share it."""
    room = 0 if encoder_decoder else max_new_tokens
    if len(prompts) == 0:
        raise GenerationError("no prompts given")
    out = []
    for i, prompt in enumerate(prompts):
        prompt = [int(t) for t in prompt]
        if not prompt:
            raise GenerationError(f"prompt {i} is empty; give at least one token (for example BOS)")
        bad = [t for t in prompt if not 0 <= t < vocab_size]
        if bad:
            raise GenerationError(f"prompt {i} has token id {bad[0]} outside the vocabulary [0, {vocab_size})")
        if truncate and len(prompt) + room > context:
            prompt = prompt[-max(1, context - room):]
        if len(prompt) >= context + (1 if encoder_decoder else 0):
            raise GenerationError(f"prompt {i} has {len(prompt)} tokens but the context window is {context}, "
                                  "leaving no room to generate; shorten it or ask for truncation")
        out.append(prompt)
    return out


def _row_generators(params: SamplingParams, n_prompts: int) -> list[torch.Generator] | None:
    if params.greedy or params.seed is None:
        return None
    return [torch.Generator().manual_seed(params.seed + j) for _ in range(n_prompts) for j in range(params.n)]


def _ends_with(tokens: list[int], sequences: tuple[tuple[int, ...], ...]) -> bool:
    return any(len(tokens) >= len(s) and tuple(tokens[-len(s):]) == s for s in sequences)


class Engine:
    """Batched, streaming generation from token-id prompts.

    With `compile=True` the decode steps run through a `CompiledDecoder` (CPU; the first call for
    each batch size compiles, for tens of seconds); prefill and beam search stay eager.
    """

    def __init__(self, model: nn.Module, *, compile: bool = False):
        self.encoder_decoder = is_encoder_decoder(model)
        if self.encoder_decoder:
            from llmlab.generate.seq2seq import Seq2SeqDecoder

            if compile:
                raise GenerationError("compiled decoding is for decoder-only models; run T5 without compile")
            model = Seq2SeqDecoder(model)
        self.model = model
        self.context = context_length(model)
        self.vocab_size = int(model.config.vocab_size)
        self.device = next(model.parameters()).device
        self.compiled = CompiledDecoder(model) if compile else None

    def check(self, prompts: Sequence[Sequence[int]], params: SamplingParams, truncate: bool) -> list[list[int]]:
        return check_prompts(prompts, self.vocab_size, self.context, params.max_new_tokens, truncate,
                             encoder_decoder=self.encoder_decoder)

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams, *,
                 stop_check: StopCheck | None = None, truncate: bool = False) -> list[Completion]:
        """All completions, n per prompt, ordered prompt by prompt. Beam search when num_beams > 1."""
        if params.num_beams > 1:
            from llmlab.generate.beam import beam_search

            params.validate(self.vocab_size)
            prompts = self.check(prompts, params, truncate)
            return [c for i, p in enumerate(prompts) for c in beam_search(self.model, p, params, i, stop_check)]
        completions = [Completion(i // params.n, i % params.n) for i in range(len(prompts) * params.n)]
        if params.logprobs is not None:
            for c in completions:
                c.logprobs, c.top_logprobs = [], []
        for events in self.stream(prompts, params, stop_check=stop_check, truncate=truncate):
            for e in events:
                c = completions[e.row]
                c.token_ids.append(e.token_id)
                c.finish_reason = e.finish_reason
                if c.logprobs is not None:
                    c.logprobs.append(e.logprob)
                    c.top_logprobs.append(e.top_logprobs)
        return completions

    @torch.inference_mode()
    def stream(self, prompts: Sequence[Sequence[int]], params: SamplingParams, *,
               stop_check: StopCheck | None = None, truncate: bool = False) -> Iterator[list[TokenEvent]]:
        """Yield, at every decode step, the new token of each unfinished completion.

        Closing the iterator early (breaking out of the loop) stops generation.
        """
        params.validate(self.vocab_size)
        if params.num_beams > 1:
            raise GenerationError("beam search does not stream; use generate()")
        prompts = self.check(prompts, params, truncate)
        n_rows, width = len(prompts) * params.n, max(len(p) for p in prompts)
        # row r may add tokens until its prompt plus output fills the context
        budget = [output_budget(self.model, len(p), params.max_new_tokens) for p in prompts for _ in range(params.n)]
        max_steps = max(budget)

        slots = width + max_steps
        if self.compiled is not None:
            slots = self.compiled.cache_slots(slots, self.context)
        ids = torch.zeros(len(prompts), width, dtype=torch.long)
        ragged = any(len(p) != width for p in prompts)
        mask = None  # (rows, slots): 1 on tokens; the compiled step always takes one
        if ragged or self.compiled is not None:
            mask = torch.zeros(n_rows, slots, dtype=torch.long, device=self.device)
        for i, p in enumerate(prompts):
            ids[i, width - len(p):] = torch.tensor(p)
            if mask is not None:
                mask[i * params.n:(i + 1) * params.n, width - len(p):width] = 1
        ids = ids.to(self.device)
        prompt_mask = mask[::params.n, :width] if ragged else None

        cache = self.model.make_kv_cache(len(prompts), slots)
        logits = self.model(ids, kv_cache=cache, attention_mask=prompt_mask, logits_to_keep=1)[:, -1]  # (P, V)
        if params.n > 1:
            rows = torch.arange(len(prompts), device=self.device).repeat_interleave(params.n)
            cache.select_rows(rows)
            logits = logits[rows]

        counts = seen = None
        if params.repetition_penalty != 1.0 or params.frequency_penalty or params.presence_penalty:
            counts = torch.zeros(n_rows, self.vocab_size, dtype=torch.int32, device=self.device)
            if params.repetition_penalty != 1.0:
                seen = torch.zeros(n_rows, self.vocab_size, dtype=torch.bool, device=self.device)
                for i, p in enumerate(prompts if not self.encoder_decoder else ()):  # an input is not output
                    seen[i * params.n:(i + 1) * params.n, p] = True
        if self.compiled is not None:
            cache = StaticKVCache(cache)
        generators = _row_generators(params, len(prompts))
        stop_ids = set(params.stop_token_ids)
        outputs: list[list[int]] = [[] for _ in range(n_rows)]
        every_row = torch.arange(n_rows, device=self.device)
        active = list(range(n_rows))

        for step in range(max_steps):
            logits = logits.float()
            tokens = sample(process_logits(logits, params, counts, seen), params.greedy, generators)
            chosen = top = None
            if params.logprobs is not None:
                logp = torch.log_softmax(logits, dim=-1)
                chosen = logp.gather(-1, tokens[:, None]).squeeze(-1).tolist()
                if params.logprobs:
                    top = torch.topk(logp, min(params.logprobs, self.vocab_size), dim=-1)
                    top = [dict(zip(i, v)) for i, v in zip(top.indices.tolist(), top.values.tolist())]
            token_list = tokens.tolist()
            events, still_active = [], []
            for r in active:
                t = token_list[r]
                out = outputs[r]
                out.append(t)
                reason = None
                if t in stop_ids or _ends_with(out, params.stop_sequences) or (stop_check and stop_check(r, out)):
                    reason = "stop"
                elif len(out) >= budget[r]:
                    reason = "length"
                else:
                    still_active.append(r)
                events.append(TokenEvent(r, t, chosen[r] if chosen else None, top[r] if top else None, reason))
            active = still_active
            yield events
            if not active:
                return
            if counts is not None:
                counts[every_row, tokens] += 1
                if seen is not None:
                    seen[every_row, tokens] = True
            if mask is not None:
                mask[:, width + step] = 1
            if self.compiled is not None:
                logits = self.compiled(tokens[:, None], cache, mask, width + step)
                continue
            step_mask = mask[:, :width + step + 1] if mask is not None else None
            logits = self.model(tokens[:, None], kv_cache=cache, attention_mask=step_mask)[:, -1]


def generate(model: nn.Module, prompts: Sequence[Sequence[int]], params: SamplingParams | None = None,
             **kwargs) -> list[Completion]:
    """`Engine(model).generate(prompts, params)`; params default to greedy decoding."""
    return Engine(model).generate(prompts, params or SamplingParams(temperature=0.0), **kwargs)


def sequence_logprobs(model: nn.Module, context: Sequence[int], continuations: Sequence[Sequence[int]]) -> list[float]:
    """Sum of log p(continuation | context) under the model, for each continuation (one batch).

    Used to score candidates (multiple-choice answers, tree-of-thought evaluations).
    """
    if not context:
        raise GenerationError("context is empty; give at least one token")
    return [s.logprob for s in score_continuations(model, [(context, continuations)])[0]]


@dataclass
class Score:
    """How a model scores one continuation of a context."""

    logprob: float  # sum over the continuation's tokens of log p(token | everything before it)
    greedy: bool  # every token is the model's most likely next token
    token_logprobs: list[float] = field(default_factory=list)


@torch.inference_mode()
def score_continuations(model: nn.Module, groups: Sequence[tuple[Sequence[int], Sequence[Sequence[int]]]]
                        ) -> list[list[Score]]:
    """Score each group's continuations given the group's context, all groups in one batch.

    A context is prefilled once (the groups left-padded into one batch) and its KV cache is copied
    to one row per continuation, which then runs as one right-padded batch: k answers to a question
    cost one pass over the question, not k. A continuation's first token is scored by the context's
    last logits, so one-token answers need no second pass at all.

    Every context must be non-empty and context + continuation at most `max_seq_len + 1` tokens
    (the last token is only predicted, never fed); continuations must be non-empty.
    """
    if not groups:
        return []
    device, context = next(model.parameters()).device, context_length(model)
    for ctx, conts in groups:
        if not ctx:
            raise GenerationError("context is empty; give at least one token")
        for c in conts:
            if not c:
                raise GenerationError("a continuation is empty; give at least one token")
            if len(ctx) + len(c) - 1 > context:
                raise GenerationError(f"context plus continuation is {len(ctx) + len(c)} tokens, more than the "
                                      f"model's {context} + 1")
    width = max(len(ctx) for ctx, _ in groups)
    tail = max(len(c) for _, conts in groups for c in conts) - 1  # continuation tokens that are fed
    ids = torch.zeros(len(groups), width, dtype=torch.long)
    mask = torch.zeros(len(groups), width + tail, dtype=torch.long)
    for i, (ctx, _) in enumerate(groups):
        ids[i, width - len(ctx):] = torch.tensor(list(ctx))
        mask[i, width - len(ctx):] = 1
    ids, mask = ids.to(device), mask.to(device)
    ragged = bool((mask[:, :width] == 0).any())
    cache = model.make_kv_cache(len(groups), width + tail)
    first = model(ids, kv_cache=cache, attention_mask=mask[:, :width] if ragged else None,
                  logits_to_keep=1)[:, -1].float().log_softmax(-1)  # (G, V)

    owners = [g for g, (_, conts) in enumerate(groups) for _ in conts]
    conts = [list(c) for _, cs in groups for c in cs]
    rest = None
    if tail > 0:
        rows = torch.tensor(owners, device=device)
        cache.select_rows(rows)
        fed = torch.zeros(len(conts), tail, dtype=torch.long)
        for r, c in enumerate(conts):
            fed[r, :len(c) - 1] = torch.tensor(c[:-1], dtype=torch.long)
        row_mask = mask[rows]
        row_mask[:, width:] = 1  # right padding after a continuation never reaches its real tokens
        rest = model(fed.to(device), kv_cache=cache, attention_mask=row_mask if ragged else None
                     ).float().log_softmax(-1)  # (R, tail, V)
    out: list[list[Score]] = [[] for _ in groups]
    for r, (g, c) in enumerate(zip(owners, conts)):
        logp = first[g][None] if rest is None else torch.cat([first[g][None], rest[r, :len(c) - 1]])
        target = torch.tensor(c, device=device)
        token_logprobs = logp.gather(-1, target[:, None]).squeeze(-1)
        greedy = bool((logp.argmax(-1) == target).all())
        out[g].append(Score(float(token_logprobs.double().sum()), greedy, token_logprobs.tolist()))
    return out
