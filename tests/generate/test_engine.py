"""The engine's invariants on every decoder of the zoo, and beam search on a hand-built model."""

from __future__ import annotations

import itertools

import pytest
import torch

from llmlab.generate import Engine, GenerationError, SamplingParams, sequence_logprobs
from llmlab.models import build_model
from tests.generate.tables import TableLM, chain
from tests.models.zoo import TINY, V

GREEDY = SamplingParams(temperature=0.0, max_new_tokens=8)
PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [14, 15, 16, 17]]


def tiny(name: str, seed: int = 0):
    torch.manual_seed(seed)
    return build_model(TINY[name]).eval()


@pytest.mark.parametrize("name", sorted(TINY))
def test_cached_decoding_gives_the_full_forward_distribution_at_every_step(name):
    model = tiny(name)
    prompt = PROMPTS[0]
    params = SamplingParams(temperature=1.0, seed=0, max_new_tokens=8, logprobs=V)
    c = Engine(model).generate([prompt], params)[0]
    with torch.no_grad():
        full = torch.log_softmax(model(torch.tensor([prompt + c.token_ids]))[0].float(), -1)
    for i, top in enumerate(c.top_logprobs):
        cached = torch.tensor([top[t] for t in range(V)])
        assert torch.allclose(cached, full[len(prompt) - 1 + i], atol=1e-5), f"step {i}"
        assert c.logprobs[i] == pytest.approx(top[c.token_ids[i]])


@pytest.mark.parametrize("name", sorted(TINY))
def test_batched_prompts_of_different_lengths_equal_one_by_one(name):
    engine = Engine(tiny(name))
    batched = [c.token_ids for c in engine.generate(PROMPTS, GREEDY)]
    alone = [engine.generate([p], GREEDY)[0].token_ids for p in PROMPTS]
    assert batched == alone


def test_greedy_is_deterministic_and_follows_the_argmax():
    engine = Engine(tiny("llama"))
    first = engine.generate(PROMPTS, GREEDY)
    assert [c.token_ids for c in first] == [c.token_ids for c in engine.generate(PROMPTS, GREEDY)]
    model = tiny("llama")
    ids = list(PROMPTS[0])
    for _ in range(GREEDY.max_new_tokens):
        with torch.no_grad():
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    assert first[0].token_ids == ids[len(PROMPTS[0]):]


def test_a_seeded_sample_repeats_and_does_not_depend_on_the_batch():
    engine = Engine(tiny("llama-gqa-tied"))
    params = SamplingParams(temperature=1.0, top_p=0.95, seed=7, n=3, max_new_tokens=12)
    a = [c.token_ids for c in engine.generate(PROMPTS, params)]
    assert a == [c.token_ids for c in engine.generate(PROMPTS, params)]
    alone = [c.token_ids for c in engine.generate(PROMPTS[1:2], params)]
    assert a[3:6] == alone  # prompt 1's three samples, with or without the other prompts
    assert len({tuple(t) for t in alone}) > 1  # the n samples differ from one another
    other_seed = [c.token_ids for c in engine.generate(PROMPTS, SamplingParams(**{**vars(params), "seed": 8}))]
    assert other_seed != a


def test_n_completions_come_prompt_by_prompt():
    out = Engine(tiny("gpt2")).generate(PROMPTS, SamplingParams(n=2, seed=0, max_new_tokens=3))
    assert [(c.prompt_index, c.sample_index) for c in out] == [(0, 0), (0, 1), (1, 0), (1, 1), (2, 0), (2, 1)]


def test_stop_token_stop_sequence_and_length():
    model = chain(20, [1, 2, 3, 4, 5, 6], loop_to=7)
    engine = Engine(model)
    c = engine.generate([[1]], SamplingParams(temperature=0.0, max_new_tokens=10, stop_token_ids=(4,)))[0]
    assert (c.token_ids, c.finish_reason) == ([2, 3, 4], "stop")
    c = engine.generate([[1]], SamplingParams(temperature=0.0, max_new_tokens=10, stop_sequences=((5, 6),)))[0]
    assert (c.token_ids, c.finish_reason) == ([2, 3, 4, 5, 6], "stop")
    c = engine.generate([[1]], SamplingParams(temperature=0.0, max_new_tokens=7))[0]
    assert (c.token_ids, c.finish_reason) == ([2, 3, 4, 5, 6, 7, 7], "length")
    checked = engine.generate([[1]], GREEDY, stop_check=lambda row, ids: ids[-1] == 3)[0]
    assert (checked.token_ids, checked.finish_reason) == ([2, 3], "stop")


