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
from llmlab.models import BertConfig, GPTConfig, LlamaConfig, ModelConfig, T5Config
from llmlab.models.layers import RopeScaling
from llmlab.models.moe import MoEConfig


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
    tied_head: str = "lm_head.weight"  # the HF name of the output matrix, left out when it is the embedding
    # (other name, name the rules use) of one tensor that HF saves under both, or either alone in older
    # checkpoints: read from the second when present, and written under both
    aliases: tuple[tuple[str, str], ...] = ()
    # llmlab parameters that HF has no place for and an export leaves out (SpanBERT's span boundary
    # head: its released models leave it out too)
    not_exported: tuple[str, ...] = ()


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

# Mixtral's sparse blocks in transformers' layout: the router, and each projection's experts stacked
MIXTRAL = Table(
    rules=(*LLAMA.rules,
           Rule("model.layers.{}.mlp.gate.weight", ("layers.{}.mlp.router.weight",)),
           Rule("model.layers.{}.mlp.experts.gate_up_proj", ("layers.{}.mlp.experts.gate_up_proj.weight",)),
           Rule("model.layers.{}.mlp.experts.down_proj", ("layers.{}.mlp.experts.down_proj.weight",))),
    base_prefix=LLAMA.base_prefix,
    ignored=LLAMA.ignored,
)

TABLES = {"gpt": GPT2, "llama": LLAMA}
_EXPERT = re.compile(r"(.*)\.block_sparse_moe\.experts\.(\d+)\.(w[123])\.weight$")

# BERT, RoBERTa and ALBERT: one layout of the encoder per variant, and one of each head
_BERT_LAYER = {"attention.self.query": "attn.q_proj", "attention.self.key": "attn.k_proj",
               "attention.self.value": "attn.v_proj", "attention.output.dense": "attn.o_proj",
               "attention.output.LayerNorm": "attn_norm", "intermediate.dense": "mlp.up_proj",
               "output.dense": "mlp.down_proj", "output.LayerNorm": "mlp_norm"}
_ALBERT_LAYER = {"attention.query": "attn.q_proj", "attention.key": "attn.k_proj", "attention.value": "attn.v_proj",
                 "attention.dense": "attn.o_proj", "attention.LayerNorm": "attn_norm", "ffn": "mlp.up_proj",
                 "ffn_output": "mlp.down_proj", "full_layer_layer_norm": "mlp_norm"}
# the masked-LM head's HF prefix, and where the pretraining checkpoints keep heads an MLM does not use
_MLM_HEAD = {"bert": "cls.predictions.", "roberta": "lm_head.", "albert": "predictions."}
_PRETRAINING_EXTRAS = {"bert": ("bert.pooler.dense.weight", "bert.pooler.dense.bias", "cls.seq_relationship.weight",
                                "cls.seq_relationship.bias"),
                       "roberta": ("roberta.pooler.dense.weight", "roberta.pooler.dense.bias"),
                       "albert": ("albert.pooler.weight", "albert.pooler.bias", "sop_classifier.classifier.weight",
                                  "sop_classifier.classifier.bias")}


def _pairs(hf: str, ours: str) -> tuple[Rule, Rule]:
    return Rule(f"{hf}.weight", (f"{ours}.weight",)), Rule(f"{hf}.bias", (f"{ours}.bias",))


