"""What the training tests share, built once per session in code: a tiny prepared corpus, a random
base checkpoint with its tokenizer, and synthetic instruction records."""

from __future__ import annotations

import random

import pytest

import torch

from llmlab.data.prepare import PrepareConfig, TokenizerTrainConfig, run, train_tokenizer
from llmlab.data.synth import SynthConfig
from llmlab.data.synth import run as synth
from llmlab.models import LlamaConfig, build_model
from llmlab.models.io import copy_tokenizer_files, save_model

from tests.task_models import bert_base, sets, t5_base  # noqa: F401 (the task fine-tuning fixtures)

WORDS = ("the model reads tokens and predicts the next one while the loss falls slowly over many steps "
         "data shards hold ids a tokenizer maps bytes to pieces and back").split()


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    rng = random.Random(0)
    docs = root / "docs"
    docs.mkdir()
    for i in range(120):
        text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(60, 160)))
        (docs / f"doc{i:03d}.txt").write_text(f"Document {i}.\n{text}\n")
    tok = train_tokenizer(TokenizerTrainConfig(inputs=[str(docs)], out_dir=str(root / "tok"), vocab_size=320))
    run(PrepareConfig(inputs=[str(docs)], out_dir=str(root / "data"), tokenizer=str(tok), val_frac=0.2, seed=0))
    return root / "data"


@pytest.fixture(scope="session")
def base(corpus_dir, tmp_path_factory):
    """A tiny random LLaMA checkpoint with the corpus tokenizer."""
    root = tmp_path_factory.mktemp("base")
    torch.manual_seed(0)
    model = build_model(LlamaConfig(vocab_size=320, dim=32, n_layers=2, n_heads=4, hidden_dim=64, max_seq_len=128))
    save_model(model, root / "ckpt")
    copy_tokenizer_files(corpus_dir.parent / "tok", root / "ckpt")
    return root / "ckpt"


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    synth(SynthConfig(out_dir=str(out), tasks=["reverse", "add"], train=120, val=16, test=0))
    return out
