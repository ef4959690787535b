"""Chat templates that came with a checkpoint or a file render here: in a child process, under a
time budget, a memory limit and an output cap.

Jinja's sandbox stops a template from reaching Python's internals, but not from looping: three
nested `range(50000)` loops each pass its range limit and together never end, and
`'x' * 10**10` asks for ten gigabytes in one C call that no timer interrupts. So a template
renders in a long-lived child (`python -I sandbox.py`, which imports only the standard library
and Jinja) that ignores Ctrl-C, exits when its stdin closes, limits its own address space, and
arms a timer for each render. The parent waits the budget plus a grace period, then kills the
child and starts a new one for the next render: a runaway template fails its own call with a
`ChatTemplateError`, and never the process that asked.

Wire format: each message is 4 bytes of big-endian length, then that many bytes of JSON. A request
is {"source", "renders": [...], "seconds", "max_chars"}, where a chat render is {"messages",
"add_generation_prompt", "bos_token", "eos_token"} and any other is {"variables": {...}, "strict":
bool} (strict: an undefined name is an error, as evaluation task templates want); each render has
`seconds` of its own. The answer is {"texts": [...]} or {"error": "...", "index": the failed render}.

This file runs as a script in the child; `Sandbox` below is the parent's side.
"""

from __future__ import annotations

import atexit
import json
import os
import select
import signal
import struct
import subprocess
import sys
import threading
import time

BUDGET_SECONDS = 1.0  # wall time one render may take
MAX_CHARS = 4 << 20  # the longest rendered prompt
MEMORY_BYTES = 1 << 30  # address space the child may add to what it starts with
GRACE_SECONDS = 2.0  # how much longer than the budget the parent waits before it kills the child


class RenderError(Exception):
    """A template that failed in the child: the message says why, `index` which render failed."""

    def __init__(self, message: str, index: int | None = None):
        super().__init__(message)
        self.index = index


# --------------------------------------------------------------------------- the child


class _OverBudget(BaseException):  # not an Exception: a template's own error handling cannot catch it
    pass


class _Raised(Exception):  # raise_exception() called by the template
    pass


def _child() -> None:
    import resource

    from jinja2 import StrictUndefined, TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    if os.path.exists("/proc/self/statm"):  # cap the address space above what the interpreter has now
        with open("/proc/self/statm") as f:
            start = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
        resource.setrlimit(resource.RLIMIT_AS, (start + MEMORY_BYTES, resource.RLIM_INFINITY))

    def over_budget(signum, frame):
        raise _OverBudget()

    def raise_exception(message):
        raise _Raised(str(message))

    def regex_replace(text, pattern, replacement, count=0):  # lm-evaluation-harness's filter
        import re

        return re.sub(pattern, replacement, text, count=count)

    signal.signal(signal.SIGALRM, over_budget)
    envs = {}
    for strict in (False, True):
        env = ImmutableSandboxedEnvironment(trim_blocks=False, lstrip_blocks=False, keep_trailing_newline=True,
                                            **({"undefined": StrictUndefined} if strict else {}))
        env.globals["raise_exception"] = raise_exception
        env.filters["regex_replace"] = regex_replace
        envs[strict] = env
    compiled: dict[tuple[bool, str], object] = {}
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    while True:
        request = _read(stdin)
        if request is None:  # the parent closed the pipe: it is gone or done
            return
        seconds, max_chars = float(request["seconds"]), int(request["max_chars"])
        renders, texts = request["renders"], []
        try:
            for r in renders:
                signal.setitimer(signal.ITIMER_REAL, seconds)  # each render its own budget
                try:
                    key = (bool(r.get("strict")), request["source"])
                    if key not in compiled:
                        if len(compiled) >= 16:
                            compiled.clear()
                        compiled[key] = envs[key[0]].from_string(key[1])
                    texts.append(_render(compiled[key], r, max_chars))
                finally:
                    signal.setitimer(signal.ITIMER_REAL, 0)
            answer = {"texts": texts}
        except _OverBudget:
            answer = {"error": f"rendering took more than its budget of {seconds:g} s"}
        except _Raised as e:
            answer = {"error": str(e)}
        except TemplateError as e:
            answer = {"error": f"failed to render: {e}"}
        except RecursionError:
            answer = {"error": "failed to render: it nests or recurses too deeply"}
        except MemoryError:
            answer = {"error": f"rendering needed more than {MEMORY_BYTES >> 20} MiB"}
        except Exception as e:  # SecurityError, TypeError... from the template's own code
            answer = {"error": f"failed to render: {type(e).__name__}: {e}"}
        if "error" in answer:
            answer["index"] = len(texts)
        _write(stdout, answer)


