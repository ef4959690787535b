"""T5 and mT5: HF parity (v1.0 and v1.1, tied and untied, import and export), greedy and beam
generation equal to `transformers`' `generate`, the decoding cache against the full forward, the
position buckets, the loss, and bad input."""

from __future__ import annotations

import json

import pytest
import torch

from llmlab.generate import SamplingParams
from llmlab.generate.engine import Engine
from llmlab.models import T5Config, build_model
from llmlab.models.io import load_model, save_hf, save_model
from llmlab.models.t5 import relative_position_bucket

tf = pytest.importorskip("transformers")

V = 61
SHAPE = dict(vocab_size=V, d_model=16, d_kv=6, d_ff=32, num_layers=2, num_heads=3, dropout_rate=0.0,
             relative_attention_num_buckets=8, relative_attention_max_distance=20, decoder_start_token_id=0,
             pad_token_id=0, eos_token_id=1)
CASES = {
    "v1.0-relu-tied": dict(feed_forward_proj="relu"),
    "v1.1-gated-untied": dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False),
    "v1.1-gated-tied": dict(feed_forward_proj="gated-gelu"),
    "deeper-decoder": dict(feed_forward_proj="relu", num_decoder_layers=3),
}


def _hf_model(name):
    torch.manual_seed(0)
    fields = CASES[name]
    model = tf.T5ForConditionalGeneration(tf.T5Config(**{**SHAPE, **fields})).eval()
    if fields.get("tie_word_embeddings") is False:  # transformers ties T5 on construction: untie by hand
        model.lm_head.weight = torch.nn.Parameter(torch.empty(V, 16))
    for p in model.parameters():
        p.data.normal_(0, 0.5)
    return model


def _batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(2, V, (2, 30), generator=g)  # distances past relative_attention_max_distance
    mask = torch.ones_like(ids)
    mask[1, 21:] = 0
    decoder_ids = torch.randint(2, V, (2, 24), generator=g)
    return ids, mask, decoder_ids


@pytest.mark.parametrize("name", sorted(CASES))
def test_hf_import_export_parity(name, tmp_path):
    hf = _hf_model(name)
    hf.save_pretrained(tmp_path / "hf")
    ids, mask, decoder_ids = _batch()
    with torch.no_grad():
        want = hf(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder_ids).logits
    ours = load_model(tmp_path / "hf")
    assert ours.config.tie_embeddings == (CASES[name].get("tie_word_embeddings") is not False)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids, attention_mask=mask, decoder_input_ids=decoder_ids), want,
                                   atol=1e-4, rtol=0)
    save_hf(ours, tmp_path / "out")
    back = tf.T5ForConditionalGeneration.from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        torch.testing.assert_close(back(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder_ids).logits,
                                   want, atol=1e-4, rtol=0)
    save_model(ours, tmp_path / "ours")
    assert json.loads((tmp_path / "ours" / "config.json").read_text())["llmlab"]["family"] == "t5"
    with torch.no_grad():
        assert torch.equal(load_model(tmp_path / "ours")(ids, attention_mask=mask, decoder_input_ids=decoder_ids),
                           ours(ids, attention_mask=mask, decoder_input_ids=decoder_ids))


def test_loss_equals_hf_with_padded_targets(tmp_path):
    hf = _hf_model("v1.1-gated-untied")
    hf.save_pretrained(tmp_path)
    ours = load_model(tmp_path)
    ids, mask, labels = _batch()
    labels[1, 15:] = -100
    with torch.no_grad():
        want = hf(input_ids=ids, attention_mask=mask, labels=labels).loss
        torch.testing.assert_close(ours(ids, attention_mask=mask, targets=labels), want, atol=1e-5, rtol=1e-5)


def test_position_buckets_equal_the_reference():
    from transformers.models.t5.modeling_t5 import T5Attention

    distance = torch.arange(-300, 300)[None, :]
    for bidirectional in (True, False):
        for buckets, max_distance in ((32, 128), (8, 20), (6, 7)):
            want = T5Attention._relative_position_bucket(distance, bidirectional, buckets, max_distance)
            got = relative_position_bucket(distance, bidirectional=bidirectional, num_buckets=buckets,
                                           max_distance=max_distance)
            assert torch.equal(got, want)


@pytest.mark.parametrize("beams", [1, 3])
def test_generation_equals_transformers_generate(tmp_path, beams):
    hf = _hf_model("v1.1-gated-tied")
    hf.save_pretrained(tmp_path)
    prompts = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14]]  # one batch, left-padded
    params = SamplingParams(max_new_tokens=10, temperature=0.0, num_beams=beams, stop_token_ids=[1])
    got = Engine(load_model(tmp_path)).generate(prompts, params)
    for prompt, completion in zip(prompts, got):
        want = hf.generate(torch.tensor([prompt]), max_new_tokens=10, do_sample=False, num_beams=beams,
                           length_penalty=1.0)[0].tolist()
        assert [0] + completion.token_ids == want  # transformers returns the decoder's start token too


