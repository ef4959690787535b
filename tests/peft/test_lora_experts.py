"""LoRA and QLoRA on an MoE's stacked experts: targets by name, one update per expert, merging, the
4-bit stack, PEFT's `target_parameters` layout both ways, and fine-tuning end to end."""

from __future__ import annotations

import json

import pytest
import torch

from llmlab.models import LlamaConfig, build_model
from llmlab.models.io import load_model, save_hf, save_model
from llmlab.models.moe import ExpertLinear, MoEConfig
from llmlab.peft import (AdapterError, LoraConfig, LoRALinear, apply_lora, disable_adapters, load_adapter,
                         merge_and_unload, merge_lora, save_adapter, unmerge_lora)
from tests.peft.test_lora import _randomise_b

V = 97


def _moe(every=1, seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=V, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=40, max_seq_len=64,
                      moe=MoEConfig(n_experts=4, top_k=2, every=every))
    model = build_model(cfg).eval()
    for p in model.parameters():  # larger weights than the init: routing and the updates matter
        p.data.normal_(0, 0.2)
    return model


def _x():
    return torch.randint(0, V, (2, 10), generator=torch.Generator().manual_seed(5))


def test_targets_select_expert_stacks_by_name():
    model = _moe(every=2)  # layer 0 dense, layer 1 MoE
    wrapped = apply_lora(_moe(every=2), LoraConfig(targets=["down_proj"]))
    assert wrapped == ["layers.0.mlp.down_proj", "layers.1.mlp.experts.down_proj"]
    wrapped = apply_lora(model, LoraConfig(targets=["experts.gate_up_proj", "router"]))
    assert wrapped == ["layers.1.mlp.router", "layers.1.mlp.experts.gate_up_proj"]
    layer = model.layers[1].mlp.experts.gate_up_proj
    assert layer.lora_A.weight.shape == (4, 8, 32) and layer.lora_B.weight.shape == (4, 80, 8)
    everything = apply_lora(_moe(), LoraConfig(targets=["all-linear"]))
    assert "layers.0.mlp.experts.down_proj" in everything and "lm_head" not in everything


def test_each_expert_gets_its_own_update_and_merging_folds_it_into_its_slice():
    model = _moe()
    with torch.no_grad():
        before = model(_x())
    apply_lora(model, LoraConfig(r=4, alpha=8, targets=["gate_up_proj", "down_proj"]))
    with torch.no_grad():
        assert torch.equal(model(_x()), before)  # B = 0: the base model exactly
        _randomise_b(model, scale=0.2)
        adapted = model(_x())
        layer = model.layers[0].mlp.experts.down_proj
        x = torch.randn(3, 40)
        for e in range(4):  # expert e computes with W_e + s B_e A_e, no other expert's update
            w = layer.base.weight[e] + layer.scaling * layer.lora_B.weight[e] @ layer.lora_A.weight[e]
            assert torch.allclose(layer(x, e), x @ w.t(), atol=1e-5)
        assert not torch.allclose(adapted, before, atol=1e-3)
        merge_lora(model)
        assert torch.allclose(model(_x()), adapted, atol=1e-4)
        unmerge_lora(model)
        with disable_adapters(model):
            assert torch.allclose(model(_x()), before, atol=1e-5)
        merged = merge_and_unload(model)
        assert isinstance(merged.layers[0].mlp.experts.down_proj, ExpertLinear)
        assert torch.allclose(merged(_x()), adapted, atol=1e-4)


def test_a_step_trains_the_expert_adapters_only():
    model = _moe().train()
    apply_lora(model, LoraConfig(r=2, targets=["gate_up_proj", "down_proj"]))
    _randomise_b(model, scale=0.2)
    x = _x()
    model(x, targets=x).backward()
    trained = {n for n, p in model.named_parameters() if p.grad is not None}
    assert trained and all(".lora_" in n for n in trained)
    assert any(n.endswith("experts.gate_up_proj.lora_A.weight") for n in trained)


def test_dropout_on_expert_adapters_is_refused():
    with pytest.raises(AdapterError, match="dropout must be 0 .* stacked experts"):
        apply_lora(_moe(), LoraConfig(targets=["q_proj", "down_proj"], dropout=0.1))


# --------------------------------------------------------------------------- QLoRA


