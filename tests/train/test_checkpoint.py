"""Checkpoints: bit-exact save/load of weights, optimizer and RNG; crash-safe writes."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch

from llmlab.models import LlamaConfig, build_model
from llmlab.train.checkpoint import (CheckpointWriteError, latest_checkpoint, list_checkpoints, load_checkpoint,
                                     save_checkpoint)
from llmlab.train.config import OptimConfig
from llmlab.train.optim import build_optimizer, lr_at

CFG = LlamaConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, hidden_dim=64, max_seq_len=32)


def _trained(seed=0):
    torch.manual_seed(seed)
    model = build_model(CFG)
    opt = build_optimizer(model, OptimConfig(), torch.device("cpu"))
    for _ in range(2):
        model(torch.randint(0, 64, (2, 8))).mean().backward()
        opt.step()
        opt.zero_grad()
    return model, opt


def test_save_load_restores_everything_bit_exactly(tmp_path):
    model, opt = _trained()
    random.seed(5), np.random.seed(6), torch.manual_seed(7)
    path = save_checkpoint(tmp_path, 2, model, opt, {"tokens": 32, "note": "x"})
    expected = (random.random(), np.random.rand(), torch.rand(3))

    model2, opt2 = _trained(seed=1)
    random.seed(0), np.random.seed(0), torch.manual_seed(0)
    state = load_checkpoint(path, model2, opt2)
    assert state["step"] == 2 and state["tokens"] == 32 and state["note"] == "x"
    assert (random.random(), np.random.rand()) == expected[:2] and torch.equal(torch.rand(3), expected[2])
    for a, b in zip(model.state_dict().values(), model2.state_dict().values()):
        assert torch.equal(a, b)
    s1, s2 = opt.state_dict(), opt2.state_dict()
    assert s1["param_groups"] == s2["param_groups"]
    for i in s1["state"]:
        for k in s1["state"][i]:
            assert torch.equal(s1["state"][i][k], s2["state"][i][k]), (i, k)
    # the weights alone are an ordinary llmlab checkpoint
    import llmlab

    assert torch.equal(llmlab.load_model(path).norm.weight, model.norm.weight)


def test_keep_last_and_latest(tmp_path):
    model, opt = _trained()
    for step in (10, 20, 30, 40):
        save_checkpoint(tmp_path, step, model, opt, {}, keep_last=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000030", "step-00000040"]
    (tmp_path / ".tmp-step-00000050-abc").mkdir()  # debris of a write that was killed
    assert latest_checkpoint(tmp_path).name == "step-00000040"
    assert not (tmp_path / ".tmp-step-00000050-abc").exists()


def test_non_finite_weights_are_never_saved(tmp_path):
    model, opt = _trained()
    with torch.no_grad():
        model.norm.weight[0] = float("nan")
    with pytest.raises(CheckpointWriteError, match="norm.weight"):
        save_checkpoint(tmp_path, 1, model, opt, {})
    assert not list(tmp_path.iterdir())


def test_lr_schedule_by_hand():
    cfg = OptimConfig(lr=1.0, warmup_steps=4, min_lr_ratio=0.1)
    assert [lr_at(t, 14, cfg) for t in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_at(4, 14, cfg) == 1.0
    assert lr_at(9 - 0, 14, cfg) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * 5 / 9)))
    assert lr_at(13, 14, cfg) == pytest.approx(0.1)


def test_weight_decay_only_on_matrices():
    model = build_model(CFG)
    decay, no_decay = build_optimizer(model, OptimConfig(weight_decay=0.1), torch.device("cpu")).param_groups
    assert decay["weight_decay"] == 0.1 and all(p.dim() == 2 for p in decay["params"])
    assert no_decay["weight_decay"] == 0.0 and all(p.dim() == 1 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


WRITER = textwrap.dedent("""
    import sys, torch
    from llmlab.models import LlamaConfig, build_model
    from llmlab.train.checkpoint import save_checkpoint
    from llmlab.train.config import OptimConfig
    from llmlab.train.optim import build_optimizer
    torch.manual_seed(0)
    model = build_model(LlamaConfig(vocab_size=4096, dim=256, n_layers=4, n_heads=4))  # ~10 MB of weights
    opt = build_optimizer(model, OptimConfig(), torch.device("cpu"))
    model(torch.randint(0, 4096, (1, 8))).mean().backward(); opt.step()
    step = 1
    while True:
        with torch.no_grad():
            model.norm.weight.fill_(step)  # each checkpoint is recognisable by its step
        save_checkpoint(sys.argv[1], step, model, opt, {"tokens": step}, keep_last=2)
        print(step, flush=True)
        step += 1
""")


@pytest.mark.slow
def test_killing_a_writer_mid_write_leaves_the_last_checkpoint_loadable(tmp_path):
    import llmlab

    rng = random.Random(0)
    for trial in range(4):
        ckpt = tmp_path / f"run{trial}"
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(ckpt)], stdout=subprocess.PIPE, text=True,
                                cwd=os.getcwd())
        assert proc.stdout.readline()  # at least one checkpoint is complete
        time.sleep(rng.uniform(0.05, 0.6))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        latest = latest_checkpoint(ckpt)
        step = int(latest.name.split("-")[1])
        model = llmlab.load_model(latest)
        assert torch.all(model.norm.weight == step)
        model2, opt2 = _big_like_writer()
        assert load_checkpoint(latest, model2, opt2)["tokens"] == step


def _big_like_writer():
    model = build_model(LlamaConfig(vocab_size=4096, dim=256, n_layers=4, n_heads=4))
    return model, build_optimizer(model, OptimConfig(), torch.device("cpu"))
