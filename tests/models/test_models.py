"""Invariants every decoder in the zoo must keep, whatever its variant."""

from __future__ import annotations

import math

import pytest
import torch

from llmlab.models import build_model
from llmlab.models.gpt import alibi_slopes
from llmlab.models.layers import RopeScaling, rope_inv_freq
from tests.models.zoo import TINY, V

VARIANTS = sorted(TINY)


def _model(name: str, seed: int = 0):
    torch.manual_seed(seed)
    return build_model(TINY[name]).eval()


def _ids(B: int, T: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", VARIANTS)
def test_causality_future_tokens_do_not_change_past_logits(name):
    model, x = _model(name), _ids(2, 16)
    y = x.clone()
    y[:, 10:] = (y[:, 10:] + 1) % V
    with torch.no_grad():
        a, b = model(x), model(y)
    torch.testing.assert_close(a[:, :10], b[:, :10], rtol=0, atol=1e-6)
    assert (a[:, 10:] - b[:, 10:]).abs().max() > 1e-4  # the change is visible where it should be


@pytest.mark.parametrize("name", VARIANTS)
def test_kv_cache_decode_equals_full_forward(name):
    model, x = _model(name), _ids(2, 14)
    with torch.no_grad():
        full = model(x)
        cache = model.make_kv_cache(2, 32)
        steps = [model(x[:, :5], kv_cache=cache)] + [model(x[:, t:t + 1], kv_cache=cache) for t in range(5, 14)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=0, atol=1e-5)
    assert cache.length == 14


@pytest.mark.parametrize("name", VARIANTS)
def test_logits_to_keep_gives_the_last_positions_of_the_full_logits(name):
    model, x = _model(name), _ids(2, 12)
    with torch.no_grad():
        full = model(x)
        last3 = model(x, logits_to_keep=3)
        cache = model.make_kv_cache(2, 16)
        prefill = model(x[:, :8], kv_cache=cache, logits_to_keep=1)
    assert last3.shape == (2, 3, V) and prefill.shape == (2, 1, V)
    torch.testing.assert_close(last3, full[:, -3:], rtol=0, atol=1e-6)
    torch.testing.assert_close(prefill[:, 0], full[:, 7], rtol=0, atol=1e-5)
    assert cache.length == 8  # the cache holds every prompt token, whatever the logits kept
    with pytest.raises(ValueError, match="logits_to_keep must be >= 0"):
        model(x, logits_to_keep=-1)
    with pytest.raises(ValueError, match="does not apply with targets"):
        model(x, targets=x, logits_to_keep=1)


@pytest.mark.parametrize("name", VARIANTS)
def test_left_and_right_padding_match_unpadded(name):
    model = _model(name)
    short, long = _ids(1, 7, seed=2), _ids(1, 12, seed=3)
    with torch.no_grad():
        ref_short, ref_long = model(short), model(long)
        # left padding: the short row is shifted right and its pads are masked out
        left = torch.cat([torch.cat([torch.zeros(1, 5, dtype=torch.long), short], 1), long])
        mask = torch.ones(2, 12, dtype=torch.long)
        mask[0, :5] = 0
        out = model(left, attention_mask=mask)
        torch.testing.assert_close(out[0, 5:], ref_short[0], rtol=0, atol=1e-5)
        torch.testing.assert_close(out[1], ref_long[0], rtol=0, atol=1e-5)
        # right padding
        right = torch.cat([torch.cat([short, torch.zeros(1, 5, dtype=torch.long)], 1), long])
        mask = torch.ones(2, 12, dtype=torch.long)
        mask[0, 7:] = 0
        out = model(right, attention_mask=mask)
        torch.testing.assert_close(out[0, :7], ref_short[0], rtol=0, atol=1e-5)
        assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", VARIANTS)
def test_left_padded_batch_decodes_with_cache(name):
    model = _model(name)
    prompt, cont = _ids(1, 6, seed=4), _ids(1, 3, seed=5)
    with torch.no_grad():
        ref = model(torch.cat([prompt, cont], 1))[0, -3:]
        x = torch.cat([torch.zeros(1, 4, dtype=torch.long), prompt], 1)
        mask = torch.cat([torch.zeros(1, 4, dtype=torch.long), torch.ones(1, 6, dtype=torch.long)], 1)
        cache = model.make_kv_cache(1, 16)
        model(x, kv_cache=cache, attention_mask=mask)
        outs = []
        for t in range(3):
            mask = torch.cat([mask, torch.ones(1, 1, dtype=torch.long)], 1)
            outs.append(model(cont[:, t:t + 1], kv_cache=cache, attention_mask=mask)[0])
    torch.testing.assert_close(torch.cat(outs), ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", VARIANTS)
def test_num_params_equals_counted_parameters(name):
    model = _model(name)
    counted = sum(p.numel() for p in model.parameters())  # tied weights are counted once
    vocab_like = sum(p.numel() for n, p in model.named_parameters()
                     if n.startswith(("embed_tokens", "embed_positions", "lm_head")))
    assert model.num_params().total == counted
    assert model.num_params().non_embedding == counted - vocab_like
    assert model.num_params().active == counted  # dense: every token uses every parameter


@pytest.mark.parametrize("name", VARIANTS)
def test_the_attention_shape_a_config_reports_is_the_built_models(name):
    """What the planner reads instead of asking for the family by name."""
    cfg, model = TINY[name], _model(name)
    shape = cfg.attention_shape()
    attn = model.layers[0].attn
    assert cfg.causal is True
    assert attn.q_proj.weight.shape[0] == shape.n_heads * shape.head_dim
    assert attn.k_proj.weight.shape[0] == shape.n_kv_heads * shape.head_dim
    assert shape.gated_mlp == any(n.endswith("gate_proj.weight") for n, _ in model.named_parameters())


def test_flops_per_token_by_hand():
    cfg = TINY["llama"]  # dim 32, 2 layers, 4 heads of 8, SwiGLU 64, vocab 97, untied
    non_embedding = 2 * (4 * 32 * 32 + 3 * 32 * 64 + 2 * 32) + 32  # blocks with their norms, final norm
    matmul = non_embedding + 97 * 32  # plus the output head
    assert build_model(cfg).flops_per_token(16) == 6 * matmul + 12 * 2 * 32 * 16


@pytest.mark.parametrize("name", ["gpt2", "llama-gqa-tied", "gpt-relative"])
def test_gradient_checkpointing_gives_the_same_gradients(name):
    x = _ids(2, 12)
    grads = []
    for ckpt in (False, True):
        model = _model(name).train()
        model.gradient_checkpointing = ckpt
        model(x).logsumexp(-1).mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], rtol=1e-5, atol=1e-6)


