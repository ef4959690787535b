"""HF transformers <-> llmlab: config field maps and declarative parameter-name tables.

Each family has one table of `Rule`s mapping an HF parameter name to llmlab names, with `{}`
standing for the layer index and an `op` for the few tensors whose layout differs (GPT-2 stores
its linear layers as Conv1D, i.e. transposed, and fuses q, k and v into one `c_attn`).
Conversion is strict both ways: a key that no rule maps, or a key that a rule expects but the
checkpoint lacks, is an error that lists them all.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

import torch

from llmlab.common import LlmlabError
from llmlab.models import GPTConfig, LlamaConfig, ModelConfig
from llmlab.models.layers import RopeScaling


class ConversionError(LlmlabError):
    pass


# --------------------------------------------------------------------------- tensor layouts

# op -> (hf tensor -> llmlab tensors, llmlab tensors -> hf tensor)
OPS = {
    "copy": (lambda t: [t], lambda ts: ts[0]),
    "transpose": (lambda t: [t.t().contiguous()], lambda ts: ts[0].t().contiguous()),  # Conv1D
    "split_qkv": (lambda t: list(t.chunk(3, dim=0)), lambda ts: torch.cat(ts, dim=0)),  # fused bias
    "split_qkv_transpose": (lambda t: [x.contiguous() for x in t.t().chunk(3, dim=0)],
                            lambda ts: torch.cat(ts, dim=0).t().contiguous()),  # fused Conv1D weight
}


@dataclass(frozen=True)
class Rule:
    hf: str  # HF name, "{}" = layer index
    ours: tuple[str, ...]  # llmlab name(s), same "{}"
    op: str = "copy"


@dataclass(frozen=True)
class Table:
    rules: tuple[Rule, ...]
    base_prefix: str  # prefix of the base model inside the *ForCausalLM wrapper
    ignored: tuple[str, ...] = ()  # HF buffers that older checkpoints saved and that carry no weights


def _qkv(hf: str, ours: str, op: str) -> Rule:
    return Rule(hf, tuple(ours.format("{}", p) for p in "qkv"), op)


GPT2 = Table(
    rules=(
        Rule("transformer.wte.weight", ("embed_tokens.weight",)),
        Rule("transformer.wpe.weight", ("embed_positions.weight",)),
        Rule("transformer.h.{}.ln_1.weight", ("layers.{}.attn_norm.weight",)),
        Rule("transformer.h.{}.ln_1.bias", ("layers.{}.attn_norm.bias",)),
        _qkv("transformer.h.{}.attn.c_attn.weight", "layers.{}.attn.{}_proj.weight", "split_qkv_transpose"),
        _qkv("transformer.h.{}.attn.c_attn.bias", "layers.{}.attn.{}_proj.bias", "split_qkv"),
        Rule("transformer.h.{}.attn.c_proj.weight", ("layers.{}.attn.o_proj.weight",), "transpose"),
        Rule("transformer.h.{}.attn.c_proj.bias", ("layers.{}.attn.o_proj.bias",)),
        Rule("transformer.h.{}.ln_2.weight", ("layers.{}.mlp_norm.weight",)),
        Rule("transformer.h.{}.ln_2.bias", ("layers.{}.mlp_norm.bias",)),
        Rule("transformer.h.{}.mlp.c_fc.weight", ("layers.{}.mlp.up_proj.weight",), "transpose"),
        Rule("transformer.h.{}.mlp.c_fc.bias", ("layers.{}.mlp.up_proj.bias",)),
        Rule("transformer.h.{}.mlp.c_proj.weight", ("layers.{}.mlp.down_proj.weight",), "transpose"),
        Rule("transformer.h.{}.mlp.c_proj.bias", ("layers.{}.mlp.down_proj.bias",)),
        Rule("transformer.ln_f.weight", ("norm.weight",)),
        Rule("transformer.ln_f.bias", ("norm.bias",)),
        Rule("lm_head.weight", ("lm_head.weight",)),
    ),
    base_prefix="transformer.",
    ignored=("transformer.h.{}.attn.bias", "transformer.h.{}.attn.masked_bias"),
)

LLAMA = Table(
    rules=(
        Rule("model.embed_tokens.weight", ("embed_tokens.weight",)),
        *(Rule(f"model.layers.{{}}.self_attn.{p}_proj.{w}", (f"layers.{{}}.attn.{p}_proj.{w}",))
          for p in "qkvo" for w in ("weight", "bias") if (p, w) != ("o", "bias")),
        *(Rule(f"model.layers.{{}}.mlp.{p}_proj.weight", (f"layers.{{}}.mlp.{p}_proj.weight",))
          for p in ("gate", "up", "down")),
        Rule("model.layers.{}.input_layernorm.weight", ("layers.{}.attn_norm.weight",)),
        Rule("model.layers.{}.post_attention_layernorm.weight", ("layers.{}.mlp_norm.weight",)),
        Rule("model.norm.weight", ("norm.weight",)),
        Rule("lm_head.weight", ("lm_head.weight",)),
    ),
    base_prefix="model.",
    ignored=("model.layers.{}.self_attn.rotary_emb.inv_freq",),
)

TABLES = {"gpt": GPT2, "llama": LLAMA}


def _pattern(name: str) -> re.Pattern:
    return re.compile(re.escape(name).replace(r"\{\}", r"(\d+)") + "$")


def _convert(state: dict[str, torch.Tensor], table: Table, to_ours: bool) -> dict[str, torch.Tensor]:
    """Apply `table` in one direction. Sources are grouped per (rule, layer) because a fused HF
    tensor has several llmlab sources; every key must be used by exactly one rule."""
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    for rule in table.rules:
        split, fuse = OPS[rule.op]
        if to_ours:
            for key in state:
                m = _pattern(rule.hf).match(key)
                if m:
                    used.add(key)
                    for name, t in zip(rule.ours, split(state[key])):
                        out[name.format(*m.groups())] = t
        else:
            first = _pattern(rule.ours[0])
            for key in state:
                m = first.match(key)
                if not m:
                    continue
                sources = [name.format(*m.groups()) for name in rule.ours]
                missing = [s for s in sources if s not in state]
                if missing:
                    raise ConversionError(f"cannot build {rule.hf.format(*m.groups())}: missing {missing}")
                used.update(sources)
                out[rule.hf.format(*m.groups())] = fuse([state[s] for s in sources])
    ignored = [_pattern(p) for p in table.ignored] if to_ours else []
    unmapped = sorted(k for k in state if k not in used and not any(p.match(k) for p in ignored))
    if unmapped:
        raise ConversionError(f"{len(unmapped)} parameter(s) have no conversion rule: {', '.join(unmapped[:20])}"
                              + (" ..." if len(unmapped) > 20 else ""))
    return out


def hf_to_llmlab_state(state: dict[str, torch.Tensor], family: str) -> dict[str, torch.Tensor]:
    """Rename (and re-lay-out) an HF state dict into llmlab names for `family`.

    A checkpoint of the bare base model (no `transformer.` / `model.` prefix, no lm_head) is
    accepted too: the prefix is added before matching.
    """
    table = TABLES[family]
    if SCORE_HEAD in state:  # a *ForSequenceClassification model: its score head is llmlab's narrow lm_head
        state = {("lm_head.weight" if k == SCORE_HEAD else k): v for k, v in state.items()}
    if state and not any(k.startswith(table.base_prefix) or k == "lm_head.weight" for k in state):
        state = {table.base_prefix + k: v for k, v in state.items()}
    return _convert(state, table, to_ours=True)


def llmlab_to_hf_state(state: dict[str, torch.Tensor], family: str, *, score_head: bool = False
                       ) -> dict[str, torch.Tensor]:
    """Rename an llmlab state dict into HF names (the inverse of `hf_to_llmlab_state`); with
    `score_head` (a model with num_labels > 0) its lm_head becomes the `score` of HF's
    *ForSequenceClassification layout."""
    out = _convert(state, TABLES[family], to_ours=False)
    if score_head and "lm_head.weight" in out:
        out[SCORE_HEAD] = out.pop("lm_head.weight")
    return out


def module_name_map(name: str, family: str, *, to_hf: bool) -> tuple[str, str]:
    """The HF path of llmlab linear layer `name` (or, with to_hf=False, the llmlab path of an HF one),
    with the layout op of its weight ("copy", or "transpose" for a Conv1D): what adapters need, whose
    tensors attach to whole layers. A layer that HF fuses with others (GPT-2's c_attn) has no such
    one-to-one counterpart and is an error."""
    for rule in TABLES[family].rules:
        source, target = (rule.ours[0], rule.hf) if to_hf else (rule.hf, rule.ours[0])
        m = _pattern(source).match(name + ".weight")
        if m:
            if len(rule.ours) > 1:
                raise ConversionError(f"{name}: HF fuses this layer into {rule.hf.format(*m.groups())}; an adapter "
                                      "on it has no HF/PEFT counterpart")
            return target.format(*m.groups()).removesuffix(".weight"), rule.op
    raise ConversionError(f"{name}: no {family} linear layer of that name")


# --------------------------------------------------------------------------- configs

LLAMA_TYPES = ("llama", "mistral", "qwen2")
HF_ARCHITECTURES = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                    "qwen2": "Qwen2ForCausalLM"}
HF_CLASSIFIERS = {"gpt2": "GPT2ForSequenceClassification", "llama": "LlamaForSequenceClassification",
                  "mistral": "MistralForSequenceClassification", "qwen2": "Qwen2ForSequenceClassification"}
SCORE_HEAD = "score.weight"


def _unsupported(where: str, field: str, value, expected: str) -> ConversionError:
    return ConversionError(f"{where}: {field}={value!r} is not supported (expected {expected})")


_REQUIRED = object()
_KIND_NAMES = {int: "a whole number", float: "a finite number", bool: "true or false", dict: "a JSON object"}


def _field(hf: dict, key: str, where: str, kind: type, default: Any = _REQUIRED) -> Any:
    """`hf[key]` checked to be of `kind` (for float, an int is fine); `default` when it is absent or null.

    Raises:
        ConversionError: the key is required and absent, or holds another type; the message names it.
    """
    value = hf.get(key)
    if value is None:
        if default is _REQUIRED:
            raise ConversionError(f"{where}: {key!r} is missing and has no default")
        return default
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    ok = {int: number and isinstance(value, int), float: number and math.isfinite(value),
          bool: isinstance(value, bool)}.get(kind, isinstance(value, kind))
    if not ok:
        raise ConversionError(f"{where}: {key} must be {_KIND_NAMES[kind]}, got {value!r}")
    return float(value) if kind is float else value


def config_from_hf(hf: dict, where: str = "config.json") -> ModelConfig:
    """Map an HF `config.json` dict to a llmlab model config; unknown architectures, options llmlab
    cannot reproduce exactly, and missing or mistyped fields are errors naming the field. A
    *ForSequenceClassification model (a reward model) keeps its labels as `num_labels`."""
    model_type = hf.get("model_type")
    try:
        cfg = _config_from_hf(hf, model_type, where)
        if _is_classifier(hf):
            labels = hf.get("id2label")
            cfg.num_labels = len(labels) if isinstance(labels, dict) and labels else _field(hf, "num_labels", where,
                                                                                            int, 2)
            cfg.tie_embeddings = False
            cfg.__post_init__()
        return cfg
    except ValueError as e:  # a combination the model config refuses (e.g. dim not divisible by n_heads)
        raise ConversionError(f"{where}: {e}") from None


def _is_classifier(hf: dict) -> bool:
    architectures = hf.get("architectures")
    return isinstance(architectures, list) and any(isinstance(a, str) and a.endswith("ForSequenceClassification")
                                                   for a in architectures)


def _config_from_hf(hf: dict, model_type: Any, where: str) -> ModelConfig:
    if model_type == "gpt2":
        act = hf.get("activation_function", "gelu_new")
        if act not in ("gelu_new", "gelu_pytorch_tanh"):
            raise _unsupported(where, "activation_function", act, "gelu_new")
        for flag, ok in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False)):
            if hf.get(flag, ok) != ok:
                raise _unsupported(where, flag, hf[flag], str(ok))
        return GPTConfig(vocab_size=_field(hf, "vocab_size", where, int), dim=_field(hf, "n_embd", where, int),
                         n_layers=_field(hf, "n_layer", where, int), n_heads=_field(hf, "n_head", where, int),
                         hidden_dim=_field(hf, "n_inner", where, int, None),
                         max_seq_len=_field(hf, "n_positions", where, int),
                         norm_eps=_field(hf, "layer_norm_epsilon", where, float, 1e-5),
                         dropout=_field(hf, "resid_pdrop", where, float, 0.0),
                         tie_embeddings=_field(hf, "tie_word_embeddings", where, bool, True))
    if isinstance(model_type, str) and model_type in LLAMA_TYPES:
        if hf.get("hidden_act", "silu") != "silu":
            raise _unsupported(where, "hidden_act", hf["hidden_act"], "silu")
        if hf.get("mlp_bias"):
            raise _unsupported(where, "mlp_bias", True, "false")
        if model_type == "llama" and hf.get("attention_bias"):
            raise _unsupported(where, "attention_bias", True, "false (biases on q/k/v only: use qwen2)")
        sliding = _field(hf, "sliding_window", where, int, None) if model_type == "mistral" else None
        if model_type == "qwen2" and hf.get("use_sliding_window"):
            raise _unsupported(where, "use_sliding_window", True, "false (per-layer windows)")
        rope = dict(_field(hf, "rope_parameters", where, dict, {}))
        theta = _field(rope, "rope_theta", where, float, None)
        theta = _field(hf, "rope_theta", where, float, 10000.0) if theta is None else theta
        rope.pop("rope_theta", None)
        scaling = rope or _field(hf, "rope_scaling", where, dict, None)
        return LlamaConfig(vocab_size=_field(hf, "vocab_size", where, int), dim=_field(hf, "hidden_size", where, int),
                           n_layers=_field(hf, "num_hidden_layers", where, int),
                           n_heads=_field(hf, "num_attention_heads", where, int),
                           n_kv_heads=_field(hf, "num_key_value_heads", where, int, None),
                           head_dim=_field(hf, "head_dim", where, int, None),
                           hidden_dim=_field(hf, "intermediate_size", where, int),
                           max_seq_len=_field(hf, "max_position_embeddings", where, int, 2048),
                           norm_eps=_field(hf, "rms_norm_eps", where, float, 1e-6),
                           rope_theta=theta, rope_scaling=_scaling_from_hf(scaling, where),
                           tie_embeddings=_field(hf, "tie_word_embeddings", where, bool, False),
                           attention_bias=model_type == "qwen2", sliding_window=sliding,
                           dropout=_field(hf, "attention_dropout", where, float, 0.0))
    raise ConversionError(f"{where}: model_type={model_type!r} is not a supported architecture "
                          f"(supported: {', '.join(('gpt2',) + LLAMA_TYPES)})")


# the HF rope_parameters fields each scaling kind reads, besides rope_type, rope_theta and factor
_SCALING_FIELDS = {
    "linear": (),
    "dynamic": (),
    "yarn": ("original_max_position_embeddings", "beta_fast", "beta_slow", "attention_factor", "truncate"),
    "llama3": ("original_max_position_embeddings", "low_freq_factor", "high_freq_factor"),
}


def _scaling_from_hf(scaling: dict | None, where: str) -> RopeScaling | None:
    if not scaling:
        return None
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return None
    if not isinstance(kind, str) or kind not in RopeScaling.KINDS:
        raise _unsupported(where, "rope_type", kind, ", ".join(RopeScaling.KINDS))
    fields = _SCALING_FIELDS[kind]
    extra = set(scaling) - {"rope_type", "type", "factor", "partial_rotary_factor", *fields}
    if extra or scaling.get("partial_rotary_factor", 1.0) != 1.0:
        raise _unsupported(where, f"{kind} rope scaling fields", sorted(extra) or scaling,
                           ", ".join(("factor",) + fields))
    kinds = {"original_max_position_embeddings": int, "truncate": bool}
    return RopeScaling(kind=kind, factor=_field(scaling, "factor", f"{where}: rope_scaling", float),
                       **{k: _field(scaling, k, f"{where}: rope_scaling", kinds.get(k, float))
                          for k in fields if scaling.get(k) is not None})


def config_to_hf(cfg: ModelConfig) -> dict:
    """The HF `config.json` dict for a llmlab config; variants HF has no class for are errors. A model
    with a score head (num_labels > 0) is written as HF's *ForSequenceClassification."""
    out = _causal_config_to_hf(cfg)
    if cfg.num_labels:
        out["architectures"] = [HF_CLASSIFIERS[out["model_type"]]]
        out["id2label"] = {str(i): f"LABEL_{i}" for i in range(cfg.num_labels)}
        out["label2id"] = {f"LABEL_{i}": i for i in range(cfg.num_labels)}
    return out


def _causal_config_to_hf(cfg: ModelConfig) -> dict:
    if isinstance(cfg, GPTConfig):
        if (cfg.position, cfg.norm, cfg.bias, cfg.embed_norm) != ("learned", "layernorm", True, False):
            raise ConversionError("only GPT-2-style models (position=learned, norm=layernorm, bias=true, "
                                  "embed_norm=false) have an HF export")
        return {"architectures": [HF_ARCHITECTURES["gpt2"]], "model_type": "gpt2", "vocab_size": cfg.vocab_size,
                "n_embd": cfg.dim, "n_layer": cfg.n_layers, "n_head": cfg.n_heads, "n_inner": cfg.hidden_dim,
                "n_positions": cfg.max_seq_len, "activation_function": "gelu_new",
                "layer_norm_epsilon": cfg.norm_eps, "resid_pdrop": cfg.dropout, "embd_pdrop": cfg.dropout,
                "attn_pdrop": cfg.dropout, "tie_word_embeddings": cfg.tie_embeddings, "dtype": "float32"}
    if cfg.parallel_block:
        raise ConversionError("parallel_block LLaMA models have no HF export")
    if cfg.attention_bias and cfg.sliding_window:
        raise ConversionError("attention_bias together with sliding_window has no HF export")
    model_type = "qwen2" if cfg.attention_bias else "mistral" if cfg.sliding_window else "llama"
    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling is not None:
        s = cfg.rope_scaling
        rope = {"rope_type": s.kind, "factor": s.factor, "rope_theta": cfg.rope_theta,
                **{k: getattr(s, k) for k in _SCALING_FIELDS[s.kind] if getattr(s, k) is not None}}
    out = {"architectures": [HF_ARCHITECTURES[model_type]], "model_type": model_type,
           "vocab_size": cfg.vocab_size, "hidden_size": cfg.dim, "intermediate_size": cfg.hidden_dim,
           "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
           "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim,
           "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps, "hidden_act": "silu",
           "rope_theta": cfg.rope_theta, "rope_parameters": rope, "tie_word_embeddings": cfg.tie_embeddings,
           "attention_dropout": cfg.dropout, "dtype": "float32"}
    if model_type == "mistral":
        out["sliding_window"] = cfg.sliding_window
    if cfg.rope_scaling is not None:
        out["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}  # transformers < 5 reads this
    return out
