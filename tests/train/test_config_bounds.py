"""Numbers out of range in the training verbs' configs are errors naming the key, before any work;
device names that do not exist here too. One row a case: the verb, the override, the words expected."""

from __future__ import annotations

import pytest

from llmlab.cli import main
from llmlab.config import ConfigError, load_config
from llmlab.demo import DemoConfig
from llmlab.train.finetune import FinetuneConfig
from llmlab.train.pretrain import PretrainConfig
from llmlab.train.sweep import ScalingFitConfig

VERBS = {"pretrain": PretrainConfig, "finetune": FinetuneConfig, "scaling fit": ScalingFitConfig, "demo": DemoConfig}

CASES = [
    # the model
    ("pretrain", "model.dim=0", "model: dim must be >= 1, got 0"),
    ("pretrain", "model.n_layers=-1", "model: n_layers must be >= 1, got -1"),
    ("pretrain", "model.n_heads=0", "model: n_heads must be >= 1, got 0"),
    ("pretrain", "model.n_kv_heads=0", "model: n_kv_heads must be >= 1, got 0"),
    ("pretrain", "model.vocab_size=0", "model: vocab_size must be >= 1, got 0"),
    ("pretrain", "model.max_seq_len=0", "model: max_seq_len must be >= 1, got 0"),
    ("pretrain", "model.hidden_dim=-5", "model: hidden_dim must be >= 1, got -5"),
    ("pretrain", "model.head_dim=0", "model: head_dim must be >= 1, got 0"),
    ("pretrain", "model.dropout=1", "model: dropout must be in [0, 1), got 1.0"),
    ("pretrain", "model.norm_eps=0", "model: norm_eps must be > 0, got 0.0"),
    ("pretrain", "model.rope_theta=-1", "model: rope_theta must be > 1, got -1.0"),
    ("pretrain", "model.init_std=0", "model: init_std must be > 0, got 0.0"),
    ("pretrain", "model.sliding_window=0", "model: sliding_window must be >= 1, got 0"),
    ("pretrain", "model={family: gpt, dim: 0}", "model: dim must be >= 1, got 0"),
    ("pretrain", "model={family: gpt, position: relative, dim: 9, n_heads: 3}", "dim=9 must be even"),
    ("pretrain", "model.rope_scaling={kind: llama3, factor: 8, low_freq_factor: 4, high_freq_factor: 4}",
     "0 < low_freq_factor < high_freq_factor"),
    ("pretrain", "model.rope_scaling={kind: yarn, factor: 4, beta_fast: 0}", "rope_scaling.beta_fast must be > 0"),
    ("pretrain", "model.rope_scaling={kind: linear, factor: 2, original_max_position_embeddings: 0}",
     "original_max_position_embeddings must be >= 1"),
    # the optimizer
    ("pretrain", "optim.lr=-1", "optim: lr must be > 0, got -1.0"),
    ("pretrain", "optim.lr=0", "optim: lr must be > 0, got 0.0"),
    ("pretrain", "optim.min_lr_ratio=1.5", "optim: min_lr_ratio must be in [0, 1], got 1.5"),
    ("pretrain", "optim.warmup_steps=-1", "optim: warmup_steps must be >= 0, got -1"),
    ("pretrain", "optim.weight_decay=-0.1", "optim: weight_decay must be >= 0, got -0.1"),
    ("pretrain", "optim.betas=[0.9,1.0]", "optim: betas must be each in [0, 1)"),
    ("pretrain", "optim.eps=0", "optim: eps must be > 0, got 0.0"),
    ("pretrain", "optim.grad_clip=-1", "optim: grad_clip must be >= 0"),
    ("finetune", "optim.lr=0", "optim: lr must be > 0, got 0.0"),
    # evaluation and checkpoints
    ("pretrain", "eval.every=0", "eval: every must be >= 1, got 0"),
    ("pretrain", "eval.batches=0", "eval: batches must be >= 1, got 0"),
    ("pretrain", "eval.patience=-1", "eval: patience must be >= 0, got -1"),
    ("finetune", "eval.every=0", "eval: every must be >= 1, got 0"),
    ("finetune", "eval.exact_match=-1", "eval: exact_match must be >= 0, got -1"),
    ("finetune", "eval.max_new_tokens=0", "eval: max_new_tokens must be >= 1, got 0"),
    ("pretrain", "ckpt.every=0", "ckpt: every must be >= 1, got 0"),
    ("pretrain", "ckpt.keep_last=0", "ckpt: keep_last must be >= 1, got 0"),
    ("finetune", "ckpt.keep_last=-2", "ckpt: keep_last must be >= 1, got -2"),
    ("pretrain", "ckpt.resume=''", 'resume must be "none", "auto" or a checkpoint folder'),
    # the loops
    ("pretrain", "grad_accum=0", "grad_accum must be >= 1, got 0"),
    ("pretrain", "batch_size=0", "batch_size must be >= 1, got 0"),
    ("pretrain", "seq_len=0", "seq_len must be >= 1, got 0"),
    ("pretrain", "max_steps=0", "max_steps must be >= 1, got 0"),
    ("pretrain", "max_minutes=-1", "max_minutes must be >= 0, got -1.0"),
    ("pretrain", "log_every=0", "log_every must be >= 1, got 0"),
    ("pretrain", "seed=-1", "seed must be in [0, 2**64), got -1"),
    ("pretrain", "seed=100000000000000000000000", "seed must be in [0, 2**64)"),
    ("pretrain", "fim_rate=1.5", "fim_rate must be a probability in [0, 1], got 1.5"),
    ("pretrain", "fim_spm_rate=-0.1", "fim_spm_rate must be a probability in [0, 1]"),
    ("pretrain", "data=''", "data is empty"),
    ("finetune", "grad_accum=0", "grad_accum must be >= 1, got 0"),
    ("finetune", "seq_len=0", "seq_len must be >= 1, got 0"),
    ("finetune", "epochs=-1", "epochs must be >= 0, got -1.0"),
    ("finetune", "max_steps=0", "max_steps must be >= 1, got 0"),
    ("finetune", "data.val_fraction=1", "data: val_fraction must be in [0, 1), got 1.0"),
    ("finetune", "data.train=''", "data: train is empty"),
    ("finetune", "lora.r=0", "lora: r must be a rank >= 1, got 0"),
    ("finetune", "lora.alpha=0", "lora: alpha must be > 0, got 0.0"),
    ("finetune", "lora.dropout=1", "lora: dropout must be a probability in [0, 1), got 1.0"),
    ("finetune", "lora.targets=[]", "lora: targets must name the modules"),
    # the demo and the sweep
    ("demo", "minutes=0", "minutes must be > 0, got 0.0"),
    ("demo", "dim=100", "dim must be a positive multiple of 12"),
    ("demo", "n_layers=0", "n_layers must be >= 1, got 0"),
    ("demo", "batch_size=0", "batch_size must be >= 1, got 0"),
    ("demo", "vocab_size=100", "vocab_size=100 is too small"),
    ("demo", "lr=0", "lr must be > 0, got 0.0"),
    ("scaling fit", "widths=[16,0]", "widths must be multiples of 16"),
    ("scaling fit", "tokens=[1e6,-1]", "tokens must each be >= 1"),
    ("scaling fit", "tokens=[1000000,1000001]", "tokens must differ in their first 3 significant digits"),
    ("scaling fit", "seq_len=0", "seq_len must be >= 1, got 0"),
    ("scaling fit", "batch_size=-1", "batch_size must be >= 1, got -1"),
    ("scaling fit", "lr=0", "lr must be > 0, got 0.0"),
    ("scaling fit", "bootstrap=1", "bootstrap must be >= 2, got 1"),
    ("scaling fit", "predict_flops=-1e20", "predict_flops must be in (0, 1e+33]"),
    ("scaling fit", "predict_flops=1e300", "predict_flops must be in (0, 1e+33], got 1e+300"),
    ("scaling fit", "corpus_bytes=-1", "corpus_bytes must be >= 0, got -1"),
    ("scaling fit", "vocab_size=0", "vocab_size=0 is too small"),
]