def test_dropout_acts_only_in_training():
    cfg = TINY["gpt2"]
    cfg = type(cfg)(**{**cfg.__dict__, "dropout": 0.5})
    torch.manual_seed(0)
    model, x = build_model(cfg), _ids(1, 8)
    model.train()
    assert not torch.equal(model(x), model(x))
    model.eval()
    assert torch.equal(model(x), model(x))


def test_sliding_window_limits_attention():
    model, x = _model("llama-window"), _ids(1, 16)  # window 5, 2 layers -> receptive field 9
    y = x.clone()
    y[0, 0] = (y[0, 0] + 1) % V
    with torch.no_grad():
        a, b = model(x), model(y)
    assert (a[0, 4] - b[0, 4]).abs().max() > 1e-5
    torch.testing.assert_close(a[0, 9:], b[0, 9:], rtol=0, atol=1e-6)


def test_alibi_slopes_by_hand():
    # 8 heads: 2^-1 ... 2^-8; 6 heads: the 4-head sequence, then the odd terms of the 8-head one
    assert alibi_slopes(8).tolist() == [2.0 ** -i for i in range(1, 9)]
    assert alibi_slopes(6).tolist() == [2.0 ** -2, 2.0 ** -4, 2.0 ** -6, 2.0 ** -8, 2.0 ** -1, 2.0 ** -3]


def test_rope_scaling_rules_by_hand():
    base, _ = rope_inv_freq(8, 10000.0)
    torch.testing.assert_close(base, torch.tensor([1.0, 0.1, 0.01, 0.001]))
    linear, _ = rope_inv_freq(8, 10000.0, RopeScaling("linear", 4.0))
    torch.testing.assert_close(linear, base / 4)
    # dynamic NTK is the identity up to the context and stretches the base beyond it
    same, _ = rope_inv_freq(8, 10000.0, RopeScaling("dynamic", 2.0), 16, seq_len=16)
    torch.testing.assert_close(same, base)
    grown, _ = rope_inv_freq(8, 10000.0, RopeScaling("dynamic", 2.0), 16, seq_len=32)
    new_base = 10000.0 * (2.0 * 32 / 16 - 1) ** (8 / 6)
    torch.testing.assert_close(grown, 1.0 / new_base ** (torch.arange(0, 8, 2) / 8))
    # llama3: high frequencies kept, low frequencies divided by the factor
    l3, _ = rope_inv_freq(8, 10000.0, RopeScaling("llama3", 8.0, original_max_position_embeddings=64))
    assert l3[0] == base[0] and l3[-1] == pytest.approx(base[-1] / 8)
    _, yarn_factor = rope_inv_freq(8, 10000.0, RopeScaling("yarn", 4.0, original_max_position_embeddings=16))
    assert yarn_factor == pytest.approx(0.1 * math.log(4.0) + 1)


