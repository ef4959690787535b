"""Continuous batching: sequences that join and leave at any step compute what they compute alone."""

from __future__ import annotations

import random

import pytest
import torch

from llmlab.generate import Engine, GenerationError, SamplingParams
from llmlab.generate import scheduler as scheduler_module
from llmlab.generate.scheduler import Scheduler, Sequence
from llmlab.models import build_model
from tests.models.zoo import TINY, V

GREEDY = SamplingParams(temperature=0.0, max_new_tokens=10)


def tiny(name: str, seed: int = 0):
    torch.manual_seed(seed)
    return build_model(TINY[name]).eval()


def _run(scheduler: Scheduler, arrivals: dict[int, list[Sequence]], steps: int = 1000):
    """Step the scheduler, adding each arrival at its step; returns the events by sequence."""
    events: dict[int, list] = {}
    for step in range(steps):
        for seq in arrivals.get(step, []):
            scheduler.add(seq)
        for e in scheduler.step():
            events.setdefault(e.sequence.id, []).append(e)
        if not scheduler.busy and step > max(arrivals):
            break
    return events


@pytest.mark.parametrize("headroom", [64, 2])  # 2: the cache grows while rows decode
@pytest.mark.parametrize("name", ["llama", "llama-gqa-tied", "gpt2", "llama-window"])
def test_staggered_joins_and_leaves_equal_one_by_one(name, headroom, monkeypatch):
    monkeypatch.setattr(scheduler_module, "HEADROOM", headroom)
    model = tiny(name)
    rng = random.Random(0)
    prompts = [[rng.randrange(V) for _ in range(rng.randint(1, 20))] for _ in range(7)]
    limits = [rng.randint(1, 12) for _ in prompts]
    seqs = [Sequence(p, SamplingParams(temperature=0.0, max_new_tokens=n)) for p, n in zip(prompts, limits)]
    arrivals = {0: seqs[:2], 1: seqs[2:3], 3: seqs[3:5], 4: seqs[5:6], 9: seqs[6:]}
    _run(Scheduler(model, max_batch=4), arrivals)  # batch of 4: some sequences wait for a free row
    engine = Engine(model)
    for seq, p, n in zip(seqs, prompts, limits):
        assert seq.output == engine.generate([p], SamplingParams(temperature=0.0, max_new_tokens=n))[0].token_ids
        assert seq.finish_reason == "length"


def test_rows_shift_left_when_the_shared_length_reaches_the_context():
    model = tiny("llama")  # context 64
    long = Sequence(list(range(1, 40)), SamplingParams(temperature=0.0, max_new_tokens=20))
    late = Sequence([7, 8, 9], SamplingParams(temperature=0.0, max_new_tokens=40))
    scheduler = Scheduler(model)
    _run(scheduler, {0: [long], 15: [late]})
    engine = Engine(model)
    assert late.output == engine.generate([[7, 8, 9]], SamplingParams(temperature=0.0, max_new_tokens=40))[0].token_ids
    assert long.output == engine.generate([list(range(1, 40))], long.params)[0].token_ids


def test_a_finished_row_is_refilled_in_place_without_reallocating_the_store():
    model = tiny("llama-gqa-tied")
    prompts = [[1, 2, 3, 4, 5], [6, 7, 8, 9, 10], [11, 12, 13, 14, 15], [5, 4, 3, 2, 1]]
    limits = [2, 12, 12, 6]
    seqs = [Sequence(p, SamplingParams(temperature=0.0, max_new_tokens=n, logprobs=0)) for p, n in zip(prompts, limits)]
    scheduler = Scheduler(model, max_batch=3)
    for seq in seqs[:3]:
        scheduler.add(seq)
    events = _run(scheduler, {0: []}, steps=2)
    store = scheduler.store
    assert store.k.size(1) == 3
    assert scheduler.running == [seqs[2], seqs[1]]  # the first ended: the last row moved into its place
    scheduler.add(seqs[3])
    for seq_id, more in _run(scheduler, {0: []}).items():
        events.setdefault(seq_id, []).extend(more)
    assert scheduler.store is store  # leaving and joining within its rows and length reuse it
    with torch.no_grad():  # every step's distribution, keys and values included, is the sequence's own
        for seq, p in zip(seqs, prompts):
            full = torch.log_softmax(model(torch.tensor([p + seq.output]))[0], -1)
            got = [e.logprob for e in events[seq.id]]
            want = [float(full[len(p) - 1 + i, t]) for i, t in enumerate(seq.output)]
            assert got == pytest.approx(want, abs=1e-5)


