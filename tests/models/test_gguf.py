"""GGUF export, read back with the `gguf` package's reader: every tensor equal (F32) or within its
type's rounding (F16, Q8_0), llama.cpp's rotary layout, metadata and tokenizer, errors, atomicity."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from llmlab.cli import main
from llmlab.models import GPTConfig, LlamaConfig, build_model
from llmlab.models.io import save_model
from llmlab.tokenizer import load_tokenizer, train_bpe

gguf = pytest.importorskip("gguf")
from llmlab.models.gguf import GGUFExportError, export_gguf, permute_rotary, unpermute_rotary  # noqa: E402

CFG = dict(vocab_size=300, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=128, max_seq_len=64)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tok")
    train_bpe([f"hello world {i}, the answer is {i * 3}." for i in range(300)], 300).save(folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["chat_template"] = "{% for m in messages %}{{ m.content }}{% endfor %}"
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def _model(tied=False):
    torch.manual_seed(0)
    return build_model(LlamaConfig(**CFG, tie_embeddings=tied)).eval()


def _expected(model) -> dict[str, torch.Tensor]:
    cfg = model.config
    out = {"token_embd.weight": model.embed_tokens.weight, "output_norm.weight": model.norm.weight}
    if not cfg.tie_embeddings:
        out["output.weight"] = model.lm_head.weight
    for i, layer in enumerate(model.layers):
        out.update({f"blk.{i}.attn_norm.weight": layer.attn_norm.weight,
                    f"blk.{i}.attn_q.weight": permute_rotary(layer.attn.q_proj.weight, cfg.n_heads),
                    f"blk.{i}.attn_k.weight": permute_rotary(layer.attn.k_proj.weight, cfg.n_kv_heads),
                    f"blk.{i}.attn_v.weight": layer.attn.v_proj.weight,
                    f"blk.{i}.attn_output.weight": layer.attn.o_proj.weight,
                    f"blk.{i}.ffn_norm.weight": layer.mlp_norm.weight,
                    f"blk.{i}.ffn_gate.weight": layer.mlp.gate_proj.weight,
                    f"blk.{i}.ffn_up.weight": layer.mlp.up_proj.weight,
                    f"blk.{i}.ffn_down.weight": layer.mlp.down_proj.weight})
    return {k: v.detach().float().numpy() for k, v in out.items()}


def _read(path) -> dict[str, np.ndarray]:
    reader = gguf.GGUFReader(path)
    out = {}
    for t in reader.tensors:
        data = np.asarray(t.data)
        if t.tensor_type == gguf.GGMLQuantizationType.Q8_0:
            data = gguf.quants.dequantize(data, t.tensor_type)
        out[t.name] = (data.astype(np.float32).reshape([int(n) for n in reversed(t.shape)]), t.tensor_type.name)
    return out


@pytest.mark.parametrize("tied", [False, True])
def test_f32_tensors_equal_the_model_in_llama_cpp_layout(tokenizer_dir, tmp_path, tied):
    model = _model(tied)
    export_gguf(model, tokenizer_dir, tmp_path / "m.gguf", outtype="f32")
    got, expected = _read(tmp_path / "m.gguf"), _expected(model)
    assert set(got) == set(expected) and len(got) == 2 + 9 * 2 + (not tied)
    for name, want in expected.items():
        data, kind = got[name]
        assert kind == "F32" and np.array_equal(data, want), name


def test_the_rotary_permutation_is_llama_cpps_and_undoes_exactly():
    w = torch.arange(8 * 3, dtype=torch.float32).reshape(8, 3)  # 2 heads of 4 rows: halves (0,1 | 2,3)
    assert permute_rotary(w, 2)[:4, 0].tolist() == [0, 6, 3, 9]  # rows 0, 2, 1, 3 of head 0: pairs interleaved
    x = torch.randn(64, 32)
    assert torch.equal(unpermute_rotary(permute_rotary(x, 4), 4), x)


def test_f16_and_q8_0_are_within_their_rounding(tokenizer_dir, tmp_path):
    model = _model()
    expected = _expected(model)
    export_gguf(model, tokenizer_dir, tmp_path / "h.gguf", outtype="f16")
    export_gguf(model, tokenizer_dir, tmp_path / "q.gguf", outtype="q8_0")
    for name, (data, kind) in _read(tmp_path / "h.gguf").items():
        want = expected[name]
        assert kind == ("F32" if want.ndim == 1 else "F16")
        assert np.allclose(data, want, rtol=2**-10, atol=2**-24), name
    for name, (data, kind) in _read(tmp_path / "q.gguf").items():
        want = expected[name]
        if want.ndim == 1:
            assert kind == "F32" and np.array_equal(data, want)
            continue
        assert kind == "Q8_0"
        # per block of 32: scale = absmax / 127 (stored in fp16), error <= scale / 2 plus the scale's rounding
        blocks = np.abs(want.reshape(-1, 32)).max(axis=1, keepdims=True)
        bound = blocks / 127 * 0.5 + blocks * 2**-10
        assert (np.abs(data - want).reshape(-1, 32) <= bound + 1e-12).all(), name


def test_metadata_and_tokenizer(tokenizer_dir, tmp_path):
    export_gguf(_model(), tokenizer_dir, tmp_path / "m.gguf", outtype="f16")
    fields = gguf.GGUFReader(tmp_path / "m.gguf").fields
    value = {k: f.contents() for k, f in fields.items()}
    assert value["general.architecture"] == "llama"
    assert (value["llama.context_length"], value["llama.embedding_length"], value["llama.block_count"],
            value["llama.feed_forward_length"], value["llama.attention.head_count"],
            value["llama.attention.head_count_kv"], value["llama.rope.dimension_count"]) == (64, 64, 2, 128, 4, 2, 16)
    assert value["llama.rope.freq_base"] == pytest.approx(10000.0)
    tok = load_tokenizer(tokenizer_dir)
    vocab = tok.backend.get_vocab(with_added_tokens=True)
    assert value["tokenizer.ggml.model"] == "gpt2" and value["tokenizer.ggml.pre"] == "gpt-2"
    assert value["tokenizer.ggml.tokens"] == [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    assert len(value["tokenizer.ggml.merges"]) > 0 and all(" " in m for m in value["tokenizer.ggml.merges"])
    assert value["tokenizer.ggml.bos_token_id"] == tok.bos_id and value["tokenizer.ggml.eos_token_id"] == tok.eos_id
    assert value["tokenizer.chat_template"].startswith("{% for m in messages %}")
    types = value["tokenizer.ggml.token_type"]
    assert types[tok.eos_id] == 3 and types[tok.vocab_size - 1] == 1  # control vs normal


def test_errors_and_atomic_writes(tokenizer_dir, tmp_path, monkeypatch):
    with pytest.raises(GGUFExportError, match="LLaMA family"):
        export_gguf(build_model(GPTConfig(vocab_size=300, dim=32, n_layers=1, n_heads=4)), None, tmp_path / "g.gguf")
    with pytest.raises(GGUFExportError, match="q4_k"):
        export_gguf(_model(), None, tmp_path / "x.gguf", outtype="q4_k")
    with pytest.raises(GGUFExportError, match="parallel_block"):
        export_gguf(build_model(LlamaConfig(**CFG, parallel_block=True)), None, tmp_path / "p.gguf")
    with pytest.raises(GGUFExportError, match="no tokenizer.json"):
        export_gguf(_model(), tmp_path, tmp_path / "t.gguf")
    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", lambda *a, **k: (_ for _ in ()).throw(OSError("disk")))
    with pytest.raises(OSError, match="disk"):
        export_gguf(_model(), tokenizer_dir, tmp_path / "m.gguf")
    assert list(tmp_path.iterdir()) == []  # no file, no temporary left behind


def test_convert_to_gguf_from_the_command_line(tokenizer_dir, tmp_path):
    save_model(_model(), tmp_path / "ckpt")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / "ckpt" / name).write_bytes((tokenizer_dir / name).read_bytes())
    assert main(["convert", str(tmp_path / "ckpt"), "--to", "gguf", "--outtype", "q8_0",
                 "--out", str(tmp_path / "m.gguf")]) == 0
    assert {t.tensor_type.name for t in gguf.GGUFReader(tmp_path / "m.gguf").tensors} == {"F32", "Q8_0"}
