"""Every YAML config shipped in configs/ loads strictly; the CPU ones train for a few steps."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from llmlab.config import load_config
from llmlab.train.finetune import FinetuneConfig
from llmlab.train.finetune import run as finetune
from llmlab.train.pretrain import PretrainConfig, estimate_training_memory
from llmlab.train.pretrain import run as pretrain

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
VERBS = {"pretrain": PretrainConfig, "finetune": FinetuneConfig}


def _configs() -> list[Path]:
    return sorted(CONFIGS.rglob("*.yaml"))


def test_every_config_loads_and_names_its_verb():
    found = _configs()
    assert len(found) == 5, [str(p) for p in found]
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
        if path.parent.name == "pretrain":
            result = pretrain(load_config(PretrainConfig, path, [f"data={corpus_dir}", f"out_dir={out}", "max_steps=3",
                                                                 "eval.every=3", "eval.batches=1"]))
        else:
            result = finetune(load_config(FinetuneConfig, path, [
                f"base={base}", f"out_dir={out}", f"data.train={synth_dir / 'train.jsonl'}",
                f"data.val={synth_dir / 'val.jsonl'}", "max_steps=3", "eval.every=3", "eval.batches=1",
                "eval.exact_match=2"]))
        assert result["step"] == 3 and result["stopped"] == "max_steps", path
        ran += 1
    assert ran == 2