def _render(template, request: dict, max_chars: int) -> str:
    parts, size = [], 0
    variables = request["variables"] if "variables" in request else {
        "messages": request["messages"], "add_generation_prompt": request["add_generation_prompt"],
        "bos_token": request["bos_token"], "eos_token": request["eos_token"]}
    for part in template.generate(**variables):
        size += len(part)
        if size > max_chars:
            raise _Raised(f"the rendered prompt is longer than {max_chars} characters")
        parts.append(part)
    return "".join(parts)


def _read(stream) -> dict | None:
    head = stream.read(4)
    if len(head) < 4:
        return None
    (size,) = struct.unpack(">I", head)
    return json.loads(stream.read(size))


def _write(stream, message: dict) -> None:
    data = json.dumps(message).encode()
    stream.write(struct.pack(">I", len(data)) + data)
    stream.flush()


# --------------------------------------------------------------------------- the parent


class Sandbox:
    """The parent's handle on one render child, started on first use and restarted after a kill.
    Thread-safe: renders from several threads take turns."""

    def __init__(self, seconds: float = BUDGET_SECONDS, max_chars: int = MAX_CHARS):
        self.seconds, self.max_chars = seconds, max_chars
        self._process: subprocess.Popen | None = None
        self._owner = 0  # the pid that started the child: a forked copy of this object starts its own
        self._lock = threading.Lock()

    def render(self, source: str, renders: list[dict]) -> list[str]:
        """The texts of `renders` (see the module's wire format) through template `source`.

        Raises:
            RenderError: the template failed, ran over its budget or memory, or killed its child.
        """
        request = {"source": source, "renders": renders, "seconds": self.seconds, "max_chars": self.max_chars}
        with self._lock:
            process = self._start()
            try:
                _write(process.stdin, request)
            except (BrokenPipeError, OSError):
                self._stop()
                raise RenderError("its render process died") from None
            answer = self._answer(process, self.seconds * max(1, len(renders)) + GRACE_SECONDS)
        if "error" in answer:
            raise RenderError(answer["error"], answer.get("index"))
        return answer["texts"]

    def close(self) -> None:
        with self._lock:
            self._stop()

    def _start(self) -> subprocess.Popen:
        if self._owner != os.getpid():  # in a forked process the pipes are the parent's: never share them
            self._process = None
        if self._process is None or self._process.poll() is not None:
            if self._owner == 0:
                atexit.register(self.close)
            self._process = subprocess.Popen([sys.executable, "-I", os.path.abspath(__file__)],
                                             stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                             stderr=subprocess.DEVNULL, close_fds=True)
            self._owner = os.getpid()
        return self._process

    def _answer(self, process: subprocess.Popen, seconds: float) -> dict:
        deadline = time.monotonic() + seconds
        fd = process.stdout.fileno()
        while True:
            left = deadline - time.monotonic()
            ready = select.select([fd], [], [], max(0.0, left))[0] if left > 0 else []
            if ready:
                answer = _read(process.stdout)
                if answer is None:  # the child died: a C-level crash or the kernel's memory limit
                    self._stop()
                    raise RenderError("it crashed its render process")
                return answer
            if left <= 0:
                self._stop()
                raise RenderError(f"rendering took more than its budget of {self.seconds:g} s")

    def _stop(self) -> None:
        process, self._process = self._process, None
        if process is None or self._owner != os.getpid():
            return
        process.kill()
        process.wait()
        for stream in (process.stdin, process.stdout):
            try:
                stream.close()
            except OSError:
                pass


if __name__ == "__main__":
    _child()
