"""Training runs inside a workspace record themselves in its registry: running, then finished,
stopped or failed, with their metrics summary; a registry that fails never stops a run."""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
import time

import pytest

from llmlab.common import LlmlabError
from llmlab.config import save_config
from llmlab.track import Registry
from llmlab.track.registry import DB
from llmlab.train import core
from llmlab.train.pretrain import run
from tests.train.test_pretrain import _cfg, _metrics


def test_a_run_inside_a_workspace_records_itself(corpus_dir, tmp_path):
    Registry.create(tmp_path / "ws").close()
    result = run(_cfg(corpus_dir, tmp_path / "ws" / "runs" / "pt", max_steps=8))
    with Registry(tmp_path / "ws") as registry:
        (row,) = registry.runs()
    metrics = _metrics(tmp_path / "ws" / "runs" / "pt")
    last_val = [m["val_loss"] for m in metrics if "val_loss" in m]
    assert (row["path"], row["kind"], row["status"], row["step"], row["max_steps"]) == ("runs/pt", "pretrain",
                                                                                     "finished", 8, 8)
    assert row["tokens"] == result["tokens"] and row["val_loss"] == last_val[-1] == result["val_loss"]
    assert row["best_val_loss"] == min(last_val) and row["loss"] == [m for m in metrics if "loss" in m][-1]["loss"]
    assert row["started"] < row["ended"] and row["pid"] is None and '"max_steps": 8' in row["config"]


def test_a_run_outside_any_workspace_writes_no_registry(corpus_dir, tmp_path):
    run(_cfg(corpus_dir, tmp_path / "pt", max_steps=2))
    assert not list(tmp_path.rglob(DB.name))


def test_a_failing_run_is_recorded_as_failed(corpus_dir, tmp_path, monkeypatch):
    Registry.create(tmp_path).close()

    def fail(self, done, record, **kwargs):
        raise LlmlabError("a step that fails")

    monkeypatch.setattr(core.Run, "after_step", fail)
    with pytest.raises(LlmlabError, match="a step that fails"):
        run(_cfg(corpus_dir, tmp_path / "pt", max_steps=4))
    with Registry(tmp_path) as registry:
        assert registry.runs()[0]["status"] == "failed"


def test_a_registry_that_fails_warns_once_and_the_run_goes_on(corpus_dir, tmp_path, monkeypatch, capsys):
    Registry.create(tmp_path).close()

    def locked(self, run_dir, **summary):
        raise sqlite3.OperationalError("database is locked")

    monkeypatch.setattr(Registry, "update_run", locked)
    assert run(_cfg(corpus_dir, tmp_path / "pt", max_steps=4))["step"] == 4
    assert capsys.readouterr().err.count("is not recorded in the workspace") == 1


@pytest.mark.slow
def test_a_signal_records_the_run_as_stopped(corpus_dir, tmp_path):
    Registry.create(tmp_path).close()
    cfg = _cfg(corpus_dir, tmp_path / "pt", max_steps=100000, **{"ckpt.every": 100000})
    save_config(cfg, tmp_path / "pt.yaml")
    proc = subprocess.Popen([sys.executable, "-m", "llmlab", "pretrain", str(tmp_path / "pt.yaml")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    with Registry(tmp_path) as registry:
        while time.time() < deadline and not (registry.runs() and registry.runs()[0]["step"]):
            time.sleep(0.05)
        assert registry.runs()[0]["status"] == "running" and registry.runs()[0]["pid"] == proc.pid
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=120)
        assert proc.returncode == 128 + signal.SIGTERM
        assert registry.runs()[0]["status"] == "stopped"
