"""The studio's accounts, sessions, login throttling and share links (store.py), and `llmlab studio
user ...`."""

from __future__ import annotations

import hashlib
import io
import time

import pytest

from llmlab.cli import main
from llmlab.studio import store as store_module
from llmlab.studio.store import (FREE_FAILURES, Store, StudioError, Throttled, hash_password, retry_after,
                                 verify_password)

from .conftest import free_port


@pytest.fixture
def store(tmp_path):
    s = Store.open(tmp_path / "ws", create=True)
    yield s
    s.close()


def test_passwords_are_salted_scrypt_hashes_that_verify():
    a, b = hash_password("correct horse"), hash_password("correct horse")
    assert a != b  # a salt each
    scheme, n, r, p = a.split("$")[:4]
    assert (scheme, int(n), int(r), int(p)) == ("scrypt", 2**14, 8, 1)  # 16 MiB per hash: memory-hard
    assert verify_password("correct horse", a) and verify_password("correct horse", b)
    assert not verify_password("correct horsE", a)
    assert not verify_password("correct horse", "md5$abc") and not verify_password("x", "")


def test_accounts_are_checked(store):
    store.add_user("ann", "a-long-password", "admin")
    for name, password, role, expected in [("ann", "another-password", "viewer", "exists already"),
                                           ("../ann", "a-long-password", "viewer", "user name"),
                                           ("bob\n", "a-long-password", "viewer", "user name"),
                                           ("bob", "short", "viewer", "at least 8"),
                                           ("bob", "a-long-password", "root", "role 'root'")]:
        with pytest.raises(StudioError, match=expected):
            store.add_user(name, password, role)
    assert [u["name"] for u in store.users()] == ["ann"]
    stored = store.db.execute("SELECT password FROM users").fetchone()[0]
    assert "a-long-password" not in stored
    with pytest.raises(StudioError, match="no user 'bob'"):
        store.set_role("bob", "viewer")


def test_login_sessions_and_logout(store):
    store.add_user("ann", "a-long-password", "editor")
    assert store.authenticate("ann", "wrong-password") is None
    assert store.authenticate("nobody", "a-long-password") is None
    assert store.authenticate("ann", "a-long-password") == {"name": "ann", "role": "editor"}
    token, csrf = store.start_session("ann")
    assert store.session(token) == {"user": "ann", "role": "editor", "csrf": csrf}
    stored = store.db.execute("SELECT token FROM sessions").fetchone()[0]
    assert stored == hashlib.sha256(token.encode()).hexdigest()  # a copied database opens no session
    assert store.session(token + "x") is None and store.session(None) is None
    store.set_role("ann", "viewer")
    assert store.session(token)["role"] == "viewer"  # a role change applies at the next request
    store.end_session(token)
    assert store.session(token) is None


def test_sessions_expire_and_a_new_password_ends_them(store, monkeypatch):
    store.add_user("ann", "a-long-password", "editor")
    old, _ = store.start_session("ann")
    other, _ = store.start_session("ann")
    store.set_password("ann", "a-new-password")
    assert store.session(old) is None and store.session(other) is None
    assert store.authenticate("ann", "a-long-password") is None
    token, _ = store.start_session("ann")
    later = time.time() + store_module.SESSION_S + 1
    monkeypatch.setattr(store_module.time, "time", lambda: later)
    assert store.session(token) is None


def test_retry_after_doubles_past_the_free_failures():
    assert [retry_after(n) for n in range(FREE_FAILURES)] == [0.0] * FREE_FAILURES
    assert [retry_after(FREE_FAILURES + k) for k in range(3)] == [30.0, 60.0, 120.0]
    assert retry_after(FREE_FAILURES + 40) == store_module.MAX_DELAY_S


