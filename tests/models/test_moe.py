"""The mixture-of-experts layer: routing invariants, capacity's dropping rule, the auxiliary losses'
formulas on hand-built examples, and HF Mixtral's sparse block on the same weights."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from llmlab.models.moe import MoEConfig, SparseMoE, assign, capacity, load_balancing_loss, route, router_z_loss


def _layer(**cfg) -> SparseMoE:
    torch.manual_seed(0)
    layer = SparseMoE(16, 24, MoEConfig(**{"n_experts": 4, "top_k": 2, **cfg}))
    for p in layer.parameters():
        p.data.normal_(0, 0.3)
    return layer


def _dense_loop(layer: SparseMoE, x: torch.Tensor) -> torch.Tensor:
    """Every token through each of its chosen experts, one at a time."""
    flat = x.reshape(-1, x.size(-1))
    r = route(layer.router(flat), layer.cfg.top_k, layer.cfg.normalize)
    out = torch.zeros_like(flat)
    for n in range(flat.size(0)):
        for w, e in zip(r.weights[n], r.experts[n]):
            gate, up = (layer.experts.gate_up_proj.weight[e] @ flat[n]).chunk(2)
            out[n] += w * (layer.experts.down_proj.weight[e] @ (torch.nn.functional.silu(gate) * up))
    return out.view(x.shape)


@pytest.mark.parametrize("cfg", [{}, {"capacity_factor": 100.0}, {"top_k": 1, "normalize": "all"},
                                 {"n_experts": 8, "top_k": 3}])
@torch.no_grad()
def test_with_room_for_every_token_the_layer_equals_a_loop_over_experts(cfg):
    layer = _layer(**cfg)
    x = torch.randn(3, 7, 16)
    torch.testing.assert_close(layer(x), _dense_loop(layer, x), atol=1e-5, rtol=1e-5)
    assert layer.stats["dropped"] == 0 and int(layer.stats["tokens_per_expert"].sum()) == 21 * layer.cfg.top_k


def test_capacity_keeps_first_choices_first_then_earlier_tokens():
    experts = torch.tensor([[0, 1], [0, 2], [0, 1], [1, 0]])
    keep = assign(experts, 3, limit=2)
    # expert 0: tokens 0 and 1 (first choices); token 2's first choice and token 3's second are over
    # the limit; expert 1: token 3 (a first choice) before token 0's second; token 2's second is third
    assert keep.tolist() == [[True, True], [True, True], [False, False], [True, False]]
    assert assign(experts, 3, limit=None).all()
    assert capacity(8, 4, 1, 1.0) == 2 and capacity(10, 4, 2, 1.25) == 7 and capacity(8, 4, 1, None) is None


@torch.no_grad()
def test_tokens_over_capacity_are_dropped_and_counted():
    layer = _layer(top_k=1, normalize="all", capacity_factor=1.0)
    layer.router.weight.zero_()
    layer.router.weight[0] = 1.0  # every token with a positive sum prefers expert 0
    x = torch.rand(1, 8, 16) + 0.1
    out = layer(x)[0]
    assert layer.stats["dropped"] == 6  # capacity ceil(1.0 * 1 * 8 / 4) = 2: tokens 0 and 1 are kept
    assert layer.stats["tokens_per_expert"].tolist() == [2, 0, 0, 0]
    assert out[:2].abs().sum() > 0 and out[2:].abs().sum() == 0  # the dropped pass through the residual only
    torch.testing.assert_close(out[:2], _dense_loop(layer, x)[0, :2])


def test_the_auxiliary_losses_equal_their_formulas():
    probs = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.6, 0.4], [0.3, 0.7]])
    experts = probs.argmax(-1, keepdim=True)  # f = (0.75, 0.25), P = (0.65, 0.35)
    assert float(load_balancing_loss(probs, experts, 2)) == pytest.approx(2 * (0.75 * 0.65 + 0.25 * 0.35))
    uniform = torch.full((6, 4), 0.25)
    balanced = torch.tensor([[0, 1], [2, 3], [1, 0], [3, 2], [0, 2], [1, 3]])
    assert float(load_balancing_loss(uniform, balanced[:4], 4)) == pytest.approx(2.0)  # 1 per rank
    logits = torch.tensor([[0.0, 0.0], [1.0, 3.0]])
    want = (math.log(2.0) ** 2 + math.log(math.exp(1.0) + math.exp(3.0)) ** 2) / 2
    assert float(router_z_loss(logits)) == pytest.approx(want)


def test_the_auxiliary_loss_trains_the_router():
    layer = _layer(aux_loss_coef=0.01, z_loss_coef=0.001)
    x = torch.randn(2, 5, 16)
    out = layer(x)
    (out.square().mean() + layer.aux_loss).backward()
    assert layer.router.weight.grad.abs().sum() > 0 and layer.experts.gate_up_proj.weight.grad.abs().sum() > 0
    assert layer.aux_loss.requires_grad


@pytest.mark.hf
@torch.no_grad()
def test_the_layer_equals_transformers_mixtral_sparse_block():
    tf = pytest.importorskip("transformers")
    from transformers.models.mixtral import modeling_mixtral as hf_mixtral

    hf_cfg = tf.MixtralConfig(hidden_size=16, intermediate_size=24, num_local_experts=4, num_experts_per_tok=2)
    torch.manual_seed(0)
    hf = hf_mixtral.MixtralSparseMoeBlock(hf_cfg).eval()
    for p in hf.parameters():
        p.data.normal_(0, 0.3)
    layer = SparseMoE(16, 24, MoEConfig(n_experts=4, top_k=2)).eval()
    layer.router.weight.copy_(hf.gate.weight)
    layer.experts.gate_up_proj.weight.copy_(hf.experts.gate_up_proj)
    layer.experts.down_proj.weight.copy_(hf.experts.down_proj)
    x = torch.randn(2, 9, 16)
    torch.testing.assert_close(layer(x), hf(x), atol=1e-5, rtol=1e-5)
    hf_logits = hf.gate(x.reshape(-1, 16))[0]
    torch.testing.assert_close(layer.router_logits(x.reshape(-1, 16)), hf_logits)
    r = route(hf_logits, 2)
    want = hf_mixtral.load_balancing_loss_func((hf_logits,), 4, 2)
    assert float(load_balancing_loss(r.probs, r.experts, 4)) == pytest.approx(float(want), rel=1e-6)


# --------------------------------------------------------------------------- in a decoder


def _moe_llama(**moe):
    from llmlab.models import LlamaConfig, build_model

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=97, dim=32, n_layers=4, n_heads=4, n_kv_heads=2, hidden_dim=48, max_seq_len=64,
                      moe=MoEConfig(**{"n_experts": 4, "top_k": 2, **moe}))
    return build_model(cfg)


def test_a_decoder_with_experts_counts_its_total_and_active_parameters(tmp_path):
    from llmlab.models.io import load_model, save_model

    model = _moe_llama(every=2, hidden_dim=40)
    assert [type(b.mlp).__name__ for b in model.layers] == ["SwiGLU", "SparseMoE", "SwiGLU", "SparseMoE"]
    counts = model.config.num_params()
    assert counts.total == sum(p.numel() for p in model.parameters())
    assert counts.total - counts.active == 2 * (4 - 2) * 3 * 32 * 40  # two idle experts in each MoE block
    save_model(model.eval(), tmp_path)
    x = torch.randint(0, 97, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(load_model(tmp_path).eval()(x), model(x), atol=0, rtol=0)


def test_a_decoder_with_experts_adds_the_router_losses_and_reports_them():
    model = _moe_llama(aux_loss_coef=0.02, z_loss_coef=0.001)
    x = torch.randint(0, 97, (2, 12))
    loss = model(x, targets=x)
    aux = model.aux_loss
    want = sum(b.mlp.aux_loss.detach() for b in model.layers)
    assert float(aux) == pytest.approx(float(want)) and float(aux) > 0 and not aux.requires_grad
    logits = model(x)
    ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), x.flatten())
    assert float(loss.detach()) == pytest.approx(float(ce.detach() + aux), rel=1e-5)
    with torch.no_grad():  # evaluation scores the tokens alone
        assert float(model.eval()(x, targets=x)) == pytest.approx(float(ce), rel=1e-5)
    model.train().gradient_checkpointing = True
    model(x, targets=x).backward()
    assert all(b.mlp.router.weight.grad is not None for b in model.layers)


def test_padding_is_not_routed_nor_counted():
    model = _moe_llama()  # four MoE blocks, top-2
    x = torch.randint(0, 97, (2, 10))
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, 6:] = 0  # the second row is 6 tokens and 4 of padding
    model(x, attention_mask=mask, targets=x.masked_fill(mask == 0, -100))
    assert model.routing[:4].sum() == 4 * 2 * 16 and model.routing[4] == 0
    aux_padded = float(model.aux_loss)
    model(x[:, :6], targets=x[:, :6])  # the same real tokens but for the first row's last four
    assert model.routing[:4].sum() == 4 * 2 * 12 and aux_padded != float(model.aux_loss)
    with torch.no_grad():
        alone = model.eval()(x[1:, :6])
        padded = model(x, attention_mask=mask)
    assert torch.allclose(padded[1, :6], alone[0], atol=1e-5)  # the padding changed nothing of the row's


@torch.no_grad()
def test_decoding_with_the_kv_cache_equals_the_full_forward():
    model = _moe_llama().eval()
    x = torch.randint(0, 97, (2, 10))
    full = model(x)
    cache = model.make_kv_cache(2, 16)
    steps = [model(x[:, :4], kv_cache=cache)] + [model(x[:, t:t + 1], kv_cache=cache) for t in range(4, 10)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------- HF Mixtral


def _hf_mixtral():
    tf = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = tf.MixtralConfig(vocab_size=97, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                           sliding_window=6, max_position_embeddings=64, tie_word_embeddings=False)
    model = tf.MixtralForCausalLM(cfg).eval()
    for p in model.parameters():
        p.data.normal_(0, 0.2)
    return model


def _router_logits(model, x) -> list[torch.Tensor]:
    found = []
    hooks = [b.mlp.router.register_forward_hook(lambda m, i, o: found.append(o)) for b in model.layers]
    model(x)
    for h in hooks:
        h.remove()
    return found


@pytest.mark.hf
@torch.no_grad()
def test_transformers_mixtral_imports_and_exports_with_equal_logits_and_router_logits(tmp_path):
    import transformers

    from llmlab.models.io import load_model, save_hf

    hf = _hf_mixtral()
    hf.save_pretrained(tmp_path / "hf")
    ours = load_model(tmp_path / "hf").eval()
    assert ours.config.moe.n_experts == 4 and ours.config.sliding_window == 6 and ours.config.n_kv_heads == 2
    x = torch.randint(0, 97, (2, 14))  # longer than the window
    want = hf(x, output_router_logits=True)
    torch.testing.assert_close(ours(x), want.logits, atol=1e-4, rtol=1e-4)
    for got, theirs in zip(_router_logits(ours, x), want.router_logits):
        torch.testing.assert_close(got, theirs, atol=1e-5, rtol=1e-5)
    save_hf(ours, tmp_path / "back")
    again = transformers.MixtralForCausalLM.from_pretrained(tmp_path / "back").eval()
    torch.testing.assert_close(again(x).logits, want.logits, atol=1e-4, rtol=1e-4)


@pytest.mark.hf
@torch.no_grad()
def test_mixtral_as_released_with_one_tensor_per_expert_imports(tmp_path):
    from safetensors.torch import save_file

    from llmlab.models.io import load_model

    hf = _hf_mixtral()
    hf.save_pretrained(tmp_path / "fused")
    state = {}
    for key, t in hf.state_dict().items():  # the released checkpoints' names: block_sparse_moe.experts.E.w1/w2/w3
        if key.endswith("mlp.experts.gate_up_proj"):
            block = key.removesuffix(".mlp.experts.gate_up_proj")
            for e, fused in enumerate(t):
                w1, w3 = fused.chunk(2)
                state[f"{block}.block_sparse_moe.experts.{e}.w1.weight"] = w1.contiguous()
                state[f"{block}.block_sparse_moe.experts.{e}.w3.weight"] = w3.contiguous()
        elif key.endswith("mlp.experts.down_proj"):
            block = key.removesuffix(".mlp.experts.down_proj")
            for e, w2 in enumerate(t):
                state[f"{block}.block_sparse_moe.experts.{e}.w2.weight"] = w2.contiguous()
        else:
            state[key.replace(".mlp.gate.", ".block_sparse_moe.gate.")] = t.contiguous()
    (tmp_path / "released").mkdir()
    (tmp_path / "released" / "config.json").write_text((tmp_path / "fused" / "config.json").read_text())
    save_file(state, tmp_path / "released" / "model.safetensors")
    x = torch.randint(0, 97, (1, 9))
    torch.testing.assert_close(load_model(tmp_path / "released").eval()(x), hf(x).logits, atol=1e-4, rtol=1e-4)


def test_an_moe_without_a_mixtral_layout_has_no_hf_export(tmp_path):
    from llmlab.models.convert import ConversionError
    from llmlab.models.io import save_hf

    with pytest.raises(ConversionError, match="every=1"):
        save_hf(_moe_llama(every=2), tmp_path)


def test_the_engine_decodes_an_moe_model_batched_as_alone():
    from llmlab.generate import SamplingParams
    from llmlab.generate.engine import Engine

    engine = Engine(_moe_llama().eval())
    prompts = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14]]
    params = SamplingParams(max_new_tokens=6, temperature=0.0)
    together = [c.token_ids for c in engine.generate(prompts, params)]
    assert together == [engine.generate([p], params)[0].token_ids for p in prompts]


def test_the_scheduler_decodes_an_moe_model_as_the_engine_does():
    from llmlab.generate import SamplingParams
    from llmlab.generate.engine import Engine
    from llmlab.generate.scheduler import Scheduler, Sequence

    model = _moe_llama().eval()
    prompts = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14]]
    params = SamplingParams(max_new_tokens=6, temperature=0.0)
    scheduler = Scheduler(model, max_batch=2)  # the third waits for a row
    running = [scheduler.add(Sequence(p, params)) for p in prompts]
    while scheduler.busy:
        scheduler.step()
    assert [s.output for s in running] == [c.token_ids for c in Engine(model).generate(prompts, params)]


def test_lora_adapts_the_router_by_name():
    from llmlab.peft import LoraConfig, apply_lora

    model = _moe_llama()
    wrapped = apply_lora(model, LoraConfig(r=4, targets=["router", "q_proj"]))
    assert sum(name.endswith("mlp.router") for name in wrapped) == 4
    x = torch.randint(0, 97, (2, 8))
    model(x, targets=x).backward()
    trained = {n for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}
    assert any("router" in n and "lora" in n for n in trained) and not any("gate_up_proj" in n for n in trained)


# --------------------------------------------------------------------------- Switch: T5 with experts


def _switch(**moe):
    from llmlab.models import T5Config, build_model

    torch.manual_seed(0)
    cfg = T5Config(vocab_size=97, dim=32, n_layers=2, n_heads=2, head_dim=16, hidden_dim=48, max_seq_len=32,
                   max_target_len=16, dropout=0.0,
                   moe=MoEConfig(**{"n_experts": 4, "top_k": 1, "every": 2, "gated": False, "activation": "relu",
                                    "normalize": "all", **moe}))
    return build_model(cfg)


def test_a_switch_transformer_counts_and_places_its_experts():
    model = _switch()
    n = model.num_params()
    assert n.total == sum(p.numel() for p in model.parameters())
    kinds = [type(b.mlp).__name__ for stack in (model.encoder, model.decoder) for b in stack.layers]
    assert kinds == ["MLP", "SparseMoE", "MLP", "SparseMoE"]  # every other block of each stack
    assert model.encoder.layers[1].mlp.experts.up_proj.weight.shape == (4, 48, 32)
    assert n.total - n.active == 2 * 3 * 2 * 32 * 48  # two MoE blocks, three idle ReLU experts each
    dense = model.config.flops_per_token(16)
    assert dense == type(model.config)(**{**vars(model.config), "moe": None}).flops_per_token(16) + 3 * 2 * 32 * 4


def test_a_switch_transformer_adds_its_router_losses_while_training_only():
    model = _switch(aux_loss_coef=0.01, z_loss_coef=0.001)
    x, y = torch.randint(2, 97, (2, 12)), torch.randint(2, 97, (2, 6))
    loss = model.train()(x, targets=y)
    aux = model.aux_loss
    assert aux > 0 and model.routing.shape == (5,)
    assert model.routing[:4].sum() == 2 * 12 + 2 * 6  # one MoE block a stack, top-1
    loss.backward()
    assert model.decoder.layers[1].mlp.router.weight.grad.abs().sum() > 0
    with torch.no_grad():
        evaluated = model.eval()(x, targets=y)
        logits = model(x, decoder_input_ids=model.shift_right(y))
    assert torch.allclose(evaluated, F.cross_entropy(logits.flatten(0, 1), y.flatten()), atol=1e-6)


def test_a_switch_transformer_routes_neither_input_nor_target_padding():
    model = _switch().train()
    x, y = torch.randint(2, 97, (2, 12)), torch.randint(2, 97, (2, 6))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[0, 8:] = 0  # 4 input tokens of padding
    y[1, 4:] = -100  # 2 target positions of padding
    model(x, attention_mask=mask, targets=y)
    assert model.routing[:4].sum() == (24 - 4) + (12 - 2)  # one MoE block a stack, top-1


def test_a_switch_transformer_decodes_with_its_cache_as_without():
    from llmlab.generate import Engine, SamplingParams

    model = _switch(capacity_factor=None).eval()  # dropless: a token's route does not depend on the others
    prompt = [5, 6, 7, 8, 9, 10]
    out = Engine(model).generate([prompt], SamplingParams(max_new_tokens=5, temperature=0.0))[0].token_ids
    decoded = [model.config.decoder_start_id]
    with torch.no_grad():
        for _ in range(len(out)):
            logits = model(torch.tensor([prompt]), decoder_input_ids=torch.tensor([decoded]))
            decoded.append(int(logits[0, -1].argmax()))
    assert out == decoded[1:]


def test_the_seq2seq_scheduler_decodes_a_switch_transformer_as_the_engine_does():
    from llmlab.generate import Engine, SamplingParams
    from llmlab.generate.scheduler import Seq2SeqScheduler, Sequence

    model = _switch(capacity_factor=None).eval()
    prompts = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [14, 15, 16, 17]]  # rows of other lengths: padding in batches
    params = SamplingParams(max_new_tokens=6, temperature=0.0)
    scheduler = Seq2SeqScheduler(model, max_batch=2)  # the third joins when a row leaves
    running = [scheduler.add(Sequence(p, params)) for p in prompts]
    while scheduler.busy:
        scheduler.step()
    assert [s.output for s in running] == [Engine(model).generate([p], params)[0].token_ids for p in prompts]


def test_a_switch_transformer_has_no_hf_export(tmp_path):
    from llmlab.models.convert import ConversionError
    from llmlab.models.io import save_hf

    with pytest.raises(ConversionError, match="Switch Transformer.*no HF export"):
        save_hf(_switch(), tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


@pytest.mark.parametrize("fields, message", [
    ({"top_k": 5}, r"top_k must be in \[1, n_experts=4\]"),
    ({"top_k": 1}, "router would learn from the auxiliary loss alone; use normalize=all"),
    ({"every": 0}, "every must be >= 1"),
    ({"capacity_factor": 0.0}, "capacity_factor must be > 0"),
    ({"activation": "swish"}, "activation must be one of"),
    ({"jitter": 1.0}, r"jitter must be in \[0, 1\)"),
    ({"aux_loss_coef": -0.1}, "aux_loss_coef must be >= 0"),
])
def test_bad_settings_are_named(fields, message):
    with pytest.raises(ValueError, match=message):
        MoEConfig(**{"n_experts": 4, **fields})
