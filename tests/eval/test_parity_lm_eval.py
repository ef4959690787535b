"""Same scores as lm-evaluation-harness: a tiny random LLaMA exported to HF format, scored by
`lm_eval --model hf` and by llmlab's evaluator on the same local task YAMLs (multiple choice zero-
and few-shot, rolling perplexity over documents longer than the context, generation with exact
match and a regex filter): equal accuracies and log-likelihoods within 1e-4."""

from __future__ import annotations

import json
import math
import os
import random

import pytest
import torch

from llmlab.eval import LocalLM, evaluate_task, load_task_file
from llmlab.models import LlamaConfig, build_model
from llmlab.models.io import save_hf
from llmlab.tokenizer import train_bpe

pytestmark = pytest.mark.hf
lm_eval = pytest.importorskip("lm_eval")

WORDS = ("red blue green cat dog bird fish tree sun moon star book door hand road ship rain snow wind fire milk "
         "cake bread apple king queen house river stone light").split()

MC = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}/mc.jsonl
    train: {data}/mc_train.jsonl
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - metric: acc
  - metric: acc_norm
"""

FEWSHOT = """include: mc.yaml
task: mc_fewshot
fewshot_split: train
num_fewshot: 2
description: "Answer with a word.\\n\\n"
"""

PPL = """task: ppl
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}/ppl.jsonl
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
"""

GEN = """task: gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}/gen.jsonl
test_split: test
output_type: generate_until
doc_to_text: "Q: {{{{question}}}}\\nA:"
doc_to_target: answer
generation_kwargs:
  until: ["\\n", "."]
  max_gen_toks: 6
  do_sample: false
metric_list:
  - metric: exact_match
    ignore_case: true
filter_list:
  - name: first-word
    filter:
      - function: regex
        regex_pattern: "([a-z]+)"
      - function: take_first
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("parity")
    rng = random.Random(0)
    corpus = [" ".join(rng.choice(WORDS) for _ in range(40)) for _ in range(200)]
    tok = train_bpe(corpus, vocab_size=320)
    torch.manual_seed(0)
    model = build_model(LlamaConfig(vocab_size=320, dim=48, n_layers=2, n_heads=4, hidden_dim=96, max_seq_len=48))
    hf = root / "hf"
    save_hf(model, hf)
    tok.save(hf, model_max_length=48)
    data = root / "data"
    data.mkdir()

    def write(name, rows):
        (data / name).write_text("".join(json.dumps(r) + "\n" for r in rows))

    def mc_rows(n):
        rows = []
        for _ in range(n):
            choices = rng.sample(WORDS, 4)
            rows.append({"question": " ".join(rng.sample(WORDS, 5)), "choices": choices, "label": rng.randrange(4)})
        return rows

    write("mc.jsonl", mc_rows(24))
    write("mc_train.jsonl", mc_rows(8))
    write("ppl.jsonl", [{"text": " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 90)))} for _ in range(8)])
    write("gen.jsonl", [{"question": " ".join(rng.sample(WORDS, 3)), "answer": rng.choice(WORDS)} for _ in range(10)])
    tasks = root / "tasks"
    tasks.mkdir()
    (tasks / "mc.yaml").write_text(MC.format(name="mc", data=data))
    (tasks / "mc_fewshot.yaml").write_text(FEWSHOT)
    (tasks / "ppl.yaml").write_text(PPL.format(data=data))
    (tasks / "gen.yaml").write_text(GEN.format(data=data))
    return hf, tasks, root


@pytest.fixture(scope="module")
def harness(setup):
    """lm-eval's hf backend on the exported model: results and samples of every task."""
    hf, tasks, root = setup
    os.environ.update(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", HF_DATASETS_CACHE=str(root / "cache"),
                      TOKENIZERS_PARALLELISM="false")
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    out = simple_evaluate(model="hf", model_args=f"pretrained={hf},dtype=float32,device=cpu", batch_size=4,
                          tasks=["mc", "mc_fewshot", "ppl", "gen"], task_manager=TaskManager(include_path=str(tasks)),
                          log_samples=True, bootstrap_iters=0)
    return out


@pytest.fixture(scope="module")
def ours(setup):
    hf, tasks, _ = setup
    lm = LocalLM.from_path(hf, batch_size=4)
    return {name: evaluate_task(load_task_file(tasks / f"{name}.yaml"), lm, bootstrap_iters=0)
            for name in ("mc", "mc_fewshot", "ppl", "gen")}


def _their_samples(harness, task):
    return sorted(harness["samples"][task], key=lambda s: s["doc_id"])


@pytest.mark.parametrize("task", ["mc", "mc_fewshot"])
def test_multiple_choice_matches_the_harness(harness, ours, task):
    theirs, mine = _their_samples(harness, task), ours[task]
    assert len(theirs) == len(mine.samples) == 24
    for t, m in zip(theirs, mine.samples):
        assert t["arguments"][0][0] == m["context"]  # the same prompt, few-shot examples included
        lls = [r[0][0] for r in t["resps"]]
        assert m["loglikelihoods"] == pytest.approx(lls, abs=1e-4)
        assert m["acc"] == t["acc"] and m["acc_norm"] == t["acc_norm"]
    for metric in ("acc", "acc_norm"):
        assert mine.metrics[metric] == pytest.approx(harness["results"][task][f"{metric},none"], abs=1e-9)
    assert 0 < mine.metrics["acc"] < 1  # a score with something to agree on


def test_rolling_perplexity_matches_the_harness(harness, ours):
    theirs, mine = _their_samples(harness, "ppl"), ours["ppl"]
    assert max(s["tokens"] for s in mine.samples) > 48  # some documents span several windows
    for t, m in zip(theirs, mine.samples):
        assert m["loglikelihood"] == pytest.approx(t["resps"][0][0], abs=1e-4)
    for metric in ("word_perplexity", "byte_perplexity", "bits_per_byte"):
        assert mine.metrics[metric] == pytest.approx(harness["results"]["ppl"][f"{metric},none"], rel=1e-5)
        assert math.isfinite(mine.metrics[metric])


def test_generation_and_exact_match_match_the_harness(harness, ours):
    theirs, mine = _their_samples(harness, "gen"), ours["gen"]
    for t, m in zip(theirs, mine.samples):
        assert m["responses"] == t["resps"][0]
        assert m["filtered"]["first-word"] == [t["filtered_resps"][0]] or m["filtered"]["first-word"][0] == \
            t["filtered_resps"][0]
    assert mine.metrics["exact_match,first-word"] == harness["results"]["gen"]["exact_match,first-word"]
