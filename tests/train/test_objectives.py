"""Pretraining objectives beyond the next token: BERT's masked LM (dynamic and static, whole words,
SpanBERT spans with the boundary objective, ALBERT's sentence order) and T5's span corruption, as
batches and end to end through `llmlab pretrain` (exact resume included)."""

from __future__ import annotations

import json
import random
import shutil

import numpy as np
import pytest
import torch

from llmlab.common import LlmlabError
from llmlab.config import from_dict
from llmlab.data.prepare import PrepareConfig, TokenizerTrainConfig, run as prepare, train_tokenizer
from llmlab.data.shards import TokenShards
from llmlab.models import BertConfig, T5Config
from llmlab.tokenizer import load_tokenizer
from llmlab.train.objectives import Batches, MaskingConfig, resolve_objective
from llmlab.train.pretrain import PretrainConfig, run

from tests.train.conftest import WORDS

CPU = torch.device("cpu")


def _corpus(root, kind):
    rng = random.Random(1)
    docs = root / "docs"
    docs.mkdir(exist_ok=True)
    for i in range(60):
        (docs / f"d{i}.txt").write_text(" ".join(rng.choice(WORDS) for _ in range(rng.randint(60, 120))))
    tok = train_tokenizer(TokenizerTrainConfig(inputs=[str(docs)], out_dir=str(root / f"tok-{kind}"), kind=kind,
                                               vocab_size=200))
    prepare(PrepareConfig(inputs=[str(docs)], out_dir=str(root / f"data-{kind}"), tokenizer=str(tok), val_frac=0.2))
    return root / f"data-{kind}"


@pytest.fixture(scope="module")
def wordpiece_data(tmp_path_factory):
    return _corpus(tmp_path_factory.mktemp("wp"), "wordpiece")


@pytest.fixture(scope="module")
def unigram_data(tmp_path_factory):
    return _corpus(tmp_path_factory.mktemp("ug"), "unigram")


def _bert(**kw):
    return BertConfig(**{**dict(vocab_size=200, dim=32, n_layers=2, n_heads=4, max_seq_len=48, dropout=0.0), **kw})


def _batches(data, model_cfg, masking=None, objective="mlm", seq_len=48, batch_size=64):
    tokenizer = load_tokenizer(json.loads((data / "manifest.json").read_text())["tokenizer_path"])
    return Batches(objective, masking or MaskingConfig(), seq_len, batch_size, model_cfg, tokenizer, 0)


def test_mlm_batches_frame_mask_and_redraw(wordpiece_data):
    shards = TokenShards(str(wordpiece_data), "train")
    tok = load_tokenizer(json.loads((wordpiece_data / "manifest.json").read_text())["tokenizer_path"])
    maker = _batches(wordpiece_data, _bert())
    batch = maker.batch(shards, (0, 0, 1, 0), CPU)
    ids, targets = batch["input_ids"], batch["targets"]
    assert ids.shape == targets.shape == (64, 48)
    assert bool((ids[:, 0] == tok.cls_id).all()) and bool((ids[:, -1] == tok.sep_id).all())
    # a WordPiece vocabulary has no EOS: [SEP] ends each document in the shards
    assert json.loads((wordpiece_data / "manifest.json").read_text())["eos_id"] == tok.sep_id
    predicted = targets != -100
    assert predicted.sum(1).tolist() == [7] * 64  # round(0.15 x 46 text tokens) of every row
    assert not bool(predicted[:, [0, -1]].any())  # [CLS] and [SEP] are never predicted
    assert float((ids[predicted] == tok.mask_id).float().mean()) == pytest.approx(0.8, abs=0.08)
    # the same batch key gives the same batch; another key a new mask of the same sequences (dynamic)
    assert torch.equal(maker.batch(shards, (0, 0, 1, 0), CPU)["input_ids"], ids)
    # static masking: a sequence is masked alike whenever it is drawn
    static = _batches(wordpiece_data, _bert(), MaskingConfig(static=True))
    dynamic_masks, static_masks = {}, {}
    for key in range(30):
        for maker_, masks in ((maker, dynamic_masks), (static, static_masks)):
            rng = np.random.default_rng((0, 0, key, 0))
            index = rng.integers(0, maker_.sequences(shards), size=64).tolist()
            got = maker_.batch(shards, (0, 0, key, 0), CPU)["targets"] != -100
            for i, row in zip(index, got):
                masks.setdefault(i, set()).add(tuple(row.tolist()))
    seen_twice = [i for i, m in static_masks.items() if i in dynamic_masks]
    assert all(len(static_masks[i]) == 1 for i in seen_twice)
    assert sum(len(dynamic_masks[i]) > 1 for i in seen_twice) > len(seen_twice) // 2


