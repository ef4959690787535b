"""GGUF export, read back with the `gguf` package's reader.

Checked against references written here from llama.cpp's sources: the converter's q/k `permute`, its
llama3 `rope_freqs` rule, and a NumPy forward pass that computes what llama.cpp's llama graph computes
from the file (interleaved rotary, grouped-query attention, RMSNorm, SwiGLU). Also: every tensor's
name, shape and type; F16 and Q8_0 within their rounding; metadata and tokenizer keys; errors;
atomic writes.
"""

from __future__ import annotations

import json
import shutil

import gguf
import numpy as np
import pytest
import torch

from llmlab.cli import main
from llmlab.models import GPTConfig, LlamaConfig, build_model
from llmlab.models.gguf import OUTTYPES, GGUFExportError, export_gguf, permute_rotary, unpermute_rotary
from llmlab.models.io import save_model
from llmlab.models.layers import RopeScaling
from llmlab.models.moe import MoEConfig
from llmlab.peft import LoraConfig, apply_lora
from llmlab.tokenizer import load_tokenizer, train_bpe

SHAPE = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=128, max_seq_len=64)
TEMPLATE = "{% for m in messages %}{{ m.content }}{% endfor %}"


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tok")
    train_bpe([f"hello world {i}, the answer is {i * 3}." for i in range(300)], 300).save(folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": TEMPLATE}))
    return folder


@pytest.fixture(scope="module")
def vocab_size(tokenizer_dir) -> int:
    return load_tokenizer(tokenizer_dir).vocab_size


def _model(vocab_size: int, **overrides) -> torch.nn.Module:
    """A tiny LLaMA with random norm weights too, so that a swapped norm would show."""
    torch.manual_seed(0)
    model = build_model(LlamaConfig(vocab_size=vocab_size, **{**SHAPE, **overrides})).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.uniform_(0.5, 1.5)
    return model


def _llama_cpp_permute(weights: np.ndarray, n_head: int, n_head_kv: int | None) -> np.ndarray:
    # llama.cpp convert_hf_to_gguf.py, LlamaModel.permute, verbatim
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2)
            .reshape(weights.shape))


def _expected(model) -> dict[str, np.ndarray]:
    """GGUF name -> the tensor llama.cpp's converter would write for the HF-layout weights of `model`."""
    cfg = model.config

    def np_(t):
        return t.detach().float().numpy()

    out = {"token_embd.weight": np_(model.embed_tokens.weight), "output_norm.weight": np_(model.norm.weight)}
    if not cfg.tie_embeddings:
        out["output.weight"] = np_(model.lm_head.weight)
    for i, layer in enumerate(model.layers):
        attn, mlp = layer.attn, layer.mlp
        out.update({f"blk.{i}.attn_norm.weight": np_(layer.attn_norm.weight),
                    f"blk.{i}.attn_q.weight": _llama_cpp_permute(np_(attn.q_proj.weight), cfg.n_heads, cfg.n_heads),
                    f"blk.{i}.attn_k.weight": _llama_cpp_permute(np_(attn.k_proj.weight), cfg.n_heads,
                                                                 cfg.n_kv_heads),
                    f"blk.{i}.attn_v.weight": np_(attn.v_proj.weight),
                    f"blk.{i}.attn_output.weight": np_(attn.o_proj.weight),
                    f"blk.{i}.ffn_norm.weight": np_(layer.mlp_norm.weight)})
        if cfg.moe is None:
            out.update({f"blk.{i}.ffn_gate.weight": np_(mlp.gate_proj.weight),
                        f"blk.{i}.ffn_up.weight": np_(mlp.up_proj.weight),
                        f"blk.{i}.ffn_down.weight": np_(mlp.down_proj.weight)})
        else:  # the converter's Mixtral: w1, w3 and w2 of every expert stacked
            h = mlp.experts.down_proj.in_features
            out.update({f"blk.{i}.ffn_gate_inp.weight": np_(mlp.router.weight),
                        f"blk.{i}.ffn_gate_exps.weight": np_(mlp.experts.gate_up_proj.weight[:, :h]),
                        f"blk.{i}.ffn_up_exps.weight": np_(mlp.experts.gate_up_proj.weight[:, h:]),
                        f"blk.{i}.ffn_down_exps.weight": np_(mlp.experts.down_proj.weight)})
    return out