def test_rows_finish_independently():
    engine = Engine(chain(20, [1, 2, 3, 4, 5, 6], loop_to=7))
    out = engine.generate([[1], [3], [5]], SamplingParams(temperature=0.0, max_new_tokens=6, stop_token_ids=(5,)))
    assert [(c.token_ids, c.finish_reason) for c in out] == [([2, 3, 4, 5], "stop"), ([4, 5], "stop"),
                                                             ([6, 7, 7, 7, 7, 7], "length")]


def test_output_stops_where_the_context_window_ends():
    model = chain(20, [1, 2, 3], loop_to=3)
    model.config.max_seq_len = 6
    c = Engine(model).generate([[1, 1, 1, 1]], SamplingParams(temperature=0.0, max_new_tokens=50))[0]
    assert (len(c.token_ids), c.finish_reason) == (2, "length")


def test_repetition_penalty_breaks_a_loop():
    table = torch.zeros(10, 10)
    table[:, 3] = 5.0  # 3 is always the favourite, 4 the runner-up
    table[:, 4] = 4.0
    engine = Engine(TableLM(table))
    plain = engine.generate([[0]], SamplingParams(temperature=0.0, max_new_tokens=3))[0].token_ids
    penalised = engine.generate([[0]], SamplingParams(temperature=0.0, max_new_tokens=3, presence_penalty=2.0))[0]
    assert plain == [3, 3, 3] and penalised.token_ids == [3, 4, 3]
    in_prompt = engine.generate([[3]], SamplingParams(temperature=0.0, max_new_tokens=1, repetition_penalty=2.0))[0]
    assert in_prompt.token_ids == [4]  # 5 / 2 < 4: the prompt's token is penalised too


def test_bad_prompts_are_clear_errors():
    engine = Engine(tiny("llama"))
    with pytest.raises(GenerationError, match="prompt 1 is empty"):
        engine.generate([[1], []], GREEDY)
    with pytest.raises(GenerationError, match="prompt 0 has 64 tokens but the context window is 64"):
        engine.generate([[1] * 64], GREEDY)
    with pytest.raises(GenerationError, match=f"token id {V} outside the vocabulary"):
        engine.generate([[1, V]], GREEDY)
    with pytest.raises(GenerationError, match="temperature must be"):
        engine.generate([[1]], SamplingParams(temperature=-1.0))
    with pytest.raises(GenerationError, match="no prompts"):
        engine.generate([], GREEDY)


def test_truncation_keeps_the_newest_tokens_and_room_to_generate():
    engine = Engine(tiny("llama"))
    long = list(range(1, 91))
    out = engine.generate([long], GREEDY, truncate=True)[0]
    assert out.token_ids == engine.generate([long[-(64 - 8):]], GREEDY)[0].token_ids
    assert len(out.token_ids) == 8


def test_the_stream_yields_every_token_and_can_be_closed_early():
    engine = Engine(tiny("llama"))
    params = SamplingParams(temperature=0.0, max_new_tokens=6)
    steps = list(engine.stream(PROMPTS[:2], params))
    assert len(steps) == 6 and all([e.row for e in s] == [0, 1] for s in steps)
    assert [e.token_id for s in steps for e in s if e.row == 0] == engine.generate(PROMPTS[:1], params)[0].token_ids
    assert steps[-1][0].finish_reason == "length" and steps[0][0].finish_reason is None
    stream = engine.stream(PROMPTS[:1], SamplingParams(temperature=0.0, max_new_tokens=50))
    first = next(stream)
    stream.close()
    assert len(first) == 1