def bert_table(cfg) -> Table:
    """The HF layout of a `BertConfig`: its variant's encoder and its head's layers."""
    variant, p = cfg.variant, f"{cfg.variant}."
    rules = [Rule(f"{p}embeddings.word_embeddings.weight", ("embed_tokens.weight",)),
             Rule(f"{p}embeddings.position_embeddings.weight", ("embed_positions.weight",)),
             Rule(f"{p}embeddings.token_type_embeddings.weight", ("embed_types.weight",)),
             *_pairs(f"{p}embeddings.LayerNorm", "embed_norm")]
    if variant == "albert":
        rules += _pairs(f"{p}encoder.embedding_hidden_mapping_in", "embed_proj")
        layer, names = f"{p}encoder.albert_layer_groups.{{}}.albert_layers.0.", _ALBERT_LAYER
    else:
        layer, names = f"{p}encoder.layer.{{}}.", _BERT_LAYER
    for hf, ours in names.items():
        rules += _pairs(layer + hf, f"layers.{{}}.{ours}")
    ignored = [f"{p}embeddings.position_ids"]
    if cfg.head == "mlm":
        head = _MLM_HEAD[variant]
        dense, norm = ("dense", "layer_norm") if variant == "roberta" else \
            ("transform.dense", "transform.LayerNorm") if variant == "bert" else ("dense", "LayerNorm")
        rules += [*_pairs(head + dense, "mlm_dense"), *_pairs(head + norm, "mlm_norm"),
                  Rule(f"{head}decoder.weight", ("lm_head.weight",)), Rule(f"{head}decoder.bias", ("lm_head.bias",))]
        extras = _PRETRAINING_EXTRAS[variant]
        if cfg.sentence_head:  # the pooler and the NSP / SOP classifier
            rules += [*_pairs(extras[0].removesuffix(".weight"), "pooler"),
                      *_pairs(extras[2].removesuffix(".weight"), "sentence_classifier")]
        else:
            ignored += list(extras)
    elif cfg.head == "classify":
        pooler = {"bert": "bert.pooler.dense", "roberta": "classifier.dense", "albert": "albert.pooler"}[variant]
        rules += [*_pairs(pooler, "pooler"),
                  *_pairs("classifier.out_proj" if variant == "roberta" else "classifier", "classifier")]
    else:
        rules += _pairs("qa_outputs" if cfg.head == "span" else "classifier", "classifier")
        ignored += list(_PRETRAINING_EXTRAS[variant][:2])  # a pooler the head does not use
    head = _MLM_HEAD[variant]
    span_boundary = ("sbo_positions.weight", *(f"{n}.{w}" for n in ("sbo_up", "sbo_norm", "sbo_down", "sbo_out_norm")
                                               for w in ("weight", "bias")))
    return Table(tuple(rules), p, tuple(ignored), tied_head=f"{head}decoder.weight",
                 aliases=((f"{head}bias", f"{head}decoder.bias"),) if cfg.head == "mlm" else (),
                 not_exported=span_boundary if cfg.span_boundary_head else ())


