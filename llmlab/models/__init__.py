"""The model zoo: one family per file, each an `XConfig` dataclass and an `X(nn.Module)`.

The contract every family keeps, which the training core, the generation engine and the planner
rely on instead of asking for a family by name:
- the config says whether the model is `causal` (each position sees only those before it; False
  for the encoders, BERT, whose heads predict masked tokens, classes or spans) and, for T5, that it
  is an `encoder_decoder` (inputs through the encoder, targets through the decoder); it reports
  `num_params()` (total, non-embedding and active: what one token uses), `flops_per_token(seq_len)`
  (training, forward plus backward) and `attention_shape()` (heads, key/value heads, head width,
  gated MLP);
- the module takes `forward(input_ids, *, targets=None, attention_mask=None, ...)` and returns the
  logits (B, T, V), or with `targets` the mean loss over the targets that are not -100; decoders
  also take `kv_cache` and `logits_to_keep`, encoders `token_type_ids`, encoder-decoders
  `decoder_input_ids` (and `encode` / `decode` with a `Seq2SeqCache` for generation). A family
  whose forward adds an auxiliary loss (a router's load balancing) includes it in the returned loss.
- `ModelConfig` is the union of the families' configs; `REGISTRY` maps `family` to (config, module).
"""

from __future__ import annotations

from typing import Union

from torch import nn

from llmlab.common import LlmlabError

from llmlab.models.bert import Bert, BertConfig
from llmlab.models.gpt import GPT, GPTConfig
from llmlab.models.llama import Llama, LlamaConfig
from llmlab.models.t5 import T5, T5Config

REGISTRY: dict[str, tuple[type, type[nn.Module]]] = {
    "gpt": (GPTConfig, GPT),
    "llama": (LlamaConfig, Llama),
    "bert": (BertConfig, Bert),
    "t5": (T5Config, T5),
}

ModelConfig = Union[GPTConfig, LlamaConfig, BertConfig, T5Config]


def model_kind(cfg: ModelConfig) -> str:
    """"decoder" (GPT, LLaMA), "encoder" (BERT and its variants) or "encoder-decoder" (T5)."""
    if getattr(cfg, "encoder_decoder", False):
        return "encoder-decoder"
    return "decoder" if cfg.causal else "encoder"


def with_article(kind: str) -> str:
    return f"{'an' if kind[0] in 'aeiou' else 'a'} {kind}"


def require_kind(cfg: ModelConfig, kinds: tuple[str, ...], what: str, where: str) -> None:
    """Refuse a model that `what` (a verb, in words) cannot drive: an LlmlabError naming the model's kind."""
    kind = model_kind(cfg)
    if kind not in kinds:
        head = f", head={cfg.head}" if kind == "encoder" else ""
        raise LlmlabError(f"{where}: {with_article(kind)} (family={cfg.family}{head}); {what} takes "
                         f"{' or '.join(f'{k} models' for k in kinds)}")


def build_model(cfg: ModelConfig) -> nn.Module:
    """Instantiate the family's module for `cfg` (random initialisation, on the default device)."""
    if cfg.vocab_size is None:
        raise ValueError("vocab_size is not set: a model needs its vocabulary size (pretrain takes the data's)")
    return REGISTRY[cfg.family][1](cfg)


__all__ = ["Bert", "BertConfig", "GPT", "GPTConfig", "Llama", "LlamaConfig", "ModelConfig", "REGISTRY", "T5",
           "T5Config", "build_model", "model_kind", "require_kind", "with_article"]
