"""Every bad request of `server_cases.txt` against one real uvicorn server with a tiny model: the status,
an OpenAI-shaped error naming the field, a server that keeps answering and logs no error; client
disconnects that log nothing; and a runaway chat template that fails its request without stalling
the server, which SIGINT then stops."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.hardening.workspace import busy_port
from tests.serve.test_server import Server as ServeServer

uvicorn = pytest.importorskip("uvicorn")
try:
    import httpx
except ImportError:  # openai 3 ships its HTTP client as httpx2
    httpx = pytest.importorskip("httpx2")

TABLE = Path(__file__).with_name("server_cases.txt")
KEY = "sk-hardening-Key-1"


def read_cases(path: Path) -> list:
    cases = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        status, needle, request, *headers = (part.strip() for part in line.split(" | "))
        method, route, body = request.split(" ", 2)
        cases.append(pytest.param(int(status), needle, method, route, body, headers[0] if headers else "{}",
                                  id=f"{number}-{method}-{route.strip('/').replace('/', '.')}"))
    return cases


CASES = read_cases(TABLE)


def expand(body: str) -> bytes:
    """The request body a table line describes (see the macros in server_cases.txt)."""
    if body == "-":
        return b""
    body = re.sub(r"\$NEST\((\d+)\)", lambda m: "[" * int(m.group(1)) + "]" * int(m.group(1)), body)
    body = re.sub(r"\$OBJ\((\d+)\)", lambda m: '{"a": ' * int(m.group(1)) + "1" + "}" * int(m.group(1)), body)
    body = re.sub(r"\$TEXT\((\d+)\)", lambda m: "a" * int(m.group(1)), body)
    body = re.sub(r"\$DIGITS\((\d+)\)", lambda m: "9" * int(m.group(1)), body)
    body = re.sub(r"\$REPEAT\((.*?), (\d+)\)", lambda m: ", ".join([m.group(1)] * int(m.group(2))), body)
    return body.encode().replace(b"$LATIN1", b"\xe9")


class ErrorLog(logging.Handler):
    """Collects the server's log records at ERROR and above (a traceback is logged as one)."""

    def __init__(self):
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record):
        self.records.append(record)


class Server(ServeServer):
    """`llmlab serve` in this process as `tests/serve/test_server.py` runs it (uvicorn in a thread), with
    the server's error log collected for the cases to check."""

    def __init__(self, checkpoint: str, **overrides):
        super().__init__(checkpoint, **{"api_key": KEY, "max_batch": 4, "max_queue": 16, **overrides})
        self.log = ErrorLog()

    def __enter__(self):
        super().__enter__()
        for name in LOGGERS:
            logging.getLogger(name).addHandler(self.log)
        return self

    def __exit__(self, *exc):
        for name in LOGGERS:
            logging.getLogger(name).removeHandler(self.log)
        super().__exit__(*exc)


LOGGERS = ("", "uvicorn", "uvicorn.error", "uvicorn.access", "fastapi")


def _free_port() -> int:
    s, port = busy_port()
    s.close()
    return port


@pytest.fixture(scope="module")
def server(hardening_workspace):
    with Server(hardening_workspace.values["ckpt"]) as s:
        yield s


def test_the_table_covers_the_api():
    routes = {c.values[3] for c in CASES}
    assert {"/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/tokenizer_info", "/tokenize",
            "/detokenize"} <= routes
    assert len(CASES) >= 100


@pytest.mark.parametrize("status, needle, method, route, body, headers", CASES)
def test_bad_request(server, status, needle, method, route, body, headers):
    content = expand(body)
    sent = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    for name, value in json.loads(headers).items():
        if value is None:
            sent.pop(name, None)
        else:
            sent[name] = value
    logged = len(server.log.records)
    r = httpx.request(method, server.url + route, content=content, headers=sent, timeout=60)

    problems = []
    if r.status_code != status:
        problems.append(f"status {r.status_code}, expected {status}")
    try:
        error = r.json()["error"]
        assert isinstance(error, dict) and {"message", "type", "param", "code"} <= error.keys()
    except Exception:
        error = None
        problems.append("the body is not an OpenAI error ({'error': {message, type, param, code}})")
    if error is not None:
        message = str(error["message"])
        for part in (p.strip() for p in needle.split("&&")):
            if part not in message:
                problems.append(f"the message does not contain {part!r}")
        if "\n" in message:
            problems.append("the message spans several lines")
        fields = _fields(content)
        if needle in fields and error["param"] != needle:
            problems.append(f"param is {error['param']!r}, expected {needle!r}")
    try:
        health = httpx.get(server.url + "/health", timeout=10).status_code
    except httpx.HTTPError as e:
        health = repr(e)
    if health != 200:
        problems.append(f"/health then answered {health}")
    time.sleep(0.01)  # let the server log what it logs after answering
    errors = server.log.records[logged:]
    if errors:
        problems.append(f"the server logged {len(errors)} error(s): {errors[0].getMessage()[:200]}")
    assert not problems, "; ".join(problems) + f"\n  response: {r.status_code} {r.text[:400]}"


