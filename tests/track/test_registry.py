"""The run registry: a workspace's SQLite file, what hangs off a run, scanning folders, concurrent and
killed writers."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import threading

import pytest

from llmlab.track import Registry, RegistryError, find_workspace
from llmlab.track.registry import DB


def test_a_workspace_is_made_once_and_found_from_inside(tmp_path):
    with pytest.raises(RegistryError, match="not a workspace"):
        Registry(tmp_path / "ws")
    Registry.create(tmp_path / "ws").close()
    with Registry.create(tmp_path / "ws") as registry:  # again: the same registry
        assert registry.runs() == []
        mode = registry.db.execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"
    (tmp_path / "ws" / "runs" / "a").mkdir(parents=True)
    assert find_workspace(tmp_path / "ws" / "runs" / "a") == (tmp_path / "ws").resolve()
    assert find_workspace(tmp_path) is None


def test_a_run_records_its_life_and_what_hangs_off_it(tmp_path):
    with Registry.create(tmp_path) as registry:
        run = tmp_path / "runs" / "pt"
        registry.start_run(run, kind="pretrain", config={"max_steps": 10}, max_steps=10, owner="ada")
        registry.update_run(run, step=4, tokens=512, loss=3.5, val_loss=3.9)
        registry.update_run(run, step=8, loss=3.1, val_loss=4.1, lr=1e-3)  # lr is no summary field
        row = registry.run(run)
        assert (row["status"], row["step"], row["tokens"], row["loss"]) == ("running", 8, 512, 3.1)
        assert (row["val_loss"], row["best_val_loss"], row["owner"], row["name"]) == (4.1, 3.9, "ada", "pt")
        registry.end_run(run, "finished")
        assert registry.run(run)["status"] == "finished" and registry.run(run)["ended"] is not None
        registry.record_evaluation(run, "pydoc-cloze", {"acc": 0.5, "acc_stderr": 0.03})
        registry.add_artefact(run, "checkpoint", run / "final")
        registry.tag(run, "baseline", "cpu", "baseline")
        registry.comment(run, "bob", "<script>alert(1)</script> looks good")  # kept as written
        assert [e["metric"] for e in registry.evaluations(run)] == ["acc", "acc_stderr"]
        assert registry.tags(run) == ["baseline", "cpu"] and registry.artefacts(run)[0]["kind"] == "checkpoint"
        assert registry.comments(run)[0]["text"].startswith("<script>")
        registry.start_run(run, kind="pretrain", config={}, max_steps=20)  # resumed: start and summary stay
        again = registry.run(run)
        assert again["status"] == "running" and again["started"] == row["started"] and again["step"] == 8
        with pytest.raises(RegistryError, match="not inside the workspace"):
            registry.start_run(tmp_path.parent, kind=None, config={}, max_steps=None)
        with pytest.raises(RegistryError, match="not a run of the workspace"):
            registry.comment(tmp_path / "runs" / "nope", "bob", "hi")
        with pytest.raises(RegistryError, match="empty comment"):
            registry.comment(run, "bob", "  ")


def test_scan_indexes_copied_folders_and_stops_the_runs_whose_process_is_gone(tmp_path):
    copied = tmp_path / "runs" / "copied"
    copied.mkdir(parents=True)
    (copied / "config.yaml").write_text("max_steps: 6\nmodel: {dim: 32}\n")
    lines = [{"step": 3, "loss": 4.0, "tokens": 96}, {"step": 3, "val_loss": 4.5}, {"step": 6, "loss": 3.0,
                                                                                     "tokens": 192},
             {"step": 6, "val_loss": 4.2}]
    (copied / "metrics.jsonl").write_text("\n".join(map(json.dumps, lines)) + '\n{"step": 7, "lo')  # cut short
    with Registry.create(tmp_path) as registry:
        dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True).stdout.strip()
        registry.start_run(tmp_path / "runs" / "killed", kind="pretrain", config={}, max_steps=9)
        registry.db.execute("UPDATE runs SET pid=? WHERE path='runs/killed'", (int(dead),))
        assert registry.scan() == ["runs/copied"]
        row = registry.run(copied)
        assert (row["status"], row["kind"], row["step"], row["tokens"]) == ("finished", "pretrain", 6, 192)
        assert (row["val_loss"], row["best_val_loss"]) == (4.2, 4.2)
        assert registry.run(tmp_path / "runs" / "killed")["status"] == "stopped"
        assert registry.scan() == []  # known now


def test_concurrent_writers_wait_for_each_other(tmp_path):
    Registry.create(tmp_path).close()
    errors = []

    def write(name):
        try:
            with Registry(tmp_path) as registry:
                run = tmp_path / name
                registry.start_run(run, kind="pretrain", config={}, max_steps=200)
                for step in range(200):
                    registry.update_run(run, step=step, loss=1.0)
                    registry.comment(run, name, f"step {step}")
                registry.end_run(run, "finished")
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=write, args=(f"r{i}",)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    with Registry(tmp_path) as registry:
        assert sorted((r["name"], r["step"], r["status"]) for r in registry.runs()) == [
            (f"r{i}", 199, "finished") for i in range(3)]
        assert len(registry.comments(tmp_path / "r0")) == 200


def test_a_writer_killed_mid_transaction_leaves_the_last_committed_state(tmp_path):
    with Registry.create(tmp_path) as registry:
        registry.start_run(tmp_path / "kept", kind="pretrain", config={}, max_steps=1)
    code = (f"import os, signal, sqlite3; db = sqlite3.connect({str(tmp_path / DB)!r}, isolation_level=None); "
            "db.execute('BEGIN IMMEDIATE'); db.execute(\"UPDATE runs SET name='lost'\"); "
            "db.execute(\"INSERT INTO runs (path, name, status) VALUES ('x', 'x', 'running')\"); "
            "os.kill(os.getpid(), signal.SIGKILL)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == -9
    with Registry(tmp_path) as registry:
        assert [(r["path"], r["name"]) for r in registry.runs()] == [("kept", "kept")]
        registry.update_run(tmp_path / "kept", step=1)  # and it takes writes again


def test_a_foreign_or_newer_file_is_refused_by_name(tmp_path):
    (tmp_path / DB).parent.mkdir()
    (tmp_path / DB).write_bytes(b"this is not a database" * 100)
    with pytest.raises(RegistryError, match="not a readable registry"):
        Registry(tmp_path)
    (tmp_path / DB).unlink()
    db = sqlite3.connect(tmp_path / DB)
    db.execute("PRAGMA user_version=99")
    db.close()
    with pytest.raises(RegistryError, match="newer llmlab"):
        Registry(tmp_path)