def t5_table(cfg) -> Table:
    """The HF layout of a `T5Config` (T5ForConditionalGeneration, MT5ForConditionalGeneration)."""
    mlp = {"wi_0": "gate_proj", "wi_1": "up_proj"} if cfg.mlp == "gated-gelu" else {"wi": "up_proj"}
    rules = [Rule("shared.weight", ("embed_tokens.weight",)), Rule("lm_head.weight", ("lm_head.weight",))]
    for stack in ("encoder", "decoder"):
        block, ours = f"{stack}.block.{{}}.layer.", f"{stack}.layers.{{}}."
        sublayers = [("0.SelfAttention", "attn", "attn_norm")]
        if stack == "decoder":
            sublayers.append(("1.EncDecAttention", "cross_attn", "cross_norm"))
        for hf, attn, norm in sublayers:
            rules += [Rule(f"{block}{hf}.{p}.weight", (f"{ours}{attn}.{p}_proj.weight",)) for p in "qkvo"]
            rules.append(Rule(f"{block}{hf[0]}.layer_norm.weight", (f"{ours}{norm}.weight",)))
        ff = len(sublayers)
        rules += [Rule(f"{block}{ff}.DenseReluDense.{hf}.weight", (f"{ours}mlp.{name}.weight",))
                  for hf, name in {**mlp, "wo": "down_proj"}.items()]
        rules += [Rule(f"{block}{ff}.layer_norm.weight", (f"{ours}mlp_norm.weight",)),
                  Rule(f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
                       (f"{stack}.relative_bias.embedding.weight",)),
                  Rule(f"{stack}.final_layer_norm.weight", (f"{stack}.norm.weight",))]
    # older checkpoints store the shared embedding again under each stack
    return Table(tuple(rules), "", ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight"))


def table_for(model) -> Table:
    """The conversion table of a model config, or of a family named by a string (gpt, llama)."""
    if isinstance(model, str):
        return TABLES[model]
    if model.family == "llama" and model.moe is not None:
        return MIXTRAL
    if model.family == "bert":
        return bert_table(model)
    if model.family == "t5":
        return t5_table(model)
    return TABLES[model.family]


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


def hf_to_llmlab_state(state: dict[str, torch.Tensor], family) -> dict[str, torch.Tensor]:
    """Rename (and re-lay-out) an HF state dict into llmlab names for `family` (a name, or the model's
    config where the layout depends on it: an encoder's variant and head).

    A checkpoint of the bare base model (no `transformer.` / `model.` prefix, no lm_head) is
    accepted too: the prefix is added before matching.
    """
    table = table_for(family)
    if table is MIXTRAL:
        state = _stack_experts(state)
    # a decoder's *ForSequenceClassification model: its score head is llmlab's narrow lm_head
    if SCORE_HEAD in state and table in (*TABLES.values(), MIXTRAL):
        state = {("lm_head.weight" if k == SCORE_HEAD else k): v for k, v in state.items()}
    if state and not any(k.startswith(table.base_prefix) or k == "lm_head.weight" for k in state):
        state = {table.base_prefix + k: v for k, v in state.items()}
    if any(other in state for other, _ in table.aliases):
        state = dict(state)
        for other, name in table.aliases:
            if other in state:
                state.setdefault(name, state.pop(other))
    return _convert(state, table, to_ours=True)


def _stack_experts(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Mixtral as released (`block_sparse_moe.gate` and each expert's w1, w2, w3) in transformers'
    layout (`mlp.gate`, `mlp.experts.gate_up_proj` = [w1; w3] per expert, `mlp.experts.down_proj` = w2):
    the names the table maps. A state already in that layout is returned as it is."""
    experts: dict[str, dict[int, dict[str, torch.Tensor]]] = {}
    out = {}
    for key, t in state.items():
        m = _EXPERT.match(key)
        if m:
            experts.setdefault(m[1], {}).setdefault(int(m[2]), {})[m[3]] = t
        else:
            out[key.replace(".block_sparse_moe.gate.", ".mlp.gate.")] = t
    for block, by_expert in experts.items():
        ids = sorted(by_expert)
        if ids != list(range(len(ids))) or any(set(by_expert[e]) != {"w1", "w2", "w3"} for e in ids):
            raise ConversionError(f"{block}.block_sparse_moe: experts must be numbered 0..E-1, each with w1, w2 and "
                                  "w3")
        out[f"{block}.mlp.experts.gate_up_proj"] = torch.stack([torch.cat([by_expert[e]["w1"], by_expert[e]["w3"]])
                                                                for e in ids])
        out[f"{block}.mlp.experts.down_proj"] = torch.stack([by_expert[e]["w2"] for e in ids])
    return out


def llmlab_to_hf_state(state: dict[str, torch.Tensor], family, *, score_head: bool = False
                       ) -> dict[str, torch.Tensor]:
    """Rename an llmlab state dict into HF names (the inverse of `hf_to_llmlab_state`); with
    `score_head` (a model with num_labels > 0) its lm_head becomes the `score` of HF's
    *ForSequenceClassification layout."""
    table = table_for(family)
    out = _convert({k: v for k, v in state.items() if k not in table.not_exported}, table, to_ours=False)
    for other, name in table.aliases:
        if name in out:
            out[other] = out[name].clone()
    if score_head and "lm_head.weight" in out:
        out[SCORE_HEAD] = out.pop("lm_head.weight")
    return out


def module_name_map(name: str, family, *, to_hf: bool) -> tuple[str, str]:
    """The HF path of llmlab linear layer `name` (or, with to_hf=False, the llmlab path of an HF one;
    an MoE's stack of experts is a parameter in HF, `mlp.experts.gate_up_proj`), with the layout op
    of its weight ("copy", or "transpose" for a Conv1D): what adapters need, whose tensors attach to
    whole layers. A layer that HF fuses with others (GPT-2's c_attn) has no such one-to-one
    counterpart and is an error."""
    for rule in table_for(family).rules:
        source, target = (rule.ours[0], rule.hf) if to_hf else (rule.hf, rule.ours[0])
        m = _pattern(source).match(name + ".weight") or _pattern(source).match(name)  # or a stack of experts
        if m:
            if len(rule.ours) > 1:
                raise ConversionError(f"{name}: HF fuses this layer into {rule.hf.format(*m.groups())}; an adapter "
                                      "on it has no HF/PEFT counterpart")
            return target.format(*m.groups()).removesuffix(".weight"), rule.op
    raise ConversionError(f"{name}: no {getattr(family, 'family', family)} linear layer of that name")


# --------------------------------------------------------------------------- configs

LLAMA_TYPES = ("llama", "mistral", "qwen2", "mixtral")
HF_ARCHITECTURES = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                    "qwen2": "Qwen2ForCausalLM", "mixtral": "MixtralForCausalLM"}
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
        if model_type in BERT_TYPES:
            return _bert_from_hf(hf, model_type, where)
        if model_type in T5_TYPES:
            return _t5_from_hf(hf, where)
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
        sliding = _field(hf, "sliding_window", where, int, None) if model_type in ("mistral", "mixtral") else None
        moe = None
        if model_type == "mixtral":
            moe = MoEConfig(n_experts=_field(hf, "num_local_experts", where, int, 8),
                            top_k=_field(hf, "num_experts_per_tok", where, int, 2),
                            aux_loss_coef=_field(hf, "router_aux_loss_coef", where, float, 0.001),
                            jitter=_field(hf, "router_jitter_noise", where, float, 0.0))
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
                           attention_bias=model_type == "qwen2", sliding_window=sliding, moe=moe,
                           dropout=_field(hf, "attention_dropout", where, float, 0.0))
    raise ConversionError(f"{where}: model_type={model_type!r} is not a supported architecture "
                          f"(supported: {', '.join(('gpt2',) + LLAMA_TYPES + BERT_TYPES + T5_TYPES)})")


BERT_TYPES = ("bert", "roberta", "albert")
_BERT_CLASSES = {"bert": "Bert", "roberta": "Roberta", "albert": "Albert"}
_BERT_HEADS = {"ForMaskedLM": "mlm", "ForPreTraining": "mlm", "Model": "mlm", "ForSequenceClassification": "classify",
               "ForTokenClassification": "tokens", "ForQuestionAnswering": "span"}  # ForPreTraining: + sentence head
_HF_ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh"}


def _bert_from_hf(hf: dict, model_type: str, where: str) -> BertConfig:
    """A BertConfig from a BERT, RoBERTa or ALBERT config.json; the head comes from `architectures`."""
    architectures = hf.get("architectures") or [f"{_BERT_CLASSES[model_type]}ForMaskedLM"]
    if not isinstance(architectures, list) or not architectures or not isinstance(architectures[0], str):
        raise _unsupported(where, "architectures", architectures, "a list of class names")
    suffix = architectures[0].removeprefix(_BERT_CLASSES[model_type])
    if suffix not in _BERT_HEADS:
        raise _unsupported(where, "architectures", architectures[0], ", ".join(
            _BERT_CLASSES[model_type] + k for k in _BERT_HEADS))
    head = _BERT_HEADS[suffix]
    if suffix == "ForPreTraining" and model_type == "roberta":
        raise _unsupported(where, "architectures", architectures[0], "RobertaForMaskedLM (RoBERTa has no NSP head)")
    act = hf.get("hidden_act", "gelu_new" if model_type == "albert" else "gelu")
    if act not in _HF_ACTIVATIONS:
        raise _unsupported(where, "hidden_act", act, ", ".join(_HF_ACTIVATIONS))
    if hf.get("position_embedding_type", "absolute") != "absolute":
        raise _unsupported(where, "position_embedding_type", hf["position_embedding_type"], "absolute")
    n_layers = _field(hf, "num_hidden_layers", where, int)
    fields = {}
    if model_type == "albert":
        groups = _field(hf, "num_hidden_groups", where, int, 1)
        if groups not in (1, n_layers) or _field(hf, "inner_group_num", where, int, 1) != 1:
            raise _unsupported(where, "num_hidden_groups / inner_group_num", (groups, hf.get("inner_group_num")),
                               f"1 / 1 (one shared layer) or {n_layers} / 1 (none shared)")
        fields = {"embed_dim": _field(hf, "embedding_size", where, int, 128), "share_layers": groups == 1 < n_layers}
    pad_id = _field(hf, "pad_token_id", where, int, 1 if model_type == "roberta" else 0)
    positions = _field(hf, "max_position_embeddings", where, int, 512)
    labels = hf.get("id2label")
    num_labels = 0 if head == "mlm" else 2 if head == "span" else \
        len(labels) if isinstance(labels, dict) and labels else _field(hf, "num_labels", where, int, 2)
    return BertConfig(variant=model_type, vocab_size=_field(hf, "vocab_size", where, int),
                      dim=_field(hf, "hidden_size", where, int), n_layers=n_layers,
                      n_heads=_field(hf, "num_attention_heads", where, int),
                      hidden_dim=_field(hf, "intermediate_size", where, int),
                      max_seq_len=positions - (pad_id + 1 if model_type == "roberta" else 0),
                      type_vocab_size=_field(hf, "type_vocab_size", where, int, 2), pad_id=pad_id,
                      activation=_HF_ACTIVATIONS[act], norm_eps=_field(hf, "layer_norm_eps", where, float, 1e-12),
                      head=head, num_labels=num_labels,
                      tie_embeddings=_field(hf, "tie_word_embeddings", where, bool, True),
                      sentence_head=suffix == "ForPreTraining",
                      dropout=_field(hf, "hidden_dropout_prob", where, float, 0.1), **fields)


def _bert_to_hf(cfg: BertConfig) -> dict:
    suffix = "ForPreTraining" if cfg.sentence_head else {v: k for k, v in reversed(_BERT_HEADS.items())}[cfg.head]
    out = {"architectures": [_BERT_CLASSES[cfg.variant] + suffix], "model_type": cfg.variant,
           "vocab_size": cfg.vocab_size, "hidden_size": cfg.dim, "num_hidden_layers": cfg.n_layers,
           "num_attention_heads": cfg.n_heads, "intermediate_size": cfg.hidden_dim,
           "max_position_embeddings": cfg.position_rows, "type_vocab_size": cfg.type_vocab_size,
           "pad_token_id": cfg.pad_id, "hidden_act": {"gelu": "gelu", "gelu_tanh": "gelu_new"}[cfg.activation],
           "layer_norm_eps": cfg.norm_eps, "hidden_dropout_prob": cfg.dropout,
           "attention_probs_dropout_prob": cfg.dropout, "position_embedding_type": "absolute",
           "tie_word_embeddings": cfg.tie_embeddings, "dtype": "float32"}
    if cfg.variant == "albert":
        if not cfg.embed_dim:
            raise ConversionError("an ALBERT export needs embed_dim (the factorised embedding width)")
        out.update(embedding_size=cfg.embed_dim, num_hidden_groups=1 if cfg.share_layers else cfg.n_layers,
                   inner_group_num=1, classifier_dropout_prob=cfg.dropout)
    elif cfg.embed_dim or cfg.share_layers:
        raise ConversionError(f"embed_dim and share_layers are ALBERT's; variant={cfg.variant} has no HF layout "
                              "with them")
    if cfg.head in ("classify", "tokens"):
        out["id2label"] = {str(i): f"LABEL_{i}" for i in range(cfg.num_labels)}
        out["label2id"] = {f"LABEL_{i}": i for i in range(cfg.num_labels)}
    return out


T5_TYPES = ("t5", "mt5")


def _t5_from_hf(hf: dict, where: str) -> T5Config:
    """A T5Config from a T5 or mT5 config.json (T5ForConditionalGeneration and its mT5 twin)."""
    architectures = hf.get("architectures") or ["T5ForConditionalGeneration"]
    if architectures[0] not in ("T5ForConditionalGeneration", "MT5ForConditionalGeneration"):
        raise _unsupported(where, "architectures", architectures[0], "T5ForConditionalGeneration")
    mlp = hf.get("feed_forward_proj", "relu")
    if mlp not in ("relu", "gated-gelu"):
        raise _unsupported(where, "feed_forward_proj", mlp, "relu (T5) or gated-gelu (T5 v1.1, mT5)")
    if mlp == "gated-gelu" and hf.get("dense_act_fn", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
        raise _unsupported(where, "dense_act_fn", hf["dense_act_fn"], "gelu_new")
    tie = _field(hf, "tie_word_embeddings", where, bool, True)
    eos = hf.get("eos_token_id", 1)
    positions = _field(hf, "n_positions", where, int, 512)
    return T5Config(vocab_size=_field(hf, "vocab_size", where, int), dim=_field(hf, "d_model", where, int),
                    n_layers=_field(hf, "num_layers", where, int),
                    n_decoder_layers=_field(hf, "num_decoder_layers", where, int, None),
                    n_heads=_field(hf, "num_heads", where, int), head_dim=_field(hf, "d_kv", where, int),
                    hidden_dim=_field(hf, "d_ff", where, int), mlp=mlp,
                    relative_buckets=_field(hf, "relative_attention_num_buckets", where, int, 32),
                    relative_max_distance=_field(hf, "relative_attention_max_distance", where, int, 128),
                    max_seq_len=positions, max_target_len=positions,
                    norm_eps=_field(hf, "layer_norm_epsilon", where, float, 1e-6), tie_embeddings=tie,
                    scale_logits=_field(hf, "scale_decoder_outputs", where, bool, tie),
                    pad_id=_field(hf, "pad_token_id", where, int, 0),
                    eos_id=eos[0] if isinstance(eos, list) and eos else _field(hf, "eos_token_id", where, int, 1),
                    decoder_start_id=_field(hf, "decoder_start_token_id", where, int, 0),
                    dropout=_field(hf, "dropout_rate", where, float, 0.1),
                    init_std=_field(hf, "initializer_factor", where, float, 1.0))


def _t5_to_hf(cfg: T5Config) -> dict:
    if cfg.moe is not None:
        raise ConversionError("a T5 with experts (a Switch Transformer) has no HF export; T5 and mT5 export, "
                              "and MoE decoders as Mixtral")
    return {"architectures": ["T5ForConditionalGeneration"], "model_type": "t5", "vocab_size": cfg.vocab_size,
            "d_model": cfg.dim, "d_kv": cfg.head_dim, "d_ff": cfg.hidden_dim, "num_layers": cfg.n_layers,
            "num_decoder_layers": cfg.n_decoder_layers, "num_heads": cfg.n_heads,
            "relative_attention_num_buckets": cfg.relative_buckets,
            "relative_attention_max_distance": cfg.relative_max_distance, "dropout_rate": cfg.dropout,
            "layer_norm_epsilon": cfg.norm_eps, "initializer_factor": cfg.init_std, "feed_forward_proj": cfg.mlp,
            "tie_word_embeddings": cfg.tie_embeddings, "scale_decoder_outputs": cfg.scale_logits,
            "n_positions": max(cfg.max_seq_len, cfg.max_target_len), "pad_token_id": cfg.pad_id,
            "eos_token_id": cfg.eos_id, "decoder_start_token_id": cfg.decoder_start_id, "is_encoder_decoder": True,
            "dtype": "float32"}


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
    if isinstance(cfg, BertConfig):
        return _bert_to_hf(cfg)
    if isinstance(cfg, T5Config):
        return _t5_to_hf(cfg)
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
    moe = cfg.moe
    if moe is not None:
        if cfg.attention_bias or moe.hidden_dim not in (None, cfg.hidden_dim) or moe.unlike_mixtral():
            raise ConversionError("an MoE model has an HF export as Mixtral: gated silu experts as wide as "
                                  "hidden_dim in every block (every=1), normalize=topk, dropless "
                                  "(capacity_factor=null), no attention_bias")
        model_type = "mixtral"
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
    if model_type in ("mistral", "mixtral"):
        out["sliding_window"] = cfg.sliding_window
    if moe is not None:
        out.update(num_local_experts=moe.n_experts, num_experts_per_tok=moe.top_k,
                   router_aux_loss_coef=moe.aux_loss_coef, router_jitter_noise=moe.jitter)
    if cfg.rope_scaling is not None:
        out["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}  # transformers < 5 reads this
    return out
