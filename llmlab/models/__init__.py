"""The model zoo: one family per file, each an `XConfig` dataclass and an `X(nn.Module)`.

The contract every family keeps, which the training core, the generation engine and the planner
rely on instead of asking for a family by name:
- the config says whether the model is `causal` (each position sees only those before it), and
  reports `num_params()` (total, non-embedding and active: what one token uses),
  `flops_per_token(seq_len)` (training, forward plus backward) and `attention_shape()` (heads,
  key/value heads, head width, gated MLP);
- the module takes `forward(input_ids, *, targets=None, attention_mask=None, ...)` and returns the
  logits (B, T, V), or with `targets` the mean loss over the targets that are not -100; decoders
  also take `kv_cache` and `logits_to_keep`. A family whose forward adds an auxiliary loss (a
  router's load balancing) includes it in the returned loss.
- `ModelConfig` is the union of the families' configs; `REGISTRY` maps `family` to (config, module).
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
