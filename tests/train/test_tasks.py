"""`llmlab finetune task=classify|tokens|span|seq2seq` end to end on tiny models and synthetic data
made in the test: each task trains, scores and exports; resume is exact; bad input is named."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from llmlab.cli import main
from llmlab.common import LlmlabError
from llmlab.config import from_dict
from llmlab.models.io import load_model
from llmlab.train.finetune import FinetuneConfig, run


def _cfg(base, out, task, train, val, **more) -> FinetuneConfig:
    cfg = {"task": task, "base": str(base), "out_dir": str(out), "data": {"train": str(train), "val": str(val)},
           "peft": "none", "batch_size": 8, "max_steps": 6, "optim": {"lr": 3e-3, "warmup_steps": 1},
           "eval": {"every": 3, "batches": 2}, "ckpt": {"every": 3, "keep_last": 5}, "system": {"autocast": "none"}}
    for key, value in more.items():
        node = cfg
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return from_dict(FinetuneConfig, cfg)


CASES = {
    "classify": ("sentiment", "train.tsv", "val.tsv", {"accuracy", "macro_f1"}),
    "tokens": ("ner", "train.conll", "val.conll", {"entity_f1", "tag_accuracy"}),
    "span": ("qa", "train.json", "val.json", {"exact_match", "f1"}),
}


@pytest.mark.parametrize("task", sorted(CASES))
def test_encoder_tasks_train_score_and_export(task, sets, bert_base, tmp_path):
    name, train, val, scores = CASES[task]
    result = run(_cfg(bert_base, tmp_path / "run", task, sets / name / train, sets / name / val))
    assert result["step"] == 6 and set(result["metrics"]) == scores
    assert all(0 <= v <= 1 for v in result["metrics"].values())
    final = load_model(result["final"])
    assert final.config.head == {"classify": "classify", "tokens": "tokens", "span": "span"}[task]
    base = load_model(bert_base)  # the encoder started from the base's weights (and then trained)
    assert final.embed_tokens.weight.shape == base.embed_tokens.weight.shape
    if task != "span":
        labels = json.loads((tmp_path / "run" / "final" / "labels.json").read_text())
        assert len(labels) == final.config.num_labels and ("O" in labels if task == "tokens" else True)


def test_lora_trains_the_new_head_and_merges(sets, bert_base, tmp_path):
    result = run(_cfg(bert_base, tmp_path / "run", "classify", sets / "sentiment" / "train.tsv",
                      sets / "sentiment" / "val.tsv", peft="lora", **{"lora.targets": ["q_proj", "v_proj"]}))
    final = load_model(result["final"])
    assert not any("lora" in k for k in final.state_dict())  # merged
    from llmlab.common import seed_everything
    from llmlab.models.io import read_config
    from llmlab.train.tasks import task_model

    seed_everything(0)  # the run's seed: the head as it was initialised
    start = task_model(str(bert_base), read_config(bert_base)[0], "classify", 2, torch.device("cpu"))
    assert not torch.equal(final.classifier.weight, start.classifier.weight)  # the new head trained
    assert torch.equal(final.embed_tokens.weight, start.embed_tokens.weight)  # not a target: frozen


def test_seq2seq_trains_and_decodes(sets, t5_base, tmp_path):
    result = run(_cfg(t5_base, tmp_path / "run", "seq2seq", sets / "translate" / "train.jsonl",
                      sets / "translate" / "val.jsonl"))
    assert set(result["metrics"]) == {"exact_match", "bleu"} and result["step"] == 6
    assert load_model(result["final"]).config.family == "t5"


def test_resume_is_exact(sets, bert_base, tmp_path):
    args = (bert_base, "classify", sets / "sentiment" / "train.tsv", sets / "sentiment" / "val.tsv")
    whole = run(_cfg(args[0], tmp_path / "whole", *args[1:]))
    run(_cfg(args[0], tmp_path / "part", *args[1:]))
    shutil.rmtree(tmp_path / "part" / "checkpoints" / "step-00000006")
    shutil.rmtree(tmp_path / "part" / "final")
    resumed = run(_cfg(args[0], tmp_path / "part", *args[1:], **{"ckpt.resume": "auto"}))
    assert resumed["val_loss"] == whole["val_loss"] and resumed["metrics"] == whole["metrics"]


def test_bad_input_is_named(sets, bert_base, t5_base, tmp_path, capsys):
    sentiment = sets / "sentiment"
    bad = tmp_path / "bad.tsv"
    bad.write_text("sentence\tlabel\ngood day\tpositive\nbad day\tsarcastic\n")
    with pytest.raises(LlmlabError, match=r"bad.tsv:3.*sarcastic"):
        run(_cfg(bert_base, tmp_path / "a", "classify", sentiment / "train.tsv", bad))
    conll = tmp_path / "bad.conll"
    conll.write_text("Anna B-PER\nlives\nthere O\n")
    with pytest.raises(LlmlabError, match=r"bad.conll:2"):
        run(_cfg(bert_base, tmp_path / "b", "tokens", conll, conll))
    tags = tmp_path / "tags.conll"
    tags.write_text("Alice B-PER extra more\nworks O\n\nBob I-PER\n")  # the last column is the tag
    with pytest.raises(LlmlabError, match=r"tags.conll:1: tag 'more' .* is not O, B-TYPE or I-TYPE"):
        run(_cfg(bert_base, tmp_path / "b2", "tokens", tags, tags))
    with pytest.raises(LlmlabError, match="lies inside data.train"):
        run(_cfg(t5_base, tmp_path / "b3", "seq2seq", sets / "translate", sets / "translate" / "val.jsonl"))
    long = tmp_path / "long.jsonl"
    long.write_text(json.dumps({"source": "a b", "target": " ".join(["word"] * 80)}) + "\n")
    with pytest.raises(LlmlabError, match=r"long.jsonl:1: the target is \d+ tokens, more than the model's "
                                          r"max_target_len=48"):
        run(_cfg(t5_base, tmp_path / "c", "seq2seq", long, long))
    with pytest.raises(LlmlabError, match="is an encoder-decoder .* task=classify fine-tunes encoder models"):
        run(_cfg(t5_base, tmp_path / "d", "classify", sentiment / "train.tsv", sentiment / "val.tsv"))
    # from the command line: one line, exit 1, nothing written
    assert main(["finetune", f"base={bert_base}", "task=classify", f"data.train={sentiment / 'train.tsv'}",
                 f"data.val={bad}", f"out_dir={tmp_path / 'e'}"]) == 1
    assert "sarcastic" in capsys.readouterr().err
    with pytest.raises(LlmlabError, match="task=classify or tokens, not task=sft"):
        _cfg(bert_base, tmp_path / "f", "sft", sentiment / "train.tsv", sentiment / "val.tsv",
             **{"data.labels": ["a", "b"]})
