"""Fixtures shared by the tests of task fine-tuning and of evaluating its models: the synthetic
task sets (sentiment, NER, QA, translation), a tiny BERT with a WordPiece vocabulary and a tiny T5
with a Unigram vocabulary learnt on them."""

from __future__ import annotations

import random

import pytest
import torch

from llmlab.data.synth_tasks import TaskSynthConfig
from llmlab.data.synth_tasks import run as synth
from llmlab.models import BertConfig, T5Config, build_model
from llmlab.models.io import save_model
from llmlab.tokenizer import train_unigram, train_wordpiece

WORDS = "the model reads tokens and predicts the next one while the loss falls slowly over many steps".split()


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    root = tmp_path_factory.mktemp("tasks")
    for task in ("sentiment", "ner", "qa", "translate"):
        synth(TaskSynthConfig(out_dir=str(root / task), task=task, train=64, val=16, test=4))
    return root


def _texts(sets) -> list[str]:
    lines = []
    for path in sets.rglob("*"):
        if path.is_file() and path.suffix in (".tsv", ".conll", ".json", ".jsonl"):
            lines += path.read_text().split("\n")
    return lines + [" ".join(random.Random(0).sample(WORDS, 8))]


@pytest.fixture(scope="module")
def bert_base(sets, tmp_path_factory):
    folder = tmp_path_factory.mktemp("bert")
    tok = train_wordpiece(_texts(sets), 400)
    torch.manual_seed(0)
    save_model(build_model(BertConfig(vocab_size=tok.vocab_size, dim=32, n_layers=2, n_heads=4, max_seq_len=96,
                                      dropout=0.0)), folder)
    tok.save(folder)
    return folder


@pytest.fixture(scope="module")
def t5_base(sets, tmp_path_factory):
    folder = tmp_path_factory.mktemp("t5")
    tok = train_unigram(_texts(sets), 300, sentinels=4)
    torch.manual_seed(0)
    save_model(build_model(T5Config(vocab_size=tok.vocab_size, dim=32, n_layers=1, n_heads=2, head_dim=16,
                                    hidden_dim=64, max_seq_len=64, max_target_len=48, dropout=0.0,
                                    eos_id=tok.eos_id)), folder)
    tok.save(folder)
    return folder
