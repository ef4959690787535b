"""What the alignment tests share, built once per session in code: a tiny random chat model with a
trained tokenizer, preference pairs and prompts with checkable answers."""

from __future__ import annotations

import json
import random

import pytest
import torch

from llmlab.data.prepare import TokenizerTrainConfig, train_tokenizer
from llmlab.models import LlamaConfig, build_model
from llmlab.models.io import copy_tokenizer_files, save_model

LETTERS = "abcdef"


def _task(rng: random.Random) -> tuple[str, str, str]:
    """(prompt, right answer, near miss) of a tiny reversal task."""
    items = rng.sample(LETTERS, 3)
    answer = " ".join(reversed(items))
    wrong = " ".join(items)
    return f"Reverse: {' '.join(items)}", answer, wrong


def _write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture(scope="session")
def align_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("align-data")
    rng = random.Random(0)
    tasks = [_task(rng) for _ in range(64)]
    pairs = [{"prompt": p, "chosen": a, "rejected": w, "task": "reverse"} for p, a, w in tasks]
    prompts = [{"prompt": p, "answer": a, "task": "reverse"} for p, a, _ in tasks]
    _write(root / "pairs.jsonl", pairs[:48])
    _write(root / "pairs-val.jsonl", pairs[48:])
    _write(root / "prompts.jsonl", prompts[:48])
    _write(root / "prompts-val.jsonl", prompts[48:])
    _write(root / "text.jsonl", [{"text": f"{p} {a}"} for p, a, _ in tasks])
    text = root / "text"
    text.mkdir()
    (text / "a.txt").write_text("\n".join(f"{p} {a}" for p, a, _ in tasks * 4))
    return root


@pytest.fixture(scope="session")
def chat_base(align_data, tmp_path_factory):
    """A tiny random LLaMA with a byte-level BPE tokenizer trained on the task text."""
    root = tmp_path_factory.mktemp("align-base")
    tok = train_tokenizer(TokenizerTrainConfig(inputs=[str(align_data / "text")], out_dir=str(root / "tok"),
                                               vocab_size=300))
    torch.manual_seed(0)
    model = build_model(LlamaConfig(vocab_size=300, dim=32, n_layers=2, n_heads=4, hidden_dim=64, max_seq_len=96))
    save_model(model, root / "ckpt")
    copy_tokenizer_files(tok.parent, root / "ckpt")
    return root / "ckpt"
