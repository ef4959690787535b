"""Checkpoint folders: round trips, and every corrupt or mismatched input named in its error."""

from __future__ import annotations

import json
import os
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

import llmlab
from llmlab.models import build_model
from llmlab.models.convert import ConversionError, hf_to_llmlab_state, llmlab_to_hf_state
from llmlab.models.io import CheckpointError, load_model, save_hf, save_model
from tests.models.zoo import TINY


@pytest.fixture
def checkpoint(tmp_path):
    torch.manual_seed(0)
    model = build_model(TINY["llama-gqa-tied"]).eval()
    save_model(model, tmp_path / "ckpt")
    return model, tmp_path / "ckpt"


def test_round_trip_is_bit_exact_through_the_public_loader(checkpoint):
    model, path = checkpoint
    loaded = llmlab.load_model(path)
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    assert loaded.lm_head.weight is loaded.embed_tokens.weight  # still tied after loading
    assert not loaded.training
    assert not list(path.glob("*.tmp"))  # atomic writes leave no temporary files


def test_wrong_shapes_are_named(checkpoint):
    _, path = checkpoint
    cfg = json.loads((path / "config.json").read_text())
    cfg["llmlab"]["hidden_dim"] = 48
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"layers\.0\.mlp\.gate_proj\.weight: shape \(64, 32\) but the config "
                                              r"implies \(48, 32\)"):
        load_model(path)


def test_missing_tensors_are_listed(checkpoint):
    _, path = checkpoint
    state = load_file(path / "model.safetensors")
    del state["layers.1.attn.k_proj.weight"], state["norm.weight"]
    save_file(state, path / "model.safetensors")
    with pytest.raises(CheckpointError, match="missing tensors: layers.1.attn.k_proj.weight, norm.weight"):
        load_model(path)


def test_truncated_safetensors_names_the_file(checkpoint):
    _, path = checkpoint
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: not a readable safetensors file"):
        load_model(path)


