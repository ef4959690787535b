"""Beam search with a length penalty.

Keeps the `num_beams` highest-scoring partial sequences; at each step every beam is extended by
every token and the best 2 * num_beams candidates are examined in order, so that finishing
hypotheses (a stop token or stop sequence) never starve the running beams. A finished
hypothesis is scored sum(log p) / generated_len ** length_penalty (Wu et al. 2016 use a related
form; this one is HF transformers'): length_penalty > 0 favours longer outputs, < 0 shorter ones.
Search ends when num_beams hypotheses are finished and the best running beam, normalised at
its current length, cannot beat the worst of them, or when the token budget runs out (running
beams then finish with reason "length").

The scores are the model's own log-probabilities: temperature, truncation and penalties do not
apply to beam search.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from llmlab.generate.engine import Completion, StopCheck, _ends_with, output_budget
from llmlab.generate.sampling import SamplingParams


class _Hypothesis(NamedTuple):
    score: float  # length-normalised
    tokens: list[int]
    finish_reason: str


@torch.inference_mode()
def beam_search(model: nn.Module, prompt: list[int], params: SamplingParams, prompt_index: int = 0,
                stop_check: StopCheck | None = None) -> list[Completion]:
    """The best `params.n` of `params.num_beams` beams after `prompt`, best first. `stop_check`
    (called with the beam index and its tokens) finishes a hypothesis like a stop token does."""
    k, penalty = params.num_beams, params.length_penalty
    device = next(model.parameters()).device
    budget = output_budget(model, len(prompt), params.max_new_tokens)
    cache = model.make_kv_cache(1, len(prompt) + budget)
    logits = model(torch.tensor([prompt], device=device), kv_cache=cache, logits_to_keep=1)[:, -1]
    cache.select_rows(torch.zeros(k, dtype=torch.long, device=device))
    logits = logits.expand(k, -1)
    scores = torch.full((k,), float("-inf"), device=device)
    scores[0] = 0.0  # the k copies of the prompt are one beam until the first step
    beams: list[list[int]] = [[] for _ in range(k)]
    finished: list[_Hypothesis] = []
    stop_ids = set(params.stop_token_ids)

    def norm(score: float, length: int) -> float:
        return score / length ** penalty

    for step in range(budget):
        candidates = (scores[:, None] + torch.log_softmax(logits.float(), dim=-1)).view(-1)
        top_scores, top_index = candidates.topk(min(2 * k, candidates.numel()))
        vocab = logits.size(-1)
        next_beams, next_scores, sources = [], [], []
        for score, index in zip(top_scores.tolist(), top_index.tolist()):
            if score == float("-inf"):
                break
            beam, token = divmod(index, vocab)
            tokens = beams[beam] + [token]
            if (token in stop_ids or _ends_with(tokens, params.stop_sequences)
                    or (stop_check is not None and stop_check(beam, tokens))):
                finished.append(_Hypothesis(norm(score, len(tokens)), tokens, "stop"))
                continue
            next_beams.append(tokens)
            next_scores.append(score)
            sources.append(beam)
            if len(next_beams) == k:
                break
        if not next_beams:
            break
        if step == budget - 1:
            finished += [_Hypothesis(norm(s, len(t)), t, "length") for t, s in zip(next_beams, next_scores)]
            break
        if len(finished) >= k:
            worst_kept = sorted(h.score for h in finished)[-k]
            if norm(max(next_scores), step + 1) <= worst_kept:
                break
        while len(next_beams) < k:  # fewer survivors than beams: park dead copies at -inf
            next_beams.append(next_beams[0])
            next_scores.append(float("-inf"))
            sources.append(sources[0])
        cache.select_rows(torch.tensor(sources, device=device))
        beams, scores = next_beams, torch.tensor(next_scores, device=device)
        logits = model(torch.tensor([b[-1] for b in beams], device=device)[:, None], kv_cache=cache)[:, -1]

    best = sorted(finished, key=lambda h: h.score, reverse=True)[:params.n]
    return [Completion(prompt_index, j, h.tokens, h.finish_reason, score=h.score) for j, h in enumerate(best)]
