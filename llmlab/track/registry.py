"""The run registry: every run of a workspace in one SQLite database.

A workspace is a folder holding `.llmlab/registry.sqlite` (made by `Registry.create`). A training run
whose output folder lies inside a workspace records itself there while it trains (`RunRecorder`,
which the training loop holds): its kind, config, owner, status, start and end, and a summary of its
metrics (step, tokens, loss, validation loss, the best one). Evaluations, artefacts, tags and
comments hang off a run. A run folder that arrives another way (copied in, or trained before the
workspace existed) is indexed from its `config.yaml` and `metrics.jsonl` by `Registry.scan`, which
also marks as stopped a run recorded as running whose process is gone (killed).

The database is in WAL mode: readers never block the one writer, and a process killed mid-write
leaves the last committed state. Every write is one short transaction; a writer waits up to
`BUSY_TIMEOUT_S` for another to finish.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import socket
import sqlite3
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import yaml

from llmlab.common import LlmlabError, pid_alive

DB = Path(".llmlab") / "registry.sqlite"
BUSY_TIMEOUT_S = 10.0
STATUSES = ("running", "finished", "stopped", "failed")
SCHEMA_VERSION = 1
SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    id INTEGER PRIMARY KEY,
    path TEXT NOT NULL UNIQUE,  -- the run folder, relative to the workspace
    name TEXT NOT NULL,
    kind TEXT,                  -- pretrain, finetune, align, ... (null: unknown)
    status TEXT NOT NULL,       -- running, finished, stopped, failed
    owner TEXT,
    config TEXT,                -- the run's config as JSON
    started REAL, ended REAL, updated REAL,  -- Unix times
    step INTEGER, max_steps INTEGER, tokens INTEGER,
    loss REAL, val_loss REAL, best_val_loss REAL,
    host TEXT, pid INTEGER      -- where a running run runs
);
CREATE TABLE IF NOT EXISTS evaluations (
    run INTEGER NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
    task TEXT NOT NULL, metric TEXT NOT NULL, value REAL, created REAL,
    PRIMARY KEY (run, task, metric)
);
CREATE TABLE IF NOT EXISTS artefacts (
    run INTEGER NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
    kind TEXT NOT NULL, path TEXT NOT NULL, created REAL,
    PRIMARY KEY (run, path)
);
CREATE TABLE IF NOT EXISTS tags (
    run INTEGER NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
    tag TEXT NOT NULL,
    PRIMARY KEY (run, tag)
);
CREATE TABLE IF NOT EXISTS comments (
    id INTEGER PRIMARY KEY,
    run INTEGER NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
    author TEXT, text TEXT NOT NULL, created REAL
);
"""
SUMMARY = ("step", "tokens", "loss", "val_loss")  # what a metrics line updates


class RegistryError(LlmlabError):
    """A workspace or registry that cannot be opened or written; the message says which and why."""


def find_workspace(path: str | os.PathLike) -> Path | None:
    """The workspace holding `path` (the nearest folder above it with a registry), or None."""
    here = Path(path).resolve()
    for folder in (here, *here.parents):
        if (folder / DB).is_file():
            return folder
    return None