def test_sentence_order_and_span_boundary_batches(wordpiece_data):
    shards = TokenShards(str(wordpiece_data), "train")
    cfg = _bert(variant="albert", embed_dim=16, share_layers=True, sentence_head=True, span_boundary_head=True)
    masking = MaskingConfig(unit="span", sentence_order=True)
    batch = _batches(wordpiece_data, cfg, masking).batch(shards, (0, 0, 0, 0), CPU)
    labels = batch["sentence_targets"]
    assert labels.shape == (64,) and 10 < int(labels.sum()) < 54  # swapped about half the time
    types = batch["token_type_ids"]
    assert bool((types[:, 0] == 0).all()) and bool((types[:, -1] == 1).all())
    left, right, position = batch["span_boundaries"]
    inside = position >= 0
    assert torch.equal(inside, batch["targets"] != -100)  # every prediction is inside a span
    assert bool((left[inside] < torch.nonzero(inside)[:, 1]).all())
    # a model of these heads takes the batch, and every loss term is finite
    from llmlab.models import build_model

    loss = build_model(cfg)(**batch)
    assert torch.isfinite(loss) and loss > 0


def test_span_corruption_batches_have_fixed_shapes(unigram_data):
    shards = TokenShards(str(unigram_data), "train")
    cfg = T5Config(vocab_size=200, dim=32, n_layers=1, n_heads=2, head_dim=16, hidden_dim=64, max_seq_len=64,
                   max_target_len=32, dropout=0.0)
    maker = _batches(unigram_data, cfg, objective="span_corruption", seq_len=64, batch_size=8)
    batch = maker.batch(shards, (0, 0, 0, 0), CPU)
    assert batch["input_ids"].shape == (8, 64) and batch["targets"].shape == (8, maker.target_len)
    tok = load_tokenizer(json.loads((unigram_data / "manifest.json").read_text())["tokenizer_path"])
    assert bool((batch["targets"][:, 0] == tok.sentinel_ids[0]).all())  # targets open with the first sentinel
    with pytest.raises(LlmlabError, match="max_target_len"):
        _batches(unigram_data, T5Config(**{**vars(cfg), "max_target_len": 8}), objective="span_corruption",
                 seq_len=64)


@pytest.mark.parametrize("objective, model, masking, message", [
    ("clm", _bert(), MaskingConfig(), "objective=clm trains decoder models; model.family=bert is an encoder"),
    ("auto", _bert(sentence_head=True), MaskingConfig(), "sentence_order and model.sentence_head go together"),
    ("auto", _bert(span_boundary_head=True), MaskingConfig(), "set masking.unit=span"),
    ("auto", _bert(head="classify", num_labels=2), MaskingConfig(), "needs model.head=mlm"),
])
def test_objective_and_model_must_agree(objective, model, masking, message):
    with pytest.raises(LlmlabError, match=message):
        resolve_objective(objective, masking, model)


def test_mlm_needs_mask_tokens(corpus_dir):
    with pytest.raises(LlmlabError, match=r"\[CLS\], \[SEP\] and \[MASK\]"):
        _batches(corpus_dir, _bert(vocab_size=320))  # a byte-level BPE without a mask token


def _pretrain(data, out, model, **overrides):
    cfg = {"data": str(data), "out_dir": str(out), "seq_len": 48, "batch_size": 8, "max_steps": 8,
           "model": model, "optim": {"lr": 3e-3, "warmup_steps": 2}, "eval": {"every": 4, "batches": 2},
           "ckpt": {"every": 4, "keep_last": 5}, "system": {"autocast": "none"}, **overrides}
    return run(from_dict(PretrainConfig, cfg))


