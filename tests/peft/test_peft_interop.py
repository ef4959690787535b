"""PEFT interop on tiny models built in code: llmlab adapters load with `peft` on the HF export of the
same base and give the same logits, and adapters made with `peft` load into llmlab."""

from __future__ import annotations

import json
import os

import pytest
import torch

from llmlab.models import build_model
from llmlab.models.io import load_model, save_hf
from llmlab.peft import AdapterError, LoraConfig, LoRALinear, apply_lora, disable_adapters, load_adapter, save_adapter
from tests.models.zoo import TINY, V

pytestmark = pytest.mark.hf
tf = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")


def _x():
    return torch.randint(0, V, (2, 10), generator=torch.Generator().manual_seed(5))


def _adapted(name, cfg, seed=0):
    torch.manual_seed(seed)
    model = build_model(TINY[name]).eval()
    apply_lora(model, cfg)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * 0.2)
    return model


@pytest.mark.parametrize("name, cfg", [
    ("llama", LoraConfig(r=4, alpha=8, targets=["q_proj", "v_proj"])),
    ("llama-gqa-tied", LoraConfig(r=2, alpha=4, targets=["all-linear"], rslora=True)),
    ("llama", LoraConfig(r=3, alpha=6, targets=["layers.1.mlp.down_proj", "layers.0.attn.k_proj"])),
    ("gpt2", LoraConfig(r=4, alpha=8, targets=["o_proj", "up_proj"])),
])
def test_llmlab_adapter_applies_with_peft_to_the_hf_export(name, cfg, tmp_path):
    model = _adapted(name, cfg)
    save_adapter(model, tmp_path / "adapter", cfg)
    with disable_adapters(model):
        save_hf(_base_copy(model), tmp_path / "hf")
    hf = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    hf = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    with torch.no_grad():
        assert torch.allclose(hf(_x()).logits, model(_x()), atol=1e-5)


def _base_copy(model):
    """The base model alone: a fresh model holding the adapted model's frozen weights."""
    base = build_model(model.config)
    state = {k.replace(".base.", "."): v for k, v in model.state_dict().items() if ".lora_" not in k}
    base.load_state_dict(state)
    return base


@pytest.mark.parametrize("targets", [["q_proj", "v_proj"], ["gate_proj", "up_proj", "down_proj", "o_proj"]])
def test_a_peft_adapter_imports_with_the_same_logits(targets, tmp_path):
    torch.manual_seed(0)
    base = build_model(TINY["llama"]).eval()
    save_hf(base, tmp_path / "hf")
    hf = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    config = peft.LoraConfig(r=4, lora_alpha=12, target_modules=targets, lora_dropout=0.0, init_lora_weights=False)
    hf = peft.get_peft_model(hf, config).eval()  # init_lora_weights=False: B is random, not zero
    hf.save_pretrained(tmp_path / "adapter")
    ours = load_model(tmp_path / "hf")
    cfg = load_adapter(ours, tmp_path / "adapter")
    assert cfg.r == 4 and cfg.scaling == pytest.approx(3.0)
    with torch.no_grad():
        expected = hf(_x()).logits
        assert not torch.allclose(expected, base(_x()), atol=1e-3)  # the adapter does change the output
        assert torch.allclose(ours(_x()), expected, atol=1e-5)


def test_an_adapter_for_another_base_is_refused(tmp_path):
    cfg = LoraConfig(r=4, targets=["q_proj"])
    save_adapter(_adapted("llama", cfg), tmp_path / "adapter", cfg)
    wider = build_model(TINY["llama"].__class__(vocab_size=V, dim=64, n_layers=2, n_heads=4, hidden_dim=64))
    with pytest.raises(AdapterError, match=r"q_proj.lora_A.weight: shape \(4, 32\).*\(4, 64\)"):
        load_adapter(wider, tmp_path / "adapter")
    shallow = build_model(TINY["llama"].__class__(vocab_size=V, dim=32, n_layers=1, n_heads=4, hidden_dim=64))
    with pytest.raises(AdapterError, match="layers.1.attn.q_proj"):
        load_adapter(shallow, tmp_path / "adapter")
    with pytest.raises(AdapterError, match="another model family"):
        load_adapter(build_model(TINY["gpt2"]), tmp_path / "adapter")


def test_unsupported_or_broken_adapter_configs_are_named(tmp_path):
    cfg = LoraConfig(r=4, targets=["q_proj"])
    save_adapter(_adapted("llama", cfg), tmp_path / "a", cfg)
    config_file = tmp_path / "a" / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(AdapterError, match="use_dora=True is not supported"):
        load_adapter(build_model(TINY["llama"]), tmp_path / "a")
    config_file.write_text("{")
    with pytest.raises(AdapterError, match="adapter_config.json: cannot read"):
        load_adapter(build_model(TINY["llama"]), tmp_path / "a")
    with pytest.raises(AdapterError, match="not an adapter folder"):
        load_adapter(build_model(TINY["llama"]), tmp_path)
    with pytest.raises(AdapterError, match="HF fuses this layer"):
        save_adapter(_adapted("gpt2", LoraConfig(targets=["q_proj"])), tmp_path / "b", cfg)