class Registry:
    """One workspace's registry. Open with `Registry.create(workspace)` (making it when missing) or
    `Registry(workspace)` (an existing one); close with `close()` or a `with` block."""

    def __init__(self, workspace: str | os.PathLike):
        self.workspace = Path(workspace).resolve()
        self.file = self.workspace / DB
        if not self.file.is_file():
            raise RegistryError(f"{self.workspace}: not a workspace (no {DB}); create one with Registry.create")
        self.db = self._connect()

    @classmethod
    def create(cls, workspace: str | os.PathLike) -> Registry:
        """The registry of `workspace`, made (with the folder) when it does not exist yet."""
        folder = Path(workspace) / DB.parent
        try:
            folder.mkdir(parents=True, exist_ok=True)
            (Path(workspace) / DB).touch(exist_ok=True)
        except OSError as e:
            raise RegistryError(f"{workspace}: cannot make a workspace there ({e.strerror or e})") from None
        return cls(workspace)

    def _connect(self) -> sqlite3.Connection:
        return connect(self.file, SCHEMA, SCHEMA_VERSION, RegistryError, "registry")

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> Registry:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ runs

    def key(self, run_dir: str | os.PathLike) -> str:
        """A run folder's key: its path relative to the workspace (an error for one outside it)."""
        path = Path(run_dir).resolve()
        if not path.is_relative_to(self.workspace):
            raise RegistryError(f"{run_dir}: not inside the workspace {self.workspace}")
        return path.relative_to(self.workspace).as_posix()

    def start_run(self, run_dir: str | os.PathLike, *, kind: str | None, config: dict, max_steps: int | None,
                  owner: str | None = None) -> int:
        """Record that the run in `run_dir` trains now (a new run, or a recorded one resuming: its start
        and summary stay); returns its id."""
        key, now = self.key(run_dir), time.time()
        self.db.execute(
            "INSERT INTO runs (path, name, kind, status, owner, config, started, updated, max_steps, host, pid) "
            "VALUES (?, ?, ?, 'running', ?, ?, ?, ?, ?, ?, ?) "
            "ON CONFLICT (path) DO UPDATE SET kind=excluded.kind, status='running', config=excluded.config, "
            "updated=excluded.updated, ended=NULL, max_steps=excluded.max_steps, host=excluded.host, pid=excluded.pid",
            (key, Path(key).name or self.workspace.name, kind, owner, json.dumps(config, default=str), now, now,
             max_steps, socket.gethostname(), os.getpid()))
        return self.db.execute("SELECT id FROM runs WHERE path=?", (key,)).fetchone()[0]

    def update_run(self, run_dir: str | os.PathLike, **summary) -> None:
        """Update a run's metrics summary (step, tokens, loss, val_loss; best_val_loss follows val_loss)."""
        fields = {k: v for k, v in summary.items() if k in SUMMARY and v is not None and _finite(v)}
        if not fields:
            return
        sets = ", ".join(f"{k}=?" for k in fields)
        best = ", best_val_loss=min(coalesce(best_val_loss, ?), ?)" if "val_loss" in fields else ""
        args = [*fields.values(), time.time()] + ([fields["val_loss"]] * 2 if best else [])
        self.db.execute(f"UPDATE runs SET {sets}, updated=?{best} WHERE path=?", (*args, self.key(run_dir)))

    def end_run(self, run_dir: str | os.PathLike, status: str) -> None:
        if status not in STATUSES[1:]:
            raise ValueError(f"a run ends finished, stopped or failed, not {status!r}")
        now = time.time()
        self.db.execute("UPDATE runs SET status=?, ended=?, updated=?, pid=NULL WHERE path=?",
                        (status, now, now, self.key(run_dir)))

    def runs(self, status: str | None = None) -> list[dict]:
        """Every run, the newest first (optionally only those of one status)."""
        where, args = ("WHERE status=?", (status,)) if status else ("", ())
        return [dict(r) for r in self.db.execute(f"SELECT * FROM runs {where} ORDER BY started DESC, id DESC", args)]

    def run(self, run_dir: str | os.PathLike) -> dict | None:
        row = self.db.execute("SELECT * FROM runs WHERE path=?", (self.key(run_dir),)).fetchone()
        return dict(row) if row else None

    def by_id(self, run_id: int) -> dict | None:
        row = self.db.execute("SELECT * FROM runs WHERE id=?", (run_id,)).fetchone()
        return dict(row) if row else None

    def forget(self, run_dir: str | os.PathLike) -> None:
        """Drop a run (and what hangs off it) from the registry; its folder is left alone."""
        self.db.execute("DELETE FROM runs WHERE path=?", (self.key(run_dir),))

    # ------------------------------------------------------------------ what hangs off a run

    def _id(self, run_dir: str | os.PathLike) -> int:
        row = self.db.execute("SELECT id FROM runs WHERE path=?", (self.key(run_dir),)).fetchone()
        if row is None:
            raise RegistryError(f"{run_dir}: not a run of the workspace {self.workspace}")
        return row[0]

    def record_evaluation(self, run_dir: str | os.PathLike, task: str, metrics: dict[str, float]) -> None:
        run, now = self._id(run_dir), time.time()
        with self._transaction():
            for metric, value in metrics.items():
                self.db.execute("INSERT OR REPLACE INTO evaluations VALUES (?, ?, ?, ?, ?)",
                                (run, task, metric, float(value), now))

    def evaluations(self, run_dir: str | os.PathLike) -> list[dict]:
        return [dict(r) for r in self.db.execute("SELECT task, metric, value, created FROM evaluations WHERE run=? "
                                                 "ORDER BY task, metric", (self._id(run_dir),))]

    def add_artefact(self, run_dir: str | os.PathLike, kind: str, path: str | os.PathLike) -> None:
        self.db.execute("INSERT OR REPLACE INTO artefacts VALUES (?, ?, ?, ?)",
                        (self._id(run_dir), kind, str(path), time.time()))

    def artefacts(self, run_dir: str | os.PathLike) -> list[dict]:
        return [dict(r) for r in self.db.execute("SELECT kind, path, created FROM artefacts WHERE run=? "
                                                 "ORDER BY created", (self._id(run_dir),))]

    def tag(self, run_dir: str | os.PathLike, *tags: str) -> None:
        run = self._id(run_dir)
        with self._transaction():
            for tag in tags:
                self.db.execute("INSERT OR IGNORE INTO tags VALUES (?, ?)", (run, tag))

    def tags(self, run_dir: str | os.PathLike) -> list[str]:
        return [r[0] for r in self.db.execute("SELECT tag FROM tags WHERE run=? ORDER BY tag", (self._id(run_dir),))]

    def comment(self, run_dir: str | os.PathLike, author: str | None, text: str) -> int:
        if not text.strip():
            raise RegistryError("an empty comment")
        cursor = self.db.execute("INSERT INTO comments (run, author, text, created) VALUES (?, ?, ?, ?)",
                                 (self._id(run_dir), author, text, time.time()))
        return cursor.lastrowid

    def comments(self, run_dir: str | os.PathLike) -> list[dict]:
        return [dict(r) for r in self.db.execute("SELECT id, author, text, created FROM comments WHERE run=? "
                                                 "ORDER BY created, id", (self._id(run_dir),))]

    def _transaction(self):
        return Transaction(self.db)

    # ------------------------------------------------------------------ indexing folders

    def scan(self) -> list[str]:
        """Index the run folders (a `config.yaml` beside a `metrics.jsonl`) under the workspace that the
        registry does not know, and mark as stopped the runs recorded as running on this host whose
        process is gone; returns the keys of the runs it added."""
        added = []
        for metrics in sorted(_metrics_files(self.workspace)):
            folder = metrics.parent
            if not (folder / "config.yaml").is_file() or self.run(folder) is not None:
                continue
            config = _read_config(folder / "config.yaml")
            summary = _summary(metrics)
            max_steps = config.get("max_steps") if isinstance(config.get("max_steps"), int) else None
            done = max_steps is not None and summary.get("step") == max_steps
            started, ended = (folder / "config.yaml").stat().st_mtime, metrics.stat().st_mtime
            best = summary.pop("best_val_loss", None)
            key = self.key(folder)
            self.db.execute(
                "INSERT INTO runs (path, name, kind, status, config, started, ended, updated, max_steps, step, "
                "tokens, loss, val_loss, best_val_loss) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (key, folder.name, _kind(config), "finished" if done else "stopped", json.dumps(config, default=str),
                 started, ended, ended, max_steps, *(summary.get(k) for k in SUMMARY), best))
            added.append(key)
        host = socket.gethostname()
        for run in self.runs("running"):
            if run["host"] == host and run["pid"] and not pid_alive(run["pid"]):
                self.db.execute("UPDATE runs SET status='stopped', pid=NULL, ended=updated WHERE id=?", (run["id"],))
        return added


