"""Parity with HF transformers on tiny random models built in code: import, export and back."""

from __future__ import annotations

import json

import pytest
import torch

from llmlab.models.io import load_model, save_hf

pytestmark = pytest.mark.hf
tf = pytest.importorskip("transformers")

V = 97


def _llama_config(**kw):
    base = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=64)
    return {**base, **kw}


CASES = {
    "gpt2": lambda: tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=V, n_positions=64, n_embd=32, n_layer=2, n_head=4,
                                                     bos_token_id=0, eos_token_id=0)),
    "llama-mha-untied": lambda: tf.LlamaForCausalLM(tf.LlamaConfig(**_llama_config())),
    "llama-gqa": lambda: tf.LlamaForCausalLM(tf.LlamaConfig(**_llama_config(num_key_value_heads=2))),
    "llama-mqa-tied": lambda: tf.LlamaForCausalLM(tf.LlamaConfig(**_llama_config(num_key_value_heads=1,
                                                                                 tie_word_embeddings=True))),
    "llama-rope-linear": lambda: tf.LlamaForCausalLM(tf.LlamaConfig(**_llama_config(
        rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}))),
    "llama-rope-dynamic": lambda: tf.LlamaForCausalLM(tf.LlamaConfig(**_llama_config(
        max_position_embeddings=16, rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}))),
    "llama-rope-yarn": lambda: tf.LlamaForCausalLM(tf.LlamaConfig(**_llama_config(
        rope_parameters={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16,
                         "rope_theta": 10000.0}))),
    "llama-rope-llama3": lambda: tf.LlamaForCausalLM(tf.LlamaConfig(**_llama_config(
        num_key_value_heads=2, rope_parameters={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                "high_freq_factor": 4.0, "original_max_position_embeddings": 16,
                                                "rope_theta": 500000.0}))),
    "qwen2": lambda: tf.Qwen2ForCausalLM(tf.Qwen2Config(**_llama_config(num_key_value_heads=2))),
    "mistral-window": lambda: tf.MistralForCausalLM(tf.MistralConfig(**_llama_config(
        num_key_value_heads=2, sliding_window=8, head_dim=8))),
}


def _hf_model(name):
    torch.manual_seed(0)
    model = CASES[name]().eval()
    for p in model.parameters():  # HF zero-initialises biases and unit-initialises norms: randomise all
        p.data.normal_(0, 0.3)
    return model


@pytest.mark.parametrize("name", sorted(CASES))
def test_hf_import_export_parity(name, tmp_path):
    hf = _hf_model(name)
    hf.save_pretrained(tmp_path / "hf")
    x = torch.randint(0, V, (2, 40), generator=torch.Generator().manual_seed(1))  # past 16: scaling applies
    ours = load_model(tmp_path / "hf")
    with torch.no_grad():
        ref, got = hf(x).logits, ours(x)
    assert (ref - got).abs().max() < 1e-4

    # llmlab -> HF folder (sharded, to exercise the index) -> transformers gives the same logits back
    save_hf(ours, tmp_path / "out", max_shard_bytes=8_000)
    assert json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())["weight_map"]
    back = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert type(back) is type(hf)
    with torch.no_grad():
        assert (back(x).logits - got).abs().max() < 1e-4
    # and the sharded export loads into llmlab again
    with torch.no_grad():
        assert (load_model(tmp_path / "out")(x) - got).abs().max() < 1e-6


def test_llmlab_built_model_exports_to_transformers(tmp_path):
    from llmlab.models import build_model
    from tests.models.zoo import TINY

    for name in ("gpt2", "gpt-untied", "llama-gqa-tied", "llama-yarn", "llama-window"):
        torch.manual_seed(0)
        model = build_model(TINY[name]).eval()
        save_hf(model, tmp_path / name)
        hf = tf.AutoModelForCausalLM.from_pretrained(tmp_path / name).eval()
        x = torch.randint(0, V, (2, 30))
        with torch.no_grad():
            assert (hf(x).logits - model(x)).abs().max() < 1e-4, name


def test_base_model_checkpoint_without_lm_wrapper_loads(tmp_path):
    # GPT2Model / LlamaModel folders keep bare names ("h.0...", "layers.0..."): the prefix is added
    hf = _hf_model("gpt2")
    hf.transformer.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["model_type"] == "gpt2"
    x = torch.randint(0, V, (1, 10))
    with torch.no_grad():
        assert (load_model(tmp_path)(x) - hf(x).logits).abs().max() < 1e-4


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_sequence_classifiers_import_and_export(name, tmp_path):
    """An HF *ForSequenceClassification (a reward model: num_labels=1, and a 3-label classifier) imports with
    its score head as the output layer, gives HF's score at the last token, and exports back to the same
    class and weights."""
    for labels in (1, 3):
        torch.manual_seed(0)
        if name == "llama":
            hf = tf.LlamaForSequenceClassification(tf.LlamaConfig(**_llama_config(num_labels=labels,
                                                                                   pad_token_id=V - 1)))
        else:
            hf = tf.GPT2ForSequenceClassification(tf.GPT2Config(vocab_size=V, n_positions=64, n_embd=32, n_layer=2,
                                                                 n_head=4, num_labels=labels, bos_token_id=0,
                                                                 eos_token_id=0, pad_token_id=V - 1))
        hf.eval()
        for p in hf.parameters():
            p.data.normal_(0, 0.3)
        hf.save_pretrained(tmp_path / f"hf{labels}")
        ours = load_model(tmp_path / f"hf{labels}")
        assert ours.config.num_labels == labels
        x = torch.randint(0, V - 1, (2, 12), generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            want = hf(x).logits  # no pad token in x: HF scores the last position of every row
            got = ours(x)[:, -1]
        assert got.shape == (2, labels)
        assert torch.allclose(got, want, atol=1e-4)
        save_hf(ours, tmp_path / f"back{labels}", pad_token_id=V - 1)
        config = json.loads((tmp_path / f"back{labels}" / "config.json").read_text())
        assert config["architectures"][0].endswith("ForSequenceClassification")
        back = tf.AutoModelForSequenceClassification.from_pretrained(tmp_path / f"back{labels}").eval()
        with torch.no_grad():
            assert torch.allclose(back(x).logits, want, atol=1e-4)
