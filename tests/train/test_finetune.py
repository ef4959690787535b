"""The fine-tuning loop end to end on CPU: LoRA, QLoRA, full and frozen runs, exact resume,
exports, and bad input."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from llmlab.common import LlmlabError
from llmlab.config import from_dict
from llmlab.models import LlamaConfig, build_model
from llmlab.models.io import copy_tokenizer_files, load_model, save_model
from llmlab.train.checkpoint import list_checkpoints
from llmlab.train.finetune import FinetuneConfig, run


def _cfg(base, data, out_dir, **overrides) -> FinetuneConfig:
    cfg = {"base": str(base), "out_dir": str(out_dir), "data": {"train": str(data / "train.jsonl"),
                                                               "val": str(data / "val.jsonl")},
           "seq_len": 64, "batch_size": 4, "max_steps": 8, "optim": {"lr": 1e-2, "warmup_steps": 2},
           "lora": {"r": 4, "alpha": 8, "targets": ["q_proj", "v_proj"], "dropout": 0.1},
           "eval": {"every": 4, "batches": 2, "exact_match": 4, "max_new_tokens": 6},
           "ckpt": {"every": 4, "keep_last": 5},
           "system": {"autocast": "none"}}  # fp32 on every machine: exact comparisons across runs
    for key, value in overrides.items():
        node = cfg
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return from_dict(FinetuneConfig, cfg)


def _metrics(out_dir):
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


def test_lora_run_writes_adapter_checkpoints_and_merged_model(base, synth_dir, tmp_path):
    result = run(_cfg(base, synth_dir, tmp_path))
    assert result["step"] == 8 and result["exit_code"] == 0
    lines = _metrics(tmp_path)
    assert [r["step"] for r in lines if "loss" in r] == list(range(1, 9))
    accuracy = [r for r in lines if "exact_match" in r]
    assert [r["step"] for r in accuracy] == [0, 4, 8]  # before fine-tuning, then at each evaluation
    assert "exact_match/reverse" in accuracy[0]
    ckpt = list_checkpoints(tmp_path / "checkpoints")[-1]
    names = {p.name for p in ckpt.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "optimizer.safetensors", "tokenizer.json"} <= names
    assert "model.safetensors" not in names  # the frozen base is not copied into every checkpoint
    adapter = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert len(adapter) == 2 * 2 * 2 and all(k.startswith("base_model.model.model.layers.") for k in adapter)
    # the merged model differs from the base exactly in the adapted matrices
    merged, original = load_model(tmp_path / "final").state_dict(), load_model(base).state_dict()
    changed = {k for k in original if not torch.equal(merged[k], original[k])}
    assert changed == {f"layers.{i}.attn.{p}_proj.weight" for i in range(2) for p in "qv"}
    assert (tmp_path / "final" / "tokenizer.json").is_file()


@pytest.mark.parametrize("method", [{}, {"peft": "qlora", "optim.name": "adamw8bit"}], ids=["lora", "qlora-8bit"])
def test_adapter_resume_is_exact(base, synth_dir, tmp_path, method):
    whole = tmp_path / "whole"
    run(_cfg(base, synth_dir, whole, **method))
    part = tmp_path / "part"
    run(_cfg(base, synth_dir, part, **method))
    # as if killed right after the step-4 checkpoint: later checkpoints and outputs never happened
    shutil.rmtree(part / "checkpoints" / "step-00000008")
    shutil.rmtree(part / "final")
    run(_cfg(base, synth_dir, part, **method, **{"ckpt.resume": "auto"}))
    strip = [{k: v for k, v in r.items() if k not in ("tokens_per_s", "time")} for r in _metrics(whole)]
    assert [{k: v for k, v in r.items() if k not in ("tokens_per_s", "time")} for r in _metrics(part)] == strip
    a, b = (load_file(d / "adapter" / "adapter_model.safetensors") for d in (whole, part))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_qlora_trains_adapters_over_a_4bit_base(base, synth_dir, tmp_path):
    result = run(_cfg(base, synth_dir, tmp_path, peft="qlora", **{"lora.targets": ["all-linear"],
                                                                  "optim.name": "adamw8bit"}))
    train = [r for r in _metrics(tmp_path) if "loss" in r]
    assert len(train) == 8 and all(torch.isfinite(torch.tensor(r["loss"])) for r in train)
    assert train[-1]["loss"] < train[0]["loss"]
    model = load_model(result["final"])  # merged and dequantized: an ordinary fp32 checkpoint
    assert all(p.dtype == torch.float32 for p in model.parameters())
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert cfg["target_modules"] == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]


def test_qlora_adapts_the_experts_of_an_moe_base(corpus_dir, synth_dir, tmp_path):
    from llmlab.models.moe import MoEConfig

    torch.manual_seed(0)
    model = build_model(LlamaConfig(vocab_size=320, dim=32, n_layers=2, n_heads=4, hidden_dim=64, max_seq_len=128,
                                    moe=MoEConfig(n_experts=4, top_k=2)))
    save_model(model, tmp_path / "base")
    copy_tokenizer_files(corpus_dir.parent / "tok", tmp_path / "base")
    out = tmp_path / "run"
    run(_cfg(tmp_path / "base", synth_dir, out, peft="qlora", max_steps=4, **{
        "lora.targets": ["all-linear"], "lora.dropout": 0.0, "eval.every": 4, "ckpt.every": 4}))
    train = [r for r in _metrics(out) if "loss" in r]
    assert len(train) == 4 and all(torch.isfinite(torch.tensor(r["loss"])) for r in train)
    cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert cfg["target_parameters"] == ["experts.down_proj", "experts.gate_up_proj"]
    assert "gate" in cfg["target_modules"]  # HF names the router mlp.gate
    merged = load_model(out / "final").state_dict()  # dequantized and merged
    assert merged["layers.0.mlp.experts.gate_up_proj.weight"].shape == (4, 128, 32)
    assert not torch.equal(merged["layers.0.mlp.router.weight"], model.state_dict()["layers.0.mlp.router.weight"])


def test_full_finetune_with_frozen_layers(base, synth_dir, tmp_path):
    run(_cfg(base, synth_dir, tmp_path, peft="none", freeze=["embed_tokens", "layers.0"], **{"eval.exact_match": 0}))
    assert not (tmp_path / "adapter").exists()
    merged, original = load_model(tmp_path / "final").state_dict(), load_model(base).state_dict()
    same = {k for k in original if torch.equal(merged[k], original[k])}
    assert same == {"embed_tokens.weight"} | {k for k in original if k.startswith("layers.0.")}
    assert "model.safetensors" in {p.name for p in list_checkpoints(tmp_path / "checkpoints")[-1].iterdir()}


def test_continued_pretraining_on_prepared_shards(base, corpus_dir, tmp_path):
    cfg = _cfg(base, corpus_dir, tmp_path, peft="none", **{"eval.exact_match": 0})
    cfg.data.train, cfg.data.val = str(corpus_dir), ""
    result = run(cfg)
    assert result["val_loss"] is not None and result["tokens"] == 8 * 4 * 64


def _write(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return path


@pytest.mark.parametrize("lines, match", [
    (['{"instruction": "Say hi", "output": "hi"}', '{"instruction": "x", "output": '],
     r"bad\.jsonl:2: (malformed|invalid) JSON"),
    (['{"instruction": "Say hi", "input": ""}'], r"bad\.jsonl:1: an Alpaca record needs a string 'output'"),
    (['{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}]}'],
     r"bad\.jsonl:1: messages\[1\]: empty assistant turn"),
    (['{"prompt": "hi"}'], r"bad\.jsonl:1: unknown record"),
])
def test_bad_records_are_named_and_nothing_is_written(base, tmp_path, lines, match):
    data = _write(tmp_path / "bad.jsonl", lines)
    cfg = _cfg(base, tmp_path, tmp_path / "run")
    cfg.data.train, cfg.data.val = str(data), ""
    with pytest.raises(LlmlabError, match=match):
        run(cfg)
    assert not (tmp_path / "run").exists()


def test_a_template_that_raises_is_a_clear_error(base, synth_dir, tmp_path):
    template = tmp_path / "strict.jinja"
    template.write_text("{{ raise_exception('this template takes no system turn') }}")
    with pytest.raises(LlmlabError, match="this template takes no system turn"):
        run(_cfg(base, synth_dir, tmp_path / "run", **{"data.template": str(template)}))
    assert not (tmp_path / "run").exists()


def test_bad_settings_are_refused(base, synth_dir, tmp_path):
    with pytest.raises(LlmlabError, match="freeze applies to full fine-tuning"):
        run(_cfg(base, synth_dir, tmp_path, freeze=["layers.0"]))
    with pytest.raises(LlmlabError, match="exceeds the base model's context"):
        run(_cfg(base, synth_dir, tmp_path, seq_len=1024))
    with pytest.raises(LlmlabError, match="no such checkpoint"):
        run(_cfg(tmp_path / "nope", synth_dir, tmp_path / "out"))


def test_preflight_refuses_a_run_that_cannot_fit(base, synth_dir, tmp_path, monkeypatch):
    import llmlab.train.finetune as finetune

    cfg = _cfg(base, synth_dir, tmp_path / "run")
    cpu = torch.device("cpu")
    full = finetune.estimate_memory(_cfg(base, synth_dir, tmp_path, peft="none"), load_model(base).config, cpu)
    lora = finetune.estimate_memory(cfg, load_model(base).config, cpu)
    assert lora.optimizer < full.optimizer / 5  # adapters only: a small fraction of the optimizer state
    monkeypatch.setattr(finetune, "available_memory", lambda device: 1e3)
    with pytest.raises(LlmlabError, match="preflight: fine-tuning needs about"):
        run(cfg)
    assert not (tmp_path / "run").exists()


def test_the_readme_example_runs_on_a_pretrain_run_without_seq_len(corpus_dir, synth_dir, tmp_path, monkeypatch):
    from llmlab.cli import main
    from llmlab.config import load_config
    from llmlab.train.pretrain import PretrainConfig
    from llmlab.train.pretrain import run as pretrain

    # a pretraining run like the demo's: context 128, which the default seq_len once exceeded
    pretrain(from_dict(PretrainConfig, {"data": str(corpus_dir), "out_dir": str(tmp_path / "demo"), "max_steps": 2,
                                        "batch_size": 2, "model": {"dim": 32, "n_layers": 1, "max_seq_len": 128}}))
    monkeypatch.chdir(tmp_path)
    readme = ["finetune", "base=demo", f"data.train={synth_dir / 'train.jsonl'}",
              f"data.val={synth_dir / 'val.jsonl'}", "peft=lora", "lora.r=16", "lora.targets=[all-linear]",
              "eval.exact_match=200", "out_dir=ft"]
    assert main(readme + ["max_steps=2", "batch_size=2", "eval.max_new_tokens=2", "eval.batches=1"]) == 0
    saved = load_config(FinetuneConfig, tmp_path / "ft" / "config.yaml")
    assert saved.seq_len == 128 and saved.base.endswith("step-00000002")


def test_settings_that_cannot_hold_for_the_base_are_refused(base, corpus_dir, synth_dir, tmp_path):
    with pytest.raises(LlmlabError, match=r"freeze pattern 'layers.0-9': the range 0-9 reaches past the model's "
                                          r"2 layers \(layers.0-1\)"):
        run(_cfg(base, synth_dir, tmp_path / "a", peft="none", freeze=["layers.0-9"]))
    with pytest.raises(LlmlabError, match="freezes every parameter, which leaves nothing to train"):
        run(_cfg(base, synth_dir, tmp_path / "b", peft="none", freeze=["*"]))
    small = tmp_path / "small"
    save_model(build_model(LlamaConfig(vocab_size=300, dim=32, n_layers=1, n_heads=4, max_seq_len=64)), small)
    copy_tokenizer_files(corpus_dir.parent / "tok", small)
    cfg = _cfg(small, synth_dir, tmp_path / "c", peft="none", **{"eval.exact_match": 0})
    cfg.data.train, cfg.data.val = str(corpus_dir / "manifest.json"), ""
    with pytest.raises(LlmlabError, match=r"its tokenizer has 320 ids, more than the base model's vocab_size of 300"):
        run(cfg)
    cfg = _cfg(base, synth_dir, tmp_path / "d", peft="none")
    cfg.data.train = str(corpus_dir)
    with pytest.raises(LlmlabError, match=r"data.val=.*val.jsonl: a prepared data.train brings its own val split"):
        run(cfg)
    from tests.data.test_shards import _prepared

    short = _prepared(tmp_path / "short", list(range(50)))
    cfg = _cfg(base, synth_dir, tmp_path / "e", peft="none")
    cfg.data.train, cfg.data.val = str(short), ""
    with pytest.raises(LlmlabError, match=r"the train split has 50 tokens, fewer than seq_len\+1=65"):
        run(cfg)
    for path in (tmp_path / "a", tmp_path / "b", tmp_path / "c", tmp_path / "d", tmp_path / "e"):
        assert not path.exists()


def test_resuming_on_another_base_is_refused(base, synth_dir, tmp_path):
    run(_cfg(base, synth_dir, tmp_path / "run", max_steps=4))
    other = tmp_path / "other-base"
    shutil.copytree(base, other)
    with pytest.raises(LlmlabError, match=r"base=.*other-base, but the checkpoint .* was trained with .*ckpt; set "
                                          r"it back$"):
        run(_cfg(other, synth_dir, tmp_path / "run", max_steps=8, **{"ckpt.resume": "auto"}))