def connect(file: Path, schema: str, version: int, error: type[LlmlabError], what: str,
            threads: bool = False) -> sqlite3.Connection:
    """A connection to the SQLite database `file` in WAL mode, its tables made by `schema` when its
    user_version is below `version`; one written by a newer llmlab, or not a database, is an `error`
    naming the file. `threads`: the connection may be used from another thread than its maker's."""
    try:
        db = sqlite3.connect(file, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=not threads)
        db.row_factory = sqlite3.Row
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA foreign_keys=ON")
        found = db.execute("PRAGMA user_version").fetchone()[0]
        if found > version:
            raise error(f"{file}: written by a newer llmlab (schema {found}, this one reads {version})")
        if found < version:
            db.executescript(f"BEGIN; {schema} PRAGMA user_version={version}; COMMIT;")
    except sqlite3.DatabaseError as e:
        raise error(f"{file}: not a readable {what} ({e})") from None
    except OSError as e:
        raise error(f"{file}: cannot open it ({e.strerror or e})") from None
    return db


class Transaction:
    """A write transaction taken at once (BEGIN IMMEDIATE): what it reads, no other writer changes."""

    def __init__(self, db: sqlite3.Connection):
        self.db = db

    def __enter__(self):
        self.db.execute("BEGIN IMMEDIATE")

    def __exit__(self, kind, *rest):
        self.db.execute("ROLLBACK" if kind else "COMMIT")