def test_ten_wrong_passwords_slow_the_next_tries_even_the_right_one(store, monkeypatch):
    store.add_user("ann", "a-long-password", "editor")
    now = [1000.0]
    monkeypatch.setattr(store_module.time, "time", lambda: now[0])
    for _ in range(FREE_FAILURES - 1):
        assert store.authenticate("ann", "wrong-password") is None
    assert store.authenticate("ann", "wrong-password") is None  # the tenth: tries now wait
    with pytest.raises(Throttled) as e:
        store.authenticate("ann", "a-long-password")
    assert e.value.seconds == pytest.approx(30.0)
    now[0] += 31
    assert store.authenticate("ann", "wrong-password") is None  # the eleventh: twice as long
    with pytest.raises(Throttled) as e:
        store.authenticate("ann", "a-long-password")
    assert e.value.seconds == pytest.approx(60.0)
    now[0] += 61
    assert store.authenticate("ann", "a-long-password")["name"] == "ann"
    assert store.authenticate("ann", "wrong-password") is None  # a success starts the count again
    assert store.authenticate("ann", "a-long-password")["name"] == "ann"


def test_unknown_names_are_throttled_alike(store, monkeypatch):
    for _ in range(FREE_FAILURES):
        assert store.authenticate("ghost", "whatever-pass") is None
    with pytest.raises(Throttled):
        store.authenticate("ghost", "whatever-pass")


def test_share_links_open_one_run_until_revoked(store):
    token = store.share("runs/a", "ann")
    assert store.shared_run(token) == "runs/a" and store.shared_run("nope") is None
    [link] = store.shares("runs/a")
    with pytest.raises(StudioError, match="no live share link"):
        store.revoke(link["id"], "runs/b")  # a link is revoked from its own run's page only
    store.revoke(link["id"], "runs/a")
    assert store.shared_run(token) is None
    with pytest.raises(StudioError):
        store.revoke(link["id"], "runs/a")


def test_a_store_from_a_newer_llmlab_is_refused(tmp_path):
    s = Store.open(tmp_path, create=True)
    s.db.execute("PRAGMA user_version=99")
    s.close()
    with pytest.raises(StudioError, match="newer llmlab"):
        Store(tmp_path)
    (tmp_path / ".llmlab" / "studio.sqlite").write_bytes(b"not a database" * 100)
    with pytest.raises(StudioError, match="not a readable studio database"):
        Store(tmp_path)


def test_user_commands(tmp_path, monkeypatch, capsys):
    ws = str(tmp_path / "ws")
    monkeypatch.setattr("sys.stdin", io.StringIO("a-long-password\n"))
    assert main(["studio", "user", "add", "ann", "--role", "admin", "--workspace", ws]) == 0
    monkeypatch.setattr("sys.stdin", io.StringIO("short\n"))
    assert main(["studio", "user", "add", "bob", "--role", "viewer", "--workspace", ws]) == 1
    assert "at least 8 characters" in capsys.readouterr().err
    assert main(["studio", "user", "role", "ann", "editor", "--workspace", ws]) == 0
    capsys.readouterr()
    assert main(["studio", "user", "list", "--workspace", ws]) == 0
    assert capsys.readouterr().out == "ann\teditor\n"
    assert main(["studio", "user", "remove", "bob", "--workspace", ws]) == 1
    assert "no user 'bob'" in capsys.readouterr().err
    assert main(["studio", "user", "list", "--workspace", str(tmp_path / "none")]) == 1
    assert "not a workspace" in capsys.readouterr().err
    assert not (tmp_path / "none").exists()  # only `user add` and the studio make a workspace


def test_the_studio_refuses_to_start_without_an_account(tmp_path, capsys):
    assert main(["studio", "--workspace", str(tmp_path / "ws"), "--port", str(free_port())]) == 1
    assert "no accounts yet" in capsys.readouterr().err
    assert main(["studio", "--workspace", str(tmp_path / "ws"), "--devices", "gpu0"]) == 1
    assert "--devices 'gpu0'" in capsys.readouterr().err
    import socket

    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        assert main(["studio", "--workspace", str(tmp_path / "other"), "--port", str(port)]) == 1
    assert "another server holds the port" in capsys.readouterr().err
    assert not (tmp_path / "other").exists()  # refused before anything is made