BERT = {"family": "bert", "vocab_size": None, "dim": 32, "n_layers": 2, "n_heads": 4, "max_seq_len": 48,
        "dropout": 0.0}


def test_bert_pretrains_and_resumes_exactly(wordpiece_data, tmp_path):
    whole = _pretrain(wordpiece_data, tmp_path / "whole", BERT)
    lines = [json.loads(x) for x in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in lines if "loss" in r]
    assert losses[-1] < losses[0] and "val_bpb" not in lines[-1]
    _pretrain(wordpiece_data, tmp_path / "part", BERT)
    shutil.rmtree(tmp_path / "part" / "checkpoints" / "step-00000008")
    resumed = _pretrain(wordpiece_data, tmp_path / "part", BERT, ckpt={"every": 4, "keep_last": 5, "resume": "auto"})
    assert resumed["val_loss"] == whole["val_loss"]
    # the checkpoint is an encoder that loads and exports like any model
    from llmlab.models.io import load_model

    assert load_model(tmp_path / "whole" / "checkpoints" / "step-00000008").config.family == "bert"
    # other masking settings are not the run the checkpoint belongs to
    with pytest.raises(LlmlabError, match="masking=.*set it back"):
        _pretrain(wordpiece_data, tmp_path / "part", BERT, max_steps=10, masking={"static": True},
                  ckpt={"every": 4, "keep_last": 5, "resume": "auto"})
    with pytest.raises(LlmlabError, match="model.activation=gelu_tanh, but .* was trained with gelu; set it back"):
        _pretrain(wordpiece_data, tmp_path / "part", {**BERT, "activation": "gelu_tanh"}, max_steps=10,
                  ckpt={"every": 4, "keep_last": 5, "resume": "auto"})


def test_auxiliary_losses_are_logged_apart_and_left_out_of_validation(wordpiece_data, tmp_path):
    model = {**BERT, "variant": "albert", "embed_dim": 16, "share_layers": True, "sentence_head": True,
             "span_boundary_head": True}
    result = _pretrain(wordpiece_data, tmp_path / "albert", model, masking={"unit": "span", "sentence_order": True})
    lines = [json.loads(x) for x in (tmp_path / "albert" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in lines if "loss" in r]
    assert all(r["aux_loss"] > 0 for r in train)  # sentence order + span boundary, apart from the total
    # validation scores the masked tokens only: about ln(V) for an untrained model, not twice it plus SOP's
    assert result["val_loss"] < train[0]["loss"] - train[0]["aux_loss"] + 1.0


def test_t5_pretrains_with_span_corruption(unigram_data, tmp_path):
    model = {"family": "t5", "vocab_size": None, "dim": 32, "n_layers": 1, "n_heads": 2, "head_dim": 16,
             "hidden_dim": 64, "max_seq_len": 48, "max_target_len": 24, "dropout": 0.0}
    result = _pretrain(unigram_data, tmp_path / "t5", model)
    assert result["step"] == 8 and np.isfinite(result["val_loss"])
    with pytest.raises(LlmlabError, match="fim_rate reorders documents"):
        _pretrain(unigram_data, tmp_path / "fim", model, fim_rate=0.5)


def test_a_switch_transformer_pretrains_with_span_corruption_and_logs_its_experts(unigram_data, tmp_path):
    switch = {"n_experts": 4, "top_k": 1, "every": 1, "gated": False, "activation": "relu", "normalize": "all",
              "capacity_factor": 1.0, "jitter": 0.01}
    model = {"family": "t5", "vocab_size": None, "dim": 32, "n_layers": 1, "n_heads": 2, "head_dim": 16,
             "hidden_dim": 64, "max_seq_len": 48, "max_target_len": 24, "dropout": 0.0, "moe": switch}
    result = _pretrain(unigram_data, tmp_path / "switch", model)
    assert result["step"] == 8 and np.isfinite(result["val_loss"])
    lines = [json.loads(line) for line in (tmp_path / "switch" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in lines if "loss" in r]
    assert train and all(len(r["expert_load"]) == 4 and r["aux_loss"] > 0 for r in train)