def test_the_table_covers_every_verb():
    assert len(CASES) >= 70 and {verb for verb, _, _ in CASES} == set(VERBS)


@pytest.mark.parametrize("verb, override, expected", CASES, ids=[f"{v}:{o}" for v, o, _ in CASES])
def test_out_of_range_values_are_config_errors_naming_the_key(verb, override, expected):
    with pytest.raises(ConfigError) as info:
        load_config(VERBS[verb], None, [override])
    assert expected in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("verb, override, expected", [c for c in CASES if c[1] in ("grad_accum=0", "lora.r=0",
                                                                                       "minutes=0", "eval.every=0")])
def test_the_cli_prints_one_line_and_exits_1_writing_nothing(verb, override, expected, tmp_path, capsys,
                                                             monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main([*verb.split(), override, f"out_dir={tmp_path / 'out'}"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and expected in err and err.count("\n") == 1
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("device", ["gpu", "cuda:x", "cuda:7", "mps", "tpu", "cpu:1"])
@pytest.mark.parametrize("verb", ["pretrain", "finetune"])
def test_devices_this_machine_lacks_are_named(verb, device, tmp_path, capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the same answer on a machine with GPUs
    monkeypatch.chdir(tmp_path)
    assert main([verb, f"system.device={device}", f"out_dir={tmp_path / 'out'}"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: system.device={device!r}: ") and err.count("\n") == 1
    assert "auto" in err and ("this machine has cpu)" in err or "(it has cpu)" in err)
