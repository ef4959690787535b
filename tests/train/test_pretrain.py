"""The pretraining loop end to end on CPU: run directory, exact resume after SIGKILL, signals,
non-finite losses and early stopping."""

from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from llmlab.common import LlmlabError
from llmlab.config import from_dict, load_config, save_config, to_dict
from llmlab.train.checkpoint import list_checkpoints
from llmlab.train.pretrain import PretrainConfig, run


def _cfg(corpus_dir, out_dir, **overrides) -> PretrainConfig:
    base = {"data": str(corpus_dir), "out_dir": str(out_dir), "seq_len": 32, "batch_size": 4, "max_steps": 12,
            "model": {"family": "llama", "vocab_size": 320, "dim": 32, "n_layers": 2, "n_heads": 4,
                      "hidden_dim": 64, "max_seq_len": 64, "dropout": 0.1},
            "optim": {"lr": 3e-3, "warmup_steps": 3}, "eval": {"every": 4, "batches": 2},
            "ckpt": {"every": 4, "keep_last": 10},
            "system": {"autocast": "none"}}  # fp32 on every machine: exact comparisons across runs
    for key, value in overrides.items():
        node = base
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return from_dict(PretrainConfig, base)


def test_checkpoints_carry_the_tokenizer_when_the_shards_name_its_folder(corpus_dir, tmp_path):
    from llmlab.data.prepare import PrepareConfig
    from llmlab.data.prepare import run as prepare

    root = corpus_dir.parent
    prepare(PrepareConfig(inputs=[str(root / "docs")], out_dir=str(tmp_path / "data"), tokenizer=str(root / "tok"),
                          val_frac=0.2, seed=0))
    run(_cfg(tmp_path / "data", tmp_path / "run", max_steps=2, **{"ckpt.every": 2}))
    last = list_checkpoints(tmp_path / "run" / "checkpoints")[-1]
    assert (last / "tokenizer.json").read_bytes() == (root / "tok" / "tokenizer.json").read_bytes()


@pytest.mark.hf
@pytest.mark.parametrize("bos", [False, True])
def test_checkpoints_record_the_datas_bos_convention(corpus_dir, tmp_path, bos):
    """Whatever the tokenizer folder said (here an old one naming a BOS), a checkpoint declares what the
    shards hold: with bos=false no BOS, so HF's bos_token_id is None and EOS precedes a document."""
    import shutil

    tf = pytest.importorskip("transformers")
    from llmlab.data.prepare import PrepareConfig
    from llmlab.data.prepare import run as prepare
    from llmlab.tokenizer import load_tokenizer

    root = corpus_dir.parent
    shutil.copytree(root / "tok", tmp_path / "tok")
    config_file = tmp_path / "tok" / "tokenizer_config.json"
    config = {k: v for k, v in json.loads(config_file.read_text()).items() if k != "add_bos_token"}
    config_file.write_text(json.dumps({**config, "bos_token": "<|bos|>"}))  # as llmlab wrote it before
    manifest = prepare(PrepareConfig(inputs=[str(root / "docs")], out_dir=str(tmp_path / "data"),
                                     tokenizer=str(tmp_path / "tok"), val_frac=0.2, seed=0, bos=bos))
    run(_cfg(tmp_path / "data", tmp_path / "run", max_steps=2, **{"ckpt.every": 2}))
    last = list_checkpoints(tmp_path / "run" / "checkpoints")[-1]
    tok = load_tokenizer(last)
    assert tok.add_bos is bos and tok.document_start_id == (tok.bos_id if bos else tok.eos_id)
    auto = tf.AutoTokenizer.from_pretrained(str(last))
    assert (auto.bos_token_id, auto.eos_token_id) == (tok.bos_id if bos else None, tok.eos_id)
    # the shards agree: the token just before the second document is document_start_id
    ids = np.fromfile(tmp_path / "data" / "train_0000.bin", dtype=manifest["dtype"])
    end = int(np.flatnonzero(ids == tok.eos_id)[0])
    assert ids[end + 1 if bos else end] == tok.document_start_id
    assert bool(ids[0] == tok.bos_id) is bos


