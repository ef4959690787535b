"""The `llmlab` command as a user runs it: help, exit codes, clean output, the demo and convert."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llmlab.cli import main
from llmlab.models import build_model
from llmlab.models.io import load_model, save_model
from tests.models.zoo import TINY


def _llmlab(*args, cwd=None, env=None):
    return subprocess.run([sys.executable, "-m", "llmlab", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env={**os.environ, **(env or {})}, timeout=300)


def test_help_lists_the_verbs_that_exist():
    out = _llmlab("--help")
    assert out.returncode == 0
    for verb in ("demo", "data", "tokenizer", "pretrain", "finetune", "convert"):
        assert verb in out.stdout
    assert "\033[" not in out.stdout
    out = _llmlab("pretrain", "--help")
    assert out.returncode == 0 and "optim.lr" in out.stdout and "model.family" in out.stdout


@pytest.mark.slow
def test_demo_end_to_end(tmp_path, capsys):
    # the real demo, shrunk: same corpus and stages, a tiny budget
    args = ["demo", f"out_dir={tmp_path / 'run'}", "minutes=0.1", "vocab_size=512", "dim=48", "seq_len=64",
            "code_bytes=300000"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "\033[" not in out  # captured output is not a TTY: no colour codes
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["val_ppl"] < 512  # better than the uniform guess after a few seconds
    # the best checkpoint by validation loss, evaluated on the built-in tasks
    assert Path(summary["best_checkpoint"]).parent == tmp_path / "run" / "pretrain" / "checkpoints"
    results = json.loads((tmp_path / "run" / "eval" / "results.json").read_text())
    assert {r["task"] for r in results["rows"]} == {"pydoc-ppl", "pydoc-cloze", "bias"}
    assert 1 < summary["eval"]["pydoc-ppl/token_perplexity"] < 512 and 0 <= summary["eval"]["pydoc-cloze/acc"] <= 1
    assert (tmp_path / "run" / "loss.png").stat().st_size > 1000
    assert "minutes: 0.1" in (tmp_path / "run" / "config.yaml").read_text()
    assert "validation perplexity" in out and "> The for statement" in out
    assert main(args) == 1  # a second demo into the same folder is refused, nothing overwritten


def test_config_errors_exit_1_with_a_clean_message(tmp_path):
    out = _llmlab("demo", "seedd=3", env={"NO_COLOR": "1"})
    assert out.returncode == 1
    assert out.stderr.startswith("error: command line: seedd: unknown key (did you mean 'seed'?)")
    assert "Traceback" not in out.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text("seed: [1,\n")
    out = _llmlab("demo", bad)
    assert out.returncode == 1 and "bad.yaml" in out.stderr and "line" in out.stderr
    out = _llmlab("demo", "seed=abc")
    assert out.returncode == 1 and "seed: expected int, got 'abc'" in out.stderr
    out = _llmlab("demo", tmp_path / "missing.yaml")
    assert out.returncode == 1 and "missing.yaml: config file not found" in out.stderr


def test_convert_both_ways(tmp_path):
    torch.manual_seed(0)
    model = build_model(TINY["llama-gqa-tied"]).eval()
    save_model(model, tmp_path / "ours")
    (tmp_path / "ours" / "tokenizer.json").write_text("{}")
    out = _llmlab("convert", tmp_path / "ours", "--to", "hf", "--out", tmp_path / "hf")
    assert out.returncode == 0, out.stderr
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["model_type"] == "llama"
    assert (tmp_path / "hf" / "tokenizer.json").is_file()
    out = _llmlab("convert", tmp_path / "hf", "--to", "llmlab", "--out", tmp_path / "back")
    assert out.returncode == 0, out.stderr
    x = torch.randint(0, 97, (1, 12))
    with torch.no_grad():
        assert torch.equal(load_model(tmp_path / "back")(x), model(x))


def test_convert_failures(tmp_path):
    out = _llmlab("convert", tmp_path / "missing", "--to", "hf", "--out", tmp_path / "o")
    assert out.returncode == 1 and "not a directory" in out.stderr
    out = _llmlab("convert", tmp_path, "--to", "onnx", "--out", tmp_path / "o")
    assert out.returncode == 2 and "invalid choice: 'onnx'" in out.stderr
    out = _llmlab("convert", tmp_path, "--to", "hf", "--out", tmp_path)
    assert out.returncode == 1 and ": is the input " in out.stderr


@pytest.mark.slow
def test_console_script_is_installed():
    exe = os.path.join(os.path.dirname(sys.executable), "llmlab")
    if not os.path.exists(exe):
        pytest.skip("package not installed in this environment")
    assert subprocess.run([exe, "--version"], capture_output=True, text=True).stdout.startswith("llmlab ")


def test_synth_then_finetune_then_generate(tmp_path, capsys):
    from llmlab.models import LlamaConfig
    from llmlab.tokenizer import train_bpe

    base = tmp_path / "base"
    torch.manual_seed(0)
    save_model(build_model(LlamaConfig(vocab_size=300, dim=32, n_layers=1, n_heads=4, max_seq_len=64)), base)
    train_bpe([f"Add the two numbers. {i} + {i} is {2 * i}" for i in range(200)], vocab_size=300).save(base)
    assert main(["data", "synth", f"out_dir={tmp_path / 'synth'}", "tasks=[add]", "train=40", "val=8", "test=0"]) == 0
    assert main(["finetune", f"base={base}", f"out_dir={tmp_path / 'ft'}",
                 f"data.train={tmp_path / 'synth/train.jsonl'}", "seq_len=64", "batch_size=4", "max_steps=3",
                 "eval.exact_match=2", "eval.max_new_tokens=4"]) == 0
    assert "exact match" in capsys.readouterr().out
    assert main(["generate", str(tmp_path / "ft" / "final"), "--prompt", "Add", "--max-new-tokens", "3"]) == 0
    # base + adapter merged by convert, to HF format: the same model as finetune's merged final/
    assert main(["convert", str(base), "--adapter", str(tmp_path / "ft" / "adapter"), "--to", "hf",
                 "--out", str(tmp_path / "hf")]) == 0
    x = torch.randint(0, 300, (1, 12))
    with torch.no_grad():
        assert torch.allclose(load_model(tmp_path / "hf")(x), load_model(tmp_path / "ft" / "final")(x), atol=1e-5)
    assert main(["convert", str(base), "--adapter", str(tmp_path), "--to", "hf", "--out", str(tmp_path / "x")]) == 1
    assert not (tmp_path / "x").exists()
    out = _llmlab("finetune", f"base={tmp_path / 'nope'}")
    assert out.returncode == 1 and out.stderr.startswith("error: base=") and "Traceback" not in out.stderr
