"""Evaluation through a server, both ways: lm-eval's `local-completions` model drives `llmlab serve`
with nothing but `base_url` and `model` (the server's tokenizer routes stand in for a tokenizer),
and `llmlab eval --server` scores the same tasks; both agree with the model evaluated in process."""

from __future__ import annotations

import json
import os

import pytest

from llmlab.eval import LocalLM, ServerLM, evaluate_task, load_task_file
from tests.serve.test_server import Server, checkpoint  # noqa: F401  (the served tiny model, a fixture)

pytestmark = pytest.mark.hf
lm_eval = pytest.importorskip("lm_eval")

HEAD = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
"""
TASKS = {
    "srv_mc": HEAD + """output_type: multiple_choice
doc_to_text: "{{{{q}}}} is"
doc_to_choice: choices
doc_to_target: label
""",
    "srv_ppl": HEAD + """output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: text
""",
    "srv_gen": HEAD + """output_type: generate_until
doc_to_text: "Say hi to {{{{q}}}}"
doc_to_target: "{{{{q}}}} friends"
generation_kwargs:
  until: [".", ","]
  max_gen_toks: 8
""",
}


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    root = tmp_path_factory.mktemp("srv_tasks")
    rows = [{"q": f"Hello there, the answer is {i}", "choices": [" 1", " 2", " friends!"], "label": i % 3,
             "text": f"Say hi to {i} friends! Hello there, the answer is {i}."} for i in range(6)]
    data = root / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    for name, body in TASKS.items():
        (root / f"{name}.yaml").write_text(body.format(name=name, data=data))
    return root


@pytest.fixture(scope="module")
def served(checkpoint):  # noqa: F811
    with Server(checkpoint) as s:
        yield s


@pytest.fixture(scope="module")
def local(checkpoint, tasks):  # noqa: F811
    lm = LocalLM.from_path(checkpoint)
    return {name: evaluate_task(load_task_file(tasks / f"{name}.yaml"), lm, bootstrap_iters=0) for name in TASKS}


def test_lm_eval_local_completions_drives_llmlab_serve(served, tasks, local, tmp_path):
    os.environ.update(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", HF_DATASETS_CACHE=str(tmp_path / "cache"))
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    out = simple_evaluate(model="local-completions", model_args=f"base_url={served.url}/v1/completions,model=tiny",
                          tasks=list(TASKS), task_manager=TaskManager(include_path=str(tasks)), log_samples=True,
                          bootstrap_iters=0)
    by_doc = {name: sorted(out["samples"][name], key=lambda s: s["doc_id"]) for name in TASKS}
    for theirs, mine in zip(by_doc["srv_mc"], local["srv_mc"].samples):
        assert [r[0][0] for r in theirs["resps"]] == pytest.approx(mine["loglikelihoods"], abs=1e-4)
    assert out["results"]["srv_mc"]["acc,none"] == local["srv_mc"].metrics["acc"]
    for theirs, mine in zip(by_doc["srv_ppl"], local["srv_ppl"].samples):
        assert theirs["resps"][0][0] == pytest.approx(mine["loglikelihood"], abs=1e-4)
    for theirs, mine in zip(by_doc["srv_gen"], local["srv_gen"].samples):
        assert theirs["resps"][0] == mine["responses"]
        assert "." not in theirs["resps"][0][0] and "," not in theirs["resps"][0][0]


def test_llmlab_eval_server_model_agrees_with_the_local_one(served, tasks, local):
    lm = ServerLM(served.url + "/v1")
    assert lm.model_id == "tiny" and lm.max_length == 96
    for name in TASKS:
        remote = evaluate_task(load_task_file(tasks / f"{name}.yaml"), lm, bootstrap_iters=0)
        for theirs, mine in zip(remote.samples, local[name].samples):
            for key in ("loglikelihoods", "loglikelihood"):
                if key in mine:
                    assert theirs[key] == pytest.approx(mine[key], abs=1e-4)
            if "responses" in mine:
                assert theirs["responses"] == mine["responses"]
        assert remote.metrics == pytest.approx(local[name].metrics, rel=1e-6)