def _metrics(out_dir):
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


def test_run_directory_and_metrics(corpus_dir, tmp_path):
    result = run(_cfg(corpus_dir, tmp_path))
    assert result["step"] == 12 and result["stopped"] == "max_steps" and result["exit_code"] == 0
    saved = (tmp_path / "config.yaml").read_text()
    assert "max_steps: 12" in saved and "family: llama" in saved
    lines = _metrics(tmp_path)
    train = [r for r in lines if "loss" in r]
    evals = [r for r in lines if "val_loss" in r]
    assert [r["step"] for r in train] == list(range(1, 13))
    assert {"step", "loss", "lr", "tokens", "tokens_per_s"} <= train[0].keys()
    assert train[-1]["tokens"] == 12 * 4 * 32
    assert [r["step"] for r in evals] == [4, 8, 12] and {"val_ppl", "val_bpb"} <= evals[0].keys()
    assert train[-1]["loss"] < train[0]["loss"]  # it learns something
    assert [p.name for p in list_checkpoints(tmp_path / "checkpoints")] == [
        "step-00000004", "step-00000008", "step-00000012"]
    last = list_checkpoints(tmp_path / "checkpoints")[-1]  # a complete model folder for generation
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= {
        p.name for p in last.iterdir()}
    with pytest.raises(LlmlabError, match="already holds checkpoints"):
        run(_cfg(corpus_dir, tmp_path))


