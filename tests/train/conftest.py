"""A tiny prepared corpus shared by the training tests (built once per session, in code)."""

from __future__ import annotations

import random

import pytest

from llmlab.data.prepare import PrepareConfig, TokenizerTrainConfig, run, train_tokenizer

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
