"""`llmlab eval` from the command line: several models side by side, --json, results on disk, and
bad input refused before anything is written."""

from __future__ import annotations

import json

import pytest
import torch

from llmlab.cli import main
from llmlab.models import LlamaConfig, build_model
from llmlab.models.io import save_model
from llmlab.tokenizer import train_bpe

WORDS = "red blue green cat dog bird fish tree sun moon star book door hand road ship rain snow".split()
TASK = """task: colours
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Q: {{{{q}}}}\\nA:"
doc_to_choice: choices
doc_to_target: label
metric_list:
  - metric: acc
  - metric: f1
  - metric: ece
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli_eval")
    tok = train_bpe([" ".join(WORDS[i:] + WORDS[:i]) for i in range(len(WORDS))] * 10, vocab_size=300)
    for seed in (0, 1):
        torch.manual_seed(seed)
        save_model(build_model(LlamaConfig(vocab_size=300, dim=32, n_layers=1, n_heads=2, max_seq_len=64)),
                   root / f"m{seed}")
        tok.save(root / f"m{seed}")
    rows = [{"q": " ".join(WORDS[i:i + 3]), "choices": WORDS[i + 3:i + 6], "label": i % 3} for i in range(12)]
    (root / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "colours.yaml").write_text(TASK.format(data=root / "data.jsonl"))
    return root


def test_two_models_side_by_side_with_results_on_disk(setup, tmp_path, capsys):
    out = tmp_path / "ev"
    args = ["eval", str(setup / "m0"), str(setup / "m1"), f"tasks=[{setup / 'colours.yaml'},bias]", f"out_dir={out}",
            "bootstrap_iters=50"]
    assert main(args) == 0
    table = capsys.readouterr().out
    header = table.splitlines()[0]
    assert "m0" in header and "m1" in header and "colours" in table and "likelihood_gap" in table
    results = json.loads((out / "results.json").read_text())
    assert {m["name"].rsplit("/", 1)[-1] for m in results["models"]} == {"m0", "m1"}
    assert all(m["hash"] and len(m["hash"]) == 16 for m in results["models"])
    assert results["models"][0]["hash"] != results["models"][1]["hash"]
    rows = [r for r in results["rows"] if r["task"] == "colours"]
    assert len(rows) == 2 * 3 and all(r["n"] == 12 and r["seed"] == 1234 and r["fewshot"] == 0 for r in rows)
    assert all(r["stderr"] is not None for r in rows if r["metric"] == "acc")
    entry = next(e for e in results["results"] if e["task"] == "colours")
    assert sum(sum(row.values()) for row in entry["extra"]["classification"]["confusion"].values()) == 12
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 2 * (12 + 50)
    assert main(args) == 1  # an existing result is not overwritten
    assert "--overwrite" in capsys.readouterr().err
    assert main(args + ["--overwrite", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["rows"] == json.loads((out / "results.json").read_text())["rows"]


@pytest.mark.parametrize("task, message", [
    ("nope", "unknown task 'nope'"),
    ("{bad}", "bad.yaml:2: unknown key 'colour'"),
])
def test_bad_task_is_refused_before_anything_is_written(setup, tmp_path, capsys, task, message):
    bad = tmp_path / "bad.yaml"
    bad.write_text("task: x\ncolour: red\n")
    out = tmp_path / "ev"
    assert main(["eval", str(setup / "m0"), f"tasks=[{task.format(bad=bad)}]", f"out_dir={out}"]) == 1
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_missing_model_and_bad_keys(setup, tmp_path, capsys):
    assert main(["eval", str(tmp_path / "absent"), f"out_dir={tmp_path / 'ev'}"]) == 1
    assert "no such checkpoint or run directory" in capsys.readouterr().err
    assert main(["eval", str(setup / "m0"), "limit=0"]) == 1
    assert "limit must be >= 1" in capsys.readouterr().err
    assert main(["eval", f"out_dir={tmp_path / 'ev'}"]) == 1
    assert "name at least one model" in capsys.readouterr().err
    assert not (tmp_path / "ev").exists()


def test_hostile_inputs_are_clean_errors(setup, tmp_path, capsys):
    (tmp_path / "empty.txt").write_text(" \n\n")
    gen = TASK.format(data=setup / "data.jsonl").replace("multiple_choice", "generate_until").replace(
        "metric_list:\n  - metric: acc\n  - metric: f1\n  - metric: ece\n", "")
    (tmp_path / "until.yaml").write_text(gen + "generation_kwargs: {until: 5}\n")
    (tmp_path / "sample.yaml").write_text(gen + "generation_kwargs: {do_sample: 'yes'}\n")
    cases = [
        ("tasks=[/dev/zero]", "/dev/zero: not a regular file"),
        (f"tasks=[{tmp_path / 'empty.txt'}]", "no text to score"),
        (f"tasks=[{tmp_path / 'until.yaml'}]", "until.yaml:11: generation_kwargs.until must be a string or a list"),
        (f"tasks=[{tmp_path / 'sample.yaml'}]", "generation_kwargs.do_sample must be true or false"),
    ]
    for arg, message in cases:
        assert main(["eval", str(setup / "m0"), arg, f"out_dir={tmp_path / 'ev'}"]) == 1, arg
        assert message in capsys.readouterr().err
    assert main(["eval", "--server", "notaurl", "tasks=[bias]", f"out_dir={tmp_path / 'ev'}"]) == 1
    assert "expected an http:// or https:// URL" in capsys.readouterr().err
    assert not (tmp_path / "ev").exists()


def test_server_answers_of_the_wrong_shape_or_impossible_logprobs_are_errors():
    from llmlab.eval.lm import EvalError, _expecting, _logprobs

    for values in ([float("nan")], [5.0], ["x"], [-1.0, -2.0]):
        with pytest.raises(ValueError):
            _logprobs(values, 1)
    assert _logprobs([-0.5, 0], 2) == [-0.5, 0.0]
    with pytest.raises(EvalError, match=r"http://x/v1/completions: unexpected answer \(IndexError"):
        with _expecting("http://x/v1/completions", "a choice"):
            [][0]
