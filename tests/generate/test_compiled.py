"""Compiled decoding gives what eager decoding gives, and refuses the configs it cannot compile."""

from __future__ import annotations

import pytest
import torch

from llmlab.generate import Engine, GenerationError, SamplingParams
from llmlab.generate.compiled import CompiledDecoder
from llmlab.models import build_model
from tests.models.zoo import TINY, V

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [14, 15, 16, 17]]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["llama-gqa-tied", "llama-window", "gpt2"])
def test_compiled_decoding_matches_eager_on_ragged_prompts_with_n_samples(name):
    torch.manual_seed(0)
    model = build_model(TINY[name]).eval()
    params = SamplingParams(temperature=1.0, seed=3, n=2, max_new_tokens=10, logprobs=V)
    eager = Engine(model).generate(PROMPTS, params)
    compiled_engine = Engine(model, compile=True)
    for attempt in range(2):  # the second call replays the compiled step without its guards
        compiled = compiled_engine.generate(PROMPTS, params)
        assert [c.token_ids for c in compiled] == [c.token_ids for c in eager], f"call {attempt}"
        for e, c in zip(eager, compiled):
            for step, (te, tc) in enumerate(zip(e.top_logprobs, c.top_logprobs)):
                want, got = torch.tensor([te[t] for t in range(V)]), torch.tensor([tc[t] for t in range(V)])
                assert torch.allclose(got, want, atol=1e-4), f"call {attempt}, row {e.prompt_index}, step {step}"


def test_compiled_decoding_refuses_dynamic_rotary_scaling():
    with pytest.raises(GenerationError, match="dynamic"):
        Engine(build_model(TINY["llama-dynamic"]), compile=True)


def test_a_missing_cxx_compiler_is_a_clear_error():
    import torch._inductor.config as inductor

    model = build_model(TINY["llama"]).eval()
    # no cached artifact may stand in for the compiler
    with inductor.patch({"cpp.cxx": ("/nonexistent/g++",), "fx_graph_cache": False, "autotune_local_cache": False}):
        with pytest.raises(GenerationError, match="C\\+\\+ compiler"):
            Engine(model, compile=True).generate([[1, 2, 3]], SamplingParams(temperature=0.0, max_new_tokens=2))


@pytest.mark.slow
def test_one_compiled_step_serves_every_prompt_length_within_its_cache_slots():
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    model = build_model(TINY["llama"]).eval()  # a context of 64: every cache below gets 64 slots
    params = SamplingParams(temperature=0.0, max_new_tokens=6, logprobs=0)
    engine = Engine(model, compile=True)
    engine.generate([[5, 6, 7]], params)
    graphs = counters["stats"]["unique_graphs"]
    for prompt in ([5, 6, 7], list(range(1, 50)), [8, 9]):
        eager, compiled = (Engine(model).generate([prompt], params)[0], engine.generate([prompt], params)[0])
        assert compiled.token_ids == eager.token_ids, f"prompt of {len(prompt)}"
        assert torch.allclose(torch.tensor(compiled.logprobs), torch.tensor(eager.logprobs), atol=1e-5)
    assert counters["stats"]["unique_graphs"] == graphs  # no new compilation


def test_cache_slots_are_powers_of_two_within_the_context_with_one_spare():
    assert CompiledDecoder.cache_slots(144, 512) == 256
    assert CompiledDecoder.cache_slots(256, 512) == 512  # a full bucket leaves no spare slot
    assert CompiledDecoder.cache_slots(257, 2048) == 512
    assert CompiledDecoder.cache_slots(40, 64) == 64  # the context caps the bucket
    assert CompiledDecoder.cache_slots(64, 64) == 65
    assert CompiledDecoder.cache_slots(70, 64) == 71  # ragged prompts may need more slots than positions