def _read(path) -> dict[str, tuple[np.ndarray, str]]:
    """GGUF name -> (values as float32 in NumPy's (rows, cols) order, GGML type name)."""
    out = {}
    for t in gguf.GGUFReader(path).tensors:
        data = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type)
        shape = [int(n) for n in reversed(t.shape)]  # the file lists ggml's ne: innermost first
        out[t.name] = (data.astype(np.float32).reshape(shape), t.tensor_type.name)
    return out


def _fields(path) -> dict:
    return {k: f.contents() for k, f in gguf.GGUFReader(path).fields.items()}


# --------------------------------------------------------------------------- tensors


@pytest.mark.parametrize("tied", [False, True])
def test_f32_tensors_are_the_model_in_llama_cpps_layout(tokenizer_dir, vocab_size, tmp_path, tied):
    model = _model(vocab_size, tie_embeddings=tied)
    export_gguf(model, tokenizer_dir, tmp_path / "m.gguf", outtype="f32")
    got, expected = _read(tmp_path / "m.gguf"), _expected(model)
    assert sorted(got) == sorted(expected) and len(got) == 2 + 9 * 2 + (not tied)
    assert ("output.weight" in got) is not tied  # tied: llama.cpp reuses token_embd
    for name, want in expected.items():
        data, kind = got[name]
        assert kind == "F32" and data.shape == want.shape and np.array_equal(data, want), name


def test_undoing_the_permutation_gives_back_the_weights(vocab_size, tmp_path):
    model = _model(vocab_size)
    export_gguf(model, None, tmp_path / "m.gguf")
    got = _read(tmp_path / "m.gguf")
    for i, layer in enumerate(model.layers):
        q, k = (torch.from_numpy(got[f"blk.{i}.attn_{x}.weight"][0]) for x in "qk")
        assert not torch.equal(q, layer.attn.q_proj.weight)  # permuted in the file ...
        assert torch.equal(unpermute_rotary(q, 4), layer.attn.q_proj.weight)  # ... and exactly undone
        assert torch.equal(unpermute_rotary(k, 2), layer.attn.k_proj.weight)
    w = torch.arange(8 * 3, dtype=torch.float32).reshape(8, 3)  # 2 heads of 4 rows, halves (0, 1 | 2, 3)
    assert permute_rotary(w, 2)[:4, 0].tolist() == [0, 6, 3, 9]  # rows 0, 2, 1, 3: pairs interleaved


def test_interleaved_rotary_of_permuted_rows_is_llmlabs_rotary_permuted():
    """llama.cpp's llama rotates (x_2i, x_2i+1) (ggml rope, normal mode); llmlab rotates (x_i, x_i+d/2)."""
    from llmlab.models.layers import RotaryEmbedding, apply_rotary

    torch.manual_seed(0)
    n_heads, head_dim, T = 3, 8, 5
    x = torch.randn(1, n_heads, T, head_dim, dtype=torch.float64)
    cos, sin = RotaryEmbedding(head_dim, 10000.0)(torch.arange(T)[None], torch.float64)
    ours = apply_rotary(x, cos, sin)
    angles = torch.arange(T, dtype=torch.float64)[:, None] * 10000.0 ** (-torch.arange(0, head_dim, 2) / head_dim)
    rows = permute_rotary(x[0].transpose(0, 1).reshape(T, -1).T, n_heads).T.reshape(T, n_heads, head_dim)
    x0, x1 = rows[..., 0::2], rows[..., 1::2]
    c, s = angles.cos()[:, None], angles.sin()[:, None]
    theirs = torch.stack((x0 * c - x1 * s, x0 * s + x1 * c), dim=-1).reshape(T, n_heads, head_dim)
    want = permute_rotary(ours[0].transpose(0, 1).reshape(T, -1).T, n_heads).T.reshape(T, n_heads, head_dim)
    assert torch.allclose(theirs, want, atol=1e-12)


