"""Task files and built-in tasks: what loads, what prompts they build, and the errors bad ones get."""

from __future__ import annotations

import json
import math

import pytest
import torch

from llmlab.eval import EvalError, LocalLM, evaluate_task, load_task_file
from llmlab.eval.builtin import BUILTIN_TASKS
from llmlab.eval.tasks import Renderer, load_tasks, prepare
from llmlab.models import LlamaConfig, build_model
from llmlab.models.io import save_model
from llmlab.tokenizer import train_bpe

WORDS = "red blue green cat dog bird fish tree sun moon star book door hand road ship rain snow".split()

HEAD = """task: t
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
"""
MC = HEAD + """output_type: multiple_choice
doc_to_text: "{{{{q}}}}"
doc_to_choice: choices
doc_to_target: label
"""


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_ckpt")
    tok = train_bpe([" ".join(WORDS[i:] + WORDS[:i]) for i in range(len(WORDS))] * 10, vocab_size=300)
    torch.manual_seed(0)
    save_model(build_model(LlamaConfig(vocab_size=300, dim=32, n_layers=1, n_heads=2, max_seq_len=64)), root / "ck")
    tok.save(root / "ck")
    return root / "ck"


def _task(tmp_path, body: str, rows: list[dict], name="t.yaml"):
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / name).write_text(body.format(data=data))
    return tmp_path / name


ROWS = [{"q": "red cat", "choices": ["dog", "sun"], "label": 0}, {"q": "blue", "choices": ["moon", "star"], "label": 1}]


def test_every_builtin_task_loads_with_documents():
    assert len(BUILTIN_TASKS) == 9
    tasks = {t.name: t for name in BUILTIN_TASKS for t in load_tasks(name, builtins=BUILTIN_TASKS)}
    assert set(tasks) == set(BUILTIN_TASKS)
    assert len(tasks["pydoc-cloze"].docs) == 200 and len(tasks["synth"].docs) == 200
    assert all(d["text"].count("[MASK]") == 1 for d in tasks["pydoc-fill-mask"].docs)
    assert {d["task"] for d in tasks["synth"].docs} == {"add", "subtract", "multiply", "reverse", "sort", "count",
                                                         "upper", "format"}
    assert len(tasks["pydoc-ppl"].docs) >= 10 and len(tasks["code"].docs) == 12 and len(tasks["bias"].docs) == 50
    renderer = Renderer()
    for t in tasks.values():
        p = prepare(t, renderer, limit=3)
        assert len(p.contexts) == len(p.docs) == min(3, len(t.docs))
    cloze = prepare(tasks["pydoc-cloze"], renderer)
    assert all(len(c) == 4 and len(set(c)) == 4 for c in cloze.choices)


def test_builtin_held_out_text_is_the_demo_validation_split():
    from llmlab.data.clean import normalize
    from llmlab.data.ingest import default_corpus
    from llmlab.data.prepare import assign_split

    held = {d["text"] for d in load_tasks("pydoc-ppl", builtins=BUILTIN_TASKS)[0].docs}
    train = {normalize(d.text) for d in default_corpus()} - held
    assert held and all(assign_split(t, 0, 0.1) == "train" for t in train if t)


def test_fewshot_from_its_own_split_never_shows_the_document_itself(tmp_path):
    rows = [{"q": w, "choices": ["a", "b"], "label": 0} for w in WORDS[:6]]
    path = _task(tmp_path, MC + "num_fewshot: 5\n", rows)
    p = prepare(load_task_file(path), Renderer())
    for doc, ctx in zip(p.docs, p.contexts):
        shots = ctx.split("\n\n")[:-1]
        assert len(shots) == 5 and f"{doc['q']} a" not in shots and ctx.endswith(doc["q"])


