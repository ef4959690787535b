"""Studio fixtures: a workspace with three accounts and a prepared corpus, the studio served in a
thread (`Served`) or as `llmlab studio` in a child process (`StudioProcess`), and logged-in clients."""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

try:
    import httpx
except ImportError:  # openai 3 ships its HTTP client as httpx2
    httpx = pytest.importorskip("httpx2")
uvicorn = pytest.importorskip("uvicorn")
pytest.importorskip("plotly")

from llmlab.studio.app import create_app
from llmlab.studio.store import Store
from llmlab.studio.web import Studio

PASSWORDS = {"ann": "admin-pass-1", "ed": "editor-pass-1", "vic": "viewer-pass-1"}
ROLES = {"ann": "admin", "ed": "editor", "vic": "viewer"}
WORDS = "the cat sat on a mat and a dog ran far away from home while birds sang in tall green trees".split()


def corpus_lines(n: int = 300, seed: int = 0) -> str:
    rng = random.Random(seed)
    return "".join(json.dumps({"text": " ".join(rng.choice(WORDS) for _ in range(40))}) + "\n" for _ in range(n))


def make_workspace(root: Path) -> Path:
    store = Store.open(root, create=True)
    for name, password in PASSWORDS.items():
        store.add_user(name, password, ROLES[name])
    store.close()
    return root


@pytest.fixture(scope="session")
def prepared(tmp_path_factory) -> Path:
    """A tokenizer and prepared data (tokenizers/tiny, data/tiny), made once and copied into workspaces."""
    from llmlab.cli import main

    root = tmp_path_factory.mktemp("prepared")
    (root / "corpus.jsonl").write_text(corpus_lines())
    cwd = os.getcwd()
    os.chdir(root)
    try:
        assert main(["tokenizer", "train", "inputs=[corpus.jsonl]", "out_dir=tokenizers/tiny", "vocab_size=300"]) == 0
        assert main(["data", "prepare", "inputs=[corpus.jsonl]", "out_dir=data/tiny", "tokenizer=tokenizers/tiny",
                     "val_frac=0.1"]) == 0
    finally:
        os.chdir(cwd)
    return root


@pytest.fixture
def workspace(tmp_path, prepared) -> Path:
    ws = make_workspace(tmp_path / "ws")
    for part in ("tokenizers", "data"):
        shutil.copytree(prepared / part, ws / part)
    manifest = ws / "data" / "tiny" / "manifest.json"  # the tokenizer of the copy is the workspace's
    data = json.loads(manifest.read_text())
    data["tokenizer_path"] = str(ws / "tokenizers" / "tiny")
    manifest.write_text(json.dumps(data))
    return ws


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Client:
    """An HTTP client of the studio, logged in as one account, that sends the CSRF token."""

    def __init__(self, url: str, user: str | None = None):
        self.http = httpx.Client(base_url=url, follow_redirects=False, timeout=60)
        self.csrf = ""
        if user:
            reply = self.http.post("/login", data={"name": user, "password": PASSWORDS[user]})
            assert reply.status_code == 303, reply.text
            page = self.http.get("/", headers={"accept": "text/html"}).text
            self.csrf = re.search(r'name="csrf" content="([^"]+)"', page).group(1)

    def get(self, path: str, **kw):
        return self.http.get(path, headers={"accept": "text/html", **kw.pop("headers", {})}, **kw)

    def post(self, path: str, csrf: bool = True, **kw):
        headers = {"x-csrf-token": self.csrf} if csrf else {}
        return self.http.post(path, headers={**headers, **kw.pop("headers", {})}, **kw)

    def wait_job(self, job: int, timeout: float = 120) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = self.http.get(f"/jobs/{job}/log").json()
            if state["status"] not in ("queued", "running"):
                return state
            time.sleep(0.3)
        raise AssertionError(f"job {job} still {state['status']} after {timeout} s:\n{state['log'][-2000:]}")


class Served:
    """The studio of a workspace, served by uvicorn in a thread of the test process."""

    def __init__(self, workspace: Path, **settings):
        self.studio = Studio(workspace, **settings)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(create_app(self.studio), host="127.0.0.1", port=self.port,
                                                    log_level="error"))

    def __enter__(self) -> Served:
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        for _ in range(500):
            if self.server.started:
                return self
            time.sleep(0.02)
        raise RuntimeError("the studio did not start")

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=10)

    def client(self, user: str | None = None) -> Client:
        return Client(self.url, user)


@pytest.fixture
def served(workspace):
    with Served(workspace) as s:
        yield s


class StudioProcess:
    """`llmlab studio` in a child process, as a user starts it."""

    def __init__(self, workspace: Path, port: int | None = None):
        self.workspace = workspace
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(workspace / f"studio-{self.port}.log", "ab")
        self.process = subprocess.Popen([sys.executable, "-m", "llmlab", "studio", "--workspace", str(workspace),
                                         "--port", str(self.port), "--devices", "cpu"], stdout=self.log,
                                        stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if self.process.poll() is not None:
                break
            time.sleep(0.1)
        self.kill()
        raise RuntimeError(f"llmlab studio did not start: {(workspace / f'studio-{self.port}.log').read_text()}")

    def kill(self, signum: int = signal.SIGKILL) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signum)
            self.process.wait(timeout=30)
        self.log.close()

    def client(self, user: str | None = None) -> Client:
        return Client(self.url, user)
