"""The studio's own state, beside the run registry: accounts, sessions, share links, login
throttling and the job queue, in `<workspace>/.llmlab/studio.sqlite` (WAL, like the registry).

Passwords are hashed with scrypt (memory-hard: 16 MiB and a random salt per hash); session and
share-link tokens are random 256-bit strings of which only the SHA-256 is stored, so a copied
database opens no session. After `FREE_FAILURES` wrong passwords in a row for one account name,
every further try waits out a delay that doubles with each failure (`retry_after`), right password
or not, until the account logs in.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import json
import re
import secrets
import sqlite3
import time
from pathlib import Path

from llmlab.common import LlmlabError
from llmlab.track.registry import Registry, RegistryError, Transaction, connect

DB = Path(".llmlab") / "studio.sqlite"
ROLES = ("viewer", "editor", "admin")  # each may do all that the ones before it may
SCRYPT = dict(n=2**14, r=8, p=1)  # 128 * r * n bytes = 16 MiB of memory per hash
MIN_PASSWORD = 8
SESSION_S = 12 * 3600
FREE_FAILURES = 10  # wrong passwords in a row before tries slow down
FIRST_DELAY_S, MAX_DELAY_S = 30.0, 900.0
FAILURES_KEPT_S = 24 * 3600  # a name's count of wrong passwords is forgotten a day after its last try
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
SCHEMA_VERSION = 1
SCHEMA = """
CREATE TABLE IF NOT EXISTS users (
    name TEXT PRIMARY KEY, role TEXT NOT NULL, password TEXT NOT NULL, created REAL
);
CREATE TABLE IF NOT EXISTS sessions (
    token TEXT PRIMARY KEY,     -- SHA-256 of the cookie's value
    user TEXT NOT NULL REFERENCES users(name) ON DELETE CASCADE,
    csrf TEXT NOT NULL, created REAL, expires REAL
);
CREATE TABLE IF NOT EXISTS failures (
    name TEXT PRIMARY KEY, count INTEGER NOT NULL, locked_until REAL, last REAL
);
CREATE TABLE IF NOT EXISTS shares (
    id INTEGER PRIMARY KEY,
    token TEXT NOT NULL UNIQUE, -- SHA-256 of the link's token
    run TEXT NOT NULL,          -- the run's key in the registry
    author TEXT, created REAL, revoked REAL
);
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY,
    kind TEXT NOT NULL,         -- pretrain, finetune, data prepare, eval, convert, serve, ...
    title TEXT NOT NULL,
    argv TEXT NOT NULL,         -- JSON: the llmlab command's arguments
    run TEXT,                   -- the run folder it writes, relative to the workspace
    owner TEXT, device TEXT,
    status TEXT NOT NULL,       -- queued, running, finished, failed, stopped
    pid INTEGER, exit_code INTEGER, stopping INTEGER DEFAULT 0,
    created REAL, started REAL, ended REAL
);
"""


class StudioError(LlmlabError):
    """A studio request or command that cannot be done; the message says why."""


def hash_password(password: str) -> str:
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, maxmem=64 * 2**20, dklen=32, **SCRYPT)
    n, r, p = SCRYPT["n"], SCRYPT["r"], SCRYPT["p"]
    return f"scrypt${n}${r}${p}${_b64(salt)}${_b64(digest)}"


def verify_password(password: str, stored: str) -> bool:
    try:
        scheme, n, r, p, salt, digest = stored.split("$")
        expected = base64.b64decode(digest)
        got = hashlib.scrypt(password.encode(), salt=base64.b64decode(salt), n=int(n), r=int(r), p=int(p),
                             maxmem=64 * 2**20, dklen=len(expected))
    except (ValueError, TypeError):
        return False
    return scheme == "scrypt" and hmac.compare_digest(got, expected)


@functools.cache
def _dummy() -> str:
    """A hash checked for unknown names, so that they take as long to refuse as known ones."""
    return hash_password(secrets.token_hex(8))


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def retry_after(failures: int) -> float:
    """Seconds a try must wait after `failures` wrong passwords in a row: none for the first
    `FREE_FAILURES`, then `FIRST_DELAY_S` doubling with each further failure, up to `MAX_DELAY_S`."""
    if failures < FREE_FAILURES:
        return 0.0
    return min(FIRST_DELAY_S * 2 ** min(failures - FREE_FAILURES, 32), MAX_DELAY_S)


class Throttled(StudioError):
    def __init__(self, seconds: float):
        super().__init__(f"too many wrong passwords: try again in {seconds:.0f} s")
        self.seconds = seconds


class Store:
    """The studio database of one workspace (made with the registry when missing)."""

    def __init__(self, workspace: str | Path):
        self.workspace = Path(workspace).resolve()
        self.file = self.workspace / DB
        self.db = connect(self.file, SCHEMA, SCHEMA_VERSION, StudioError, "studio database", threads=True)

    @classmethod
    def open(cls, workspace: str | Path, create: bool = False) -> Store:
        """The store of `workspace`; `create` makes the workspace (registry included) when missing."""
        if create:
            Registry.create(workspace).close()
        elif not (Path(workspace) / ".llmlab" / "registry.sqlite").is_file():
            raise RegistryError(f"{workspace}: not a workspace; `llmlab studio --workspace {workspace}` makes one")
        return cls(workspace)

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ accounts

    def add_user(self, name: str, password: str, role: str) -> None:
        if not NAME.fullmatch(name):
            raise StudioError(f"user name {name!r}: expected 1-64 letters, digits, '_', '.' or '-', starting with a "
                              "letter or digit")
        if role not in ROLES:
            raise StudioError(f"role {role!r}: expected one of {', '.join(ROLES)}")
        _check_password(password)
        try:
            self.db.execute("INSERT INTO users VALUES (?, ?, ?, ?)", (name, role, hash_password(password), time.time()))
        except sqlite3.IntegrityError:
            raise StudioError(f"user {name!r} exists already; `llmlab studio user passwd` changes a password, "
                              "`user role` a role") from None

    def set_password(self, name: str, password: str) -> None:
        _check_password(password)
        self._user_update(name, "UPDATE users SET password=? WHERE name=?", hash_password(password))
        self.db.execute("DELETE FROM sessions WHERE user=?", (name,))  # a new password logs every browser out

    def set_role(self, name: str, role: str) -> None:
        if role not in ROLES:
            raise StudioError(f"role {role!r}: expected one of {', '.join(ROLES)}")
        self._user_update(name, "UPDATE users SET role=? WHERE name=?", role)

    def remove_user(self, name: str) -> None:
        self._user_update(name, "DELETE FROM users WHERE name=?")

    def _user_update(self, name: str, sql: str, *values) -> None:
        if self.db.execute(sql, (*values, name)).rowcount == 0:
            raise StudioError(f"no user {name!r}")

    def users(self) -> list[dict]:
        return [dict(r) for r in self.db.execute("SELECT name, role, created FROM users ORDER BY name")]

    def authenticate(self, name: str, password: str) -> dict | None:
        """The user whose password this is, or None; raises `Throttled` while the name's tries are slowed.

        A try is counted before the password is checked, in one transaction with the check of the
        lock, so that tries sent at once cannot slip past it; a right password clears the count."""
        now = time.time()
        with Transaction(self.db):
            self.db.execute("DELETE FROM failures WHERE last < ? AND (locked_until IS NULL OR locked_until < ?)",
                            (now - FAILURES_KEPT_S, now))
            row = self.db.execute("SELECT count, locked_until FROM failures WHERE name=?", (name,)).fetchone()
            if row and row["locked_until"] and row["locked_until"] > now:
                raise Throttled(row["locked_until"] - now)
            tries = (row["count"] if row else 0) + 1
            delay = retry_after(tries)
            self.db.execute("INSERT OR REPLACE INTO failures VALUES (?, ?, ?, ?)",
                            (name, tries, now + delay if delay else None, now))
        user = self.db.execute("SELECT * FROM users WHERE name=?", (name,)).fetchone()
        if verify_password(password, user["password"] if user else _dummy()) and user is not None:
            self.db.execute("DELETE FROM failures WHERE name=?", (name,))
            return {"name": user["name"], "role": user["role"]}
        return None

    # ------------------------------------------------------------------ sessions

    def start_session(self, user: str) -> tuple[str, str]:
        """A new session's cookie token and CSRF token."""
        token, csrf, now = secrets.token_urlsafe(32), secrets.token_urlsafe(32), time.time()
        self.db.execute("DELETE FROM sessions WHERE expires < ?", (now,))
        self.db.execute("INSERT INTO sessions VALUES (?, ?, ?, ?, ?)", (_digest(token), user, csrf, now,
                                                                        now + SESSION_S))
        return token, csrf

    def session(self, token: str | None) -> dict | None:
        """{user, role, csrf} of a live session, or None."""
        if not token:
            return None
        row = self.db.execute("SELECT s.user, s.csrf, s.expires, u.role FROM sessions s JOIN users u ON u.name=s.user "
                              "WHERE s.token=?", (_digest(token),)).fetchone()
        if row is None or row["expires"] < time.time():
            return None
        return {"user": row["user"], "role": row["role"], "csrf": row["csrf"]}

    def end_session(self, token: str) -> None:
        self.db.execute("DELETE FROM sessions WHERE token=?", (_digest(token),))

    # ------------------------------------------------------------------ share links

    def share(self, run: str, author: str) -> str:
        """A new read-only link token for the run `run` (its registry key)."""
        token = secrets.token_urlsafe(32)
        self.db.execute("INSERT INTO shares (token, run, author, created) VALUES (?, ?, ?, ?)",
                        (_digest(token), run, author, time.time()))
        return token

    def shared_run(self, token: str) -> str | None:
        row = self.db.execute("SELECT run FROM shares WHERE token=? AND revoked IS NULL", (_digest(token),)).fetchone()
        return row["run"] if row else None

    def shares(self, run: str) -> list[dict]:
        return [dict(r) for r in self.db.execute("SELECT id, author, created, revoked FROM shares WHERE run=? "
                                                 "ORDER BY id", (run,))]

    def revoke(self, share_id: int, run: str) -> None:
        if self.db.execute("UPDATE shares SET revoked=? WHERE id=? AND run=? AND revoked IS NULL",
                           (time.time(), share_id, run)).rowcount == 0:
            raise StudioError(f"no live share link {share_id} for this run")

    def revoke_all(self, run: str) -> None:
        """Revoke every link of the run `run` (deleted: a new run of that folder is not the one shared)."""
        self.db.execute("UPDATE shares SET revoked=? WHERE run=? AND revoked IS NULL", (time.time(), run))

    # ------------------------------------------------------------------ jobs

    def add_job(self, kind: str, title: str, argv: list[str], run: str | None, owner: str, device: str | None,
                status: str = "queued") -> int:
        return self.db.execute("INSERT INTO jobs (kind, title, argv, run, owner, device, status, created) VALUES "
                               "(?, ?, ?, ?, ?, ?, ?, ?)", (kind, title, json.dumps(argv), run, owner, device, status,
                                                            time.time())).lastrowid

    def job(self, job_id: int) -> dict | None:
        row = self.db.execute("SELECT * FROM jobs WHERE id=?", (job_id,)).fetchone()
        return _job(row) if row else None

    def jobs(self, *statuses: str, kind: str | None = None, run: str | None = None, limit: int = 200) -> list[dict]:
        """The newest jobs first, of the given statuses, kind and run folder when given."""
        where, args = [], []
        if statuses:
            where.append(f"status IN ({', '.join('?' * len(statuses))})")
            args += statuses
        for column, value in (("kind", kind), ("run", run)):
            if value:
                where.append(f"{column}=?")
                args.append(value)
        sql = f"SELECT * FROM jobs {'WHERE ' + ' AND '.join(where) if where else ''} ORDER BY id DESC LIMIT ?"
        return [_job(r) for r in self.db.execute(sql, (*args, limit))]

    def update_job(self, job_id: int, **fields) -> None:
        sets = ", ".join(f"{k}=?" for k in fields)
        self.db.execute(f"UPDATE jobs SET {sets} WHERE id=?", (*fields.values(), job_id))


def _job(row: sqlite3.Row) -> dict:
    job = dict(row)
    job["argv"] = json.loads(job["argv"])
    return job


def _check_password(password: str) -> None:
    if len(password) < MIN_PASSWORD:
        raise StudioError(f"a password needs at least {MIN_PASSWORD} characters")
    if len(password) > 1024:
        raise StudioError("a password of more than 1024 characters")
