"""NF4 (QLoRA) base layers: the code's error bound holds, the layer computes with its dequantized weight,
the model swap keeps logits close, and the streaming loader equals quantize_model(load_model(...))."""

from __future__ import annotations

import copy
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

from llmlab.models import GPTConfig, LlamaConfig, build_model
from llmlab.models.io import CheckpointError, load_model, save_hf, save_model
from llmlab.models.kernels import Linear
from llmlab.quant import NF4_CODE, NF4Linear, dequantize_model, load_quantized, nf4_error_bound, quantize_model

LLAMA = LlamaConfig(vocab_size=64, dim=64, n_layers=2, n_heads=4, max_seq_len=32)
LLAMA_TIED = LlamaConfig(vocab_size=64, dim=64, n_layers=2, n_heads=4, max_seq_len=32, tie_embeddings=True)
GPT_TIED = GPTConfig(vocab_size=64, dim=64, n_layers=2, n_heads=4, max_seq_len=32)  # fused qkv, biases


def _weight(shape, seed=0):
    """Gaussian rows with scales spread over two decades, so block absmax values differ widely."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g) * torch.logspace(-2, 0, shape[0])[:, None]


def _tokens(vocab=64, T=16):
    return torch.randint(0, vocab, (2, T), generator=torch.Generator().manual_seed(3))


def test_code_table_is_bitsandbytes_nf4():
    import bitsandbytes.functional as bnbf

    assert torch.equal(torch.tensor(NF4_CODE), bnbf.get_4bit_type("nf4", device="cpu"))


# (300, 520): 2438 blocks, the last partial, in 10 groups of 256 absmax constants; (37, 100): blocks cross rows
@pytest.mark.parametrize("shape", [(300, 520), (37, 100), (80, 32), (64, 48)])  # rows shorter than a block too
@pytest.mark.parametrize("double_quant", [True, False])
def test_round_trip_error_is_within_the_nf4_bound(shape, double_quant):
    w = _weight(shape)
    layer = NF4Linear.from_weight(w, double_quant=double_quant)
    err = (layer.dequantize() - w).abs()
    bound = nf4_error_bound(w, 64, double_quant=double_quant)
    assert bound.shape == w.shape
    assert (err <= bound).all(), f"worst excess {(err - bound).max():.3g}"
    assert (err / bound).max() > 0.8  # the bound is nearly reached somewhere: it is not vacuous
    assert err.mean() < 0.3 * bound.mean()  # typical errors are far below the worst case (~0.17 of it)


def test_forward_is_the_dequantized_product_and_only_the_input_gets_gradients():
    w, b = _weight((40, 96)), torch.randn(40)
    layer = NF4Linear.from_linear(_linear(w, b))
    x = torch.randn(3, 5, 96, requires_grad=True)
    y = layer(x)
    weight = layer.dequantize()
    assert weight.shape == (40, 96) and weight.dtype == torch.float32
    torch.testing.assert_close(y, x @ weight.T + b, rtol=1e-5, atol=1e-6)
    y.sum().backward()
    torch.testing.assert_close(x.grad, torch.ones(3, 5, 40) @ weight, rtol=1e-5, atol=1e-6)
    assert not [p for p in layer.parameters() if p.requires_grad]
    assert layer.bias.grad is None
    assert layer(x.detach().bfloat16()).dtype == torch.bfloat16  # computes in fp32, returns x's dtype


def _linear(w: torch.Tensor, b: torch.Tensor | None) -> Linear:
    layer = Linear(w.size(1), w.size(0), bias=b is not None)
    with torch.no_grad():
        layer.weight.copy_(w)
        if b is not None:
            layer.bias.copy_(b)
    return layer


def test_quantization_is_deterministic_and_the_packed_weight_is_not_saved():
    w = _weight((64, 192))
    a, b = NF4Linear.from_weight(w, torch.zeros(64)), NF4Linear.from_weight(w.clone(), torch.zeros(64))
    assert a.packed_weight.dtype == torch.uint8 and a.packed_weight.numel() == 64 * 192 // 2
    assert torch.equal(a.packed_weight, b.packed_weight)
    qa, qb = a.quant_state, b.quant_state
    assert torch.equal(qa.absmax, qb.absmax) and torch.equal(qa.offset, qb.offset)
    assert torch.equal(qa.state2.absmax, qb.state2.absmax)
    # persistent=False: a QLoRA base is re-quantized from its full-precision checkpoint, never saved packed
    assert set(a.state_dict()) == {"bias"}


def test_moving_the_layer_moves_its_quant_state_and_casts_leave_the_codes_alone():
    layer = NF4Linear.from_weight(_weight((32, 64)), torch.randn(32))
    x = torch.randn(4, 64)
    expected = layer(x)
    layer.to(torch.bfloat16)
    assert layer.packed_weight.dtype == torch.uint8 and layer.bias.dtype == torch.bfloat16
    torch.testing.assert_close(layer(x), x @ layer.dequantize().T + layer.bias.float())
    assert (layer(x) - expected).abs().max() < 0.05  # only the bias was rounded to bf16
    layer.to("meta")
    state = layer.quant_state
    assert layer.packed_weight.is_meta and state.absmax.is_meta and state.code.is_meta
    assert state.offset.is_meta and state.state2.absmax.is_meta and state.state2.code.is_meta


def test_quantize_model_swaps_every_linear_but_the_head_and_keeps_logits_close():
    torch.manual_seed(0)
    model = build_model(LLAMA).eval()
    quantized = copy.deepcopy(model)
    names = quantize_model(quantized)
    per_layer = [f"attn.{p}_proj" for p in "qkvo"] + [f"mlp.{p}_proj" for p in ("gate", "up", "down")]
    assert names == [f"layers.{i}.{n}" for i in range(2) for n in per_layer]  # 14 of the 15 linears
    assert type(quantized.lm_head) is Linear
    assert all(isinstance(quantized.get_submodule(n), NF4Linear) for n in names)
    assert not any(isinstance(m, torch.nn.Linear) for n, m in quantized.named_modules() if n != "lm_head")
    assert not [p for n in names for p in quantized.get_submodule(n).parameters() if p.requires_grad]
    with torch.no_grad():
        weight_errors = [float((quantized.get_submodule(n).dequantize() - model.get_submodule(n).weight).norm()
                               / model.get_submodule(n).weight.norm()) for n in names]
    # NF4 at blocksize 64 leaves a relative RMS error of about 0.09 on Gaussian weights; the noise enters
    # the residual stream only through the branches, next to the exact embedding, and the norm and head
    # are full precision, so the logits' relative error stays below the worst weight's
    assert all(0.05 < e < 0.1 for e in weight_errors)
    x = _tokens()
    with torch.no_grad():
        ref, out = model(x), quantized(x)
    rel = float((out - ref).norm() / ref.norm())
    assert 0.1 * max(weight_errors) < rel < max(weight_errors)


def test_dequantize_model_gives_an_ordinary_model_with_the_same_logits():
    torch.manual_seed(0)
    quantized = build_model(LLAMA).eval()
    quantize_model(quantized)
    x = _tokens()
    with torch.no_grad():
        expected = quantized(x)
        plain = dequantize_model(quantized)
        assert not any(isinstance(m, NF4Linear) for m in plain.modules())
        assert set(plain.state_dict()) == set(build_model(LLAMA).state_dict())  # every weight saves again
        assert torch.allclose(plain(x), expected, atol=1e-5)


def _save(model, path, fmt):
    if fmt == "llmlab":
        save_model(model, path)
    elif fmt == "hf":
        save_hf(model, path)
    else:  # "hf-sharded": several files and an index
        save_hf(model, path, max_shard_bytes=100_000)


@pytest.mark.parametrize("fmt", ["llmlab", "hf", "hf-sharded"])
@pytest.mark.parametrize("cfg", [LLAMA, LLAMA_TIED, GPT_TIED], ids=["llama", "llama-tied", "gpt-tied"])
def test_load_quantized_equals_quantizing_the_loaded_model(tmp_path, cfg, fmt):
    torch.manual_seed(0)
    _save(build_model(cfg), tmp_path / "ckpt", fmt)
    reference = load_model(tmp_path / "ckpt")
    names = quantize_model(reference)
    model = load_quantized(tmp_path / "ckpt")
    assert [n for n, m in model.named_modules() if isinstance(m, NF4Linear)] == names
    for n in names:
        assert torch.equal(model.get_submodule(n).packed_weight, reference.get_submodule(n).packed_weight), n
    x = _tokens()
    with torch.no_grad():
        assert torch.equal(model(x), reference(x))
    # buffers computed at build time (rotary inv_freq) are real, not left on the meta device
    for (name, a), (_, b) in zip(model.named_buffers(), reference.named_buffers()):
        assert torch.equal(a, b), name
    assert not any(t.is_meta for t in [*model.parameters(), *model.buffers()])
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    if cfg.tie_embeddings:
        assert model.lm_head.weight is model.embed_tokens.weight


def test_load_quantized_can_quantize_a_tied_head_too(tmp_path):
    torch.manual_seed(0)
    save_model(build_model(LLAMA_TIED), tmp_path / "ckpt")
    reference = load_model(tmp_path / "ckpt")
    quantize_model(reference, skip=())
    model = load_quantized(tmp_path / "ckpt", skip=())
    assert isinstance(model.lm_head, NF4Linear) and isinstance(model.embed_tokens.weight, torch.nn.Parameter)
    x = _tokens()
    with torch.no_grad():
        assert torch.equal(model(x), reference(x))


def test_missing_and_unexpected_tensors_are_named_with_the_file(tmp_path):
    torch.manual_seed(0)
    save_model(build_model(LLAMA), tmp_path / "ckpt")
    file = tmp_path / "ckpt" / "model.safetensors"
    state = load_file(file)
    del state["layers.1.mlp.up_proj.weight"]
    state["layers.1.mlp.extra"] = torch.zeros(2)
    save_file(state, file)
    with pytest.raises(CheckpointError, match="missing tensors: layers.1.mlp.up_proj.weight") as e:
        load_quantized(tmp_path / "ckpt")
    assert str(file) in str(e.value) and "unexpected tensors: layers.1.mlp.extra" in str(e.value)


def test_misshapen_tensors_are_named(tmp_path):
    torch.manual_seed(0)
    save_model(build_model(LLAMA), tmp_path / "ckpt")
    file = tmp_path / "ckpt" / "model.safetensors"
    state = load_file(file)
    state["layers.0.attn.q_proj.weight"] = torch.zeros(64, 32)
    save_file(state, file)
    with pytest.raises(CheckpointError, match=r"layers.0.attn.q_proj.weight: shape \(64, 32\)"):
        load_quantized(tmp_path / "ckpt")


@pytest.mark.parametrize("index, message", [
    ('{"weight_map": {"embed_tokens.weight": "../x.safetensors"}}', "shard name '../x.safetensors' must be a plain"),
    ('{"weight_map": {"embed_tokens.weight": 3}}', "not a valid shard index (expected a weight_map"),
    ("[" * 100_000, "not a valid shard index (nested too deeply)"),
])
def test_a_bad_shard_index_is_named(tmp_path, index, message):
    save_hf(build_model(LLAMA), tmp_path / "ckpt", max_shard_bytes=100_000)
    (tmp_path / "ckpt" / "model.safetensors.index.json").write_text(index)
    with pytest.raises(CheckpointError, match=re.escape(f"model.safetensors.index.json: {message}")):
        load_quantized(tmp_path / "ckpt")


@pytest.mark.gpu
def test_layer_moved_to_cuda_computes_the_same_product():
    layer = NF4Linear.from_weight(_weight((48, 128)), torch.randn(48))
    x = torch.randn(6, 128)
    expected = layer(x)
    layer.cuda()
    assert layer.quant_state.absmax.is_cuda and layer.quant_state.state2.absmax.is_cuda
    torch.testing.assert_close(layer(x.cuda()).cpu(), expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(layer.dequantize().cpu(), layer.cpu().dequantize())
