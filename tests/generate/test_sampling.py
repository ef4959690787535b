"""Decoding strategies as pure functions: hand-computed cases and draws that must stay in their set."""

from __future__ import annotations

import re

import pytest
import torch

from llmlab.generate.sampling import (GenerationError, SamplingParams, apply_penalties, min_p_filter,
                                      process_logits, sample, top_k_filter, top_p_filter)

PROBS = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
LOGITS = PROBS.log()


def kept(logits: torch.Tensor) -> set[int]:
    return set(torch.nonzero(torch.isfinite(logits[0])).flatten().tolist())


def test_top_k_keeps_the_k_largest():
    assert kept(top_k_filter(LOGITS, 2)) == {0, 1}
    assert kept(top_k_filter(LOGITS, 0)) == {0, 1, 2, 3}


@pytest.mark.parametrize("p, expected", [(0.5, {0}), (0.7, {0, 1}), (0.8, {0, 1}), (0.81, {0, 1, 2}),
                                         (1.0, {0, 1, 2, 3})])
def test_top_p_keeps_the_smallest_set_reaching_p(p, expected):
    assert kept(top_p_filter(LOGITS, p)) == expected


def test_top_p_works_on_unsorted_rows_of_a_batch():
    logits = torch.stack([LOGITS[0], LOGITS[0].flip(0)])
    out = top_p_filter(logits, 0.7)
    assert kept(out[:1]) == {0, 1} and kept(out[1:]) == {3, 2}


def test_tiny_top_p_still_keeps_the_most_likely_token():
    assert kept(top_p_filter(LOGITS, 1e-9)) == {0}


@pytest.mark.parametrize("min_p, expected", [(0.2, {0, 1, 2}), (0.5, {0, 1}), (0.0, {0, 1, 2, 3})])
def test_min_p_drops_tokens_below_a_fraction_of_the_top(min_p, expected):
    assert kept(min_p_filter(LOGITS, min_p)) == expected


def test_penalties_hand_computed():
    logits = torch.tensor([[2.0, -1.0, 3.0, 0.5]])
    counts = torch.tensor([[2, 1, 0, 0]])
    rep = apply_penalties(logits, counts, None, repetition=2.0)
    assert rep.tolist() == [[1.0, -2.0, 3.0, 0.5]]  # seen: positive halved, negative doubled
    seen = torch.tensor([[False, False, False, True]])  # e.g. only token 3 was in the prompt
    assert apply_penalties(logits, counts, seen, repetition=2.0).tolist() == [[2.0, -1.0, 3.0, 0.25]]
    fp = apply_penalties(logits, counts, None, frequency=0.5, presence=0.25)
    assert fp.tolist() == [[2.0 - 1.0 - 0.25, -1.0 - 0.5 - 0.25, 3.0, 0.5]]


def test_temperature_divides_and_zero_is_greedy():
    logits = torch.tensor([[1.0, 2.0, 4.0]])
    assert torch.allclose(process_logits(logits, SamplingParams(temperature=2.0)), logits / 2)
    assert sample(process_logits(logits, SamplingParams(temperature=0.0)), greedy=True).tolist() == [2]


@pytest.mark.parametrize("params, allowed", [
    (SamplingParams(top_k=2), {0, 1}),
    (SamplingParams(top_p=0.7), {0, 1}),
    (SamplingParams(min_p=0.2), {0, 1, 2}),
    (SamplingParams(top_k=3, top_p=0.9, temperature=3.0), {0, 1, 2}),
])
def test_draws_never_leave_the_truncated_set(params, allowed):
    logits = LOGITS.expand(4000, -1)
    draws = set(sample(process_logits(logits, params), greedy=False).tolist())
    assert draws == allowed  # every allowed token shows up in 4000 draws, and nothing else


def test_draws_follow_the_distribution():
    draws = sample(LOGITS.expand(20000, -1), greedy=False)
    freq = torch.bincount(draws, minlength=4).float() / len(draws)
    assert torch.allclose(freq, PROBS[0], atol=0.015)


