"""`llmlab pretrain` sharded with FSDP2 under torchrun: two CPU processes (Gloo) train what one process
accumulating their micro-batches trains; their checkpoints (torch.distributed.checkpoint, written by
both ranks) resume on two ranks or on one, and load whole with `llmlab.load_model`; a save cut short
leaves the previous checkpoint to resume from."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from llmlab.cli import main
from llmlab.config import save_config
from llmlab.models.io import load_model
from llmlab.train.checkpoint import list_checkpoints, verify_checkpoint
from llmlab.train.pretrain import run
from tests.train.test_pretrain import _cfg, _metrics

COMMON = {"max_steps": 6, "model.dropout": 0.0, "eval.every": 3, "ckpt.every": 3}


def _torchrun(cfg, tmp_path, name: str, *, nproc: int = 2, wait: bool = True):
    save_config(cfg, tmp_path / f"{name}.yaml")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
               "-m", "llmlab", "pretrain", str(tmp_path / f"{name}.yaml")]
    if not wait:
        return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
    out = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def _same_losses(a: list[dict], b: list[dict], keys=("loss", "lr", "tokens", "val_loss")) -> None:
    assert [m["step"] for m in a] == [m["step"] for m in b]
    for x, y in zip(a, b):
        for key in keys:
            if key in x:
                assert y[key] == pytest.approx(x[key], rel=1e-5), (x["step"], key)


@pytest.fixture(scope="module")
def runs(corpus_dir, tmp_path_factory):
    """One process accumulating two micro-batches, and two FSDP2 ranks of one each: both 6 steps."""
    tmp = tmp_path_factory.mktemp("fsdp")
    single = run(_cfg(corpus_dir, tmp / "single", grad_accum=2, **COMMON))
    _torchrun(_cfg(corpus_dir, tmp / "fsdp", **COMMON, **{"system.parallel": "fsdp"}), tmp, "fsdp")
    return tmp, single


@pytest.mark.slow
def test_two_sharded_ranks_equal_one_process(runs):
    tmp, single = runs
    _same_losses(_metrics(tmp / "single"), _metrics(tmp / "fsdp"))
    last = tmp / "fsdp" / "checkpoints" / "step-00000006"
    state = verify_checkpoint(last)
    assert state["format"] == "sharded" and state["world_size"] == 2 and (last / "dcp" / ".metadata").is_file()
    whole = load_file(f"{single['checkpoint']}/model.safetensors")
    sharded = load_model(last).state_dict()
    for name, tensor in whole.items():
        torch.testing.assert_close(sharded[name], tensor, rtol=1e-4, atol=1e-6)
    assert main(["convert", str(last), "--to", "llmlab", "--out", str(tmp / "converted")]) == 0
    converted = load_file(tmp / "converted" / "model.safetensors")
    assert converted.keys() == whole.keys()
    assert main(["generate", str(last), "--prompt", "Document", "--max-new-tokens", "4", "--temperature", "0"]) == 0


@pytest.mark.slow
def test_two_sharded_ranks_train_an_moe_as_one_process(corpus_dir, tmp_path):
    """Each expert stack is one parameter, sharded along the experts like any other."""
    moe = {"model.moe": {"n_experts": 4, "top_k": 2}}
    single = run(_cfg(corpus_dir, tmp_path / "single", grad_accum=2, **COMMON, **moe))
    _torchrun(_cfg(corpus_dir, tmp_path / "fsdp", **COMMON, **moe, **{"system.parallel": "fsdp"}), tmp_path, "fsdp")
    _same_losses(_metrics(tmp_path / "single"), _metrics(tmp_path / "fsdp"),
                 keys=("loss", "val_loss", "aux_loss", "expert_load"))
    whole = load_file(f"{single['checkpoint']}/model.safetensors")
    sharded = load_model(tmp_path / "fsdp" / "checkpoints" / "step-00000006").state_dict()
    for name, tensor in whole.items():
        torch.testing.assert_close(sharded[name], tensor, rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_a_sharded_checkpoint_resumes_on_two_ranks_and_on_one(runs, corpus_dir, tmp_path):
    tmp, _ = runs
    reference = _metrics(tmp / "fsdp")
    for nproc in (2, 1):
        out = tmp_path / f"resumed-{nproc}"
        (out / "checkpoints").mkdir(parents=True)
        os.symlink(tmp / "fsdp" / "checkpoints" / "step-00000003", out / "checkpoints" / "step-00000003")
        (out / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in reference if m["step"] <= 3))
        cfg = _cfg(corpus_dir, out, **COMMON, **{"system.parallel": "fsdp", "ckpt.resume": "auto",
                                                 "grad_accum": 3 - nproc})
        if nproc == 2:
            _torchrun(cfg, tmp_path, f"resume-{nproc}")
        else:  # one process: the same two micro-batches per step, on the whole model
            run(cfg)
        _same_losses(reference, _metrics(out))


@pytest.mark.slow
def test_a_save_killed_midway_leaves_the_previous_checkpoint(corpus_dir, tmp_path):
    """SIGKILL while the ranks write their shards of step 6's checkpoint: the hidden folder they were
    writing is no checkpoint, and resume=auto continues from the newest one to the uninterrupted run's
