"""The model zoo: one family per file, each an `XConfig` dataclass and an `X(nn.Module)`.

Every decoder takes `forward(input_ids, *, kv_cache=None, attention_mask=None)` and returns
logits (B, T, V), and reports `num_params()` and `flops_per_token(seq_len)` from its config.
"""

from __future__ import annotations

from typing import Union

from torch import nn

from llmlab.models.gpt import GPT, GPTConfig
from llmlab.models.llama import Llama, LlamaConfig

REGISTRY: dict[str, tuple[type, type[nn.Module]]] = {
    "gpt": (GPTConfig, GPT),
    "llama": (LlamaConfig, Llama),
}

ModelConfig = Union[GPTConfig, LlamaConfig]


def build_model(cfg: ModelConfig) -> nn.Module:
    """Instantiate the family's module for `cfg` (random initialisation, on the default device)."""
    if cfg.vocab_size is None:
        raise ValueError("vocab_size is not set: a model needs its vocabulary size (pretrain takes the data's)")
    return REGISTRY[cfg.family][1](cfg)


__all__ = ["GPT", "GPTConfig", "Llama", "LlamaConfig", "ModelConfig", "REGISTRY", "build_model"]
