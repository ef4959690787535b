"""Generation: a KV-cache engine over token ids, decoding strategies, text and chat on top, and
prompting strategies (few-shot, chain-of-thought, self-consistency, tree of thoughts)."""

from llmlab.generate.engine import (Completion, Engine, Score, TokenEvent, generate, score_continuations,
                                    sequence_logprobs)
from llmlab.generate.sampling import GenerationError, SamplingParams

__all__ = ["Completion", "Engine", "GenerationError", "SamplingParams", "Score", "TokenEvent", "generate",
           "score_continuations", "sequence_logprobs"]
