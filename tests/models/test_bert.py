"""BERT, RoBERTa and ALBERT: HF parity of every head (import, export and back), bidirectional
attention, padding that never leaks, the heads' losses against HF's, and bad checkpoints."""

from __future__ import annotations

import json

import pytest
import torch

from llmlab.models import BertConfig, build_model
from llmlab.models.convert import ConversionError, config_to_hf
from llmlab.models.io import load_model, save_hf, save_model

tf = pytest.importorskip("transformers")

V = 61
SHAPE = dict(vocab_size=V, hidden_size=16, num_hidden_layers=3, num_attention_heads=2, intermediate_size=32,
             max_position_embeddings=24, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
CASES = {
    "bert-mlm": lambda: tf.BertForMaskedLM(tf.BertConfig(**SHAPE)),
    "bert-mlm-untied": lambda: tf.BertForMaskedLM(tf.BertConfig(tie_word_embeddings=False, **SHAPE)),
    "roberta-mlm": lambda: tf.RobertaForMaskedLM(tf.RobertaConfig(type_vocab_size=1, **SHAPE)),
    "albert-mlm-shared": lambda: tf.AlbertForMaskedLM(tf.AlbertConfig(embedding_size=8, **SHAPE)),
    "albert-mlm-unshared": lambda: tf.AlbertForMaskedLM(tf.AlbertConfig(embedding_size=8, num_hidden_groups=3,
                                                                        **SHAPE)),
    "bert-classify": lambda: tf.BertForSequenceClassification(tf.BertConfig(num_labels=3, **SHAPE)),
    "roberta-classify": lambda: tf.RobertaForSequenceClassification(tf.RobertaConfig(num_labels=3, **SHAPE)),
    "albert-classify": lambda: tf.AlbertForSequenceClassification(tf.AlbertConfig(embedding_size=8, num_labels=2,
                                                                                  **SHAPE)),
    "bert-tokens": lambda: tf.BertForTokenClassification(tf.BertConfig(num_labels=5, **SHAPE)),
    "bert-span": lambda: tf.BertForQuestionAnswering(tf.BertConfig(**SHAPE)),
    "bert-pretraining": lambda: tf.BertForPreTraining(tf.BertConfig(**SHAPE)),
    "albert-pretraining": lambda: tf.AlbertForPreTraining(tf.AlbertConfig(embedding_size=8, **SHAPE)),
}


def _hf_model(name):
    torch.manual_seed(0)
    model = CASES[name]().eval()
    for p in model.parameters():  # HF zero-initialises biases and unit-initialises norms: randomise all
        p.data.normal_(0, 0.3)
    return model


def _batch(roberta: bool):
    """Two rows, the second right-padded, with segments A and B."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, V, (2, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    types = torch.zeros_like(ids)
    if roberta:
        ids = ids.masked_fill(mask == 0, 1)  # RoBERTa finds its padding by pad_token_id (1)
    else:
        types[:, 6:] = 1
    return ids, mask, types


def _hf_logits(model, ids, mask, types):
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, token_type_ids=types)
    if hasattr(out, "prediction_logits"):  # *ForPreTraining
        return out.prediction_logits
    return torch.stack([out.start_logits, out.end_logits], -1) if hasattr(out, "start_logits") else out.logits


def _ours(model, ids, mask, types):
    with torch.no_grad():
        return model(ids, attention_mask=mask, token_type_ids=types)


def _real(logits, mask):
    """The logits of real tokens (per-token heads) or of each row (classify)."""
    return logits[mask.bool()] if logits.dim() == 3 else logits


@pytest.mark.parametrize("name", sorted(CASES))
def test_hf_import_export_parity(name, tmp_path):
    hf = _hf_model(name)
    hf.save_pretrained(tmp_path / "hf")
    batch = _batch(name.startswith("roberta"))
    want = _hf_logits(hf, *batch)

    ours = load_model(tmp_path / "hf")
    assert ours.config.family == "bert" and ours.config.variant == name.split("-")[0]
    torch.testing.assert_close(_real(_ours(ours, *batch), batch[1]), _real(want, batch[1]), atol=1e-4, rtol=0)
    if ours.config.sentence_head:  # the next-sentence / sentence-order classifier too
        ids, mask, types = batch
        with torch.no_grad():
            out = hf(input_ids=ids, attention_mask=mask, token_type_ids=types)
            pair = getattr(out, "seq_relationship_logits", None)
            torch.testing.assert_close(ours.sentence_logits(ids, attention_mask=mask, token_type_ids=types),
                                       out.sop_logits if pair is None else pair, atol=1e-4, rtol=0)

    save_hf(ours, tmp_path / "out")
    back = type(hf).from_pretrained(tmp_path / "out").eval()
    torch.testing.assert_close(_real(_hf_logits(back, *batch), batch[1]), _real(want, batch[1]), atol=1e-4, rtol=0)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["architectures"] == [type(hf).__name__]
    # and through llmlab's own format
    save_model(ours, tmp_path / "ours")
    again = load_model(tmp_path / "ours")
    assert torch.equal(_ours(again, *batch), _ours(ours, *batch))


@pytest.mark.parametrize("name", ["bert-mlm", "roberta-mlm", "albert-mlm-shared", "bert-classify",
                                  "roberta-classify", "bert-tokens", "bert-span", "bert-pretraining",
                                  "albert-pretraining"])
def test_head_losses_equal_hf(name, tmp_path):
    hf = _hf_model(name)
    hf.save_pretrained(tmp_path)
    ours = load_model(tmp_path)
    ids, mask, types = _batch(name.startswith("roberta"))
    g = torch.Generator().manual_seed(2)
    head = ours.config.head
    extra = {}
    if head == "mlm":
        labels = torch.where(torch.rand(ids.shape, generator=g) < 0.3, ids, -100)
        labels[0, 0] = ids[0, 0]  # at least one prediction
        hf_kwargs = {"labels": labels}
        if ours.config.sentence_head:  # next-sentence (BERT) or sentence-order (ALBERT) labels as well
            extra = {"sentence_targets": torch.tensor([1, 0])}
            hf_kwargs["next_sentence_label" if name.startswith("bert") else "sentence_order_label"] = \
                extra["sentence_targets"]
    elif head == "classify":
        labels = torch.tensor([2, 0])
        hf_kwargs = {"labels": labels}
    elif head == "tokens":
        labels = torch.randint(0, 5, ids.shape, generator=g).masked_fill(mask == 0, -100)
        hf_kwargs = {"labels": labels}
    else:  # one answer inside the row, one past it (ignored, as HF clamps it)
        labels = torch.tensor([[2, 4], [3, 40]])
        hf_kwargs = {"start_positions": labels[:, 0], "end_positions": labels[:, 1]}
    with torch.no_grad():
        want = hf(input_ids=ids, attention_mask=mask, token_type_ids=types, **hf_kwargs).loss
        got = ours(ids, attention_mask=mask, token_type_ids=types, targets=labels, **extra)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def _tiny(**kw) -> BertConfig:
    return BertConfig(vocab_size=V, dim=16, n_layers=2, n_heads=2, max_seq_len=16, dropout=0.0, **kw)


def test_attention_is_bidirectional_and_padding_never_leaks():
    torch.manual_seed(0)
    model = build_model(_tiny()).eval()
    ids = torch.randint(3, V, (1, 10))
    changed = ids.clone()
    changed[0, -1] = (ids[0, -1] + 1) % V  # a future token: earlier positions must see it
    assert not torch.allclose(model(ids)[0, :-1], model(changed)[0, :-1])
    # whatever sits in the padded positions, the real tokens' outputs are the same as unpadded
    mask = torch.tensor([[1] * 6 + [0] * 4])
    alone = model(ids[:, :6])
    for filler in (0, 7, 42):
        padded = ids.clone()
        padded[0, 6:] = filler
        torch.testing.assert_close(model(padded, attention_mask=mask)[:, :6], alone, atol=1e-5, rtol=0)


def test_roberta_positions_count_real_tokens_from_pad_plus_one():
    model = build_model(_tiny(variant="roberta", pad_id=1, type_vocab_size=1))
    ids = torch.tensor([[0, 5, 6, 2, 1, 1]])
    assert model.position_ids(ids).tolist() == [[2, 3, 4, 5, 1, 1]]
    assert model.embed_positions.num_embeddings == 16 + 2
    assert config_to_hf(model.config)["max_position_embeddings"] == 18


def test_albert_factorised_and_shared_parameters():
    bert = _tiny()
    albert = _tiny(variant="albert", embed_dim=8, share_layers=True, activation="gelu_tanh")
    for cfg in (bert, albert, _tiny(variant="albert", embed_dim=8)):
        model = build_model(cfg)
        assert cfg.num_params().total == sum(p.numel() for p in model.parameters())
    assert len(build_model(albert).layers) == 1
    # a shared block costs the FLOPs of every layer it runs as
    assert albert.flops_per_token(16) > build_model(albert).num_params().non_embedding * 6


@pytest.mark.parametrize("fields, message", [
    ({"head": "mlm", "num_labels": 3}, "needs a classification head"),
    ({"head": "classify"}, "num_labels >= 1"),
    ({"head": "span", "num_labels": 3}, "2 outputs"),
    ({"head": "pool"}, "head must be one of"),
    ({"pad_id": 99}, "pad_id=99"),
    ({"embed_dim": 0}, "embed_dim must be >= 1"),
])
def test_bad_configs_are_named(fields, message):
    with pytest.raises(ValueError, match=message):
        _tiny(**fields)


def test_a_sequence_longer_than_the_positions_is_refused():
    model = build_model(_tiny())
    with pytest.raises(ValueError, match="exceeds the 16 learned positions"):
        model(torch.zeros(1, 17, dtype=torch.long))


def test_a_checkpoint_of_one_family_read_as_another_names_the_keys(tmp_path):
    _hf_model("roberta-mlm").save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config.update(model_type="bert", architectures=["BertForMaskedLM"])  # RoBERTa weights under a BERT config
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConversionError, match="have no conversion rule: .*roberta.embeddings"):
        load_model(tmp_path)
    config.update(architectures=["BertForNextSentencePrediction"])
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConversionError, match="architectures='BertForNextSentencePrediction' is not supported"):
        load_model(tmp_path)


def test_only_albert_exports_factorised_or_shared_layers(tmp_path):
    with pytest.raises(ConversionError, match="ALBERT's"):
        save_hf(build_model(_tiny(embed_dim=8)), tmp_path)


def test_span_boundary_objective_is_its_formula():
    torch.manual_seed(0)
    model = build_model(_tiny(span_boundary_head=True, max_span=4)).eval()
    ids = torch.randint(3, V, (1, 10))
    targets = torch.full_like(ids, -100)
    targets[0, 4:6] = ids[0, 4:6]  # one span, tokens 4 and 5, between boundaries 3 and 6
    left, right, position = (torch.full_like(ids, -1) for _ in range(3))
    left[0, 4:6], right[0, 4:6], position[0, 4:6] = 3, 6, torch.tensor([0, 1])
    with torch.no_grad():
        x = model.encode(ids)
        mlm = model(ids, targets=targets)
        both = model(ids, targets=targets, span_boundaries=(left, right, position))
        act = torch.nn.functional.gelu
        want = []
        for i, p in ((4, 0), (5, 1)):  # y = LN(GELU(W2 LN(GELU(W1 [x_{s-1}; x_{e+1}; p])))), scored like the MLM
            h = torch.cat([x[0, 3], x[0, 6], model.sbo_positions.weight[p]])
            y = model.sbo_out_norm(act(model.sbo_down(model.sbo_norm(act(model.sbo_up(h))))))
            want.append(-torch.log_softmax(model.lm_head(y), -1)[ids[0, i]])
    torch.testing.assert_close(both - mlm, torch.stack(want).mean(), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="span_boundaries need targets"):
        build_model(_tiny())(ids, targets=targets, span_boundaries=(left, right, position))


def test_a_span_boundary_head_is_left_out_of_hf_exports(tmp_path):
    model = build_model(_tiny(span_boundary_head=True)).eval()
    save_hf(model, tmp_path)
    back = tf.BertForMaskedLM.from_pretrained(tmp_path).eval()
    ids = torch.randint(3, V, (1, 8))
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, model(ids), atol=1e-5, rtol=0)