losses."""
    long = {**COMMON, "max_steps": 30, "system.parallel": "fsdp"}
    cfg = _cfg(corpus_dir, tmp_path / "run", **long)
    process = _torchrun(cfg, tmp_path, "killed", wait=False)
    ckpts = tmp_path / "run" / "checkpoints"
    deadline = time.time() + 240
    while not list(ckpts.glob(".tmp-step-00000006-sharded/dcp/*.distcp")):
        assert process.poll() is None, process.communicate()[1][-3000:]
        assert time.time() < deadline, "the run never began its second checkpoint"
        time.sleep(0.005)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    newest = list_checkpoints(ckpts)[-1].name
    assert newest in ("step-00000003", "step-00000006")  # the save finished before the kill, or never did
    _torchrun(_cfg(corpus_dir, tmp_path / "run", **long, **{"ckpt.resume": "auto"}), tmp_path, "resumed")
    assert not list(ckpts.glob(".tmp-*"))
    reference = run(_cfg(corpus_dir, tmp_path / "single", grad_accum=2, **{**COMMON, "max_steps": 30}))
    assert reference["step"] == 30
    _same_losses(_metrics(tmp_path / "single"), _metrics(tmp_path / "run"))


@pytest.mark.slow
@pytest.mark.parametrize("parallel", ["fsdp", "ddp"])
def test_lora_finetuning_on_two_ranks_equals_one_process(base, synth_dir, tmp_path, parallel):
    """Two ranks (sharded or replicated) fine-tune LoRA adapters as one process accumulating both
    ranks' micro-batches: the same losses, validation and exact match, and the same merged model."""
    from llmlab.train.finetune import run as finetune
    from tests.train.test_finetune import _cfg as _ft_cfg
    from tests.train.test_finetune import _metrics as _ft_metrics

    common = {"lora.dropout": 0.0, "ckpt.every": 4}
    single = finetune(_ft_cfg(base, synth_dir, tmp_path / "single", grad_accum=2, **common))
    cfg = _ft_cfg(base, synth_dir, tmp_path / parallel, **common, **{"system.parallel": parallel})
    save_config(cfg, tmp_path / "ft.yaml")
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "llmlab", "finetune", str(tmp_path / "ft.yaml")],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    _same_losses(_ft_metrics(tmp_path / "single"), _ft_metrics(tmp_path / parallel),
                 keys=("loss", "lr", "tokens", "val_loss", "exact_match"))
    whole = load_file(f"{single['final']}/model.safetensors")
    merged = load_file(tmp_path / parallel / "final" / "model.safetensors")
    for name, tensor in whole.items():
        torch.testing.assert_close(merged[name], tensor, rtol=1e-4, atol=1e-6)
    assert (tmp_path / parallel / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.gpu
@pytest.mark.slow
def test_fsdp2_on_gpus_with_nccl_bf16_and_compile(corpus_dir, tmp_path):
    """The GPU path: NCCL, FSDP2's bf16 parameters with fp32 gradient reduction, compiled blocks.
    Two GPUs shard the model; the run finishes, its losses are finite and fall, and its sharded
    checkpoint loads whole."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA devices")
    cfg = _cfg(corpus_dir, tmp_path / "gpu", **{**COMMON, "max_steps": 20, "ckpt.every": 10, "eval.every": 10,
                                                 "system.parallel": "fsdp", "system.device": "cuda",
                                                 "system.autocast": "bf16", "system.compile": True})
    _torchrun(cfg, tmp_path, "gpu")
    losses = [m["loss"] for m in _metrics(tmp_path / "gpu") if "loss" in m]
    assert len(losses) == 20 and all(map(math.isfinite, losses)) and losses[-1] < losses[0]
    assert load_model(tmp_path / "gpu" / "checkpoints" / "step-00000020").config.n_layers == 2


@pytest.mark.slow
def test_a_sharded_checkpoint_whose_index_would_run_code_is_refused(runs, tmp_path):
    """DCP writes its index with pickle: a checkpoint from elsewhere could carry code in it. The index is
    read with an unpickler that knows only DCP's own record types, so such a file is an error and its
    code never runs."""
    import pickle
    import shutil

    from llmlab.models.io import CheckpointError

    tmp, _ = runs
    copy = tmp_path / "ckpt"
    shutil.copytree(tmp / "fsdp" / "checkpoints" / "step-00000006", copy)
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    (copy / "dcp" / ".metadata").write_bytes(pickle.dumps(Payload()))
    with pytest.raises(CheckpointError, match="not a readable sharded checkpoint.*posix.system|os.system"):
        load_model(copy)
    assert not marker.exists()