def _finite(value) -> bool:
    return not isinstance(value, float) or math.isfinite(value)


def _metrics_files(workspace: Path) -> Iterator[Path]:
    for root, dirs, files in os.walk(workspace):
        dirs[:] = [d for d in dirs if not d.startswith(".") and d != "checkpoints"]
        if "metrics.jsonl" in files:
            yield Path(root) / "metrics.jsonl"


def _read_config(file: Path) -> dict:
    try:
        config = yaml.safe_load(file.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError, yaml.YAMLError):
        return {}
    return config if isinstance(config, dict) else {}


def _summary(metrics: Path) -> dict:
    """The last step, tokens, loss and validation loss of a metrics file, and the best validation loss."""
    out: dict = {}
    try:
        lines = metrics.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return out
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a line cut short by a kill
        if not isinstance(record, dict):
            continue
        for key in SUMMARY:
            value = record.get(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and _finite(value):
                out[key] = value
        val = record.get("val_loss")
        if isinstance(val, (int, float)) and _finite(val):
            out["best_val_loss"] = min(out.get("best_val_loss", math.inf), val)
    return out


def _kind(config: dict) -> str | None:
    """A run's verb, from the keys its config has (folders indexed by `scan` say no more)."""
    if "method" in config:
        return "align"
    if "base" in config:
        return "finetune"
    return "pretrain" if "model" in config else None


class RunRecorder:
    """What a training run writes to its workspace's registry: its start, a metrics summary at most
    every `every_s` seconds (and at every evaluation), its end. Never stops the run: a registry that
    cannot be written is reported once on stderr and left alone."""

    def __init__(self, registry: Registry, run_dir: Path, every_s: float = 2.0):
        self.registry, self.run_dir, self.every_s = registry, run_dir, every_s
        self.pending: dict = {}
        self.last = 0.0

    @classmethod
    def for_run(cls, run_dir: str | os.PathLike, *, kind: str | None, config: object,
                max_steps: int | None) -> RunRecorder | None:
        """A recorder for a run in `run_dir` when that lies inside a workspace; else None. `config` is
        the run's config dataclass (or a dict)."""
        workspace = find_workspace(run_dir)
        if workspace is None:
            return None
        config = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else dict(config)
        try:
            recorder = cls(Registry(workspace), Path(run_dir))
            recorder.registry.start_run(run_dir, kind=kind, config=config, max_steps=max_steps, owner=_user())
        except (RegistryError, sqlite3.Error) as e:
            _warn(workspace, e)
            return None
        return recorder

    def log(self, record: dict) -> None:
        self.pending.update((k, record[k]) for k in SUMMARY if k in record)
        if "val_loss" in record or time.time() - self.last >= self.every_s:
            self._flush()

    def end(self, status: str) -> None:
        self._flush()
        if self.registry is not None:
            self._write(self.registry.end_run, self.run_dir, status)
        if self.registry is not None:
            self.registry.close()

    def _flush(self) -> None:
        if self.pending and self.registry is not None:
            self._write(self.registry.update_run, self.run_dir, **self.pending)
            self.pending, self.last = {}, time.time()

    def _write(self, method, *args, **kwargs) -> None:
        try:
            method(*args, **kwargs)
        except sqlite3.Error as e:
            _warn(self.registry.workspace, e)
            self.registry = None  # one warning; the run goes on


def _user() -> str | None:
    """Who runs this: LLMLAB_USER (the studio sets it to the account that launched a job), else the
    login name."""
    if os.environ.get("LLMLAB_USER"):
        return os.environ["LLMLAB_USER"]
    try:
        import getpass

        return getpass.getuser()
    except (OSError, KeyError):
        return None


def _warn(workspace: Path, error: Exception) -> None:
    print(f"warning: the run is not recorded in the workspace {workspace}: {error}", file=sys.stderr)
