"""PEFT interop on tiny models built in code: llmlab adapters load with `peft` on the HF export of the
same base and give the same logits, and adapters made with `peft` load into llmlab."""

from __future__ import annotations

import json

import pytest
import torch

from llmlab.models import build_model
from llmlab.models.io import load_model, save_hf
from llmlab.peft import AdapterError, LoraConfig, LoRALinear, apply_lora, load_adapter, save_adapter
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
    from llmlab.peft import disable_adapters

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
