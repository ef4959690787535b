"""Compiled decoding: a model's one-token step compiled once by `torch.compile` and replayed.

Small models decode at the speed of the framework, not of the hardware: eager PyTorch spends
microseconds of Python and dispatch on each of the hundreds of operations in a step, and the
BLAS reads a single row's weights far below the memory bandwidth. Compiled with static shapes (a
`StaticKVCache` of a fixed number of slots, the position passed as data, the single query's
attention as plain products that fuse), the step becomes generated C++: Inductor's C++ wrapper
calls the kernels, the weights are frozen into the graph (the q, k, v projections and the MLP's
gate and up projections each stacked into one matrix, `models.kernels.stacked_linear`), and each
matrix product is autotuned between the BLAS and Inductor's own kernels. One size is dynamic: the
window of slots a step attends over, the tokens so far, so that attention does not read the
slots not yet written.

The costs: compiling takes tens of seconds for each new (batch rows, cache slots) pair, so cache
lengths are rounded up to a power of two (at least 256) to keep the pairs few; the frozen weights
are a second copy, and a model whose weights change afterwards needs a new `Engine`. CPU only, for
the llama and gpt families without "dynamic" rotary scaling (its frequencies depend on the
sequence length, a value the graph does not read). A dynamic cache length as well would compile
once for all lengths, but its two dozen dynamic inputs made the step of benchmarks/decode_speed.py's
1.4M-parameter model about 1.5x slower.
"""

from __future__ import annotations

import torch
from torch import nn

from llmlab.generate.sampling import GenerationError
from llmlab.models.kernels import StaticKVCache

# Inductor settings for the step; they are read while compiling
INDUCTOR_OPTIONS = {"cpp_wrapper": True, "freezing": True, "max_autotune": True,
                    "max_autotune_gemm_backends": "CPP,ATEN"}
# models with fewer weight bytes decode on one thread: their kernels are too short to share. The
# 1.4M-parameter model of benchmarks/decode_speed.py (5.6 MB) steps about 2x faster on one thread
# of two; the 13.8M one (55 MB) 1.4x slower.
ONE_THREAD_BYTES = 16 << 20
MIN_CACHE_SLOTS = 256


class CompiledDecoder:
    """`decoder(tokens, cache, mask, slot)` -> next-token logits (B, V) in fp32, like the eager call
    `model(tokens, kv_cache=..., attention_mask=mask[:, :slot + 1])` for one new token per row.

    tokens: (B, 1); cache: a `StaticKVCache` of `cache_slots(...)` slots; mask: (B, slots), 1 on every
    slot written so far and on `slot`, where this token's keys and values go. The step attends over
    slots [0, slot] only.
    """

    def __init__(self, model: nn.Module):
        cfg = model.config
        device = next(model.parameters()).device
        if device.type != "cpu":
            raise GenerationError(f"compiled decoding runs on the CPU; the model is on {device}")
        scaling = getattr(cfg, "rope_scaling", None)
        if scaling is not None and scaling.kind == "dynamic":
            raise GenerationError("compiled decoding does not support 'dynamic' rotary scaling; decode eagerly")
        self.model = model
        weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        self.threads = 1 if weight_bytes < ONE_THREAD_BYTES else None
        self._step = torch.compile(self._forward, fullgraph=True, dynamic=False)
        self._compiled: set[tuple[int, int]] = set()  # (rows, slots) already compiled

    def _forward(self, tokens: torch.Tensor, cache: StaticKVCache, mask: torch.Tensor) -> torch.Tensor:
        return self.model(tokens, kv_cache=cache.window(mask.size(1)), attention_mask=mask)[:, -1].float()

    @staticmethod
    def cache_slots(needed: int, context: int) -> int:
        """Slots for a cache that must hold `needed` tokens: a power of two, at least 256, not past the
        context unless `needed` is, and always one spare, so that a step's window stays shorter than
        the cache, as it was when the step compiled (its guards are skipped)."""
        bucket = max(MIN_CACHE_SLOTS, 1 << needed.bit_length())
        return max(needed + 1, min(bucket, context))

    def __call__(self, tokens: torch.Tensor, cache: StaticKVCache, mask: torch.Tensor, slot: int) -> torch.Tensor:
        cache.move_to(slot)
        window = mask[:, :slot + 1]
        key = (tokens.size(0), cache.max_len)
        threads = torch.get_num_threads()
        if self.threads:
            torch.set_num_threads(self.threads)
        try:
            if key in self._compiled:
                # every input is as when this key compiled but for its values and the window, whose
                # length passes the step's guards (see cache_slots): skip them
                with torch.compiler.set_stance(skip_guard_eval_unsafe=True):
                    return self._step(tokens, cache, window)
            torch._dynamo.mark_dynamic(window, 1)
            try:
                with torch._inductor.config.patch(INDUCTOR_OPTIONS):
                    logits = self._step(tokens, cache, window)
            except torch._dynamo.exc.BackendCompilerFailed as e:  # most often: no C++ compiler
                reason = (str(getattr(e, "inner_exception", e)).strip().splitlines() or ["unknown"])[0][:300]
                raise GenerationError(f"compiling the decode step failed ({reason}); compiled decoding needs a "
                                      "C++ compiler (g++ or clang++ on PATH); decode without --compile") from e
            self._compiled.add(key)
            return logits
        finally:
            torch.set_num_threads(threads)
