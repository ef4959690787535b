"""Every YAML config shipped in configs/ loads strictly; the CPU ones train for a few steps."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from llmlab.align.config import AlignConfig
from llmlab.align.run import run as align
from llmlab.config import load_config
from llmlab.data.prepare import PrepareConfig, TokenizerTrainConfig, train_tokenizer
from llmlab.data.prepare import run as prepare
from llmlab.data.synth import SynthConfig
from llmlab.data.synth import run as synth
from llmlab.train.finetune import FinetuneConfig
from llmlab.train.finetune import run as finetune
from llmlab.train.pretrain import PretrainConfig, estimate_training_memory
from llmlab.train.pretrain import run as pretrain

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
VERBS = {"pretrain": PretrainConfig, "finetune": FinetuneConfig, "align": AlignConfig}


def _configs() -> list[Path]:
    return sorted(CONFIGS.rglob("*.yaml"))


def test_every_config_loads_and_names_its_verb():
    found = _configs()
    assert len(found) == 11, [str(p) for p in found]
    for path in found:
        verb = path.parent.name
        assert verb in VERBS, f"{path}: configs/<verb>/NAME.yaml, with verb one of {', '.join(VERBS)}"
        cfg = load_config(VERBS[verb], path)
        if verb == "pretrain" and cfg.model.vocab_size is not None:  # (None: the data's) the planner's estimate
            memory = estimate_training_memory(cfg, torch.device("cpu"))
            assert memory.total > 0


def test_the_1b_config_has_about_1b_parameters():
    cfg = load_config(PretrainConfig, CONFIGS / "pretrain" / "llama-1b-fsdp.yaml")
    assert 1.0e9 < cfg.model.num_params().total < 1.2e9


@pytest.mark.slow
def test_the_cpu_configs_train(corpus_dir, base, synth_dir, tmp_path):
    ran = 0
    for path in _configs():
        if "cpu" not in path.stem:
            continue
        out = tmp_path / path.stem
        if path.parent.name == "align":  # ppo: the checker rewards (the reward model is another config's output)
            pairs = load_config(AlignConfig, path).method in ("rm", "dpo")
            data = tmp_path / ("pairs" if pairs else "prompts")
            if not data.exists():
                synth(SynthConfig(out_dir=str(data), tasks=["reverse", "add"], train=40, val=8, test=0,
                                  format="preference" if pairs else "prompt"))
            result = align(load_config(AlignConfig, path, [
                f"base={base}", f"out_dir={out}", f"data.train={data / 'train.jsonl'}",
                f"data.val={data / 'val.jsonl'}", "max_steps=3", "eval.every=3", "eval.batches=1", "eval.answers=2",
                "batch_size=2", "rollout.max_new_tokens=4", "grpo.group_size=2", "reward.model=''",
                f"ppo.ptx_data={synth_dir / 'train.jsonl'}"]))
        elif path.parent.name == "pretrain":
            data = corpus_dir
            if load_config(PretrainConfig, path).model.family == "bert":  # masked LM: a WordPiece vocabulary
                data = tmp_path / "data-wp"
                if not data.exists():
                    docs = str(corpus_dir.parent / "docs")
                    tok = train_tokenizer(TokenizerTrainConfig(inputs=[docs], kind="wordpiece", vocab_size=300,
                                                               out_dir=str(tmp_path / "tok-wp")))
                    prepare(PrepareConfig(inputs=[docs], tokenizer=str(tok), out_dir=str(data), val_frac=0.2))
            result = pretrain(load_config(PretrainConfig, path, [f"data={data}", f"out_dir={out}", "max_steps=3",
                                                                 "eval.every=3", "eval.batches=1"]))
        else:
            result = finetune(load_config(FinetuneConfig, path, [
                f"base={base}", f"out_dir={out}", f"data.train={synth_dir / 'train.jsonl'}",
                f"data.val={synth_dir / 'val.jsonl'}", "max_steps=3", "eval.every=3", "eval.batches=1",
                "eval.exact_match=2"]))
        assert result["step"] == 3 and result["stopped"] == "max_steps", path
        ran += 1
    assert ran == 8