def test_resume_after_sigkill_is_bit_identical(corpus_dir, tmp_path):
    steps = 40
    reference = run(_cfg(corpus_dir, tmp_path / "ref", max_steps=steps, **{"ckpt.every": 5}))
    assert reference["step"] == steps

    cfg = _cfg(corpus_dir, tmp_path / "killed", max_steps=steps, **{"ckpt.every": 5})
    save_config(cfg, tmp_path / "killed.yaml")
    proc = subprocess.Popen([sys.executable, "-m", "llmlab", "pretrain", str(tmp_path / "killed.yaml")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    target = tmp_path / "killed" / "checkpoints" / "step-00000010"
    deadline = time.time() + 120
    while not target.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = max(int(p.name[5:]) for p in list_checkpoints(tmp_path / "killed" / "checkpoints"))
    assert 10 <= done < steps, "the run was not interrupted mid-way"

    resumed = run(from_dict(PretrainConfig, {**to_dict(cfg), "ckpt": {**to_dict(cfg)["ckpt"], "resume": "auto"}}))
    assert resumed["step"] == steps
    ref_lines, got_lines = _metrics(tmp_path / "ref"), _metrics(tmp_path / "killed")
    def strip(rows):
        return [{k: v for k, v in r.items() if k not in ("tokens_per_s", "time")} for r in rows]

    assert strip(got_lines) == strip(ref_lines)  # every loss, lr, grad norm and val loss, bit for bit
    final = f"step-{steps:08d}"
    a = load_file(tmp_path / "ref" / "checkpoints" / final / "model.safetensors")
    b = load_file(tmp_path / "killed" / "checkpoints" / final / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(corpus_dir, tmp_path):
    cfg = _cfg(corpus_dir, tmp_path / "run", max_steps=100000, **{"ckpt.every": 100000})
    save_config(cfg, tmp_path / "run.yaml")
    proc = subprocess.Popen([sys.executable, "-m", "llmlab", "pretrain", str(tmp_path / "run.yaml")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.time() + 120
    while (not metrics.exists() or metrics.stat().st_size == 0) and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "signal:SIGTERM" in out
    (ckpt,) = list_checkpoints(tmp_path / "run" / "checkpoints")
    assert int(ckpt.name[5:]) == max(r["step"] for r in _metrics(tmp_path / "run"))


def test_a_second_signal_stops_at_once():
    import os

    from llmlab.train.loop import StopSignals

    signals = StopSignals()
    try:
        os.kill(os.getpid(), signal.SIGTERM)  # the first: a flag the loop reads after the step
        assert signals.received == signal.SIGTERM
        with pytest.raises(KeyboardInterrupt):  # the second: out of a step that does not end
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)
    finally:
        signals.restore()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_non_finite_loss_stops_or_skips(corpus_dir, tmp_path):
    with pytest.raises(LlmlabError, match="non-finite loss"):
        run(_cfg(corpus_dir, tmp_path / "stop", **{"optim.lr": 1e12, "optim.warmup_steps": 0,
                                                    "optim.grad_clip": 0.0}))
    assert not list_checkpoints(tmp_path / "stop" / "checkpoints")
    result = run(_cfg(corpus_dir, tmp_path / "skip", nonfinite="skip", **{
        "optim.lr": 1e12, "optim.warmup_steps": 0, "optim.grad_clip": 0.0}))
    assert result["skipped"] > 0
    for path in list_checkpoints(tmp_path / "skip" / "checkpoints"):
        assert all(torch.isfinite(t).all() for t in load_file(path / "model.safetensors").values())


def test_early_stopping_with_patience(corpus_dir, tmp_path):
    # updates of 1e-12 are below the weights' float32 resolution: the validation loss never improves
    result = run(_cfg(corpus_dir, tmp_path, max_steps=50, **{"optim.lr": 1e-12, "optim.warmup_steps": 0,
                                                              "eval.every": 2, "eval.patience": 2}))
    assert result["stopped"] == "early_stopping" and result["step"] == 6


def test_bad_inputs(corpus_dir, tmp_path):
    with pytest.raises(LlmlabError, match="smaller than the tokenizer"):
        run(_cfg(corpus_dir, tmp_path, **{"model.vocab_size": 100}))
    with pytest.raises(LlmlabError, match="exceeds model.max_seq_len"):
        run(_cfg(corpus_dir, tmp_path, seq_len=128))
    with pytest.raises(LlmlabError):
        run(_cfg(tmp_path / "nowhere", tmp_path))
    out = subprocess.run([sys.executable, "-m", "llmlab", "pretrain", "optim.lrr=1"], capture_output=True, text=True)
    assert out.returncode == 1 and "optim.lrr: unknown key (did you mean 'lr'?)" in out.stderr


def test_fill_in_the_middle_batches_are_reordered_and_training_runs(corpus_dir, tmp_path):
    from llmlab.data.fim import FimSpec
    from llmlab.data.shards import TokenShards, read_manifest
    from llmlab.data.windows import sample_batch

    manifest = read_manifest(corpus_dir)
    prefix, middle, suffix = manifest["fim_ids"]
    shards, cpu = TokenShards(corpus_dir, "train"), torch.device("cpu")
    plain, _ = sample_batch(shards, 8, 32, (0, 0, 1), cpu)
    fim, _ = sample_batch(shards, 8, 32, (0, 0, 1), cpu, FimSpec(prefix, middle, suffix, manifest["eos_id"], 1.0))
    assert not (plain == prefix).any() and (fim[:, 0] == prefix).all()  # each window starts with a piece
    result = run(_cfg(corpus_dir, tmp_path / "run", fim_rate=0.5, max_steps=4))
    assert result["step"] == 4 and result["val_loss"] is not None


def test_fill_in_the_middle_needs_its_tokens_and_a_probability(corpus_dir, tmp_path):
    with pytest.raises(LlmlabError, match=r"fim_rate must be a probability in \[0, 1\], got 1.5"):
        run(_cfg(corpus_dir, tmp_path / "a", fim_rate=1.5))
    data = tmp_path / "old-data"
    data.mkdir()
    for f in corpus_dir.iterdir():
        (data / f.name).write_bytes(f.read_bytes())
    manifest = json.loads((data / "manifest.json").read_text())
    manifest["fim_ids"] = None
    (data / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(LlmlabError, match=r"needs <\|fim_prefix\|>.*prepare the data again"):
        run(_cfg(data, tmp_path / "b", fim_rate=0.5))


def test_preflight_refuses_a_run_that_cannot_fit_before_writing_anything(corpus_dir, tmp_path):
    from llmlab.train.pretrain import estimate_training_memory

    huge = _cfg(corpus_dir, tmp_path / "huge", **{"model.dim": 8192, "model.n_layers": 80, "model.n_heads": 64,
                                                   "model.hidden_dim": 28672})
    with pytest.raises(LlmlabError, match=r"preflight: this run needs about \d+.*system.preflight=false"):
        run(huge)
    assert not (tmp_path / "huge").exists()
    # the estimate behind it: 16 bytes per parameter for fp32 AdamW, plus activations
    memory = estimate_training_memory(huge, torch.device("cpu"))
    params = huge.model.num_params().total
    assert memory.weights + memory.gradients + memory.optimizer == 16 * params
    assert memory.activations > 0


def test_preflight_can_be_skipped(corpus_dir, tmp_path, monkeypatch):
    import llmlab.train.pretrain as pretrain

    monkeypatch.setattr(pretrain, "available_memory", lambda device: 1.0)  # a device with 1 byte free
    with pytest.raises(LlmlabError, match="preflight"):
        run(_cfg(corpus_dir, tmp_path / "a", max_steps=1))
    assert run(_cfg(corpus_dir, tmp_path / "b", max_steps=1, **{"system.preflight": False}))["step"] == 1


def _copy_data(corpus_dir, dest):
    dest.mkdir()
    for f in corpus_dir.iterdir():
        (dest / f.name).write_bytes(f.read_bytes())
    return dest


def test_shards_are_verified_before_training_unless_told_not_to(corpus_dir, tmp_path):
    data = _copy_data(corpus_dir, tmp_path / "data")
    shard = data / "train_0000.bin"
    ids = np.frombuffer(shard.read_bytes(), dtype="<u2").copy()
    ids[100] = (ids[100] + 1) % 300  # another id of the vocabulary: only the checksum tells
    shard.write_bytes(ids.tobytes())
    with pytest.raises(LlmlabError, match=r"train_0000\.bin: sha256 .* does not match the manifest's"):
        run(_cfg(data, tmp_path / "a", max_steps=1))
    assert not (tmp_path / "a").exists()
    assert run(_cfg(data, tmp_path / "b", max_steps=1, verify_data=False))["step"] == 1


def test_ids_beyond_the_vocabulary_name_the_shard_even_unverified(corpus_dir, tmp_path):
    import hashlib

    data = _copy_data(corpus_dir, tmp_path / "data")
    manifest = json.loads((data / "manifest.json").read_text())
    for split in ("train", "val"):
        shard = data / f"{split}_0000.bin"
        shard.write_bytes(np.full(shard.stat().st_size // 2, 400, dtype="<u2").tobytes())  # vocab_size is 320
        # a manifest that agrees with its shards: as written with a larger tokenizer's ids, say
        manifest["splits"][split]["shards"][0]["sha256"] = hashlib.sha256(shard.read_bytes()).hexdigest()
    (data / "manifest.json").write_text(json.dumps(manifest))
    for verify in (True, False):
        with pytest.raises(LlmlabError, match=r"_0000\.bin: token id 400 at position \d+ is not below the "
                                              r"manifest's vocab_size 320"):
            run(_cfg(data, tmp_path / f"run-{verify}", max_steps=1, verify_data=verify))


def test_unset_vocab_size_and_seq_len_come_from_the_data_and_the_model(corpus_dir, tmp_path):
    cfg = from_dict(PretrainConfig, {"data": str(corpus_dir / "manifest.json"), "out_dir": str(tmp_path),
                                     "max_steps": 1, "batch_size": 2, "model": {"dim": 32, "n_layers": 1,
                                                                                "max_seq_len": 48}})
    assert cfg.model.vocab_size is None and cfg.seq_len is None
    assert run(cfg)["step"] == 1
    saved = load_config(PretrainConfig, tmp_path / "config.yaml")
    assert saved.model.vocab_size == 320 and saved.seq_len == 48
    with pytest.raises(LlmlabError, match="seq_len=64 exceeds model.max_seq_len=48; .*model.max_seq_len=64"):
        run(_cfg(corpus_dir, tmp_path / "long", seq_len=64, **{"model.max_seq_len": 48}))


@pytest.mark.parametrize("loss, norm, message", [
    (2.5, math.inf, r"non-finite gradient norm inf at step 4 \(loss 2\.5\)"),
    (math.nan, 1.0, r"non-finite loss nan at step 4 \(gradient norm 1\)"),
    (math.inf, math.nan, r"non-finite loss inf and gradient norm nan at step 4;"),
])
def test_a_non_finite_step_says_which_value_was_not_finite(loss, norm, message):
    from llmlab.train.loop import finite_step

    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    assert finite_step(torch.tensor(2.5), torch.tensor(1.0), optimizer, "stop", 3)
    with pytest.raises(LlmlabError, match=message):
        finite_step(torch.tensor(loss), torch.tensor(norm), optimizer, "stop", 3)
    assert not finite_step(torch.tensor(loss), torch.tensor(norm), optimizer, "skip", 3)


@pytest.mark.parametrize("speedup, chosen", [(3.0, "bf16"), (1.2, "none")])
def test_autocast_auto_follows_the_measured_bf16_speedup_and_records_it(corpus_dir, tmp_path, monkeypatch, capsys,
                                                                        speedup, chosen):
    from llmlab.train import core

    monkeypatch.setattr(core, "matmul_speedup", lambda device: speedup)
    result = run(_cfg(corpus_dir, tmp_path / "run", max_steps=2, **{"system.autocast": "auto"}))
    assert result["step"] == 2
    assert f"autocast: {chosen}" in (tmp_path / "run" / "config.yaml").read_text()
    assert f"bf16 matrix products run {speedup:.2g}x as fast as fp32" in capsys.readouterr().out


def test_the_bf16_probe_measures_something():
    from llmlab.train.core import matmul_speedup

    assert 0.0 < matmul_speedup(torch.device("cpu"), n=128, repeats=1) < 100.0


def test_an_auxiliary_loss_is_trained_and_reported_apart(corpus_dir, tmp_path, monkeypatch):
    """The model contract: a forward that adds an auxiliary loss (a router's, say) returns the sum and
    leaves the auxiliary part in `aux_loss`; the run trains on the sum and logs the part as aux_loss."""
    from llmlab.models.llama import Llama

    plain = run(_cfg(corpus_dir, tmp_path / "plain", max_steps=2))
    forward = Llama.forward

    def with_aux(self, *args, targets=None, **kwargs):
        out = forward(self, *args, targets=targets, **kwargs)
        if targets is None:
            return out
        self.aux_loss = 0.25 * (self.embed_tokens.weight ** 2).mean()  # depends on weights: has a gradient
        return out + self.aux_loss

    monkeypatch.setattr(Llama, "forward", with_aux)
    aux = run(_cfg(corpus_dir, tmp_path / "aux", max_steps=2))
    assert plain["step"] == aux["step"] == 2
    a, b = _metrics(tmp_path / "plain"), _metrics(tmp_path / "aux")
    first_a, first_b = next(m for m in a if "loss" in m), next(m for m in b if "loss" in m)
    assert "aux_loss" not in first_a and 0 < first_b["aux_loss"] < 0.01
    assert first_b["loss"] == pytest.approx(first_a["loss"] + first_b["aux_loss"], rel=1e-6)


def test_a_mixture_of_experts_logs_its_router_loss_loads_and_drops(corpus_dir, tmp_path):
    moe = {"n_experts": 4, "top_k": 2, "capacity_factor": 0.5, "aux_loss_coef": 0.01, "z_loss_coef": 0.001}
    result = run(_cfg(corpus_dir, tmp_path, max_steps=4, grad_accum=2, **{"model.moe": moe}))
    assert result["step"] == 4
    train = [r for r in _metrics(tmp_path) if "loss" in r]
    for r in train:
        assert len(r["expert_load"]) == 4 and sum(r["expert_load"]) == pytest.approx(1.0, abs=1e-3)
        # two micro-batches of 4 x 32 tokens, two MoE layers: capacity 0.5 x 2 x 128 / 4 = 32 of each
        # expert's assignments per layer and micro-batch, so at least half of the 2 x 2 x 256 are dropped
        assert r["dropped_tokens"] >= 512 and r["aux_loss"] > 0