def test_quantized_experts_keep_the_router_and_dequantize_back():
    pytest.importorskip("bitsandbytes")
    from llmlab.quant import NF4Experts, NF4Linear, dequantize_model, nf4_error_bound, quantize_model

    model = _moe()
    original = model.layers[0].mlp.experts.gate_up_proj.weight.detach().clone()
    replaced = quantize_model(model)
    assert "layers.0.mlp.experts.gate_up_proj" in replaced and not any("router" in n for n in replaced)
    stack = model.layers[0].mlp.experts.gate_up_proj
    assert isinstance(stack, NF4Experts) and isinstance(model.layers[0].mlp.router, torch.nn.Linear)
    w = torch.randn(5, 32)
    assert torch.allclose(stack(w, 2), w @ stack.dequantize()[2].t(), atol=1e-4)
    for e in range(4):  # each expert quantized on its own slice, within the NF4 bound
        assert ((stack.dequantize()[e] - original[e]).abs() <= nf4_error_bound(original[e])).all()
    with torch.no_grad():
        quantized = model(_x())
    apply_lora(model, LoraConfig(r=2, targets=["all-linear"]))
    assert isinstance(model.layers[0].mlp.experts.gate_up_proj.base, NF4Experts)
    plain = dequantize_model(merge_and_unload(model))
    assert not any(isinstance(m, (NF4Linear, NF4Experts)) for m in plain.modules())
    with torch.no_grad():
        assert torch.allclose(plain(_x()), quantized, atol=1e-4)


def test_load_quantized_equals_quantizing_the_loaded_moe(tmp_path):
    pytest.importorskip("bitsandbytes")
    from llmlab.quant import load_quantized, quantize_model

    save_model(_moe(every=2), tmp_path / "ckpt")
    streamed = load_quantized(tmp_path / "ckpt")
    whole = load_model(tmp_path / "ckpt")
    quantize_model(whole)
    a, b = streamed.layers[1].mlp.experts.down_proj, whole.layers[1].mlp.experts.down_proj
    assert all(torch.equal(x.packed_weight, y.packed_weight) for x, y in zip(a.experts, b.experts))
    with torch.no_grad():
        assert torch.equal(streamed(_x()), whole(_x()))


# --------------------------------------------------------------------------- PEFT's layout


@pytest.mark.hf
@pytest.mark.parametrize("targets, peft_targets", [
    (["gate_up_proj", "down_proj", "q_proj", "router"], ["experts.down_proj", "experts.gate_up_proj"]),
    (["experts.down_proj"], ["experts.down_proj"]),
    (["layers.1.mlp.experts.gate_up_proj"], ["model.layers.1.mlp.experts.gate_up_proj"]),
])
def test_expert_adapters_apply_with_peft_to_the_hf_export(targets, peft_targets, tmp_path):
    tf = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    model = _moe()
    save_hf(model, tmp_path / "hf")
    cfg = LoraConfig(r=2, alpha=6, targets=targets)
    apply_lora(model, cfg)
    _randomise_b(model, scale=0.2)
    save_adapter(model, tmp_path / "adapter", cfg)
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["target_parameters"] == peft_targets
    hf = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    hf = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    with torch.no_grad():
        assert torch.allclose(hf(_x()).logits, model(_x()), atol=1e-4)


@pytest.mark.hf
def test_a_peft_adapter_on_mixtral_experts_loads(tmp_path):
    tf = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    save_hf(_moe(), tmp_path / "hf")
    hf = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    torch.manual_seed(3)
    hf = peft.get_peft_model(hf, peft.LoraConfig(r=2, lora_alpha=4, target_modules=["v_proj"], init_lora_weights=False,
                                                 target_parameters=["experts.gate_up_proj", "experts.down_proj"]))
    hf.save_pretrained(tmp_path / "adapter")
    ours = load_model(tmp_path / "hf").eval()
    load_adapter(ours, tmp_path / "adapter")
    assert isinstance(ours.layers[1].mlp.experts.gate_up_proj, LoRALinear)
    with torch.no_grad():
        assert torch.allclose(ours(_x()), hf.eval()(_x()).logits, atol=1e-4)


def test_an_adapter_whose_expert_tensors_and_config_disagree_is_named(tmp_path):
    model = _moe()
    cfg = LoraConfig(r=2, targets=["down_proj"])
    apply_lora(model, cfg)
    save_adapter(model, tmp_path / "adapter", cfg)
    config = tmp_path / "adapter" / "adapter_config.json"
    data = json.loads(config.read_text())
    config.write_text(json.dumps({**data, "target_parameters": ["experts.gate_up_proj", "experts.down_proj"]}))
    with pytest.raises(AdapterError, match="lists experts.gate_up_proj, for which adapter_model.safetensors holds no"):
        load_adapter(_moe(), tmp_path / "adapter")
    config.write_text(json.dumps(data))
    from safetensors.torch import load_file, save_file

    weights = tmp_path / "adapter" / "adapter_model.safetensors"
    tensors = load_file(weights)
    key = next(k for k in tensors if k.endswith("lora_A.weight"))
    save_file({**tensors, key: tensors[key][:-1]}, weights)  # rows that do not split into 4 experts
    with pytest.raises(AdapterError, match="not a stack of 4 experts' lora_A"):
        load_adapter(_moe(), tmp_path / "adapter")
    config.write_text(json.dumps({**data, "target_parameters": "experts"}))
    with pytest.raises(AdapterError, match="adapter_config.json: target_parameters must be a list"):
        load_adapter(_moe(), tmp_path / "adapter")