def _fields(content: bytes) -> set[str]:
    try:
        body = json.loads(content)
    except (ValueError, RecursionError):
        return set()
    return set(body) if isinstance(body, dict) else set()


def test_client_disconnects_log_nothing(server, capsys):
    """A stream closed after its first chunk and a request abandoned before its answer: the rows are
    freed, nothing is logged as an error and no traceback reaches stderr."""
    logged = len(server.log.records)
    headers = {"Authorization": f"Bearer {KEY}"}
    scheduler = server.worker.scheduler
    decode = scheduler._decode
    scheduler._decode = lambda tokens: (time.sleep(0.02), decode(tokens))[1]  # 100 tokens take 2 s
    try:
        _disconnect(server, headers)
    finally:
        scheduler._decode = decode
    assert [r.getMessage()[:200] for r in server.log.records[logged:]] == []
    err = capsys.readouterr().err
    assert "Traceback" not in err, err[-2000:]


def _disconnect(server, headers):
    with httpx.stream("POST", server.url + "/v1/completions", headers=headers,
                      json={"prompt": "Hello", "max_tokens": 100, "stream": True, "temperature": 0}) as r:
        next(r.iter_lines())
    with pytest.raises(httpx.TimeoutException):
        httpx.post(server.url + "/v1/completions", headers=headers, timeout=0.2,
                   json={"prompt": "Hello", "max_tokens": 100, "temperature": 0})
    deadline = time.time() + 10
    while server.worker.scheduler.busy and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(1.0)  # the abandoned request notices its client is gone within half a second
    assert not server.worker.scheduler.busy, "the disconnected clients' rows are still decoding"
    assert httpx.get(server.url + "/health").status_code == 200


def test_a_runaway_template_fails_its_request_while_the_server_keeps_serving(hardening_workspace):
    """Nested loops whose product no budget allows: the chat request fails with a 400 naming the
    template, /health and completions keep answering meanwhile, and SIGINT stops the server."""
    ws = hardening_workspace.values
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    process = subprocess.Popen([sys.executable, "-m", "llmlab", "serve", ws["ckpt"], "--device", "cpu", "--port",
                                str(port), "--template", ws["runaway"]], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env={**os.environ, "NO_COLOR": "1"})
    try:
        deadline = time.time() + 60
        while True:
            assert process.poll() is None, process.communicate()[1][-2000:]
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.time() < deadline, "the server did not start"
            time.sleep(0.2)
        answer = {}

        def chat():
            t0 = time.time()
            try:
                answer["response"] = httpx.post(url + "/v1/chat/completions", timeout=120,
                                                json={"messages": [{"role": "user", "content": "hi"}]})
            except httpx.HTTPError as e:
                answer["response"] = e
            answer["seconds"] = time.time() - t0

        thread = threading.Thread(target=chat)
        thread.start()
        time.sleep(0.5)  # the template is rendering now
        for _ in range(3):
            try:
                assert httpx.get(url + "/health", timeout=5).status_code == 200
                r = httpx.post(url + "/v1/completions", json={"prompt": "Hello", "max_tokens": 2}, timeout=10)
            except httpx.TimeoutException:
                pytest.fail("the server stopped answering while the runaway template rendered")
            assert r.status_code == 200, r.text[:400]
        thread.join(timeout=60)
        assert not thread.is_alive(), "the runaway template's request never finished"
        r = answer["response"]
        assert isinstance(r, httpx.Response), r
        assert r.status_code == 400 and "template" in r.json()["error"]["message"], r.text[:400]
        assert answer["seconds"] < 30
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            pytest.fail("SIGINT did not stop the server within 15 s")
        assert "Traceback" not in process.stderr.read()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