def _llama_cpp_forward(path, ids: list[int]) -> np.ndarray:
    """Logits of llama.cpp's llama graph for the GGUF file at `path`, in float64 NumPy."""
    meta, w = _fields(path), {k: v.astype(np.float64) for k, (v, _) in _read(path).items()}
    n_head, n_kv = meta["llama.attention.head_count"], meta["llama.attention.head_count_kv"]
    hd, n_rot, eps = meta["llama.attention.key_length"], meta["llama.rope.dimension_count"], \
        meta["llama.attention.layer_norm_rms_epsilon"]
    freq_scale = 1.0 / meta.get("llama.rope.scaling.factor", 1.0)
    factors = w.get("rope_freqs.weight", np.ones(n_rot // 2))
    T = len(ids)
    theta = (np.arange(T)[:, None] * freq_scale * meta["llama.rope.freq_base"] ** (-np.arange(0, n_rot, 2) / n_rot)
             / factors)  # (T, n_rot/2)

    def rope(v):  # (T, heads, hd): ggml rope, normal mode, rotates adjacent pairs
        c, s = np.cos(theta)[:, None], np.sin(theta)[:, None]
        out = np.empty_like(v)
        out[..., 0::2] = v[..., 0::2] * c - v[..., 1::2] * s
        out[..., 1::2] = v[..., 0::2] * s + v[..., 1::2] * c
        return out

    def rms(v, g):
        return v / np.sqrt((v ** 2).mean(-1, keepdims=True) + eps) * g

    x = w["token_embd.weight"][ids]
    causal = np.triu(np.full((T, T), -np.inf), 1)
    for i in range(meta["llama.block_count"]):
        h = rms(x, w[f"blk.{i}.attn_norm.weight"])
        q = rope((h @ w[f"blk.{i}.attn_q.weight"].T).reshape(T, n_head, hd))
        k = np.repeat(rope((h @ w[f"blk.{i}.attn_k.weight"].T).reshape(T, n_kv, hd)), n_head // n_kv, axis=1)
        v = np.repeat((h @ w[f"blk.{i}.attn_v.weight"].T).reshape(T, n_kv, hd), n_head // n_kv, axis=1)
        scores = np.einsum("thd,shd->hts", q, k) / np.sqrt(hd) + causal
        att = np.exp(scores - scores.max(-1, keepdims=True))
        att /= att.sum(-1, keepdims=True)
        x = x + np.einsum("hts,shd->thd", att, v).reshape(T, -1) @ w[f"blk.{i}.attn_output.weight"].T
        h = rms(x, w[f"blk.{i}.ffn_norm.weight"])
        if f"blk.{i}.ffn_gate_inp.weight" in w:  # build_moe_ffn: softmax gating, top k, weights renormalised
            logits = h @ w[f"blk.{i}.ffn_gate_inp.weight"].T
            probs = np.exp(logits - logits.max(-1, keepdims=True))
            probs /= probs.sum(-1, keepdims=True)
            chosen = np.argsort(-probs, axis=-1, kind="stable")[:, :meta["llama.expert_used_count"]]
            weights = np.take_along_axis(probs, chosen, -1)
            weights /= weights.sum(-1, keepdims=True)
            out = np.zeros_like(x)
            for t in range(T):
                for e, g in zip(chosen[t], weights[t]):
                    gate, up = w[f"blk.{i}.ffn_gate_exps.weight"][e] @ h[t], w[f"blk.{i}.ffn_up_exps.weight"][e] @ h[t]
                    out[t] += g * w[f"blk.{i}.ffn_down_exps.weight"][e] @ (gate / (1 + np.exp(-gate)) * up)
            x = x + out
            continue
        gate, up = h @ w[f"blk.{i}.ffn_gate.weight"].T, h @ w[f"blk.{i}.ffn_up.weight"].T
        x = x + (gate / (1 + np.exp(-gate)) * up) @ w[f"blk.{i}.ffn_down.weight"].T
    return rms(x, w["output_norm.weight"]) @ w.get("output.weight", w["token_embd.weight"]).T


@pytest.mark.parametrize("overrides", [
    {}, {"tie_embeddings": True}, {"head_dim": 32}, {"n_kv_heads": 1},
    {"rope_scaling": RopeScaling("linear", 4.0)},
    {"rope_scaling": RopeScaling("llama3", 8.0, original_max_position_embeddings=64)},
    {"moe": MoEConfig(n_experts=4, top_k=2, hidden_dim=96)},
], ids=["untied", "tied", "wide-heads", "multi-query", "rope-linear", "rope-llama3", "mixtral"])
def test_llama_cpps_forward_of_the_file_matches_the_model(vocab_size, tmp_path, overrides):
    model = _model(vocab_size, **overrides)
    export_gguf(model, None, tmp_path / "m.gguf")
    ids = [5, 17, 200, 3, 99, 42, 7, 150, 11, 64, 1, 250]
    with torch.no_grad():
        want = model(torch.tensor([ids]))[0].double().numpy()
    np.testing.assert_allclose(_llama_cpp_forward(tmp_path / "m.gguf", ids), want, rtol=1e-4, atol=1e-5)


def test_llama3_rope_freqs_follow_llama_cpps_converter(vocab_size, tmp_path):
    import math

    scaling = RopeScaling("llama3", 8.0, original_max_position_embeddings=64, low_freq_factor=1.0,
                          high_freq_factor=4.0)
    export_gguf(_model(vocab_size, rope_scaling=scaling), None, tmp_path / "m.gguf")
    got, kind = _read(tmp_path / "m.gguf")["rope_freqs.weight"]
    # llama.cpp convert_hf_to_gguf.py, LlamaModel.generate_extra_tensors
    freqs = 1.0 / (10000.0 ** (torch.arange(0, 16, 2, dtype=torch.float32) / 16))
    low_wavelen, high_wavelen = 64 / 1.0, 64 / 4.0
    want = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            want.append(1)
        elif wavelen > low_wavelen:
            want.append(8.0)
        else:
            smooth = (64 / wavelen - 1.0) / (4.0 - 1.0)
            want.append(1 / ((1 - smooth) / 8.0 + smooth))
    assert kind == "F32" and len(set(np.round(want, 3))) >= 3  # all three regimes occur
    np.testing.assert_allclose(got, np.array(want, dtype=np.float32), rtol=1e-6)


def test_f16_is_the_model_rounded_to_half_precision(vocab_size, tmp_path):
    model = _model(vocab_size)
    expected = _expected(model)
    export_gguf(model, None, tmp_path / "h.gguf", outtype="f16")
    got = _read(tmp_path / "h.gguf")
    assert sorted(got) == sorted(expected)
    for name, (data, kind) in got.items():
        want = expected[name]
        assert kind == ("F32" if want.ndim == 1 else "F16") and data.shape == want.shape, name
        rounded = want if want.ndim == 1 else want.astype(np.float16).astype(np.float32)
        assert np.array_equal(data, rounded), name
        assert (np.abs(data - want) <= np.abs(want) * 2**-11 + 2**-25).all(), name  # half an fp16 ulp


@pytest.mark.parametrize("overrides", [{}, {"moe": MoEConfig(n_experts=4)}], ids=["dense", "mixtral"])
def test_q8_0_is_within_its_block_error(vocab_size, tmp_path, overrides):
    model = _model(vocab_size, **overrides)
    expected = _expected(model)
    export_gguf(model, None, tmp_path / "q.gguf", outtype="q8_0")
    got = _read(tmp_path / "q.gguf")
    assert sorted(got) == sorted(expected)
    for name, (data, kind) in got.items():
        want = expected[name]
        assert data.shape == want.shape, name
        if want.ndim == 1:
            assert kind == "F32" and np.array_equal(data, want), name
            continue
        assert kind == "Q8_0", name
        # per block of 32: q = round(x / d) with d = absmax / 127, stored as fp16 d16; so
        # |q d16 - x| <= d / 2 + 127 |d16 - d| (plus float32 arithmetic)
        blocks, err = want.reshape(-1, 32), np.abs(data - want).reshape(-1, 32)
        absmax = np.abs(blocks).max(axis=1, keepdims=True)
        d = absmax / 127
        d16 = d.astype(np.float16).astype(np.float32)
        assert (err <= d / 2 + 127 * np.abs(d16 - d) + absmax * 2**-20).all(), name
        assert err.max() > 0  # really quantized


def test_q8_0_falls_back_to_f16_for_rows_not_a_multiple_of_32(vocab_size, tmp_path):
    model = _model(vocab_size, dim=48, n_heads=4, n_kv_heads=2, hidden_dim=96)  # rows of 48 or 96
    export_gguf(model, None, tmp_path / "q.gguf", outtype="q8_0")
    kinds = {name: (data.shape, kind) for name, (data, kind) in _read(tmp_path / "q.gguf").items()}
    matrices = {name: kind for name, (shape, kind) in kinds.items() if len(shape) == 2}
    for name, (shape, kind) in kinds.items():
        assert kind == ("F32" if len(shape) == 1 else "Q8_0" if shape[-1] % 32 == 0 else "F16"), name
    assert set(matrices.values()) == {"Q8_0", "F16"} and matrices["blk.0.ffn_down.weight"] == "Q8_0"


# --------------------------------------------------------------------------- metadata and tokenizer


@pytest.mark.parametrize("outtype,file_type", [("f32", 0), ("f16", 1), ("q8_0", 7)])
def test_model_metadata(vocab_size, tmp_path, outtype, file_type):
    export_gguf(_model(vocab_size, norm_eps=1e-6, rope_theta=500000.0), None, tmp_path / "tiny.gguf",
                outtype=outtype)
    meta = _fields(tmp_path / "tiny.gguf")
    assert meta["general.architecture"] == "llama" and meta["general.name"] == "tiny"
    assert (meta["general.file_type"], meta["general.quantization_version"]) == (file_type, 2)
    assert {k: meta[f"llama.{k}"] for k in ("vocab_size", "context_length", "embedding_length", "block_count",
                                              "feed_forward_length", "attention.head_count",
                                              "attention.head_count_kv", "attention.key_length",
                                              "attention.value_length", "rope.dimension_count")} == {
        "vocab_size": vocab_size, "context_length": 64, "embedding_length": 64, "block_count": 2,
        "feed_forward_length": 128, "attention.head_count": 4, "attention.head_count_kv": 2,
        "attention.key_length": 16, "attention.value_length": 16, "rope.dimension_count": 16}
    assert meta["llama.rope.freq_base"] == 500000.0
    assert meta["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-6, rel=1e-6)
    assert not any(k.startswith(("tokenizer.", "llama.rope.scaling")) for k in meta)  # none asked for


def test_mixtral_metadata_and_tensors(vocab_size, tmp_path):
    model = _model(vocab_size, moe=MoEConfig(n_experts=4, top_k=2, hidden_dim=96))
    export_gguf(model, None, tmp_path / "m.gguf")
    meta = _fields(tmp_path / "m.gguf")
    assert meta["llama.expert_count"] == 4 and meta["llama.expert_used_count"] == 2
    assert meta["llama.feed_forward_length"] == 96  # the experts' width
    got = _read(tmp_path / "m.gguf")
    assert sorted(got) == sorted(_expected(model)) and "blk.0.ffn_gate.weight" not in got
    assert got["blk.1.ffn_gate_exps.weight"][0].shape == (4, 96, 64)  # ggml ne [64, 96, 4]
    assert got["blk.1.ffn_down_exps.weight"][0].shape == (4, 64, 96)
    assert got["blk.1.ffn_gate_inp.weight"][0].shape == (4, 64)


def test_linear_rope_scaling_metadata(vocab_size, tmp_path):
    export_gguf(_model(vocab_size, rope_scaling=RopeScaling("linear", 4.0)), None, tmp_path / "m.gguf")
    meta = _fields(tmp_path / "m.gguf")
    assert (meta["llama.rope.scaling.type"], meta["llama.rope.scaling.factor"]) == ("linear", 4.0)


def test_tokenizer_metadata(tokenizer_dir, vocab_size, tmp_path):
    tok = load_tokenizer(tokenizer_dir)
    export_gguf(_model(vocab_size + 5), tokenizer_dir, tmp_path / "m.gguf")  # the model's table is larger
    meta = _fields(tmp_path / "m.gguf")
    assert (meta["tokenizer.ggml.model"], meta["tokenizer.ggml.pre"]) == ("gpt2", "gpt-2")
    in_order = [t for t, _ in sorted(tok.backend.get_vocab(with_added_tokens=True).items(), key=lambda kv: kv[1])]
    assert meta["tokenizer.ggml.tokens"] == in_order + [f"[PAD{i}]" for i in range(vocab_size, vocab_size + 5)]
    types = meta["tokenizer.ggml.token_type"]
    specials = {tok.token_to_id(t) for t in ("<|bos|>", "<|eos|>", "<|pad|>", "<|end|>", "<|user|>")}
    assert {types[i] for i in specials} == {gguf.TokenType.CONTROL}
    assert types[tok.token_to_id("a")] == types[vocab_size - 1] == gguf.TokenType.NORMAL
    assert types[vocab_size:] == [gguf.TokenType.UNUSED] * 5
    merges = json.loads((tokenizer_dir / "tokenizer.json").read_text())["model"]["merges"]
    assert meta["tokenizer.ggml.merges"] == [m if isinstance(m, str) else " ".join(m) for m in merges] != []
    assert (meta["tokenizer.ggml.bos_token_id"], meta["tokenizer.ggml.eos_token_id"],
            meta["tokenizer.ggml.padding_token_id"]) == (tok.bos_id, tok.eos_id, tok.pad_id)
    assert meta["tokenizer.ggml.add_bos_token"] is False and meta["tokenizer.ggml.add_eos_token"] is False
    assert meta["tokenizer.chat_template"] == TEMPLATE


def test_special_ids_follow_tokenizer_config_else_llmlabs_names(tokenizer_dir, vocab_size, tmp_path):
    tok = load_tokenizer(tokenizer_dir)
    folder = tmp_path / "tok"
    shutil.copytree(tokenizer_dir, folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "eos_token": {"content": "<|end|>"},
                                                              "pad_token": None}))
    (folder / "chat_template.jinja").write_text("from the jinja file")
    export_gguf(_model(vocab_size), folder, tmp_path / "a.gguf", add_bos=True)
    meta = _fields(tmp_path / "a.gguf")
    assert meta["tokenizer.ggml.eos_token_id"] == tok.token_to_id("<|end|>")
    assert "tokenizer.ggml.padding_token_id" not in meta  # named null
    assert meta["tokenizer.ggml.add_bos_token"] is True
    assert meta["tokenizer.chat_template"] == "from the jinja file"  # it wins over the config's
    (folder / "tokenizer_config.json").unlink()
    (folder / "chat_template.jinja").unlink()
    export_gguf(_model(vocab_size), folder, tmp_path / "b.gguf")
    meta = _fields(tmp_path / "b.gguf")
    assert (meta["tokenizer.ggml.bos_token_id"], meta["tokenizer.ggml.eos_token_id"],
            meta["tokenizer.ggml.padding_token_id"]) == (tok.bos_id, tok.eos_id, tok.pad_id)
    assert "tokenizer.chat_template" not in meta


# --------------------------------------------------------------------------- errors and atomicity


def test_what_llama_cpps_llama_cannot_express_is_refused(vocab_size, tmp_path):
    cases = [(build_model(GPTConfig(vocab_size=300, dim=32, n_layers=1, n_heads=4)), "GPT family is out of scope"),
             (_model(vocab_size, parallel_block=True), "parallel_block"),
             (_model(vocab_size, attention_bias=True), "attention_bias"),
             (_model(vocab_size, sliding_window=16), "sliding_window=16"),
             (_model(vocab_size, rope_scaling=RopeScaling("dynamic", 2.0)), "rope scaling 'dynamic'"),
             (_model(vocab_size, rope_scaling=RopeScaling("yarn", 2.0)), "rope scaling 'yarn'"),
             (_model(vocab_size, moe=MoEConfig(every=2)), "moe.every=2 .*every block or in none"),
             (_model(vocab_size, moe=MoEConfig(capacity_factor=1.25)), "moe.capacity_factor=1.25"),
             (_model(vocab_size, moe=MoEConfig(top_k=1, normalize="all")), "moe.normalize='all'")]
    for model, message in cases:
        with pytest.raises(GGUFExportError, match=message):
            export_gguf(model, None, tmp_path / "m.gguf")
    lora = _model(vocab_size)
    apply_lora(lora, LoraConfig(r=2))
    with pytest.raises(GGUFExportError, match="LoRALinear.*merge LoRA adapters"):
        export_gguf(lora, None, tmp_path / "m.gguf")
    with pytest.raises(GGUFExportError, match="q4_k.*" + ", ".join(OUTTYPES)):
        export_gguf(_model(vocab_size), None, tmp_path / "m.gguf", outtype="q4_k")
    big = _model(vocab_size)
    with torch.no_grad():
        big.layers[0].mlp.up_proj.weight[0, 0] = 1e5
    with pytest.raises(GGUFExportError, match="ffn_up.*float16's range"):
        export_gguf(big, None, tmp_path / "m.gguf", outtype="f16")
    assert list(tmp_path.iterdir()) == []


def test_tokenizer_problems_are_named(tokenizer_dir, vocab_size, tmp_path):
    with pytest.raises(GGUFExportError, match="no tokenizer.json"):
        export_gguf(_model(vocab_size), tmp_path, tmp_path / "m.gguf")
    with pytest.raises(GGUFExportError, match=f"id {vocab_size - 1} does not fit .* {vocab_size - 1} rows"):
        export_gguf(_model(vocab_size - 1), tokenizer_dir, tmp_path / "m.gguf")
    with pytest.raises(GGUFExportError, match="add_bos=True needs a tokenizer"):
        export_gguf(_model(vocab_size), None, tmp_path / "m.gguf", add_bos=True)
    folder = tmp_path / "tok"
    shutil.copytree(tokenizer_dir, folder)
    spec = json.loads((folder / "tokenizer.json").read_text())
    (folder / "tokenizer.json").write_text(json.dumps({**spec, "pre_tokenizer": {"type": "Whitespace"}}))
    with pytest.raises(GGUFExportError, match="pre-tokenizer 'Whitespace'"):
        export_gguf(_model(vocab_size), folder, tmp_path / "m.gguf")
    (folder / "tokenizer.json").write_text("{not json")
    with pytest.raises(GGUFExportError, match="tokenizer.json: unreadable"):
        export_gguf(_model(vocab_size), folder, tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists()


@pytest.mark.parametrize("change, message", [
    ({"model": ["BPE"]}, "model must be a JSON object"),
    ({"added_tokens": [{"id": "0", "content": "<|bos|>"}]}, "added_tokens must be a list of"),
    ({"added_tokens": "none"}, "added_tokens must be a list of"),
    ({"model.vocab": {"a": -1}}, "model.vocab must map each token to an id >= 0"),
    ({"model.vocab": ["a"]}, "model.vocab must map each token to an id >= 0"),
    ({"model.merges": [["a", "b", "c"]]}, "model.merges must be a list of"),
    ({"model.merges": 5}, "model.merges must be a list of"),
    ({"pre_tokenizer": {"type": "Sequence", "pretokenizers": 5}}, "GGUF export takes byte-level BPE"),
    ({"pre_tokenizer": "ByteLevel"}, "GGUF export takes byte-level BPE"),
])
def test_a_malformed_tokenizer_json_is_named(tokenizer_dir, vocab_size, tmp_path, change, message):
    folder = tmp_path / "tok"
    shutil.copytree(tokenizer_dir, folder)
    spec = json.loads((folder / "tokenizer.json").read_text())
    for key, value in change.items():
        if key.startswith("model."):
            spec["model"][key.removeprefix("model.")] = value
        else:
            spec[key] = value
    (folder / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(GGUFExportError, match=f"tokenizer.json: {message}" if "must" in message else message):
        export_gguf(_model(vocab_size), folder, tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists()


def test_a_bad_chat_template_or_config_is_named(tokenizer_dir, vocab_size, tmp_path):
    folder = tmp_path / "tok"
    shutil.copytree(tokenizer_dir, folder)
    (folder / "tokenizer_config.json").write_text(json.dumps({"chat_template": [{"name": 1}]}))
    with pytest.raises(GGUFExportError, match="tokenizer_config.json: chat_template must be"):
        export_gguf(_model(vocab_size), folder, tmp_path / "m.gguf")
    (folder / "tokenizer_config.json").write_text("[" * 100_000)
    with pytest.raises(GGUFExportError, match="tokenizer_config.json: unreadable: nested too deeply"):
        export_gguf(_model(vocab_size), folder, tmp_path / "m.gguf")
    (folder / "tokenizer_config.json").unlink()
    (folder / "chat_template.jinja").write_bytes(b"\xff\xfe{{ x }}")
    with pytest.raises(GGUFExportError, match="chat_template.jinja: unreadable"):
        export_gguf(_model(vocab_size), folder, tmp_path / "m.gguf")


@pytest.mark.parametrize("value, outtype, message", [
    (float("nan"), "f32", "blk.0.ffn_up.weight holds NaN or infinite values"),
    (float("inf"), "f16", "blk.0.ffn_up.weight holds NaN or infinite values"),
    (1e10, "q8_0", "blk.0.ffn_up.weight has values beyond q8_0's range"),
])
def test_weights_a_type_cannot_hold_are_refused(vocab_size, tmp_path, value, outtype, message):
    model = _model(vocab_size)
    with torch.no_grad():
        model.layers[0].mlp.up_proj.weight[0, 0] = value
    with pytest.raises(GGUFExportError, match=message):
        export_gguf(model, None, tmp_path / "m.gguf", outtype=outtype)
    assert list(tmp_path.iterdir()) == []


def test_a_failure_mid_write_leaves_the_old_file_and_no_temporary(tokenizer_dir, vocab_size, tmp_path, monkeypatch):
    target = tmp_path / "m.gguf"
    target.write_bytes(b"old")
    written = []
    real = gguf.GGUFWriter.write_tensor_data

    def fail_on_the_third(self, tensor, *args, **kwargs):
        if len(written) == 2:
            raise OSError("disk full")
        written.append(tensor.nbytes)
        return real(self, tensor, *args, **kwargs)

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensor_data", fail_on_the_third)
    with pytest.raises(OSError, match="disk full"):
        export_gguf(_model(vocab_size), tokenizer_dir, target)
    assert len(written) == 2  # it failed part-way through the tensors
    assert [p.name for p in tmp_path.iterdir()] == ["m.gguf"] and target.read_bytes() == b"old"
    monkeypatch.undo()
    assert export_gguf(_model(vocab_size), tokenizer_dir, target) == target
    assert [p.name for p in tmp_path.iterdir()] == ["m.gguf"] and len(gguf.GGUFReader(target).tensors) == 21


def test_convert_to_gguf_from_the_command_line(tokenizer_dir, vocab_size, tmp_path):
    save_model(_model(vocab_size), tmp_path / "ckpt")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_dir / name, tmp_path / "ckpt" / name)
    assert main(["convert", str(tmp_path / "ckpt"), "--to", "gguf", "--outtype", "q8_0",
                 "--out", str(tmp_path / "m.gguf")]) == 0
    reader = gguf.GGUFReader(tmp_path / "m.gguf")
    assert {t.tensor_type.name for t in reader.tensors} == {"F32", "Q8_0"}
    assert reader.fields["tokenizer.ggml.tokens"].contents()[:3] == ["<|bos|>", "<|eos|>", "<|pad|>"]
