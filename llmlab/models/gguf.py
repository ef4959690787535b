"""Export a LLaMA-family model and its tokenizer to GGUF, the file format of llama.cpp and Ollama.

Written with the `gguf` package's `GGUFWriter` under llama.cpp's conventions for the "llama"
architecture: its tensor names (`token_embd`, `blk.N.attn_q`, ..., `output`), its metadata keys,
and its rotary layout. llmlab's LLaMA rotates the two halves of each head (HF's layout); llama.cpp
rotates interleaved pairs, so the q and k projections are permuted as llama.cpp's own HF converter
does (`permute` below) and the model computes the same function. With tied embeddings no `output`
tensor is written; llama.cpp then reuses `token_embd`.

Types: "f32" keeps every tensor; "f16" stores matrices in half precision; "q8_0" stores them in
blocks of 32 values with one fp16 scale (absmax / 127), falling back to f16 for a matrix whose rows
are not a multiple of 32 long. Norm weights and other vectors stay f32 in every type, as llama.cpp
expects. The tokenizer is the byte-level BPE of `tokenizer.json` ("gpt2" model, "gpt-2"
pre-tokenizer: llmlab's tokenizers split with GPT-2's regex), with its merges, special-token ids
and the chat template when the folder has one.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

from llmlab.common import LlmlabError, atomic_path

OUTTYPES = ("f32", "f16", "q8_0")
SPECIAL = {"bos": ("<|bos|>", "<s>", "<|begin_of_text|>"), "eos": ("<|eos|>", "</s>", "<|end_of_text|>"),
           "pad": ("<|pad|>", "<pad>")}


class GGUFExportError(LlmlabError):
    pass


def permute_rotary(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rows of a q or k projection from rotate-half order (HF, llmlab) to interleaved pairs (llama.cpp):
    within each head, row i of the first half and row i of the second half become rows 2i and 2i + 1."""
    out, inp = weight.shape
    return weight.reshape(n_heads, 2, out // n_heads // 2, inp).transpose(1, 2).reshape(out, inp)


def unpermute_rotary(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The inverse of `permute_rotary`."""
    out, inp = weight.shape
    return weight.reshape(n_heads, out // n_heads // 2, 2, inp).transpose(1, 2).reshape(out, inp)


def _check(model: nn.Module, outtype: str) -> None:
    cfg = model.config
    if cfg.family != "llama":
        raise GGUFExportError(f"GGUF export covers the LLaMA family; this is a {cfg.family} model "
                              "(export it to HF format with `llmlab convert --to hf` instead)")
    if outtype not in OUTTYPES:
        raise GGUFExportError(f"unknown GGUF type {outtype!r}; choose one of {', '.join(OUTTYPES)}")
    unsupported = [name for name, on in (("parallel_block", cfg.parallel_block), ("attention_bias", cfg.attention_bias),
                                         ("sliding_window", cfg.sliding_window is not None),
                                         ("rope_scaling", cfg.rope_scaling is not None)) if on]
    if unsupported:
        raise GGUFExportError(f"llama.cpp's llama architecture cannot express {', '.join(unsupported)}; "
                              "export to HF format instead")


def _tokenizer(tokenizer_dir: Path, vocab_size: int) -> dict:
    file = tokenizer_dir / "tokenizer.json"
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise GGUFExportError(f"{tokenizer_dir}: no tokenizer.json to export") from None
    except (OSError, json.JSONDecodeError) as e:
        raise GGUFExportError(f"{file}: unreadable ({e})") from None
    model = data.get("model") or {}
    if model.get("type") != "BPE":
        raise GGUFExportError(f"{file}: GGUF export takes byte-level BPE tokenizers, got {model.get('type')!r}")
    vocab = dict(model.get("vocab") or {})
    special = {t["content"]: t["id"] for t in data.get("added_tokens") or []}
    vocab.update(special)
    if max(vocab.values(), default=-1) >= vocab_size:
        raise GGUFExportError(f"{file}: token id {max(vocab.values())} does not fit the model's vocabulary "
                              f"of {vocab_size}")
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [5] * vocab_size  # gguf.TokenType: 1 normal, 3 control, 5 unused
    for text, i in vocab.items():
        tokens[i], types[i] = text, 3 if text in special else 1
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    ids = {kind: next((special[t] for t in names if t in special), None) for kind, names in SPECIAL.items()}
    template = None
    if (tokenizer_dir / "chat_template.jinja").is_file():
        template = (tokenizer_dir / "chat_template.jinja").read_text(encoding="utf-8")
    elif (tokenizer_dir / "tokenizer_config.json").is_file():
        config = json.loads((tokenizer_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
        template = config.get("chat_template") if isinstance(config.get("chat_template"), str) else None
    return {"tokens": tokens, "types": types, "merges": merges, "ids": ids, "template": template}


def export_gguf(model: nn.Module, tokenizer_dir: str | os.PathLike | None, path: str | os.PathLike, *,
                outtype: str = "f32", name: str | None = None) -> Path:
    """Write `model` (and the tokenizer in `tokenizer_dir`, if given) as a GGUF file, atomically."""
    import gguf

    _check(model, outtype)
    cfg = model.config
    path = Path(path)
    tok = _tokenizer(Path(tokenizer_dir), cfg.vocab_size) if tokenizer_dir is not None else None
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[outtype]
    with atomic_path(path) as tmp:
        writer = gguf.GGUFWriter(str(tmp), "llama")
        writer.add_name(name or path.stem)
        writer.add_context_length(cfg.max_seq_len)
        writer.add_embedding_length(cfg.dim)
        writer.add_block_count(cfg.n_layers)
        writer.add_feed_forward_length(cfg.hidden_dim)
        writer.add_head_count(cfg.n_heads)
        writer.add_head_count_kv(cfg.n_kv_heads)
        writer.add_rope_dimension_count(cfg.head_dim)
        writer.add_rope_freq_base(cfg.rope_theta)
        writer.add_layer_norm_rms_eps(cfg.norm_eps)
        writer.add_key_length(cfg.head_dim)
        writer.add_value_length(cfg.head_dim)
        writer.add_vocab_size(cfg.vocab_size)
        writer.add_file_type(file_type)
        if tok is not None:
            writer.add_tokenizer_model("gpt2")
            writer.add_tokenizer_pre("gpt-2")
            writer.add_token_list(tok["tokens"])
            writer.add_token_types(tok["types"])
            writer.add_token_merges(tok["merges"])
            for kind, add in (("bos", writer.add_bos_token_id), ("eos", writer.add_eos_token_id),
                              ("pad", writer.add_pad_token_id)):
                if tok["ids"][kind] is not None:
                    add(tok["ids"][kind])
            writer.add_add_bos_token(False)
            if tok["template"]:
                writer.add_chat_template(tok["template"])
        for gguf_name, tensor in _tensors(model):
            data = tensor.detach().float().cpu().numpy()
            if data.ndim == 1 or outtype == "f32":
                writer.add_tensor(gguf_name, data.astype(np.float32))
            elif outtype == "q8_0" and data.shape[-1] % 32 == 0:
                packed = gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q8_0)
                writer.add_tensor(gguf_name, packed, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
            else:
                writer.add_tensor(gguf_name, data.astype(np.float16))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return path


def _tensors(model: nn.Module):
    """(GGUF name, tensor) in llama.cpp's order, q and k permuted to its rotary layout."""
    cfg = model.config
    yield "token_embd.weight", model.embed_tokens.weight
    for i, layer in enumerate(model.layers):
        attn, mlp = layer.attn, layer.mlp
        yield f"blk.{i}.attn_norm.weight", layer.attn_norm.weight
        yield f"blk.{i}.attn_q.weight", permute_rotary(attn.q_proj.weight, cfg.n_heads)
        yield f"blk.{i}.attn_k.weight", permute_rotary(attn.k_proj.weight, cfg.n_kv_heads)
        yield f"blk.{i}.attn_v.weight", attn.v_proj.weight
        yield f"blk.{i}.attn_output.weight", attn.o_proj.weight
        yield f"blk.{i}.ffn_norm.weight", layer.mlp_norm.weight
        yield f"blk.{i}.ffn_gate.weight", mlp.gate_proj.weight
        yield f"blk.{i}.ffn_up.weight", mlp.up_proj.weight
        yield f"blk.{i}.ffn_down.weight", mlp.down_proj.weight
    yield "output_norm.weight", model.norm.weight
    if not cfg.tie_embeddings:
        yield "output.weight", model.lm_head.weight