@pytest.mark.parametrize("extra, message", [
    ("process_docs: !function utils.process\n", r"t.yaml:11: .*!function"),
    ("process_results: foo\n", r"t.yaml:11: 'process_results' is a key lm-evaluation-harness supports but llmlab"),
    ("colour: red\n", r"t.yaml:11: unknown key 'colour'"),
    ("num_fewshot: -1\n", r"t.yaml:11: num_fewshot must be >= 0"),
    ("metric_list:\n  - metric: mcc\n", r"metric 'mcc' is not supported for multiple_choice"),
    ("filter_list:\n  - name: x\n    filter:\n      - function: custom\n",
     r"filter function 'custom' is not supported"),
])
def test_task_file_errors_name_file_and_line(tmp_path, extra, message):
    path = _task(tmp_path, MC + extra, ROWS)
    with pytest.raises(EvalError, match=message):
        load_task_file(path)


@pytest.mark.parametrize("rows, message", [
    ([ROWS[0], {"q": "x", "choices": [], "label": 0}], r"data.jsonl:2: doc_to_choice of task t must give a non-empty"),
    ([ROWS[0], {"q": "x", "label": 0}], r"data.jsonl:2: the document has no field 'choices'"),
    ([{"choices": ["a"], "label": 0}], r"data.jsonl:1: doc_to_text of task t: .*'q' is undefined"),
    ([{"q": "x", "choices": ["a", "b"], "label": 5}], r"data.jsonl:1: the target index 5 .* outside its 2 choices"),
    ([{"q": "x", "choices": ["a", "b"], "label": "c"}], r"data.jsonl:1: the target 'c' of task t is not one of"),
])
def test_bad_documents_name_file_line_and_field(tmp_path, rows, message):
    task = load_task_file(_task(tmp_path, MC, rows))
    with pytest.raises(EvalError, match=message):
        prepare(task, Renderer())


def test_unknown_task_and_runaway_template(tmp_path):
    with pytest.raises(EvalError, match=r"unknown task 'nope': not a built-in task \(bias, code"):
        load_tasks("nope", builtins=BUILTIN_TASKS)
    body = MC.replace('"{{{{q}}}}"', '"{{{{ \'x\' * 10**10 }}}}"')
    task = load_task_file(_task(tmp_path, body, ROWS))
    with pytest.raises(EvalError, match="data.jsonl:1: doc_to_text"):  # the sandbox child fails, not this process
        prepare(task, Renderer())


def test_run_directory_resolves_to_its_newest_checkpoint(tmp_path, checkpoint):
    import shutil

    from llmlab.common import LlmlabError
    from llmlab.models.io import resolve_model_dir

    for step in ("step-00000010", "step-00000020"):
        shutil.copytree(checkpoint, tmp_path / "run" / "checkpoints" / step)
    assert resolve_model_dir(tmp_path / "run").name == "step-00000020"
    assert resolve_model_dir(checkpoint) == checkpoint
    with pytest.raises(LlmlabError, match="not a checkpoint"):
        resolve_model_dir(tmp_path)


def test_generation_task_with_checker_and_self_consistency_vote(checkpoint):
    lm = LocalLM.from_path(checkpoint)
    sc = load_tasks("synth-sc", builtins=BUILTIN_TASKS)[0]
    result = evaluate_task(sc, lm, limit=4, bootstrap_iters=10)
    assert result.n == 4 and all(len(s["responses"]) == 5 for s in result.samples)
    assert all(len(s["filtered"]["answer"]) == 1 for s in result.samples)  # five answers voted down to one
    assert result.metrics["check,answer"] == 0.0  # a random model answers nothing right
    synth = load_tasks("synth", builtins=BUILTIN_TASKS)[0]
    before = dict(synth.generation_kwargs)
    chat = evaluate_task(synth, lm, limit=3, bootstrap_iters=0)
    assert "<|user|>" in chat.samples[0]["context"]  # the checkpoint's chat template rendered the prompt
    first = synth.docs[0]  # ... the conversation `llmlab finetune` trains on, to the letter
    assert f"{first['instruction']}\n\n{first['input']}" in chat.samples[0]["context"]
    assert set(chat.extra["by_task"]) <= {"add", "subtract", "multiply"}
    assert synth.generation_kwargs == before  # the template's stop is this model's, never added to the task


class _Answers:
    """A stand-in model whose completions are given: the evaluator's side alone."""

    def __init__(self, answer):
        self.answer = answer

    def generate_until(self, requests):
        return [self.answer(ctx) for ctx, _ in requests]


