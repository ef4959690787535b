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
@pytest.mark.parametrize("name", ["llama-gqa-tied", "gpt2"])
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


@pytest.mark.parametrize("name, what", [("llama-window", "sliding-window"), ("llama-dynamic", "dynamic")])
def test_compiled_decoding_refuses_configs_a_static_graph_cannot_express(name, what):
    with pytest.raises(GenerationError, match=what):
        Engine(build_model(TINY[name]), compile=True)


def test_a_missing_cxx_compiler_is_a_clear_error():
    import torch._inductor.config as inductor

    model = build_model(TINY["llama"]).eval()
    # no cached artifact may stand in for the compiler
    with inductor.patch({"cpp.cxx": ("/nonexistent/g++",), "fx_graph_cache": False, "autotune_local_cache": False}):
        with pytest.raises(GenerationError, match="C\\+\\+ compiler"):
            Engine(model, compile=True).generate([[1, 2, 3]], SamplingParams(temperature=0.0, max_new_tokens=2))


def test_cache_slots_are_powers_of_two_within_the_context_unless_more_are_needed():
    assert CompiledDecoder.cache_slots(144, 512) == 256
    assert CompiledDecoder.cache_slots(257, 2048) == 512
    assert CompiledDecoder.cache_slots(40, 64) == 64  # the context caps the bucket
    assert CompiledDecoder.cache_slots(70, 64) == 70  # ragged prompts may need more slots than positions
