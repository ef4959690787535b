"""Continuous batching of an encoder-decoder (T5): sequences that join and leave at any step compute what
the engine computes for each alone."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest
import torch

from llmlab.generate import Engine, GenerationError, SamplingParams
from llmlab.generate import scheduler as scheduler_module
from llmlab.generate.scheduler import Scheduler, Seq2SeqScheduler, Sequence, make_scheduler
from llmlab.models import T5Config, build_model
from tests.generate.test_scheduler import _run
from tests.models.zoo import TINY, V

MAX_SEQ_LEN, MAX_TARGET_LEN = 24, 12


def tiny_t5(mlp: str = "relu", seed: int = 0):
    """A T5 whose greedy outputs vary from token to token (T5's own initialisation repeats one token)."""
    torch.manual_seed(seed)
    cfg = T5Config(vocab_size=V, dim=16, n_layers=2, n_heads=2, head_dim=8, hidden_dim=32, mlp=mlp,
                   relative_buckets=8, relative_max_distance=16, max_seq_len=MAX_SEQ_LEN,
                   max_target_len=MAX_TARGET_LEN, dropout=0.0, tie_embeddings=False, init_std=3.0)
    return build_model(cfg).eval()


def _alone(model, prompt: list[int], params: SamplingParams, seed: int | None = None):
    return Engine(model).generate([prompt], replace(params, seed=seed))[0]


def test_the_decoder_mask_hides_left_padding_of_the_decoding_cache():
    model = tiny_t5()
    ids = torch.randint(2, V, (1, 7))
    targets = torch.randint(2, V, (1, 5))
    with torch.no_grad():
        encoder_out = model.encode(ids)
        alone = model.logits(model.decode(targets, encoder_out))  # (1, 5, V)
        cache = model.make_cache(encoder_out, None, max_len=8)
        padded = torch.cat([torch.full((1, 3), 9), targets], dim=1)  # three positions of padding first
        mask = torch.tensor([[0, 0, 0] + [1] * 5])
        first = model.logits(model.decode(padded[:, :5], cache=cache, decoder_mask=mask[:, :5]))
        rest = [model.logits(model.decode(padded[:, t:t + 1], cache=cache, decoder_mask=mask[:, :t + 1]))
                for t in range(5, 8)]
    torch.testing.assert_close(torch.cat([first[:, 3:], *rest], dim=1), alone, atol=1e-4, rtol=1e-5)


def test_make_scheduler_picks_by_the_model_kind():
    assert type(make_scheduler(tiny_t5(), max_batch=2)) is Seq2SeqScheduler
    assert type(make_scheduler(build_model(TINY["llama"]).eval())) is Scheduler


@pytest.mark.parametrize("headroom", [64, 2])  # 2: the decoder cache grows while rows decode
@pytest.mark.parametrize("mlp", ["relu", "gated-gelu"])
def test_staggered_joins_and_leaves_equal_one_by_one(mlp, headroom, monkeypatch):
    monkeypatch.setattr(scheduler_module, "HEADROOM", headroom)
    model = tiny_t5(mlp)
    rng = random.Random(0)
    lengths = [3, 24, 1, 9, 17, 5, 12, 2]  # 24 fills the encoder's whole max_seq_len
    prompts = [[rng.randrange(V) for _ in range(n)] for n in lengths]
    limits = [12, 4, 30, 1, 9, 12, 7, 11]  # 30 is capped by max_target_len
    params = [SamplingParams(temperature=0.0, max_new_tokens=n, logprobs=2) for n in limits]
    seqs = [Sequence(p, q) for p, q in zip(prompts, params)]
    cancelled = Sequence([4, 5, 6], SamplingParams(temperature=0.0, max_new_tokens=12))
    arrivals = {0: seqs[:2], 1: seqs[2:3] + [cancelled], 3: seqs[3:5], 4: seqs[5:6]}
    scheduler = make_scheduler(model, max_batch=4)  # batch of 4: some sequences wait for a free row
    rooms = []
    make_room = scheduler._make_room
    monkeypatch.setattr(scheduler, "_make_room", lambda: (rooms.append(scheduler.cache.max_len), make_room()))
    events = _run(scheduler, arrivals, steps=5)
    scheduler.cancel(cancelled)
    for seq_id, more in _run(scheduler, {0: [], 4: seqs[6:]}).items():  # the last join at step 9
        events.setdefault(seq_id, []).extend(more)
    assert rooms  # the decoder cache grew, or shifted its rows left once it spanned max_target_len
    assert cancelled.finish_reason == "cancelled" and 0 < len(cancelled.output) < 12
    for seq, p, q in zip(seqs, prompts, params):
        want = _alone(model, p, q)
        assert seq.output == want.token_ids
        assert seq.finish_reason == "length" and len(seq.output) == min(q.max_new_tokens, MAX_TARGET_LEN)
        # float32 rounding differs with the batch's shape (in float64 the two agree)
        assert [e.logprob for e in events[seq.id]] == pytest.approx(want.logprobs, abs=5e-4)
        for e, top in zip(events[seq.id], want.top_logprobs):
            assert list(e.top_logprobs) == list(top)
            assert list(e.top_logprobs.values()) == pytest.approx(list(top.values()), abs=5e-4)


def test_each_sequence_keeps_its_settings_seed_and_stops():
    model = tiny_t5("gated-gelu")
    sampled = SamplingParams(temperature=0.9, top_k=20, max_new_tokens=12)
    penalised = SamplingParams(temperature=0.0, repetition_penalty=1.5, frequency_penalty=0.3, max_new_tokens=12)
    greedy = SamplingParams(temperature=0.0, max_new_tokens=10)
    first = _alone(model, [3, 4, 5], greedy).token_ids
    stopper = Sequence([3, 4, 5], replace(greedy, stop_token_ids=(first[2],)))
    a = Sequence([1, 2], sampled, seed=11)
    b = Sequence([9, 9, 9, 9, 8, 7], penalised)
    c = Sequence([1, 2], sampled, seed=11)  # same seed, other batch company: same tokens
    d = Sequence(list(range(20, 40)), sampled, seed=5)
    _run(make_scheduler(model), {0: [a, b], 2: [stopper, d], 5: [c]})
    assert a.output == c.output == _alone(model, [1, 2], sampled, seed=11).token_ids
    assert d.output == _alone(model, list(range(20, 40)), sampled, seed=5).token_ids
    assert b.output == _alone(model, [9, 9, 9, 9, 8, 7], penalised).token_ids
    assert stopper.output == first[:3] and stopper.finish_reason == "stop"


def test_a_freed_row_is_refilled_without_reallocating_the_stores():
    model = tiny_t5()
    greedy = [SamplingParams(temperature=0.0, max_new_tokens=n) for n in (2, 12, 12, 6)]
    prompts = [[1, 2, 3, 4, 5], [6, 7, 8, 9, 10, 11, 12], [13, 14, 15], [5, 4, 3]]
    seqs = [Sequence(p, q) for p, q in zip(prompts, greedy)]
    scheduler = make_scheduler(model, max_batch=3)
    for seq in seqs[:3]:
        scheduler.add(seq)
    _run(scheduler, {0: []}, steps=2)
    assert scheduler.running == [seqs[2], seqs[1]]  # the first ended: the last row moved into its place
    store, sources = scheduler.store, scheduler.sources
    scheduler.add(seqs[3])
    _run(scheduler, {0: []})
    assert scheduler.store is store and scheduler.sources is sources  # a shorter input fits the rows it has
    for seq, p, q in zip(seqs, prompts, greedy):
        assert seq.output == _alone(model, p, q).token_ids


def test_an_over_long_prompt_is_refused_and_max_new_tokens_is_capped():
    scheduler = make_scheduler(tiny_t5())
    with pytest.raises(GenerationError, match="context window is 24"):
        scheduler.add(Sequence(list(range(MAX_SEQ_LEN + 1)), SamplingParams(temperature=0.0)))
    with pytest.raises(GenerationError, match="outside the vocabulary"):
        scheduler.add(Sequence([V], SamplingParams(temperature=0.0)))
    assert not scheduler.busy
    full = scheduler.add(Sequence(list(range(MAX_SEQ_LEN)), SamplingParams(temperature=0.0, max_new_tokens=500)))
    _run(scheduler, {0: []})
    assert len(full.output) == MAX_TARGET_LEN and full.finish_reason == "length"
