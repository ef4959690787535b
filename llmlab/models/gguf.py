"""Export a LLaMA-family model and its tokenizer to GGUF, the file format of llama.cpp and Ollama.

The file follows llama.cpp's conventions for its "llama" architecture, as its own HF converter
(`convert_hf_to_gguf.py`, class `LlamaModel`) writes them with the `gguf` package's `GGUFWriter`:

- tensors `token_embd`, `blk.N.{attn_norm,attn_q,attn_k,attn_v,attn_output,ffn_norm,ffn_gate,ffn_up,
  ffn_down}`, `output_norm` and `output` (`gguf.TENSOR_NAMES`); with tied embeddings no `output`
  is written and llama.cpp reuses `token_embd`;
- the rotary layout: llmlab, like HF, rotates the two halves of each head (x_i with x_{i+d/2});
  llama.cpp's llama rotates adjacent pairs (x_2i with x_2i+1). The rows of the q and k projections
  are permuted as the converter's `permute` does (`permute_rotary` below), so the exported model
  computes the same attention scores;
- rotary scaling: "linear" as `llama.rope.scaling.{type,factor}`; "llama3" as the converter does
  it, a `rope_freqs` tensor of per-frequency divisors (llama.cpp divides each angle by it);
- types: "f32" keeps every tensor in float32; "f16" stores matrices in float16; "q8_0" stores them
  in blocks of 32 values with one float16 scale (absmax / 127), and falls back to float16 for a
  matrix whose rows are not a multiple of 32 long (as the converter does). Norm weights and other
  vectors stay float32 in every type, as llama.cpp expects;
- Mixtral-style experts (an MoE layer in every block, top-k renormalised, dropless) as llama.cpp's
  converter writes Mixtral: `llama.expert_count`, `llama.expert_used_count`, the router as
  `blk.N.ffn_gate_inp` and each projection's experts stacked in one 3-D tensor, `blk.N.ffn_gate_exps`,
  `ffn_up_exps` and `ffn_down_exps`, (E, out, in) in NumPy's order; `feed_forward_length` is then the
  experts' width. llama.cpp's llama graph softmaxes the router logits, takes the top k and
  renormalises their weights, as `MoEConfig(normalize="topk")` does;
- the tokenizer: a byte-level BPE `tokenizer.json` becomes the "gpt2" tokenizer model with the
  "gpt-2" pre-tokenizer (see `PRE_TOKENIZER`), the vocabulary in id order padded with unused
  `[PADi]` tokens up to the model's vocabulary, the merges, the BOS/EOS/PAD ids and the chat
  template when the folder has one.

Variants llama.cpp's llama architecture cannot express (the GPT family, parallel blocks, q/k/v
biases, a sliding attention window, "dynamic" and "yarn" rotary scaling; experts in some blocks
only, with a capacity, or weighted by the softmax over all of them) are refused with a
`GGUFExportError` rather than written as a file that would compute something else.

Sources: the GGUF spec (ggml-org/ggml, docs/gguf.md); llama.cpp's convert_hf_to_gguf.py
(`LlamaModel.permute`, `LlamaModel.generate_extra_tensors`, `TextModel.get_vocab_base`) and
src/llama-vocab.cpp (the pre-tokenizer names and their regexes).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from gguf.quants import quant_shape_to_byte_shape, quantize
from torch import nn

from llmlab.common import LlmlabError, atomic_path, read_json_object
from llmlab.models.layers import rope_inv_freq
from llmlab.models.moe import ExpertLinear

OUTTYPES = ("f32", "f16", "q8_0")
# llmlab's tokenizers split text with the ByteLevel pre-tokenizer's regex, which is GPT-2's; llama.cpp's
# "gpt-2" pre-tokenizer applies that same regex ("default" would add digit and punctuation splits).
PRE_TOKENIZER = "gpt-2"
ROPE_SCALING_KINDS = ("linear", "llama3")  # the kinds llama.cpp's llama architecture reproduces exactly
# Names llmlab.tokenizer.Tokenizer tries for each role (this layer cannot import it): used only for a role
# that tokenizer_config.json does not name.
_FALLBACK_NAMES = {"bos": ("<|bos|>", "<s>", "<|begin_of_text|>", "<|endoftext|>"),
                   "eos": ("<|eos|>", "</s>", "<|end_of_text|>", "<|endoftext|>"),
                   "pad": ("<|pad|>", "<pad>")}
_FILE_TYPES = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
               "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}
_Q8_0 = gguf.GGMLQuantizationType.Q8_0
_Q8_0_BLOCK = gguf.GGML_QUANT_SIZES[_Q8_0][0]  # 32 values per block


class GGUFExportError(LlmlabError):
    """A model, type or tokenizer that GGUF export cannot write faithfully; the message says why."""


# --------------------------------------------------------------------------- rotary layout


def permute_rotary(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rows of a q or k projection from the rotate-half layout (HF, llmlab) to llama.cpp's interleaved one.

    Within each head, row i of the first half and row i of the second half become rows 2i and 2i + 1.
    This is `LlamaModel.permute` of llama.cpp's convert_hf_to_gguf.py, with `n_heads` the number of
    heads the projection has (n_heads for q, n_kv_heads for k).

    Args:
        weight: (n_heads * head_dim, in_features).
        n_heads: heads in `weight`'s rows.

    Returns:
        A new tensor of the same shape.
    """
    out, inp = weight.shape
    return weight.reshape(n_heads, 2, out // n_heads // 2, inp).transpose(1, 2).reshape(out, inp)


def unpermute_rotary(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The inverse of `permute_rotary`: llama.cpp's interleaved rows back to the rotate-half layout."""
    out, inp = weight.shape
    return weight.reshape(n_heads, out // n_heads // 2, 2, inp).transpose(1, 2).reshape(out, inp)


# --------------------------------------------------------------------------- export


def export_gguf(model: nn.Module, tokenizer_dir: str | os.PathLike | None, path: str | os.PathLike, *,
                outtype: str = "f32", name: str | None = None, add_bos: bool = False) -> Path:
    """Write a LLaMA-family `model` (and the tokenizer in `tokenizer_dir`) as one GGUF file for llama.cpp.

    The file is written atomically: to a temporary name beside `path`, fsynced, then renamed over it;
    a failure leaves no partial file and no temporary behind. Tensors are converted one at a time, so
    the export needs about one matrix of memory beyond the model.

    Args:
        model: an `llmlab.models.llama.Llama` (any device or dtype).
        tokenizer_dir: folder with the byte-level BPE `tokenizer.json` (plus, optionally,
            `tokenizer_config.json` and `chat_template.jinja`); None writes no tokenizer, and llama.cpp
            then cannot run the file on its own.
        path: the .gguf file to write (its folder is created).
        outtype: "f32", "f16" or "q8_0" for the matrices; with "q8_0" a matrix whose rows are not a
            multiple of 32 long is written as F16. Vectors (norm weights) are F32 in every type.
        name: `general.name`; default: the file name without its suffix.
        add_bos: whether llama.cpp should start every prompt with BOS (`tokenizer.ggml.add_bos_token`);
            llmlab adds none unless asked (data `bos=true`, `--bos`), so set it for a model trained so.

    Returns:
        `path`.

    Raises:
        GGUFExportError: a model llama.cpp's "llama" architecture cannot express, an unknown `outtype`,
            a tokenizer that is missing, unreadable, not byte-level BPE or larger than the model's
            vocabulary, a layer that still carries a LoRA adapter or quantization, or a float16 overflow.
    """
    cfg = _checked_config(model, outtype)
    vocab = _read_vocab(Path(tokenizer_dir), cfg.vocab_size) if tokenizer_dir is not None else None
    if add_bos and (vocab is None or vocab.special_ids.get("bos") is None):
        raise GGUFExportError("add_bos=True needs a tokenizer with a BOS token")
    sources = _tensor_sources(model)
    path = Path(path)
    with atomic_path(path) as tmp:
        writer = gguf.GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
        try:
            _add_model_metadata(writer, cfg, name or path.stem, outtype)
            if vocab is not None:
                _add_vocab(writer, vocab, add_bos)
            _write_tensors(writer, sources, outtype)
        finally:
            writer.close()
    return path


def _checked_config(model: nn.Module, outtype: str) -> Any:
    """The model's LlamaConfig, after refusing what llama.cpp's llama architecture cannot express."""
    cfg = getattr(model, "config", None)
    family = getattr(cfg, "family", None)
    if family != "llama":
        raise GGUFExportError(f"GGUF export covers the LLaMA family only (llama.cpp's \"llama\" architecture); "
                              f"this is a {family or type(model).__name__} model and the GPT family is out of "
                              "scope: export it to HF format with `llmlab convert --to hf` instead")
    if outtype not in OUTTYPES:
        raise GGUFExportError(f"unknown GGUF type {outtype!r}; choose one of {', '.join(OUTTYPES)}")
    why = []
    if cfg.parallel_block:
        why.append("parallel_block=true (llama.cpp's llama block is sequential: attention, then MLP)")
    if cfg.attention_bias:
        why.append("attention_bias=true (q/k/v biases)")
    if cfg.sliding_window is not None:
        why.append(f"sliding_window={cfg.sliding_window} (llama.cpp's llama attends to the whole context, "
                   "so the file would differ from the model beyond the window)")
    if getattr(cfg, "moe", None) is not None:  # llama.cpp's llama runs Mixtral's experts
        why += cfg.moe.unlike_mixtral()
    if cfg.rope_scaling is not None and cfg.rope_scaling.kind not in ROPE_SCALING_KINDS:
        why.append(f"rope scaling {cfg.rope_scaling.kind!r} (exported: none, {', '.join(ROPE_SCALING_KINDS)})")
    if why:
        raise GGUFExportError("llama.cpp's llama architecture cannot express " + "; ".join(why)
                              + "; export to HF format with `llmlab convert --to hf` instead")
    return cfg


def _add_model_metadata(writer: gguf.GGUFWriter, cfg: Any, name: str, outtype: str) -> None:
    """The `general.*` and `llama.*` keys llama.cpp reads for the architecture."""
    writer.add_name(name)
    writer.add_file_type(_FILE_TYPES[outtype])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_context_length(cfg.max_seq_len)
    writer.add_embedding_length(cfg.dim)
    writer.add_block_count(cfg.n_layers)
    moe = getattr(cfg, "moe", None)
    writer.add_feed_forward_length(cfg.hidden_dim if moe is None else moe.hidden_dim or cfg.hidden_dim)
    if moe is not None:
        writer.add_expert_count(moe.n_experts)
        writer.add_expert_used_count(moe.top_k)
    writer.add_head_count(cfg.n_heads)
    writer.add_head_count_kv(cfg.n_kv_heads)
    writer.add_key_length(cfg.head_dim)  # written always: head_dim may differ from dim / n_heads
    writer.add_value_length(cfg.head_dim)
    writer.add_rope_dimension_count(cfg.head_dim)
    writer.add_rope_freq_base(cfg.rope_theta)
    writer.add_layer_norm_rms_eps(cfg.norm_eps)
    if cfg.rope_scaling is not None and cfg.rope_scaling.kind == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(cfg.rope_scaling.factor)


# --------------------------------------------------------------------------- tensors


@dataclass(frozen=True)
class _Source:
    name: str  # the GGUF tensor name
    weight: torch.Tensor  # as llmlab holds it (any device and dtype)
    rotary_heads: int | None = None  # permute the rows to llama.cpp's rotary layout for this many heads


def _tensor_sources(model: nn.Module) -> list[_Source]:
    """Every tensor of the file, in llama.cpp's order, with the llmlab weight it comes from."""
    cfg = model.config
    out = []
    if cfg.rope_scaling is not None and cfg.rope_scaling.kind == "llama3":
        # llama.cpp divides each rotary angle by rope_freqs[i]: the plain frequencies over the scaled ones
        plain, _ = rope_inv_freq(cfg.head_dim, cfg.rope_theta)
        scaled, _ = rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling, cfg.max_seq_len)
        out.append(_Source("rope_freqs.weight", plain / scaled))
    out.append(_Source("token_embd.weight", _weight(model.embed_tokens, "embed_tokens")))
    for i, layer in enumerate(model.layers):
        attn, mlp, at = layer.attn, layer.mlp, f"layers.{i}"
        out += [_Source(f"blk.{i}.attn_norm.weight", layer.attn_norm.weight),
                _Source(f"blk.{i}.attn_q.weight", _weight(attn.q_proj, f"{at}.attn.q_proj"), cfg.n_heads),
                _Source(f"blk.{i}.attn_k.weight", _weight(attn.k_proj, f"{at}.attn.k_proj"), cfg.n_kv_heads),
                _Source(f"blk.{i}.attn_v.weight", _weight(attn.v_proj, f"{at}.attn.v_proj")),
                _Source(f"blk.{i}.attn_output.weight", _weight(attn.o_proj, f"{at}.attn.o_proj")),
                _Source(f"blk.{i}.ffn_norm.weight", layer.mlp_norm.weight)]
        if cfg.moe is None:
            out += [_Source(f"blk.{i}.ffn_gate.weight", _weight(mlp.gate_proj, f"{at}.mlp.gate_proj")),
                    _Source(f"blk.{i}.ffn_up.weight", _weight(mlp.up_proj, f"{at}.mlp.up_proj")),
                    _Source(f"blk.{i}.ffn_down.weight", _weight(mlp.down_proj, f"{at}.mlp.down_proj"))]
        else:
            gate, up = _weight(mlp.experts.gate_up_proj, f"{at}.mlp.experts.gate_up_proj").chunk(2, dim=1)
            out += [_Source(f"blk.{i}.ffn_gate_inp.weight", _weight(mlp.router, f"{at}.mlp.router")),
                    _Source(f"blk.{i}.ffn_gate_exps.weight", gate),
                    _Source(f"blk.{i}.ffn_up_exps.weight", up),
                    _Source(f"blk.{i}.ffn_down_exps.weight",
                            _weight(mlp.experts.down_proj, f"{at}.mlp.experts.down_proj"))]
    out.append(_Source("output_norm.weight", model.norm.weight))
    if not cfg.tie_embeddings:
        out.append(_Source("output.weight", _weight(model.lm_head, "lm_head")))
    return out


def _weight(module: nn.Module, where: str) -> torch.Tensor:
    """The float weight of a plain linear or embedding layer (or stack of experts); a wrapped one (LoRA,
    NF4) is refused."""
    if not isinstance(module, (nn.Linear, nn.Embedding, ExpertLinear)) or not module.weight.is_floating_point():
        raise GGUFExportError(f"{where} is a {type(module).__name__}, not a plain float layer: merge LoRA adapters "
                              "(merge_and_unload) and export an unquantized model")
    return module.weight


def _ggml_type(shape: tuple[int, ...], outtype: str) -> gguf.GGMLQuantizationType:
    """F32 for vectors and for "f32"; Q8_0 for "q8_0" matrices whose rows split into blocks; else F16."""
    if len(shape) == 1 or outtype == "f32":
        return gguf.GGMLQuantizationType.F32
    if outtype == "q8_0" and shape[-1] % _Q8_0_BLOCK == 0:
        return _Q8_0
    return gguf.GGMLQuantizationType.F16


def _write_tensors(writer: gguf.GGUFWriter, sources: list[_Source], outtype: str) -> None:
    """Header, metadata, the tensor table, then each tensor converted and written in turn."""
    plan = [(source, _ggml_type(tuple(source.weight.shape), outtype)) for source in sources]
    for source, qtype in plan:
        byte_shape = quant_shape_to_byte_shape(tuple(source.weight.shape), qtype)
        writer.add_tensor_info(source.name, byte_shape, np.dtype(np.uint8), math.prod(byte_shape), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for source, qtype in plan:
        writer.write_tensor_data(_encode(source, qtype))


def _encode(source: _Source, qtype: gguf.GGMLQuantizationType) -> np.ndarray:
    """The tensor's bytes in llama.cpp's layout and `qtype` (rows of a matrix are its output features)."""
    weight = source.weight.detach()
    if source.rotary_heads is not None:
        weight = permute_rotary(weight, source.rotary_heads)
    data = np.ascontiguousarray(weight.to("cpu", torch.float32).numpy())
    if not np.isfinite(data).all():
        raise GGUFExportError(f"{source.name} holds NaN or infinite values: the model is damaged (a diverged run?); "
                              "export a checkpoint from before that")
    if qtype == gguf.GGMLQuantizationType.F32:
        return data
    if qtype == _Q8_0:
        if np.abs(data).max() / 127 > np.finfo(np.float16).max:  # the block scales are float16
            raise GGUFExportError(f"{source.name} has values beyond q8_0's range (+-{127 * 65504:.3g}); export with "
                                  "outtype=f32")
        return quantize(data, _Q8_0)
    with np.errstate(over="ignore"):  # an overflow is reported below, by name
        half = data.astype(np.float16)
    if (np.isinf(half) != np.isinf(data)).any():
        raise GGUFExportError(f"{source.name} has values beyond float16's range (+-65504); export with outtype=f32")
    return half


# --------------------------------------------------------------------------- tokenizer


@dataclass
class _Vocab:
    tokens: list[str]  # one per model vocabulary row, in id order
    types: list[int]  # gguf.TokenType of each
    merges: list[str]  # "left right", in merge order
    special_ids: dict[str, int | None]  # "bos", "eos", "pad" -> id
    chat_template: str | list[dict[str, str]] | None


def _read_vocab(folder: Path, vocab_size: int) -> _Vocab:
    """Tokens, types, merges, special ids and chat template of a byte-level BPE tokenizer folder.

    Token types follow the converter's `get_vocab_base`: an added token marked special is CONTROL,
    another added token USER_DEFINED, a vocabulary entry NORMAL, an id the tokenizer leaves unused
    (the model's table may be larger) an UNUSED `[PADi]`. The BOS/EOS/PAD ids come from the token
    names tokenizer_config.json gives (as in llama.cpp's `SpecialVocab`; null means none); a role it
    does not name falls back to the names llmlab's Tokenizer tries, and so does a BOS named null
    beside `add_bos_token: false` (llmlab's record of a model trained without BOS).
    """
    file = folder / "tokenizer.json"
    if not file.is_file():
        raise GGUFExportError(f"{folder}: no tokenizer.json to export (pass no tokenizer folder to write the "
                              "model alone)")
    spec = _read_json(file)
    model = spec.get("model") or {}
    if not isinstance(model, dict):
        raise GGUFExportError(f"{file}: model must be a JSON object, got {type(model).__name__}")
    if model.get("type") != "BPE" or not _is_gpt2_byte_level(spec):
        raise GGUFExportError(f"{file}: GGUF export takes byte-level BPE tokenizers split by GPT-2's regex (llama.cpp "
                              f"pre-tokenizer {PRE_TOKENIZER!r}); this one has model {model.get('type')!r}, "
                              f"normalizer {_kind(spec.get('normalizer'))} and pre-tokenizer "
                              f"{_kind(spec.get('pre_tokenizer'))}")
    added_tokens = spec.get("added_tokens") or []
    vocab = model.get("vocab") or {}
    if not isinstance(added_tokens, list) or not all(
            isinstance(a, dict) and isinstance(a.get("content"), str) and _is_id(a.get("id")) for a in added_tokens):
        raise GGUFExportError(f"{file}: added_tokens must be a list of {{\"id\": int >= 0, \"content\": str}} objects")
    if not isinstance(vocab, dict) or not all(_is_id(i) for i in vocab.values()):
        raise GGUFExportError(f"{file}: model.vocab must map each token to an id >= 0")
    ids: dict[str, int] = {**vocab, **{a["content"]: a["id"] for a in added_tokens}}
    added = {a["content"]: bool(a.get("special")) for a in added_tokens}  # text -> marked special
    if ids and max(ids.values()) >= vocab_size:
        raise GGUFExportError(f"{file}: token id {max(ids.values())} does not fit the model's vocabulary of "
                              f"{vocab_size} rows")
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [int(gguf.TokenType.UNUSED)] * vocab_size
    for text, i in ids.items():
        kind = (gguf.TokenType.NORMAL if text not in added else
                gguf.TokenType.CONTROL if added[text] else gguf.TokenType.USER_DEFINED)
        tokens[i], types[i] = text, int(kind)
    # a space inside a merge half is written as U+0120, as llama.cpp's SpecialVocab does (never in byte-level BPE)
    merges = model.get("merges") or []
    if not isinstance(merges, list) or not all(
            isinstance(m, str) or (isinstance(m, list) and len(m) == 2 and all(isinstance(p, str) for p in m))
            for m in merges):
        raise GGUFExportError(f"{file}: model.merges must be a list of \"left right\" strings or [left, right] pairs")
    merges = [m if isinstance(m, str) else " ".join(part.replace(" ", "\u0120") for part in m) for m in merges]
    config_file = folder / "tokenizer_config.json"
    config = _read_json(config_file) if config_file.is_file() else {}
    special_ids = {role: _special_id(config, role, ids) for role in _FALLBACK_NAMES}
    template = config.get("chat_template")
    if (folder / "chat_template.jinja").is_file():  # it wins over the config's, as in llmlab.tokenizer.chat
        try:
            template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise GGUFExportError(f"{folder / 'chat_template.jinja'}: unreadable: {e}") from None
    if isinstance(template, list) and not all(isinstance(t, dict) and isinstance(t.get("name"), str)
                                              and isinstance(t.get("template"), str) for t in template):
        raise GGUFExportError(f"{config_file}: chat_template must be a string or a list of {{name, template}} "
                              "objects")
    if not isinstance(template, (str, list)) or not template:
        template = None
    return _Vocab(tokens, types, merges, special_ids, template)


def _is_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _is_gpt2_byte_level(spec: dict) -> bool:
    """No normalizer and a ByteLevel pre-tokenizer with GPT-2's regex and no prefix space (alone or in a Sequence)."""
    pre = spec.get("pre_tokenizer") or {}
    if isinstance(pre, dict) and pre.get("type") == "Sequence" and isinstance(pre.get("pretokenizers"), list) \
            and len(pre["pretokenizers"]) == 1:
        pre = pre["pretokenizers"][0]
    return (spec.get("normalizer") is None and isinstance(pre, dict) and pre.get("type") == "ByteLevel"
            and pre.get("use_regex", True) and not pre.get("add_prefix_space", False))


def _kind(component: Any) -> str:
    return repr(component.get("type")) if isinstance(component, dict) else "none"


def _special_id(config: dict, role: str, ids: dict[str, int]) -> int | None:
    key = f"{role}_token"
    # llmlab writes bos_token null with add_bos_token false for a model that saw no BOS before its
    # documents: the vocabulary's BOS is still the BOS, which llama.cpp adds only with add_bos
    undeclared_bos = role == "bos" and config.get(key, "") is None and config.get("add_bos_token") is False
    if key in config and not undeclared_bos:
        token = config[key]
        text = token.get("content") if isinstance(token, dict) else token  # HF may store an AddedToken dict
        return ids.get(text) if isinstance(text, str) else None
    return next((ids[t] for t in _FALLBACK_NAMES[role] if t in ids), None)


def _read_json(file: Path) -> dict:
    return read_json_object(file, GGUFExportError)


def _add_vocab(writer: gguf.GGUFWriter, vocab: _Vocab, add_bos: bool) -> None:
    """The `tokenizer.*` keys llama.cpp reads for a "gpt2" (byte-level BPE) tokenizer."""
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(PRE_TOKENIZER)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    writer.add_token_merges(vocab.merges)
    for role, token_id in vocab.special_ids.items():
        if token_id is not None:
            getattr(writer, f"add_{role}_token_id")(token_id)
    writer.add_add_bos_token(add_bos)
    writer.add_add_eos_token(False)  # llmlab never appends EOS to a prompt
    if vocab.chat_template is not None:
        writer.add_chat_template(vocab.chat_template)