def test_bad_shapes_are_rejected():
    with pytest.raises(ValueError, match="multiple of n_kv_heads"):
        type(TINY["llama"])(dim=32, n_heads=4, n_kv_heads=3)
    with pytest.raises(ValueError, match="not divisible"):
        type(TINY["gpt2"])(dim=30, n_heads=4)
    with pytest.raises(ValueError, match="exceeds"):
        _model("gpt2")(_ids(1, 65))


LLAMA, GPT = type(TINY["llama"]), type(TINY["gpt2"])


@pytest.mark.parametrize("family, field, value, message", [
    (family, field, value, f"{field} must be >= 1, got {value}")
    for family in (LLAMA, GPT) for field in ("vocab_size", "dim", "n_layers", "n_heads", "hidden_dim", "max_seq_len")
    for value in (0, -3)
] + [
    (LLAMA, "n_kv_heads", 0, "n_kv_heads must be >= 1"), (LLAMA, "head_dim", -2, "head_dim must be >= 1"),
    (LLAMA, "sliding_window", 0, "sliding_window must be >= 1"), (LLAMA, "rope_theta", 1.0, "rope_theta must be > 1"),
    (LLAMA, "dropout", 1.0, r"dropout must be in \[0, 1\)"), (GPT, "dropout", -0.1, r"dropout must be in \[0, 1\)"),
    (LLAMA, "norm_eps", 0.0, "norm_eps must be > 0"), (GPT, "init_std", -1.0, "init_std must be > 0"),
    (LLAMA, "rope_scaling", RopeScaling("dynamic", 2.0), "'dynamic' needs head_dim >= 4"),
    (LLAMA, "rope_scaling", RopeScaling("yarn", 2.0, attention_factor=0.0), "attention_factor must be > 0"),
])
def test_sizes_and_rates_out_of_range_are_named(family, field, value, message):
    small = {"dim": 4, "n_heads": 2} if field == "rope_scaling" else {}  # head_dim 2
    with pytest.raises(ValueError, match=message):
        family(**{**small, field: value})


def test_a_model_without_a_vocabulary_size_is_not_built():
    assert LLAMA(vocab_size=None).vocab_size is None  # pretrain fills it in from the data
    with pytest.raises(ValueError, match="vocab_size is not set"):
        build_model(LLAMA(vocab_size=None, dim=8, n_layers=1, n_heads=2))


@pytest.mark.parametrize("shape", [(1, 1), (4,), (2, 8), (17,)])
def test_linear_split_product_equals_f_linear(shape):
    from llmlab.models.kernels import Linear

    torch.manual_seed(0)
    lin = Linear(96, 1024, bias=True)  # 98k weights: over the split threshold
    x = torch.randn(*shape, 96)
    with torch.no_grad():
        out = lin(x)
    assert out.shape == (*shape, 1024)
    assert torch.allclose(out, torch.nn.functional.linear(x, lin.weight, lin.bias), atol=1e-5)


@pytest.mark.parametrize("bias, wrapped, stacked", [(False, False, True), (True, False, True), (False, True, False)])
def test_stacked_linear_makes_one_product_in_a_compiled_graph_and_equals_separate_calls(bias, wrapped, stacked):
    from llmlab.models.kernels import Linear, stacked_linear

    class Wrapped(torch.nn.Module):  # stands for an adapter around a layer: never stacked
        def __init__(self, layer):
            super().__init__()
            self.layer, self.out_features = layer, layer.out_features

        def forward(self, x):
            return self.layer(x)

    torch.manual_seed(0)
    layers = [Linear(16, n, bias=bias) for n in (16, 8, 8)]
    if wrapped:
        layers[1] = Wrapped(layers[1])
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    fn = torch.compile(lambda x: stacked_linear(x, *layers), backend=backend, fullgraph=True)
    x = torch.randn(3, 5, 16)
    with torch.no_grad():
        got = fn(x)
    cats = [n for n in graphs[0].graph.nodes if n.target is torch.cat]
    assert len(cats) == (1 + bias if stacked else 0)
    for out, layer in zip(got, layers):
        assert torch.allclose(out, layer(x), atol=1e-6)
