"""`llmlab` run in this process with a time limit, and the checks of its one error line."""

from __future__ import annotations

import io
import signal
import sys

from llmlab.cli import main

SECONDS = 10  # per case: a bad input wrongly accepted starts training or serving, and must fail, not hang


class CaseTimeout(BaseException):  # not an Exception: the CLI's catch-all must not swallow it
    pass


def _alarm(signum, frame):
    raise CaseTimeout()


def run_cli(argv: list[str], seconds: int = SECONDS) -> tuple[int | str, str, str]:
    """(exit code or "timeout", stdout, stderr) of `llmlab ARGV` run in this process, stopped after `seconds`."""
    out, err = io.StringIO(), io.StringIO()
    saved = sys.stdout, sys.stderr, sys.stdin
    sys.stdout, sys.stderr, sys.stdin = out, err, io.StringIO("hello\n/exit\n")
    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(seconds)
    try:
        code = main(argv)
    except SystemExit as e:
        code = 0 if e.code is None else e.code if isinstance(e.code, int) else 1
    except CaseTimeout:
        code = "timeout"
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
        sys.stdout, sys.stderr, sys.stdin = saved
    return code, out.getvalue(), err.getvalue()


def needle_problems(needle: str, line: str) -> list[str]:
    """What `line` lacks of `needle`: `a && b` needs both, `a||b` either, `!a` forbids a."""
    problems = []
    for part in (p.strip() for p in needle.split("&&")):
        if part.startswith("!"):
            if part[1:] in line:
                problems.append(f"names {part[1:]!r}, which it must not")
        elif not any(choice in line for choice in part.split("||")):
            problems.append(f"does not contain {part!r}")
    return problems
