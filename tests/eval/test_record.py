"""`llmlab eval` of a run in a workspace records its results in the workspace's registry: each task's
metrics, equal to results.json, and the results files as artefacts; a registry that fails only warns."""

from __future__ import annotations

import json
import shutil
import sqlite3

import pytest

from llmlab.eval.run import EvalConfig
from llmlab.eval.run import run as evaluate
from llmlab.track import Registry
from llmlab.train.pretrain import run as pretrain
from tests.train.test_pretrain import _cfg


@pytest.fixture(scope="module")
def workspace(corpus_dir, tmp_path_factory):
    """A workspace holding one tiny pretraining run, with checkpoints at steps 4 and 8."""
    ws = tmp_path_factory.mktemp("ws")
    Registry.create(ws).close()
    pretrain(_cfg(corpus_dir, ws / "runs" / "pt", max_steps=8))
    return ws


def _eval(models, out):
    cfg = EvalConfig(tasks=["pydoc-ppl"], limit=2, bootstrap_iters=0, out_dir=str(out))
    evaluate(cfg, [str(m) for m in models], quiet=True)
    return json.loads((out / "results.json").read_text())


def _recorded(results: dict, model) -> dict[str, float]:
    (entry,) = [e for e in results["results"] if e["model"] == str(model)]
    return {m: v["value"] for m, v in entry["metrics"].items()}


def test_the_evaluation_of_a_run_and_of_one_of_its_checkpoints_is_recorded(workspace, tmp_path):
    run_dir = workspace / "runs" / "pt"
    older = run_dir / "checkpoints" / "step-00000004"
    results = _eval([run_dir, older], tmp_path / "ev")
    with Registry(workspace) as registry:
        rows = registry.evaluations(run_dir)
        artefacts = registry.artefacts(run_dir)
    by_task: dict[str, dict[str, float]] = {}
    for row in rows:
        by_task.setdefault(row["task"], {})[row["metric"]] = row["value"]
    assert by_task.keys() == {"pydoc-ppl", "pydoc-ppl@checkpoints/step-00000004"}
    assert by_task["pydoc-ppl"] == _recorded(results, run_dir)  # the newest checkpoint: the run's own model
    assert by_task["pydoc-ppl@checkpoints/step-00000004"] == _recorded(results, older)
    assert {"word_perplexity", "bits_per_byte"} <= by_task["pydoc-ppl"].keys()
    assert by_task["pydoc-ppl"] != by_task["pydoc-ppl@checkpoints/step-00000004"]
    assert sorted((a["kind"], a["path"]) for a in artefacts) == [
        ("evaluation", str((tmp_path / "ev" / name).resolve())) for name in ("results.json", "samples.jsonl")]


def test_a_run_folder_copied_into_a_workspace_is_indexed_and_recorded(workspace, tmp_path):
    other = tmp_path / "other"
    Registry.create(other).close()
    shutil.copytree(workspace / "runs" / "pt", other / "pt")
    results = _eval([other / "pt" / "checkpoints" / "step-00000008"], tmp_path / "ev")
    with Registry(other) as registry:
        assert [r["path"] for r in registry.runs()] == ["pt"]
        values = {r["metric"]: r["value"] for r in registry.evaluations(other / "pt") if r["task"] == "pydoc-ppl"}
    assert values == _recorded(results, other / "pt" / "checkpoints" / "step-00000008")


def test_a_registry_that_fails_warns_and_the_evaluation_stands(workspace, tmp_path, monkeypatch, capsys):
    def locked(self, run_dir, task, metrics):
        raise sqlite3.OperationalError("database is locked")

    monkeypatch.setattr(Registry, "record_evaluation", locked)
    evaluate(EvalConfig(tasks=["pydoc-ppl"], limit=1, bootstrap_iters=0, out_dir=str(tmp_path / "ev")),
             [str(workspace / "runs" / "pt")], quiet=True)
    assert (tmp_path / "ev" / "results.json").is_file()
    assert "is not recorded in the workspace" in capsys.readouterr().err