def _rewrite(folder, **changes):
    file = folder / "adapter_config.json"
    file.write_text(json.dumps({**json.loads(file.read_text()), **changes}))


@pytest.mark.parametrize("targets, message", [
    (["q_proj"], "holds tensors for model.layers.0.self_attn.v_proj, model.layers.1.self_attn.v_proj, which "
                 "target_modules does not select; target_modules lists q_proj, for which"),
    (["v_proj", "k_proj"], "target_modules lists k_proj, for which adapter_model.safetensors holds no tensors"),
    (["model.layers.0.self_attn.v_proj"], "holds tensors for model.layers.1.self_attn.v_proj, which"),
    (r".*\.q_proj", "holds tensors for model.layers.0.self_attn.v_proj"),
    ("([", "is not a valid regular expression"),
    ([], "target_modules must be a list of module names or a regular expression, got []"),
    (None, "target_modules must be a list"),
])
def test_target_modules_that_do_not_match_the_tensors_are_refused(tmp_path, targets, message):
    cfg = LoraConfig(r=4, targets=["v_proj"])
    save_adapter(_adapted("llama", cfg), tmp_path / "a", cfg)
    _rewrite(tmp_path / "a", target_modules=targets)
    with pytest.raises(AdapterError, match="adapter_config.json: target_modules") as e:
        load_adapter(build_model(TINY["llama"]), tmp_path / "a")
    assert message in str(e.value) and "\n" not in str(e.value)
    assert str(tmp_path / "a" / "adapter_config.json") in str(e.value)


def test_a_matching_regex_or_all_linear_loads(tmp_path):
    cfg = LoraConfig(r=4, targets=["v_proj"])
    save_adapter(_adapted("llama", cfg), tmp_path / "a", cfg)
    for targets in (r".*\.v_proj", "all-linear"):
        _rewrite(tmp_path / "a", target_modules=targets)
        assert load_adapter(build_model(TINY["llama"]), tmp_path / "a").r == 4


@pytest.mark.parametrize("changes, message", [
    ({"r": 8}, "r=8, but the tensors of adapter_model.safetensors have rank 4"),
    ({"r": 2.5}, "r must be a whole number >= 1, got 2.5"),
    ({"r": True}, "r must be a whole number >= 1"),
    ({"lora_alpha": "16"}, "lora_alpha must be a positive number"),
    ({"lora_dropout": "0.1"}, "lora_dropout must be a number in [0, 1)"),
    ({"lora_dropout": 1.5}, "lora_dropout must be a number in [0, 1)"),
    ({"use_rslora": "false"}, "use_rslora must be true or false"),
])
def test_bad_lora_settings_are_named(tmp_path, changes, message):
    cfg = LoraConfig(r=4, targets=["v_proj"])
    save_adapter(_adapted("llama", cfg), tmp_path / "a", cfg)
    _rewrite(tmp_path / "a", **changes)
    with pytest.raises(AdapterError, match="adapter_config.json: ") as e:
        load_adapter(build_model(TINY["llama"]), tmp_path / "a")
    assert message in str(e.value)


def test_adapter_files_that_are_not_regular_files_are_named_not_read(tmp_path):
    cfg = LoraConfig(r=4, targets=["v_proj"])
    save_adapter(_adapted("llama", cfg), tmp_path / "a", cfg)
    (tmp_path / "a" / "adapter_model.safetensors").unlink()
    os.mkfifo(tmp_path / "a" / "adapter_model.safetensors")  # reading it would block for ever
    with pytest.raises(AdapterError, match="adapter_model.safetensors: not a regular file"):
        load_adapter(build_model(TINY["llama"]), tmp_path / "a")
    with pytest.raises(AdapterError, match="adapter_config.json: not an adapter folder"):
        load_adapter(build_model(TINY["llama"]), tmp_path / "a" / "adapter_config.json")


def test_convert_names_the_adapter_whose_targets_do_not_match(tmp_path, capsys):
    from llmlab.cli import main

    cfg = LoraConfig(r=4, targets=["v_proj"])
    model = _adapted("llama", cfg)
    save_adapter(model, tmp_path / "a", cfg)
    with disable_adapters(model):
        save_hf(_base_copy(model), tmp_path / "hf")
    _rewrite(tmp_path / "a", target_modules=["q_proj"])
    assert main(["convert", str(tmp_path / "hf"), "--to", "hf", "--out", str(tmp_path / "out"),
                 "--adapter", str(tmp_path / "a")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "a/adapter_config.json: target_modules ['q_proj'] does not match" in err
    assert not (tmp_path / "out").exists()