SOLUTIONS = {"add": "    return a + b\n", "is_even": "    return n % 2 == 0\n", "square": "    return x * x\n",
             "first": "```python\ndef first(xs):\n    return xs[0] if xs else None\n```",
             "factorial": "    while True:\n        pass\n"}  # the last never ends: a timeout, a failed sample


def test_code_task_runs_unit_tests_for_pass_at_k():
    task = load_tasks("code", builtins=BUILTIN_TASKS)[0]
    names = {d["prompt"]: d["name"] for d in task.docs}
    result = evaluate_task(task, _Answers(lambda ctx: SOLUTIONS.get(names[ctx], "    return None\n")),
                           bootstrap_iters=0, code_timeout=2.0)
    by_name = {s["target"][0]: s for s in result.samples}
    assert [n for n, s in by_name.items() if s["pass@1"] == 1.0] == ["add", "is_even", "square", "first"]
    assert by_name["factorial"]["tests"] == ["timeout"]
    assert result.metrics["pass@1"] == pytest.approx(4 / 12)


def test_a_continuation_longer_than_the_context_is_scored_in_rolling_windows(checkpoint):
    lm = LocalLM.from_path(checkpoint)
    text = " ".join(WORDS * 6)
    assert len(lm.encode(text)) > 2 * lm.max_length
    (whole, greedy), = lm.loglikelihood([("", text)])
    assert whole == pytest.approx(lm.loglikelihood_rolling([text])[0], abs=1e-4)
    short = lm.loglikelihood([("red cat", " dog")])[0][0]
    assert lm.loglikelihood([(" ".join(WORDS * 8) + " red cat", " dog")])[0][0] != short  # the newest context kept


def test_text_files_and_prepared_folders_are_perplexity_tasks(tmp_path, checkpoint):
    from llmlab.data.prepare import PrepareConfig
    from llmlab.data.prepare import run as prepare_data
    from llmlab.eval.lm import rolling_windows
    from llmlab.tokenizer import train_bpe as train

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(30):
        (corpus / f"d{i:02d}.txt").write_text(" ".join(WORDS[i % 7:] + WORDS[:i % 7]) + f" note {i}\n")
    lm = LocalLM.from_path(checkpoint)
    (text,) = load_tasks(str(corpus), builtins=BUILTIN_TASKS)
    assert text.output_type == "loglikelihood_rolling" and len(text.docs) == 30
    assert text.doc_where[0].endswith("d00.txt")
    scored = evaluate_task(text, lm, bootstrap_iters=0)
    assert set(scored.metrics) == {"token_perplexity", "word_perplexity", "byte_perplexity", "bits_per_byte"}

    prepare_data(PrepareConfig(inputs=[str(corpus)], out_dir=str(tmp_path / "data"), tokenizer=str(checkpoint),
                               val_frac=0.4, dedup="none", seed=0))
    (tokens,) = load_tasks(str(tmp_path / "data"), builtins=BUILTIN_TASKS)
    assert tokens.name == "data:val" and tokens.output_type == "tokens"
    result = evaluate_task(tokens, lm, bootstrap_iters=0)
    ids = tokens.shards.get(0, len(tokens.shards)).tolist()  # one chunk: the harness's rolling windows agree
    windows = rolling_windows(ids, lm.prefix_id, lm.max_length)
    total = sum(s.logprob for s in lm.score_tokens(windows))
    assert result.metrics["token_perplexity"] == pytest.approx(math.exp(-total / len(ids)), rel=1e-4)

    other = train([" ".join(WORDS)] * 20, vocab_size=280)
    other.save(tmp_path / "other")
    prepare_data(PrepareConfig(inputs=[str(corpus)], out_dir=str(tmp_path / "other_data"),
                               tokenizer=str(tmp_path / "other"), val_frac=0.4, seed=0))
    with pytest.raises(EvalError, match="tokenized with another tokenizer than the model's"):
        evaluate_task(load_tasks(str(tmp_path / "other_data"), builtins=BUILTIN_TASKS)[0], lm, bootstrap_iters=0)