def test_each_sequence_keeps_its_settings_seed_and_stops():
    model = tiny("llama")
    engine = Engine(model)
    sampled = SamplingParams(temperature=0.9, top_k=20, max_new_tokens=12)
    penalised = SamplingParams(temperature=0.0, repetition_penalty=1.5, frequency_penalty=0.3, max_new_tokens=12)
    first = engine.generate([[3, 4, 5]], GREEDY)[0].token_ids
    stopper = Sequence([3, 4, 5], SamplingParams(temperature=0.0, max_new_tokens=10, stop_token_ids=(first[2],)))
    a = Sequence([1, 2], sampled, seed=11)
    b = Sequence([9, 9, 9, 9], penalised)
    c = Sequence([1, 2], sampled, seed=11)  # same seed, other batch company: same tokens
    _run(Scheduler(model), {0: [a, b], 2: [stopper], 5: [c]})
    assert a.output == c.output
    expected = engine.generate([[1, 2]], SamplingParams(temperature=0.9, top_k=20, max_new_tokens=12, seed=11))
    assert a.output == expected[0].token_ids
    assert b.output == engine.generate([[9, 9, 9, 9]], penalised)[0].token_ids
    assert stopper.output == first[:3] and stopper.finish_reason == "stop"


def test_cancelled_sequences_leave_at_the_next_step():
    scheduler = Scheduler(tiny("llama"), max_batch=2)
    a, b, c = (Sequence([1, 2, 3], SamplingParams(temperature=0.0, max_new_tokens=30)) for _ in range(3))
    for s in (a, b, c):
        scheduler.add(s)
    scheduler.step()
    assert len(scheduler.running) == 2 and scheduler.waiting == [c]
    scheduler.cancel(a)
    events = scheduler.step()
    assert [e.finish_reason for e in events if e.sequence is a] == ["cancelled"]
    assert a not in scheduler.running and c in scheduler.running  # c took the freed row
    scheduler.cancel(c)
    scheduler.cancel(b)
    scheduler.step()
    assert not scheduler.busy


def test_logprobs_come_from_the_model_distribution():
    model = tiny("llama")
    seq = Sequence([5, 6, 7], SamplingParams(temperature=0.0, max_new_tokens=4, logprobs=3))
    events = _run(Scheduler(model), {0: [seq]})[seq.id]
    with torch.no_grad():
        full = torch.log_softmax(model(torch.tensor([[5, 6, 7] + seq.output]))[0], -1)
    for i, e in enumerate(events):
        assert e.logprob == pytest.approx(float(full[2 + i, e.token_id]), abs=1e-5)
        assert len(e.top_logprobs) == 3 and max(e.top_logprobs.values()) == pytest.approx(e.logprob, abs=1e-5)


def test_bad_sequences_are_refused_on_add():
    scheduler = Scheduler(tiny("llama"))
    with pytest.raises(GenerationError, match="empty"):
        scheduler.add(Sequence([], GREEDY))
    with pytest.raises(GenerationError, match="outside the vocabulary"):
        scheduler.add(Sequence([V], GREEDY))
    with pytest.raises(GenerationError, match="context window"):
        scheduler.add(Sequence(list(range(64)), GREEDY))
    assert not scheduler.busy
