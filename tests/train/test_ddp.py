"""`llmlab pretrain` under torchrun: two CPU processes (Gloo) train the same model as one process
that accumulates their two micro-batches."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from llmlab.config import save_config
from llmlab.train.pretrain import run
from tests.train.test_pretrain import _cfg, _metrics


@pytest.mark.slow
@pytest.mark.parametrize("moe", [None, {"n_experts": 4, "top_k": 2, "capacity_factor": 1.0}], ids=["dense", "moe"])
def test_two_ranks_equal_one_process_accumulating_their_batches(corpus_dir, tmp_path, moe):
    common = {"max_steps": 6, "model.dropout": 0.0, "eval.every": 3, "ckpt.every": 3}
    if moe:  # capacity per rank's micro-batch, as per micro-batch when accumulating: the same drops
        common["model.moe"] = moe
    single = run(_cfg(corpus_dir, tmp_path / "single", grad_accum=2, **common))
    cfg = _cfg(corpus_dir, tmp_path / "ddp", **common)
    save_config(cfg, tmp_path / "ddp.yaml")
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "llmlab", "pretrain", str(tmp_path / "ddp.yaml")],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.count("stopped after step 6") == 1  # rank 0 reports, rank 1 stays quiet

    a, b = _metrics(tmp_path / "single"), _metrics(tmp_path / "ddp")
    assert [m["step"] for m in a] == [m["step"] for m in b]
    for x, y in zip(a, b):
        for key in ("loss", "lr", "tokens", "val_loss", "aux_loss", "expert_load", "dropped_tokens"):
            if key in x:
                assert y[key] == pytest.approx(x[key], rel=1e-5), (x["step"], key)
    assert not moe or all("expert_load" in m for m in b if "loss" in m)
    wa = load_file(f"{single['checkpoint']}/model.safetensors")
    wb = load_file(tmp_path / "ddp" / "checkpoints" / "step-00000006" / "model.safetensors")
    for name in wa:
        torch.testing.assert_close(wb[name], wa[name], rtol=1e-4, atol=1e-6)
    assert json.loads((tmp_path / "ddp" / "checkpoints" / "step-00000006" / "state.json").read_text())["step"] == 6