def test_the_decoding_cache_equals_the_full_forward():
    torch.manual_seed(0)
    model = build_model(_tiny(mlp="gated-gelu")).eval()
    ids = torch.randint(2, V, (3, 9))
    mask = torch.ones_like(ids)
    mask[2, :4] = 0  # left padding, as the engine batches prompts
    decoder_ids = torch.randint(2, V, (3, 7))
    with torch.no_grad():
        encoder_out = model.encode(ids, mask)
        full = model.logits(model.decode(decoder_ids, encoder_out, mask))
        cache = model.make_cache(encoder_out, mask, max_len=8)
        first = model.logits(model.decode(decoder_ids[:, :3], cache=cache))  # several tokens, then one at a time
        steps = [model.logits(model.decode(decoder_ids[:, t:t + 1], cache=cache)) for t in range(3, 7)]
    torch.testing.assert_close(torch.cat([first, *steps], dim=1), full, atol=1e-5, rtol=0)


def _tiny(**kw) -> T5Config:
    return T5Config(**{**dict(vocab_size=V, dim=16, n_layers=2, n_heads=2, head_dim=8, hidden_dim=32,
                              relative_buckets=8, relative_max_distance=16, max_seq_len=32, max_target_len=12,
                              dropout=0.0), **kw})


def test_encoder_is_bidirectional_and_ignores_padding():
    torch.manual_seed(0)
    model = build_model(_tiny()).eval()
    ids = torch.randint(2, V, (1, 10))
    changed = ids.clone()
    changed[0, -1] = (ids[0, -1] + 1) % V
    assert not torch.allclose(model.encode(ids)[0, :-1], model.encode(changed)[0, :-1])
    mask = torch.tensor([[1] * 6 + [0] * 4])
    decoder_ids = torch.randint(2, V, (1, 5))
    alone = model(ids[:, :6], decoder_input_ids=decoder_ids)
    for filler in (0, 9, 33):
        padded = ids.clone()
        padded[0, 6:] = filler
        torch.testing.assert_close(model(padded, attention_mask=mask, decoder_input_ids=decoder_ids), alone,
                                   atol=1e-5, rtol=0)


def test_parameter_count_and_limits():
    for cfg in (_tiny(), _tiny(mlp="gated-gelu", tie_embeddings=False, n_decoder_layers=3)):
        assert cfg.num_params().total == sum(p.numel() for p in build_model(cfg).parameters())
    model = build_model(_tiny())
    with pytest.raises(ValueError, match="exceeds max_seq_len=32"):
        model(torch.zeros(1, 33, dtype=torch.long), decoder_input_ids=torch.zeros(1, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="a target of 13 tokens exceeds max_target_len=12"):
        model(torch.zeros(1, 4, dtype=torch.long), targets=torch.zeros(1, 13, dtype=torch.long))
    with pytest.raises(ValueError, match="decoder_input_ids or targets"):
        model(torch.zeros(1, 4, dtype=torch.long))


@pytest.mark.parametrize("fields, message", [
    ({"mlp": "swiglu"}, None),
    ({"relative_buckets": 2}, "at least 4 buckets"),
    ({"eos_id": V}, "eos_id"),
    ({"num_labels": 2}, "no score head"),
])
def test_bad_configs_are_named(fields, message):
    if message is None:  # a Literal is checked where configs are read (from_dict), not by the dataclass
        from llmlab.config import ConfigError, from_dict

        with pytest.raises(ConfigError, match="mlp"):
            from_dict(T5Config, {"vocab_size": V, **fields})
        return
    with pytest.raises(ValueError, match=message):
        _tiny(**fields)


def test_unsupported_t5_layouts_are_refused(tmp_path):
    hf = _hf_model("v1.0-relu-tied")
    hf.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["feed_forward_proj"] = "gated-silu"
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(Exception, match="feed_forward_proj='gated-silu' is not supported"):
        load_model(tmp_path)


def test_the_repetition_penalty_counts_the_output_alone_as_transformers_does(tmp_path):
    hf = _hf_model("v1.1-gated-tied")
    hf.save_pretrained(tmp_path)
    prompt = [5, 6, 7, 8, 9, 10, 11]
    params = SamplingParams(max_new_tokens=10, temperature=0.0, repetition_penalty=1.5, stop_token_ids=[1])
    got = Engine(load_model(tmp_path)).generate([prompt], params)[0]
    want = hf.generate(torch.tensor([prompt]), max_new_tokens=10, do_sample=False, repetition_penalty=1.5)[0]
    assert [0] + got.token_ids == want.tolist()