def test_row_generators_make_a_row_independent_of_the_batch():
    gens = lambda: [torch.Generator().manual_seed(s) for s in (1, 2, 3)]  # noqa: E731
    logits = torch.randn(3, 50)
    together = sample(logits, greedy=False, generators=gens())
    alone = sample(logits[1:2], greedy=False, generators=[torch.Generator().manual_seed(2)])
    assert together[1] == alone[0]
    assert torch.equal(together, sample(logits, greedy=False, generators=gens()))


@pytest.mark.parametrize("field, value, message", [
    ("temperature", -0.5, "temperature must be"),
    ("top_p", 0.0, "top_p must be in (0, 1]"),
    ("top_p", 1.5, "top_p must be in (0, 1]"),
    ("top_k", -1, "top_k"),
    ("min_p", 1.0, "min_p"),
    ("n", 0, "n must be"),
    ("max_new_tokens", 0, "max_new_tokens"),
    ("repetition_penalty", 0.0, "repetition_penalty"),
])
def test_out_of_range_parameters_are_named(field, value, message):
    with pytest.raises(GenerationError, match=re.escape(message)):
        SamplingParams(**{field: value}).validate()


def test_unknown_stop_token_and_empty_stop_sequence_are_errors():
    with pytest.raises(GenerationError, match="stop token id 100 is outside the vocabulary"):
        SamplingParams(stop_token_ids=(100,)).validate(vocab_size=100)
    with pytest.raises(GenerationError, match="empty sequence"):
        SamplingParams(stop_sequences=((),)).validate()
    with pytest.raises(GenerationError, match="n must be <= num_beams"):
        SamplingParams(num_beams=2, n=3).validate()


def test_process_logits_applies_penalties_before_temperature():
    logits = torch.tensor([[2.0, 1.0]])
    counts = torch.tensor([[1, 0]])
    out = process_logits(logits, SamplingParams(temperature=2.0, repetition_penalty=4.0), counts)
    assert out.tolist() == [[0.25, 0.5]]


@pytest.mark.parametrize("field", ["temperature", "top_p", "min_p", "repetition_penalty", "frequency_penalty",
                                   "presence_penalty", "length_penalty"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_parameters_are_named(field, value):
    with pytest.raises(GenerationError, match=f"{field} must be a finite number"):
        SamplingParams(**{field: value}).validate()


def test_logit_bias_adds_to_each_row_before_temperature_and_greedy_follows_it():
    logits = torch.tensor([[2.0, 1.0, 0.0], [0.0, 1.0, 2.0]])
    params = SamplingParams(temperature=2.0, logit_bias={2: 3.0, 0: -1.0})
    assert params.logit_bias == ((0, -1.0), (2, 3.0))  # a dict becomes hashable pairs, sorted
    assert process_logits(logits, params).tolist() == [[0.5, 0.5, 1.5], [-0.5, 0.5, 2.5]]
    banned = SamplingParams(temperature=0.0, logit_bias={0: -100})
    assert sample(process_logits(LOGITS, banned), True).tolist() == [1]
    forced = SamplingParams(temperature=1.0, logit_bias={3: 100})
    assert set(sample(process_logits(LOGITS.expand(64, -1), forced), False).tolist()) == {3}


@pytest.mark.parametrize("bias, vocab, message", [
    ({1: 101}, None, r"logit_bias of token 1 must be in \[-100, 100\]"),
    ({1: float("nan")}, None, "logit_bias of token 1"),
    ({7: 1}, 5, "logit_bias: token id 7 is outside the vocabulary"),
    ({-1: 1}, 5, "logit_bias: token id -1 is outside the vocabulary"),
])
def test_bad_logit_bias_is_named(bias, vocab, message):
    with pytest.raises(GenerationError, match=message):
        SamplingParams(logit_bias=bias).validate(vocab)
    with pytest.raises(GenerationError, match="beam search"):
        SamplingParams(logit_bias={1: 1}, num_beams=2).validate()