def test_unknown_architecture_names_the_field(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mamba", "vocab_size": 10}))
    with pytest.raises(ConversionError, match=r"config\.json: model_type='mamba' is not a supported architecture"):
        load_model(tmp_path)


@pytest.mark.parametrize("content, message", [
    ("{not json", "not valid JSON"),
    ("[" * 100_000, "nested too deeply"),
    ('{"llmlab": {"family": ["llama"]}}', "llmlab.family=['llama'] is not one of"),
    ('{"model_type": "llama"}', "'vocab_size' is missing"),
    ('{"model_type": "gpt2", "vocab_size": 10, "n_embd": "8", "n_layer": 1, "n_head": 2, "n_positions": 8}',
     "n_embd must be a whole number, got '8'"),
    ('{"model_type": "llama", "vocab_size": 10, "hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 1, '
     '"num_attention_heads": 3}', "dim=8 is not divisible by n_heads=3"),
    ('{"model_type": "llama", "vocab_size": 10, "hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 1, '
     '"num_attention_heads": 2, "rope_scaling": "yes"}', "rope_scaling must be a JSON object"),
    ('{"model_type": "llama", "vocab_size": 10, "hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 1, '
     '"num_attention_heads": 2, "rope_scaling": {"rope_type": "linear"}}', "rope_scaling: 'factor' is missing"),
    ("[1, 2]", "expected a JSON object"),
    ('{"llmlab": {"family": "rnn"}}', "llmlab.family='rnn' is not one of gpt, llama"),
    ('{"llmlab": {"family": "llama", "dimm": 4}}', "dimm: unknown key"),
])
def test_bad_config_json(tmp_path, content, message):
    (tmp_path / "config.json").write_text(content)
    with pytest.raises(llmlab.common.LlmlabError, match=re.escape(message)):
        load_model(tmp_path)
    (tmp_path / "config.json").unlink()
    (tmp_path / "config.json").mkdir()
    with pytest.raises(CheckpointError, match="config.json: not a file"):
        load_model(tmp_path)


def test_missing_folder_config_and_weights(tmp_path):
    with pytest.raises(CheckpointError, match="not a directory"):
        load_model(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="config.json: missing"):
        load_model(tmp_path)
    save_model(build_model(TINY["gpt2"]), tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no weights found"):
        load_model(tmp_path)


def test_weights_that_are_not_regular_files_are_named_not_read(checkpoint):
    _, path = checkpoint
    (path / "model.safetensors").unlink()
    os.mkfifo(path / "model.safetensors")  # reading it would block for ever
    with pytest.raises(CheckpointError, match="model.safetensors: not a regular file"):
        load_model(path)
    (path / "model.safetensors").unlink()
    (path / "model.safetensors").mkdir()
    with pytest.raises(CheckpointError, match="model.safetensors: not a regular file"):
        load_model(path)


def test_pickle_is_refused_unless_allowed_and_then_weights_only(tmp_path):
    torch.manual_seed(0)
    model = build_model(TINY["llama"]).eval()
    save_hf(model, tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    (tmp_path / "model.safetensors").unlink()
    torch.save(state, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pickled weights can run code"):
        load_model(tmp_path)
    x = torch.randint(0, 97, (1, 8))
    with torch.no_grad():
        assert torch.equal(load_model(tmp_path, allow_pickle=True)(x), model(x))

    class Evil:  # anything beyond tensors and containers must not be unpickled
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"x": Evil()}, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"not a plain-tensor pickle \(holds the Python object print\); llmlab "
                                              "refuses it even with --allow-pickle, because unpickling") as e:
        load_model(tmp_path, allow_pickle=True)
    assert "weights_only=False" not in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("content, message", [
    (b"", "not a PyTorch weights file (neither a zip archive nor a pickle)"),
    (b"hello, not a pickle", "not a PyTorch weights file (neither a zip archive nor a pickle)"),
    (b"\x80\x02garbage", "not a plain-tensor pickle (weights-only reading stopped at: Unsupported operand"),
    (None, "a damaged or truncated zip archive"),
    ([1, 2], "expected a state dict (tensor names to tensors), got list"),
    ({"w": 3}, "expected a state dict (tensor names to tensors), got a mapping with values other than tensors"),
])
def test_a_damaged_or_strange_pickle_is_one_line(tmp_path, content, message):
    save_hf(build_model(TINY["llama"]), tmp_path)
    (tmp_path / "model.safetensors").unlink()
    file = tmp_path / "pytorch_model.bin"
    if isinstance(content, bytes):
        file.write_bytes(content)
    elif content is None:  # a zip archive cut short
        torch.save({"w": torch.zeros(4)}, file)
        file.write_bytes(file.read_bytes()[:100])
    else:
        torch.save(content, file)
    with pytest.raises(CheckpointError, match=re.escape(f"{file}: {message}")) as e:
        load_model(tmp_path, allow_pickle=True)
    assert "\n" not in str(e.value) and "weights_only=False" not in str(e.value)


def test_a_mismatch_is_one_line_with_the_first_ten_of_each_kind(checkpoint):
    _, path = checkpoint
    state = load_file(path / "model.safetensors")
    for i in range(12):
        state[f"extra.{i:02d}"] = torch.zeros(1)
    del state["norm.weight"]
    save_file(state, path / "model.safetensors")
    with pytest.raises(CheckpointError) as e:
        load_model(path)
    message = str(e.value)
    assert "\n" not in message
    assert "missing tensors: norm.weight; unexpected tensors: extra.00, extra.01" in message
    assert "extra.09 (and 2 more)" in message and "extra.10" not in message


def test_shard_index_problems(tmp_path):
    save_hf(build_model(TINY["gpt2"]), tmp_path, max_shard_bytes=4_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    index["weight_map"]["transformer.h.0.ln_1.weight"] = "../elsewhere.safetensors"
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="must be a plain file name"):
        load_model(tmp_path)
    for text in ("{}", '{"weight_map": {"a": 1}}', '{"weight_map": [1]}', "[" * 100_000, "{"):
        (tmp_path / "model.safetensors.index.json").write_text(text)
        with pytest.raises(CheckpointError, match="index.json: not a valid shard index"):
            load_model(tmp_path)


def test_conversion_is_strict_about_unmapped_keys():
    state = llmlab_to_hf_state(build_model(TINY["gpt2"]).state_dict(), "gpt")
    assert "transformer.h.1.attn.c_attn.weight" in state
    state["transformer.h.0.attn.rotary.weight"] = torch.zeros(1)
    state["transformer.extra"] = torch.zeros(1)
    with pytest.raises(ConversionError, match="2 parameter.*transformer.extra, transformer.h.0.attn.rotary.weight"):
        hf_to_llmlab_state(state, "gpt")
    with pytest.raises(ConversionError, match="no conversion rule: layers.0.attn.extra"):
        llmlab_to_hf_state({"layers.0.attn.extra": torch.zeros(1)}, "llama")


def test_conversion_tables_round_trip_every_family():
    for name, cfg in TINY.items():
        if cfg.family == "gpt" and cfg.position != "learned":
            continue  # no HF counterpart
        state = build_model(cfg).state_dict()
        back = hf_to_llmlab_state(llmlab_to_hf_state(state, cfg.family), cfg.family)
        assert back.keys() == state.keys(), name
        assert all(torch.equal(back[k], state[k]) for k in state), name


def test_export_refuses_variants_without_an_hf_class(tmp_path):
    with pytest.raises(ConversionError, match="only GPT-2-style"):
        save_hf(build_model(TINY["gpt-alibi"]), tmp_path)
    with pytest.raises(ConversionError, match="parallel_block"):
        save_hf(build_model(TINY["llama-mqa-parallel"]), tmp_path)
    assert not list(tmp_path.iterdir())  # nothing written before the refusal


def test_unsupported_hf_options_are_named(tmp_path):
    from llmlab.models.convert import config_from_hf

    base = {"model_type": "llama", "vocab_size": 10, "hidden_size": 8, "intermediate_size": 16,
            "num_hidden_layers": 1, "num_attention_heads": 2}
    with pytest.raises(ConversionError, match="hidden_act='gelu'"):
        config_from_hf({**base, "hidden_act": "gelu"})
    with pytest.raises(ConversionError, match="rope_type='longrope'"):
        config_from_hf({**base, "rope_scaling": {"rope_type": "longrope", "factor": 2.0}})
    with pytest.raises(ConversionError, match="yarn rope scaling fields.*mscale"):
        config_from_hf({**base, "rope_scaling": {"rope_type": "yarn", "factor": 2.0, "mscale": 1.0}})
    cfg = config_from_hf({**base, "rope_theta": 5e5, "rope_scaling": {"type": "linear", "factor": 2.0}})
    assert cfg.rope_theta == 5e5 and cfg.rope_scaling.kind == "linear"  # transformers 4 layout