def test_sequence_logprobs_sum_the_model_probabilities():
    model = chain(8, [1, 2, 3])
    probs = torch.softmax(model.table.detach(), -1)
    (good, bad) = sequence_logprobs(model, [1], [[2, 3], [3, 3]])
    assert good == pytest.approx(float(probs[1, 2].log() + probs[2, 3].log()), abs=1e-6)
    assert bad == pytest.approx(float(probs[1, 3].log() + probs[3, 3].log()), abs=1e-5)


# --------------------------------------------------------------------------- beam search


def trap_model() -> TableLM:
    """Greedy takes 1 (p 0.6) then faces a flat choice; 2 (p 0.4) leads to a near-certain token."""
    table = torch.full((8, 8), -30.0)
    table[0, 1], table[0, 2] = 0.6, 0.4
    table[1, 3:7] = 0.25
    table[2, 7], table[2, 3] = 0.9, 0.1
    table[3:, 0] = 1.0
    return TableLM(table.clamp(min=1e-12).log())


def test_beam_search_finds_the_best_sequence_where_greedy_does_not():
    model = trap_model()
    logp = torch.log_softmax(model.table.detach(), -1)
    best = max(itertools.product(range(8), repeat=2), key=lambda s: float(logp[0, s[0]] + logp[s[0], s[1]]))
    engine = Engine(model)
    greedy = engine.generate([[0]], SamplingParams(temperature=0.0, max_new_tokens=2))[0]
    beam = engine.generate([[0]], SamplingParams(num_beams=2, max_new_tokens=2))[0]
    assert tuple(beam.token_ids) == best == (2, 7)
    assert greedy.token_ids[0] == 1 and tuple(greedy.token_ids) != best
    assert beam.score == pytest.approx(float(logp[0, 2] + logp[2, 7]) / 2)


def test_beam_search_returns_n_distinct_hypotheses_best_first():
    out = Engine(trap_model()).generate([[0]], SamplingParams(num_beams=4, n=3, max_new_tokens=2))
    assert len(out) == 3 and len({tuple(c.token_ids) for c in out}) == 3
    assert [c.score for c in out] == sorted((c.score for c in out), reverse=True)


def test_length_penalty_trades_length_for_probability():
    # from 0: stop now (token 7, p 0.4) or continue 1 -> 2 -> 7 (each step p 0.6 then ~1)
    table = torch.full((8, 8), 1e-9)
    table[0, 7], table[0, 1] = 0.4, 0.6
    table[1, 2] = 1.0
    table[2, 7] = 1.0
    model = TableLM(table.log())
    engine = Engine(model)
    short = engine.generate([[0]], SamplingParams(num_beams=2, max_new_tokens=5, stop_token_ids=(7,),
                                                  length_penalty=-1.0))[0]
    long = engine.generate([[0]], SamplingParams(num_beams=2, max_new_tokens=5, stop_token_ids=(7,),
                                                 length_penalty=2.0))[0]
    assert short.token_ids == [7] and long.token_ids == [1, 2, 7]
    assert long.finish_reason == "stop"


@pytest.mark.parametrize("name", ["llama", "gpt2", "llama-window"])
def test_beam_search_with_one_beam_per_step_matches_exhaustive_search_on_real_models(name):
    model = tiny(name)
    prompt = PROMPTS[1]
    with torch.no_grad():
        seqs = [[a, b] for a in range(V) for b in range(V)]
        scores = sequence_logprobs(model, prompt, seqs)
    best = seqs[max(range(len(seqs)), key=scores.__getitem__)]
    beam = Engine(model).generate([prompt], SamplingParams(num_beams=V, max_new_tokens=2))[0]
    assert beam.token_ids == best


def test_sequence_logprobs_refuses_rows_longer_than_the_context():
    model = chain(8, [1, 2, 3])
    assert len(sequence_logprobs(model, [1] * 60, [[2] * 5])) == 1  # the last token is predicted, never fed
    with pytest.raises(GenerationError, match="66 tokens, more than the model's 64 \\+ 1"):
        sequence_logprobs(model, [1] * 60, [[2] * 6])
