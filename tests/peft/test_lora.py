"""LoRA invariants: a zero B is a no-op, merging is W + (alpha/r) B A, only adapters train, the base
comes back with disable_adapters(), and freezing by pattern or layer range."""

from __future__ import annotations

import pytest
import torch

from llmlab.common import LlmlabError
from llmlab.models import build_model
from llmlab.peft import (AdapterError, LoraConfig, LoRALinear, apply_lora, disable_adapters, freeze, lora_state_dict,
                         merge_and_unload, merge_lora, trainable_parameters, unmerge_lora)
from tests.models.zoo import TINY, V


def _model(name="llama", seed=0):
    torch.manual_seed(seed)
    return build_model(TINY[name]).eval()


def _x(T=12):
    return torch.randint(0, V, (2, T), generator=torch.Generator().manual_seed(3))


def _randomise_b(model, seed=1, scale=0.1):
    """Nonzero updates: every LoRA layer's B drawn from normal(0, scale)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * scale)


@pytest.mark.parametrize("name", ["llama", "llama-gqa-tied", "gpt2"])
def test_zero_b_changes_no_output(name):
    model = _model(name)
    with torch.no_grad():
        before = model(_x())
    names = apply_lora(model, LoraConfig(r=4, alpha=8, targets=["all-linear"]))
    assert len(names) == 7 * 2 if name.startswith("llama") else len(names) == 6 * 2
    with torch.no_grad():
        assert torch.equal(model(_x()), before)


def test_merge_equals_w_plus_scaled_ba_and_same_logits():
    model = _model()
    apply_lora(model, LoraConfig(r=4, alpha=12, targets=["q_proj", "down_proj"]))
    _randomise_b(model)
    layer = model.layers[1].mlp.down_proj
    w = layer.base.weight.detach().clone()
    expected = w + (12 / 4) * layer.lora_B.weight @ layer.lora_A.weight
    with torch.no_grad():
        unmerged = model(_x())
        merge_lora(model)
        assert torch.allclose(layer.base.weight, expected, atol=1e-6)
        assert torch.allclose(model(_x()), unmerged, atol=1e-5)
        unmerge_lora(model)
        assert torch.allclose(layer.base.weight, w, atol=1e-6)
        assert torch.allclose(model(_x()), unmerged, atol=1e-5)
        merged = merge_and_unload(model)
        assert not any(isinstance(m, LoRALinear) for m in merged.modules())
        assert torch.allclose(merged(_x()), unmerged, atol=1e-5)


def test_rslora_scales_by_alpha_over_sqrt_r():
    layer = LoRALinear(torch.nn.Linear(8, 8), r=16, alpha=8, rslora=True)
    assert layer.scaling == pytest.approx(8 / 4)
    assert LoRALinear(torch.nn.Linear(8, 8), r=16, alpha=8).scaling == pytest.approx(0.5)


def test_disable_adapters_gives_the_base_model():
    model = _model()
    with torch.no_grad():
        base = model(_x())
    apply_lora(model, LoraConfig(r=4, targets=["all-linear"]))
    _randomise_b(model)
    with torch.no_grad():
        adapted = model(_x())
        assert not torch.allclose(adapted, base)
        with disable_adapters(model):
            assert torch.equal(model(_x()), base)
        assert torch.equal(model(_x()), adapted)
    merge_lora(model)
    with pytest.raises(AdapterError, match="unmerge"), disable_adapters(model):
        pass


def test_a_step_changes_only_adapter_parameters():
    model = _model().train()
    apply_lora(model, LoraConfig(r=4, alpha=8, targets=["q_proj", "v_proj"], dropout=0.1))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        f"layers.{i}.attn.{m}_proj.lora_{ab}.weight" for i in range(2) for m in "qv" for ab in "AB"}
    opt = torch.optim.AdamW(trainable, lr=1e-2)
    x = _x()
    model(x[:, :-1], targets=x[:, 1:]).backward()
    opt.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == {n for n, p in model.named_parameters() if p.requires_grad}
    trained, total = trainable_parameters(model)
    assert trained == 2 * 2 * (4 * 32 + 32 * 4) and total == sum(p.numel() for p in model.parameters())


def test_lora_state_dict_holds_only_adapters():
    model = _model()
    apply_lora(model, LoraConfig(r=2, targets=["o_proj"]))
    state = lora_state_dict(model)
    assert sorted(state) == [f"layers.{i}.attn.o_proj.lora_{ab}.weight" for i in range(2) for ab in "AB"]
    assert state["layers.0.attn.o_proj.lora_A.weight"].shape == (2, 32)


def test_bad_lora_settings_are_named():
    model = _model()
    with pytest.raises(AdapterError, match="'qproj' matches no linear layer.*q_proj"):
        apply_lora(model, LoraConfig(targets=["qproj"]))
    with pytest.raises(AdapterError, match="r must be a rank >= 1, got 0"):
        LoraConfig(r=0)
    with pytest.raises(AdapterError, match="dropout"):
        LoraConfig(dropout=1.0)
    with pytest.raises(AdapterError, match="alpha must be > 0, got -1.0"):
        LoraConfig(alpha=-1.0)
    with pytest.raises(AdapterError, match="targets must name the modules"):
        LoraConfig(targets=[""])
    apply_lora(model, LoraConfig(targets=["q_proj"]))
    with pytest.raises(AdapterError, match="already carry an adapter"):
        apply_lora(model, LoraConfig(targets=["q_proj"]))


def test_freeze_by_name_glob_and_layer_range():
    model = build_model(TINY["llama"].__class__(vocab_size=V, dim=32, n_layers=4, n_heads=4, hidden_dim=64))
    frozen = freeze(model, ["embed_tokens", "layers.0-2", "layers.*.mlp_norm"])
    assert "embed_tokens.weight" in frozen and "layers.3.mlp_norm.weight" in frozen
    assert all(n in frozen for n, _ in model.layers[2].named_parameters(prefix="layers.2"))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in model.named_parameters()} - set(frozen)
    assert "layers.3.attn.q_proj.weight" in trainable and "norm.weight" in trainable
    with pytest.raises(Exception, match="'layer.0' matches no parameter"):
        freeze(model, ["layer.0"])
    with pytest.raises(Exception, match="range 3-1 is empty"):
        freeze(model, ["layers.3-1"])


@pytest.mark.parametrize("pattern", ["layers.0-99", "layers.2-4.mlp", "layers.0-99999999999999"])
def test_a_layer_range_past_the_depth_is_named_with_the_depth(pattern):
    model = build_model(TINY["llama"].__class__(vocab_size=V, dim=32, n_layers=4, n_heads=4, hidden_dim=64))
    with pytest.raises(LlmlabError, match=rf"freeze pattern '{pattern}': the range .* reaches past the model's 4 "
                                          r"layers \(layers.0-3\)"):
        freeze(model, [pattern])
    assert all(p.requires_grad for p in model.parameters())  # nothing frozen on the way
